package providers

import (
	"bufio"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/preemptd/preemptd/agent"
)

// LocalInstance is what is known of the machine without a cloud: its
// hostname and boot time (from /proc/stat).
func LocalInstance(provider string) agent.Instance {
	h, _ := os.Hostname()
	return agent.Instance{Provider: provider, Hostname: h, StartedAt: bootTime("/proc/stat")}
}

func bootTime(stat string) time.Time {
	f, err := os.Open(stat)
	if err != nil {
		return time.Time{}
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "btime "); ok {
			if s, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64); err == nil {
				return time.Unix(s, 0).UTC()
			}
		}
	}
	return time.Time{}
}
