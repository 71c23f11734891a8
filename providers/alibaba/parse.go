package alibaba

import (
	"fmt"
	"strings"
	"time"

	"github.com/preemptd/preemptd/agent"
	"github.com/preemptd/preemptd/providers/internal/emit"
)

// IDTermination is the ID of the spot release notice.
const IDTermination = "spot/termination-time"

// ParseTerminationTime reads instance/spot/termination-time: the time the
// spot instance is released, in UTC, as yyyy-MM-ddThh:mm:ssZ (Alibaba
// Cloud's ECS documentation, "Preemptible instances: interruption
// notices"); it is set about five minutes before the release.
func ParseTerminationTime(b []byte, now time.Time) (agent.Notice, error) {
	s := strings.TrimSpace(string(b))
	at, err := time.Parse(time.RFC3339, s)
	if err != nil {
		return agent.Notice{}, fmt.Errorf("instance/spot/termination-time: %q is not a time like 2015-01-05T18:02:00Z", emit.Truncate(s, 64))
	}
	return agent.Notice{Provider: "alibaba", Kind: agent.KindTerminate, ID: IDTermination, Action: "release",
		NoticedAt: now, Deadline: at, Raw: agent.RawString(s)}, nil
}
