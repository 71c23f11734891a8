package tencent

import (
	"fmt"
	"strings"
	"time"

	"github.com/preemptd/preemptd/agent"
	"github.com/preemptd/preemptd/providers/internal/emit"
)

// IDTermination is the ID of the spot reclaim notice.
const IDTermination = "spot/termination-time"

// beijing is the zone Tencent Cloud writes spot/termination-time in:
// China Standard Time, UTC+8 all year (no daylight saving).
var beijing = time.FixedZone("UTC+8", 8*60*60)

// ParseTerminationTime reads spot/termination-time: the time the spot
// instance is reclaimed, like 2018-08-18 12:05:33, which Tencent Cloud's
// documentation gives in Beijing time (UTC+8), not UTC: read as UTC it
// would put the deadline eight hours late. A time with its own offset
// (RFC 3339) is taken as it says.
func ParseTerminationTime(b []byte, now time.Time) (agent.Notice, error) {
	s := strings.TrimSpace(string(b))
	at, err := time.ParseInLocation(time.DateTime, s, beijing)
	if err != nil {
		if at, err = time.Parse(time.RFC3339, s); err != nil {
			return agent.Notice{}, fmt.Errorf("spot/termination-time: %q is not a time like 2018-08-18 12:05:33 (UTC+8)", emit.Truncate(s, 64))
		}
	}
	return agent.Notice{Provider: "tencent", Kind: agent.KindTerminate, ID: IDTermination, Action: "reclaim",
		NoticedAt: now, Deadline: at.UTC(), Raw: agent.RawString(s)}, nil
}
