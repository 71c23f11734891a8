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
