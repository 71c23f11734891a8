package agent

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func startAPI(t *testing.T, a *Agent) *Client {
	t.Helper()
	sock := filepath.Join(t.TempDir(), SocketName)
	l, err := ListenSocket(sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- a.Serve(ctx, l) }()
	t.Cleanup(func() {
		cancel()
		if err := <-served; err != nil {
			t.Errorf("serve: %v", err)
		}
		if _, err := os.Stat(sock); !os.IsNotExist(err) {
			t.Errorf("socket left behind after shutdown: %v", err)
		}
	})
	st, err := os.Stat(sock)
	if err != nil {
		t.Fatal(err)
	}
	if perm := st.Mode().Perm(); perm != 0o666 {
		t.Fatalf("socket mode = %o, want 666 (reads open; changes checked by peer credentials)", perm)
	}
	if left, _ := filepath.Glob(sock + ".*.tmp"); len(left) != 0 {
		t.Fatalf("temporary socket names left: %v", left)
	}
	return NewClient(sock)
}

func TestAPISimulateAndLongPoll(t *testing.T) {
	dir := t.TempDir()
	tr := &fakeTrainer{}
	a := New(Config{RunDir: dir, Signal: "SIGTERM", FatalWithin: 2 * time.Minute}, Deps{Trainer: tr, Provider: "local", Version: "test"})
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	go a.Run(ctx)
	c := startAPI(t, a)

	// No notice: the long-poll times out with nothing.
	_, ok, err := c.Notice(t.Context(), 50*time.Millisecond)
	if err != nil || ok {
		t.Fatalf("Notice with none active = ok %v, err %v", ok, err)
	}

	// A waiting reader is answered by the notice that arrives while it waits.
	type result struct {
		f   NoticeFile
		ok  bool
		err error
	}
	got := make(chan result, 1)
	go func() {
		f, ok, err := c.Notice(t.Context(), 10*time.Second)
		got <- result{f, ok, err}
	}()
	time.Sleep(100 * time.Millisecond)
	n, err := c.Simulate(t.Context(), SimulateRequest{Kind: "preempt", In: "30s"})
	if err != nil {
		t.Fatal(err)
	}
	r := <-got
	if r.err != nil || !r.ok || r.f.Kind != KindPreempt || r.f.ID != n.ID || r.f.Deadline == nil {
		t.Fatalf("long-poll = %+v", r)
	}
	if left := r.f.SecondsLeft; left <= 25 || left > 30 {
		t.Fatalf("seconds_left = %v, want just under 30", left)
	}
	<-a.EmergencyDone()
	st, err := c.Status(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if st.State != "done" || st.Version != "test" || st.LastSignal == nil || st.LastSignal.Signal != "SIGTERM" {
		t.Fatalf("status = %+v", st)
	}
}

func TestAPIRejectsBadSimulation(t *testing.T) {
	a := New(Config{RunDir: t.TempDir()}, Deps{})
	c := startAPI(t, a)
	for _, req := range []SimulateRequest{{Kind: "explode"}, {In: "soon"}, {In: "-5s"}} {
		if _, err := c.Simulate(t.Context(), req); err == nil {
			t.Errorf("Simulate(%+v) accepted", req)
		}
	}
	if a.EmergencyStarted() {
		t.Fatal("a rejected simulation started the emergency path")
	}
}

func TestClientNotRunning(t *testing.T) {
	c := NewClient(filepath.Join(t.TempDir(), SocketName))
	if _, err := c.Status(t.Context()); !errors.Is(err, ErrNotRunning) {
		t.Fatalf("Status with no daemon = %v, want ErrNotRunning", err)
	}
}

func TestWriteFileAtomicReplaces(t *testing.T) {
	p := filepath.Join(t.TempDir(), "f.json")
	for _, s := range []string{"first", "second"} {
		if err := WriteFileAtomic(p, []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	b, _ := os.ReadFile(p)
	ents, _ := os.ReadDir(filepath.Dir(p))
	if string(b) != "second" || len(ents) != 1 {
		t.Fatalf("content %q, %d entries; want second and no temporary left", b, len(ents))
	}
	if err := WriteFileAtomic(filepath.Join(p, "x"), nil, 0o644); err == nil {
		t.Fatal("write under a file succeeded")
	}
}

func TestSimulateAfterStopIsRefused(t *testing.T) {
	a := New(Config{RunDir: t.TempDir()}, Deps{})
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan struct{})
	go func() { a.Run(ctx); close(done) }()
	cancel()
	<-done
	c := startAPI(t, a)
	if _, err := c.Simulate(t.Context(), SimulateRequest{Kind: "terminate"}); err == nil || !strings.Contains(err.Error(), "not watching") {
		t.Fatalf("Simulate after stop = %v", err)
	}
}

// TestSocketRemovedOnlyByItsOwner: a listener whose path now holds another
// listener's socket leaves that socket in place when it closes.
func TestSocketRemovedOnlyByItsOwner(t *testing.T) {
	sock := filepath.Join(t.TempDir(), SocketName)
	first, err := ListenSocket(sock)
	if err != nil {
		t.Fatal(err)
	}
	second, err := ListenSocket(sock) // renamed over the first's path
	if err != nil {
		t.Fatal(err)
	}
	first.Close()
	if _, err := os.Lstat(sock); err != nil {
		t.Fatalf("the first listener removed the second's socket: %v", err)
	}
	second.Close()
	if _, err := os.Lstat(sock); !os.IsNotExist(err) {
		t.Fatalf("the owner's close left its socket: %v", err)
	}
}
