package local

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/preemptd/preemptd/agent"
)

func TestParseTrigger(t *testing.T) {
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	tests := []struct {
		name, in string
		kind     agent.Kind
		in2      time.Duration
		bad      bool
	}{
		{"empty", "", agent.KindTerminate, 2 * time.Minute, false},
		{"kind", "preempt\n", agent.KindPreempt, 2 * time.Minute, false},
		{"kind and in", "maintenance 10m", agent.KindMaintenance, 10 * time.Minute, false},
		{"rebalance has no deadline", "rebalance", agent.KindRebalance, time.Time{}.Sub(now), false},
		{"rebalance with in", "rebalance 10m", "", 0, true},
		{"json", `{"kind":"stop","in":"45s","id":"x"}`, agent.KindStop, 45 * time.Second, false},
		{"unknown kind", "explode", "", 0, true},
		{"bad in", "terminate later", "", 0, true},
		{"too many words", "terminate 1m now", "", 0, true},
		{"json unknown field", `{"kind":"stop","when":"now"}`, "", 0, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			n, err := ParseTrigger([]byte(tt.in), now)
			if tt.bad {
				if err == nil {
					t.Fatalf("accepted %q: %+v", tt.in, n)
				}
				return
			}
			if err != nil || n.Kind != tt.kind || n.Deadline.Sub(now) != tt.in2 || n.Provider != "local" {
				t.Fatalf("got %+v, %v", n, err)
			}
		})
	}
}

func recv(t *testing.T, ch chan agent.Notice) agent.Notice {
	t.Helper()
	select {
	case n := <-ch:
		return n
	case <-time.After(5 * time.Second):
		t.Fatal("no notice within 5s")
	}
	return agent.Notice{}
}

// TestTriggerFile: real files under fsnotify: an existing file at start, a
// write in two steps read only once settled, removal withdraws.
func TestTriggerFile(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "sub", "trigger")
	os.MkdirAll(filepath.Dir(path), 0o755)
	os.WriteFile(path, []byte("rebalance"), 0o644)
	p := New(path, nil)
	out := make(chan agent.Notice, 8)
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- p.Watch(ctx, out) }()
	if n := recv(t, out); n.Kind != agent.KindRebalance {
		t.Fatalf("existing file: %+v", n)
	}

	// Replace it the way a shell does: truncate, then write.
	f, _ := os.OpenFile(path, os.O_TRUNC|os.O_WRONLY, 0o644)
	time.Sleep(5 * time.Millisecond)
	f.WriteString("preempt 30s")
	f.Close()
	if n := recv(t, out); !n.Withdrawn || n.Kind != agent.KindRebalance {
		t.Fatalf("old notice not withdrawn first: %+v", n)
	}
	n := recv(t, out)
	if n.Kind != agent.KindPreempt || n.Deadline.Sub(n.NoticedAt) != 30*time.Second {
		t.Fatalf("new notice: %+v", n)
	}
	select {
	case extra := <-out:
		t.Fatalf("half-written file produced %+v", extra)
	case <-time.After(200 * time.Millisecond):
	}

	os.Remove(path)
	if w := recv(t, out); !w.Withdrawn || w.Kind != agent.KindPreempt {
		t.Fatalf("removal: %+v", w)
	}
	cancel()
	if err := <-done; err != context.Canceled {
		t.Fatalf("Watch returned %v", err)
	}
}

func FuzzParseTrigger(f *testing.F) {
	for _, s := range []string{"", "preempt 30s", `{"kind":"stop","in":"45s"}`, "explode", "terminate -1s"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		n, err := ParseTrigger([]byte(s), time.Now())
		if err == nil && (n.Kind == "" || n.Deadline.Before(n.NoticedAt)) {
			t.Fatalf("accepted %q as %+v", s, n)
		}
	})
}
