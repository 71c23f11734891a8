package bench

import (
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/preemptd/preemptd/test/peers"
)

func procStat(t *testing.T, pid int) (rssKB int, cpu time.Duration) {
	t.Helper()
	rssKB = statusKB(pid, "VmRSS:")
	return rssKB, procCPU(pid)
}

// statusKB reads one kB field of /proc/<pid>/status.
func statusKB(pid int, field string) int {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, field); ok {
			n, _ := strconv.Atoi(strings.Fields(v)[0])
			return n
		}
	}
	return 0
}

func procCPU(pid int) time.Duration {
	s, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	f := strings.Fields(string(s)[strings.LastIndexByte(string(s), ')')+2:])
	ut, _ := strconv.Atoi(f[11])
	st, _ := strconv.Atoi(f[12])
	return time.Duration(ut+st) * time.Second / 100 // USER_HZ = 100
}

// TestIdleFootprint: preemptd polling AEMM (IMDSv2) every second for five
// minutes with nothing to report: RSS, CPU, requests per minute; and the
// binary's size.
func TestIdleFootprint(t *testing.T) {
	requireBench(t)
	dur := 5 * time.Minute
	if v := os.Getenv("BENCH_IDLE"); v != "" {
		dur, _ = time.ParseDuration(v)
	}
	aemm := peers.Require(t, "ec2-metadata-mock", peers.AEMMVersion)
	dir := t.TempDir()
	port := peers.FreePort(t)
	far := time.Now().Add(time.Hour).UTC().Format(time.RFC3339)
	start(t, []string{"HOME=" + dir}, aemm, "-n", "127.0.0.1", "-p", fmt.Sprint(port), "-I", "--mock-trigger-time", far, "--rebalance-trigger-time", far, "spot")
	peers.WaitListening(t, fmt.Sprintf("127.0.0.1:%d", port), 10*time.Second)
	up, _ := url.Parse(fmt.Sprintf("http://127.0.0.1:%d", port))
	var requests atomic.Int64
	rp := httputil.NewSingleHostReverseProxy(up)
	counter := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		requests.Add(1)
		rp.ServeHTTP(w, r)
	}))
	defer counter.Close()
	d := daemon(t, dir, fmt.Sprintf("provider: aws\naws: {endpoint: %q}\n", counter.URL))
	time.Sleep(5 * time.Second) // start-up done
	pid := d.cmd.Process.Pid
	_, cpu0 := procStat(t, pid)
	req0 := requests.Load()
	var peak int
	for end := time.Now().Add(dur); time.Now().Before(end); time.Sleep(5 * time.Second) {
		rss, _ := procStat(t, pid)
		peak = max(peak, rss)
	}
	rss, cpu1 := procStat(t, pid)
	anon, file := statusKB(pid, "RssAnon:"), statusKB(pid, "RssFile:")
	peak = max(peak, rss)
	perMin := float64(requests.Load()-req0) / dur.Minutes()
	bin, _ := binaries(t)
	st, _ := os.Stat(bin)
	var b strings.Builder
	fmt.Fprintf(&b, "### Idle footprint (%s)\n\n", time.Now().UTC().Format("2006-01-02"))
	fmt.Fprintf(&b, "Machine: %s. preemptd polling amazon-ec2-metadata-mock (IMDSv2, no notice due) every 1 s for %v, through a counting proxy.\n\n", machine(), dur)
	fmt.Fprintf(&b, "| measure | value |\n|---|---|\n")
	fmt.Fprintf(&b, "| RSS at the end / peak | %.1f MiB / %.1f MiB |\n", float64(rss)/1024, float64(peak)/1024)
	fmt.Fprintf(&b, "| RSS at the end: anonymous / file-backed (the binary's pages, libc) | %.1f MiB / %.1f MiB |\n", float64(anon)/1024, float64(file)/1024)
	fmt.Fprintf(&b, "| CPU time over %v | %v (%.3f%% of one core) |\n", dur, (cpu1 - cpu0), 100*(cpu1-cpu0).Seconds()/dur.Seconds())
	fmt.Fprintf(&b, "| metadata requests per minute | %.0f (spot notice and rebalance every 1 s; scheduled events and lifecycle state every 5 s; a token every 5 minutes) |\n", perMin)
	fmt.Fprintf(&b, "| binary size (`-s -w`, cgo, dynamically linked) | %.1f MiB |\n", float64(st.Size())/(1<<20))
	appendResults(t, b.String())
}
