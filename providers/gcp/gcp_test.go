package gcp

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/preemptd/preemptd/agent"
	"github.com/preemptd/preemptd/test/fakes"
)

func TestParsePreempted(t *testing.T) {
	for _, tc := range []struct {
		in       string
		pre, bad bool
	}{{"TRUE", true, false}, {"FALSE", false, false}, {"TRUE\n", true, false}, {"true", false, true}, {"", false, true}, {"<html>", false, true}} {
		pre, err := ParsePreempted(tc.in)
		if pre != tc.pre || (err != nil) != tc.bad {
			t.Errorf("ParsePreempted(%q) = %v, %v", tc.in, pre, err)
		}
	}
}

func TestParseMaintenance(t *testing.T) {
	for _, v := range []string{MaintenanceNone, MaintenanceMigrate, MaintenanceTerminate} {
		if got, err := ParseMaintenance(v + "\n"); err != nil || got != v {
			t.Errorf("ParseMaintenance(%q) = %q, %v", v, got, err)
		}
	}
	if v, err := ParseMaintenance("REBOOT_SOMETIME"); !errors.Is(err, ErrUnknownEvent) || v != "REBOOT_SOMETIME" {
		t.Errorf("unknown well-formed value: %q, %v; want ErrUnknownEvent", v, err)
	}
	if _, err := ParseMaintenance("<html>oops"); err == nil || errors.Is(err, ErrUnknownEvent) {
		t.Errorf("garbage: %v, want a parse error", err)
	}
}

func newMetadata(t *testing.T) (*fakes.GCP, *httptest.Server) {
	s := fakes.NewGCP()
	srv := httptest.NewServer(s)
	t.Cleanup(srv.Close)
	return s, srv
}

func watch(t *testing.T, endpoint string) (chan agent.Notice, context.CancelFunc) {
	t.Helper()
	p := New(Config{Endpoint: endpoint, PreemptWindow: 30 * time.Second, MaintenanceWindow: time.Hour})
	out := make(chan agent.Notice, 16)
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan struct{})
	go func() { p.Watch(ctx, out); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	return out, cancel
}

func next(t *testing.T, ch chan agent.Notice) agent.Notice {
	t.Helper()
	select {
	case n := <-ch:
		return n
	case <-time.After(10 * time.Second):
		t.Fatal("no notice within 10s")
	}
	return agent.Notice{}
}

func quiet(t *testing.T, ch chan agent.Notice, d time.Duration) {
	t.Helper()
	select {
	case n := <-ch:
		t.Fatalf("unexpected notice %+v", n)
	case <-time.After(d):
	}
}

func waitHanging(t *testing.T, s *fakes.GCP, n int) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); ; {
		w := s.Waits()
		if w >= n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("only %d hanging GETs, want %d", w, n)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestPreemptedLongPoll: the flip to TRUE arrives through the hanging GET
// (no polling), with the preemption window as the deadline.
func TestPreemptedLongPoll(t *testing.T) {
	s, srv := newMetadata(t)
	out, _ := watch(t, strings.TrimPrefix(srv.URL, "http://"))
	waitHanging(t, s, 2)
	quiet(t, out, 100*time.Millisecond)
	flipped := time.Now()
	s.Set(PathPreempted, "TRUE")
	n := next(t, out)
	latency := time.Since(flipped)
	if n.Kind != agent.KindPreempt || n.Provider != "gcp" || n.Deadline.Sub(n.NoticedAt) != 30*time.Second {
		t.Fatalf("notice = %+v", n)
	}
	t.Logf("preempted TRUE → notice in %v", latency)
	if waits := s.Waits(); waits > 10 {
		t.Fatalf("%d wait_for_change requests for one change: polling, not long-polling", waits)
	}
}

// TestMaintenanceWindowFromMachine: TERMINATE_ON_HOST_MAINTENANCE gives
// about an hour with GPUs attached and about 60 s without.
func TestMaintenanceWindowFromMachine(t *testing.T) {
	for _, gpus := range []bool{true, false} {
		s, srv := newMetadata(t)
		p := New(Config{Endpoint: srv.URL, HasGPU: func() bool { return gpus }})
		out := make(chan agent.Notice, 4)
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan struct{})
		go func() { p.Watch(ctx, out); close(done) }()
		waitHanging(t, s, 2)
		s.Set(PathMaintenance, MaintenanceTerminate)
		n := next(t, out)
		want := OtherMaintenanceWindow
		if gpus {
			want = GPUMaintenanceWindow
		}
		if got := n.Deadline.Sub(n.NoticedAt); got != want {
			t.Errorf("gpus %v: window %v, want %v", gpus, got, want)
		}
		cancel()
		<-done
	}
}

func TestNVIDIAPCI(t *testing.T) {
	root := t.TempDir()
	dev := func(name, vendor string) {
		os.MkdirAll(filepath.Join(root, name), 0o755)
		os.WriteFile(filepath.Join(root, name, "vendor"), []byte(vendor+"\n"), 0o644)
	}
	dev("0000:00:04.0", "0x1af4") // virtio
	if NVIDIAPCI(root) {
		t.Fatal("a virtio device counted as a GPU")
	}
	dev("0000:00:05.0", "0x10de")
	if !NVIDIAPCI(root) {
		t.Fatal("an NVIDIA device not found")
	}
}

// TestUnknownMaintenanceValueKeepsWatching: a value Google adds later is
// logged, not a reason to tear the subscription down: the next real event
// arrives through the same hanging GETs at once.
func TestUnknownMaintenanceValueKeepsWatching(t *testing.T) {
	s, srv := newMetadata(t)
	p := New(Config{Endpoint: srv.URL, MaintenanceWindow: time.Hour})
	out := make(chan agent.Notice, 4)
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	go p.Watch(ctx, out)
	waitHanging(t, s, 2)
	s.Set(PathMaintenance, "SOME_NEW_EVENT")
	quiet(t, out, 200*time.Millisecond)
	if p.out.Failing() {
		t.Fatal("an unknown value counted as a metadata outage")
	}
	start := time.Now()
	s.Set(PathMaintenance, MaintenanceTerminate)
	n := next(t, out)
	if n.Action != MaintenanceTerminate || time.Since(start) > 400*time.Millisecond {
		t.Fatalf("after an unknown value: %+v after %v (a torn-down subscription backs off)", n, time.Since(start))
	}
}

// TestHalfOpenLongPoll: a hanging GET whose connection goes silent (the
// server never answers, not even at timeout_sec) is abandoned after
// timeout_sec plus HangSlack, and the watch reconnects and sees the flip.
func TestHalfOpenLongPoll(t *testing.T) {
	s, srv := newMetadata(t)
	var stall atomic.Bool
	var sawTimeout atomic.Bool
	s.SetFault(func(w http.ResponseWriter, r *http.Request) bool {
		if r.URL.Query().Get("wait_for_change") != "true" {
			return false
		}
		if r.URL.Query().Get("timeout_sec") == "1" {
			sawTimeout.Store(true)
		}
		if stall.Load() && strings.HasSuffix(r.URL.Path, PathPreempted) {
			<-r.Context().Done() // silent: never answers
			return true
		}
		return false
	})
	stall.Store(true)
	p := New(Config{Endpoint: srv.URL, LongPoll: time.Second, MaintenanceWindow: time.Hour})
	out := make(chan agent.Notice, 4)
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	go p.Watch(ctx, out)
	time.Sleep(200 * time.Millisecond)
	s.Set(PathPreempted, "TRUE") // lands while the preempted long-poll is stalled
	stall.Store(false)
	start := time.Now()
	n := next(t, out)
	if n.Kind != agent.KindPreempt {
		t.Fatalf("notice = %+v", n)
	}
	if took := time.Since(start); took > time.Second+HangSlack+2*time.Second {
		t.Fatalf("the stalled long-poll held the notice for %v", took)
	}
	if !sawTimeout.Load() {
		t.Fatal("hanging GETs carry no timeout_sec")
	}
}

func TestMaintenanceEvents(t *testing.T) {
	s, srv := newMetadata(t)
	out, _ := watch(t, srv.URL) // a URL works as well as host:port
	waitHanging(t, s, 2)
	s.Set(PathMaintenance, MaintenanceTerminate)
	n := next(t, out)
	if n.Kind != agent.KindMaintenance || n.Deadline.Sub(n.NoticedAt) != time.Hour || n.Action != MaintenanceTerminate {
		t.Fatalf("terminate maintenance = %+v", n)
	}
	s.Set(PathMaintenance, MaintenanceMigrate)
	if w := next(t, out); !w.Withdrawn || w.ID != n.ID {
		t.Fatalf("previous event not withdrawn: %+v", w)
	}
	if m := next(t, out); m.Kind != agent.KindMigrate {
		t.Fatalf("migrate = %+v", m)
	}
	s.Set(PathMaintenance, MaintenanceNone)
	if w := next(t, out); !w.Withdrawn || w.Kind != agent.KindMigrate {
		t.Fatalf("NONE did not withdraw: %+v", w)
	}
}

// TestFaultsNoFalseAlarm: 503s, a missing Metadata-Flavor and garbage values
// produce no notice; the real flip afterwards still does.
func TestFaultsNoFalseAlarm(t *testing.T) {
	s, srv := newMetadata(t)
	var count atomic.Int32
	s.SetFault(func(w http.ResponseWriter, r *http.Request) bool {
		switch c := count.Add(1); {
		case c <= 3:
			http.Error(w, "", http.StatusServiceUnavailable)
			return true
		case c <= 5:
			fmt.Fprint(w, "TRUE") // no Metadata-Flavor header: not the metadata server
			return true
		}
		return false
	})
	out, _ := watch(t, srv.URL)
	s.Set(PathPreempted, "maybe")
	quiet(t, out, 1500*time.Millisecond)
	s.Set(PathPreempted, "TRUE")
	if n := next(t, out); n.Kind != agent.KindPreempt {
		t.Fatalf("after faults: %+v", n)
	}
}

func FuzzParsePreempted(f *testing.F) {
	f.Add("TRUE")
	f.Add("FALSE")
	f.Fuzz(func(t *testing.T, s string) {
		pre, err := ParsePreempted(s)
		if pre && strings.TrimSpace(s) != "TRUE" {
			t.Fatalf("%q read as preempted", s)
		}
		_ = err
	})
}

// TestGarbageBacksOff: a metadata server that answers every GET at once with
// a value that does not parse (and no ETag) must not be re-asked in a loop.
func TestGarbageBacksOff(t *testing.T) {
	s, srv := newMetadata(t)
	var requests atomic.Int32
	s.SetFault(func(w http.ResponseWriter, r *http.Request) bool {
		requests.Add(1)
		w.Header().Set("Metadata-Flavor", "Google")
		fmt.Fprint(w, "")
		return true
	})
	out, cancel := watch(t, srv.URL)
	quiet(t, out, 2*time.Second)
	cancel()
	if n := requests.Load(); n > 20 {
		t.Fatalf("%d requests in 2s of garbage answers: no backoff", n)
	}
}

// TestUpcomingMaintenance: planned maintenance (instance/upcoming-maintenance,
// the document GPU VMs get days ahead) becomes an advisory, scheduled
// maintenance notice whose deadline is the window's start; rescheduled, the
// old one is withdrawn and the new one sent; gone (404), withdrawn; a
// document that does not parse changes nothing.
func TestUpcomingMaintenance(t *testing.T) {
	s, srv := newMetadata(t)
	p := New(Config{Endpoint: srv.URL, MaintenanceWindow: time.Hour, UpcomingPoll: 50 * time.Millisecond})
	out := make(chan agent.Notice, 16)
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan struct{})
	go func() { p.Watch(ctx, out); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	quiet(t, out, 300*time.Millisecond) // 404: nothing planned

	start := time.Now().Add(72 * time.Hour).UTC().Truncate(time.Second)
	doc := func(at time.Time) string {
		return fmt.Sprintf(`{"type":"SCHEDULED","can_reschedule":true,"maintenance_status":"PENDING","window_start_time":%q,"window_end_time":%q,"latest_window_start_time":%q}`,
			at.Format(time.RFC3339), at.Add(time.Hour).Format(time.RFC3339), at.Add(24*time.Hour).Format(time.RFC3339))
	}
	s.Set(PathUpcoming, doc(start))
	n := next(t, out)
	if n.Kind != agent.KindMaintenance || !n.Scheduled || !n.Deadline.Equal(start) || !n.WindowEnd.Equal(start.Add(time.Hour)) ||
		agent.Classify(n, time.Now(), 2*time.Minute) != agent.ClassAdvisory {
		t.Fatalf("upcoming maintenance notice = %+v", n)
	}
	quiet(t, out, 200*time.Millisecond) // the same document again: nothing new
	s.Set(PathUpcoming, "<html>")
	quiet(t, out, 200*time.Millisecond)
	later := start.Add(24 * time.Hour)
	s.Set(PathUpcoming, doc(later))
	if w := next(t, out); !w.Withdrawn || w.ID != n.ID {
		t.Fatalf("rescheduled: first %+v, want the old one withdrawn", w)
	}
	if m := next(t, out); m.Withdrawn || !m.Deadline.Equal(later) {
		t.Fatalf("rescheduled: %+v", m)
	}
	s.Delete(PathUpcoming)
	if w := next(t, out); !w.Withdrawn || !w.Deadline.Equal(later) {
		t.Fatalf("done: %+v, want withdrawn", w)
	}
}
