package e2e

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/preemptd/preemptd/agent"
	"github.com/preemptd/preemptd/test/fakes"
)

// fault is one kind of metadata failure.
type fault string

const (
	faultNone     fault = "none"
	fault5xx      fault = "5xx"
	fault401      fault = "401"
	faultHang     fault = "timeout"
	faultGarbage  fault = "garbage"
	faultRefused  fault = "refused"
	faultEmpty    fault = "empty"
	faultTruncate fault = "reset"
)

var faultCycle = []fault{fault5xx, faultNone, fault401, faultHang, faultNone, faultGarbage, faultRefused,
	faultNone, faultEmpty, faultTruncate, faultNone}

// flaky serves next on a fixed port and injects the current fault; for
// "refused" it closes its listener so that connections are refused.
type flaky struct {
	addr     string
	next     http.Handler
	mu       sync.Mutex
	cur      fault
	srv      *http.Server
	failures atomic.Int64
}

func newFlaky(t *testing.T, next http.Handler) *flaky {
	t.Helper()
	f := &flaky{next: next, cur: faultNone}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f.addr = l.Addr().String()
	f.serve(l)
	t.Cleanup(func() { f.set(faultRefused) })
	return f
}

func (f *flaky) serve(l net.Listener) {
	f.srv = &http.Server{Handler: f}
	go f.srv.Serve(l)
}

func (f *flaky) url() string { return "http://" + f.addr }

func (f *flaky) set(k fault) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.cur == faultRefused && k != faultRefused {
		for range 50 {
			l, err := net.Listen("tcp", f.addr)
			if err == nil {
				f.serve(l)
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	if k == faultRefused && f.cur != faultRefused && f.srv != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
		f.srv.Shutdown(ctx)
		cancel()
		f.srv.Close()
	}
	f.cur = k
}

func (f *flaky) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	k := f.cur
	f.mu.Unlock()
	if k != faultNone {
		f.failures.Add(1)
	}
	switch k {
	case faultNone:
		f.next.ServeHTTP(w, r)
	case fault5xx:
		http.Error(w, "SlowDown", http.StatusServiceUnavailable)
	case fault401:
		http.Error(w, "", http.StatusUnauthorized)
	case faultHang:
		select {
		case <-r.Context().Done():
		case <-time.After(4 * time.Second):
		}
		http.Error(w, "", http.StatusGatewayTimeout)
	case faultGarbage:
		w.Header().Set("Metadata-Flavor", "Google")
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprint(w, "TRUE\x00{\"action\":\"terminate\",\"Events\":[{\"EventId\":<html>")
	case faultEmpty:
		w.Header().Set("Metadata-Flavor", "Google")
	case faultTruncate:
		hj, ok := w.(http.Hijacker)
		if !ok {
			return
		}
		c, buf, err := hj.Hijack()
		if err != nil {
			return
		}
		buf.WriteString("HTTP/1.1 200 OK\r\nContent-Length: 500\r\nMetadata-Flavor: Google\r\n\r\nTRU")
		buf.Flush()
		c.Close()
	}
}

// TestMetadataFaults runs a daemon per cloud against its metadata service
// while that service cycles through every kind of failure (30 s; 6 s with
// -short): no notice, no signal, no exit, a log that stays short and valid;
// afterwards a real notice still gets through.
func TestMetadataFaults(t *testing.T) {
	dur := 30 * time.Second
	if testing.Short() {
		dur = 6 * time.Second
	}
	requireAEMM(t)
	far := time.Now().Add(time.Hour).UTC().Format(time.RFC3339)
	aemm := startAEMM(t, "-I", "--mock-trigger-time", far, "--rebalance-trigger-time", far, "spot")
	aemmURL, _ := url.Parse(aemm)
	gcp := fakes.NewGCP()
	gcp.HangLimit = 500 * time.Millisecond
	azure := fakes.NewAzure("vm-mine")
	azure.SetEvents(fakes.AzureEvent{EventId: "not-ours", EventType: "Preempt", Resources: []string{"vm-other"},
		EventStatus: "Scheduled", NotBefore: time.Now().Add(time.Minute).UTC().Format(time.RFC1123)})

	type cloud struct {
		name   string
		flaky  *flaky
		cfg    func(endpoint string) string
		notice func()
		tr     *trainer
		d      *daemon
	}
	clouds := []*cloud{
		{name: "aws", flaky: newFlaky(t, httputil.NewSingleHostReverseProxy(aemmURL)),
			cfg: func(ep string) string { return fmt.Sprintf("provider: aws\naws: {endpoint: %q}\n", ep) }},
		{name: "gcp", flaky: newFlaky(t, gcp),
			cfg:    func(ep string) string { return fmt.Sprintf("provider: gcp\ngcp: {endpoint: %q}\n", ep) },
			notice: func() { gcp.Set("instance/preempted", "TRUE") }},
		{name: "azure", flaky: newFlaky(t, azure),
			cfg: func(ep string) string { return fmt.Sprintf("provider: azure\nazure: {endpoint: %q}\n", ep) },
			notice: func() {
				azure.SetEvents(fakes.AzureEvent{EventId: "ours", EventType: "Preempt", Resources: []string{"vm-mine"},
					EventStatus: "Scheduled", NotBefore: time.Now().Add(30 * time.Second).UTC().Format(time.RFC1123)})
			}},
	}
	for _, c := range clouds {
		dir := shortDir(t)
		c.tr = startTrainer(t, filepath.Join(dir, "run", agent.NoticeFileName))
		c.d = startDaemonIn(t, dir, c.cfg(c.flaky.url())+fmt.Sprintf("trainer: {pid_file: %q}\n", c.tr.pidFile))
	}

	step := 1500 * time.Millisecond
	var injected []fault
	for start, i := time.Now(), 0; time.Since(start) < dur; i++ {
		k := faultCycle[i%len(faultCycle)]
		injected = append(injected, k)
		for _, c := range clouds {
			c.flaky.set(k)
		}
		time.Sleep(step)
	}
	for _, c := range clouds {
		c.flaky.set(faultNone)
	}
	t.Logf("faults injected over %v: %v", dur, injected)
	var lines []string
	defer func() {
		chaos(t, fmt.Sprintf("metadata: %v for %v (aws via AEMM, gcp, azure)", faultCycle, dur), strings.Join(lines, "; "))
	}()

	for _, c := range clouds {
		select {
		case <-c.d.exited:
			t.Fatalf("%s: preemptd exited during faults: %v", c.name, c.d.err)
		default:
		}
		if rs := c.tr.records(); len(rs) != 0 {
			t.Fatalf("%s: false alarm, trainer got %+v", c.name, rs)
		}
		st := c.d.status()
		if len(st.Notices) != 0 || st.Emergency != nil {
			t.Fatalf("%s: notices after faults: %+v", c.name, st)
		}
		logLines := c.d.logLines()
		failures := c.flaky.failures.Load()
		t.Logf("%s: %d failed metadata requests, %d log lines", c.name, failures, len(logLines))
		if failures < 3 {
			t.Fatalf("%s: only %d failed requests; the faults did not reach the daemon", c.name, failures)
		}
		if int64(len(logLines)) > 12+2*int64(len(injected)) {
			t.Fatalf("%s: %d log lines for %d fault phases: flooding", c.name, len(logLines), len(injected))
		}
		lines = append(lines, fmt.Sprintf("%s: no notice, no exit, %d log lines for %d failed requests", c.name, len(logLines), failures))
	}

	// The services recover: a real notice gets through.
	for _, c := range clouds {
		if c.notice == nil {
			continue // AEMM's notice is an hour away
		}
		c.notice()
		r := c.tr.waitSignal(20 * time.Second)
		if r.Signal != "SIGTERM" {
			t.Fatalf("%s: after recovery got %+v", c.name, r)
		}
	}
	if st := clouds[0].d.status(); st.State != "watching" {
		t.Fatalf("aws after faults: %+v", st)
	}
	lines = append(lines, "real notices delivered afterwards")
}
