package gpu

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/preemptd/preemptd/agent"
)

// hung is a Reader whose NVML calls never return (the driver after XID 79).
type hung struct{ Null }

func (hung) Snapshot(context.Context) agent.GPUSnapshot { select {} }
func (hung) PIDs(context.Context) ([]int, error)        { select {} }

func TestTimeoutNeverBlocks(t *testing.T) {
	r := WithTimeout(hung{}, 100*time.Millisecond)
	start := time.Now()
	snap := r.Snapshot(context.Background())
	if snap.Available || snap.Reason == "" {
		t.Fatalf("snapshot of a hung NVML = %+v", snap)
	}
	if _, err := r.PIDs(context.Background()); !errors.Is(err, ErrHung) {
		t.Fatalf("PIDs of a hung NVML: %v", err)
	}
	if took := time.Since(start); took > 2*time.Second {
		t.Fatalf("calls to a hung NVML took %v", took)
	}
	// A healthy reader passes through.
	ok := WithTimeout(Null{Reason: "no driver"}, 0)
	if s := ok.Snapshot(context.Background()); s.Reason != "no driver" {
		t.Fatalf("snapshot = %+v", s)
	}
}

// slow answers after a while, like a busy but healthy NVML.
type slow struct {
	Null
	release chan struct{}
}

func (s slow) PIDs(context.Context) ([]int, error) {
	<-s.release
	return []int{7}, nil
}

// TestTimeoutConcurrentCallsAreNotHung: calls that overlap (status,
// metrics and the emergency path at once) all get their answer; only a call
// given up on makes the next ones fail fast, until it returns.
func TestTimeoutConcurrentCallsAreNotHung(t *testing.T) {
	s := slow{release: make(chan struct{})}
	r := WithTimeout(s, time.Second)
	errs := make(chan error, 2)
	for range 2 {
		go func() { _, err := r.PIDs(context.Background()); errs <- err }()
	}
	time.Sleep(50 * time.Millisecond)
	close(s.release)
	for range 2 {
		if err := <-errs; err != nil {
			t.Fatalf("an overlapping call failed: %v", err)
		}
	}

	stuck := slow{release: make(chan struct{})}
	r = WithTimeout(stuck, 50*time.Millisecond)
	if _, err := r.PIDs(context.Background()); !errors.Is(err, ErrHung) {
		t.Fatalf("hung call: %v", err)
	}
	if _, err := r.PIDs(context.Background()); !errors.Is(err, ErrHung) {
		t.Fatalf("a call while one is stuck: %v, want ErrHung at once", err)
	}
	close(stuck.release) // the stuck call comes back
	for end := time.Now().Add(5 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		if _, err := r.PIDs(context.Background()); err == nil {
			break
		}
		if time.Now().After(end) {
			t.Fatal("calls still refused after the stuck one returned")
		}
	}
}
