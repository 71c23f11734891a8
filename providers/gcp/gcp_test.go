package gcp

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
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
	if _, err := ParseMaintenance("REBOOT_SOMETIME"); err == nil {
		t.Error("unknown value accepted")
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
