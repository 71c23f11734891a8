package gpu

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/preemptd/preemptd/agent"
)

// DefaultCallTimeout bounds one NVML call on the emergency path.
const DefaultCallTimeout = 2 * time.Second

// ErrHung is returned when NVML did not answer in time.
var ErrHung = errors.New("NVML did not answer (a GPU may have fallen off the bus, XID 79)")

// Timeout wraps a Reader so that no call blocks its caller for longer than
// D or its context: NVML can hang inside the driver after XID 79, and the
// emergency path must go on without it. A call still stuck in the driver
// makes later calls answer at once with ErrHung, so that hung calls do not
// pile up.
type Timeout struct {
	R Reader
	D time.Duration

	stuck atomic.Int32
}

// WithTimeout returns r bounded by d (DefaultCallTimeout when 0).
func WithTimeout(r Reader, d time.Duration) *Timeout {
	if d <= 0 {
		d = DefaultCallTimeout
	}
	return &Timeout{R: r, D: d}
}

// call runs f in its own goroutine and waits at most D (and ctx). A call
// given up on while still in the driver counts as stuck until it returns;
// calls merely running at the same time (status, metrics, the emergency
// path) do not.
func call[T any](t *Timeout, ctx context.Context, f func(context.Context) (T, error)) (T, error) {
	var zero T
	if t.stuck.Load() > 0 {
		return zero, ErrHung
	}
	ctx, cancel := context.WithTimeout(ctx, t.D)
	defer cancel()
	type result struct {
		v   T
		err error
	}
	ch := make(chan result, 1)
	var mu sync.Mutex
	finished, gaveUp := false, false
	go func() {
		v, err := f(ctx)
		mu.Lock()
		finished = true
		if gaveUp {
			t.stuck.Add(-1)
		}
		mu.Unlock()
		ch <- result{v, err}
	}()
	select {
	case r := <-ch:
		return r.v, r.err
	case <-ctx.Done():
		mu.Lock()
		if !finished {
			gaveUp = true
			t.stuck.Add(1)
		}
		mu.Unlock()
		return zero, fmt.Errorf("%w within %s", ErrHung, t.D)
	}
}

// Snapshot implements Reader; a hung NVML gives an unavailable snapshot
// saying so.
func (t *Timeout) Snapshot(ctx context.Context) agent.GPUSnapshot {
	s, err := call(t, ctx, func(ctx context.Context) (agent.GPUSnapshot, error) { return t.R.Snapshot(ctx), nil })
	if err != nil {
		return agent.GPUSnapshot{Available: false, Reason: err.Error(), Devices: []agent.GPUDevice{}, TakenAt: time.Now()}
	}
	return s
}

// PIDs implements Reader (and trainer.Extra).
func (t *Timeout) PIDs(ctx context.Context) ([]int, error) {
	return call(t, ctx, t.R.PIDs)
}

// WaitRelease implements Reader: bounded by ctx only (it waits by design),
// but never stuck past it.
func (t *Timeout) WaitRelease(ctx context.Context, pids []int) error {
	ch := make(chan error, 1)
	go func() { ch <- t.R.WaitRelease(ctx, pids) }()
	select {
	case err := <-ch:
		return err
	case <-ctx.Done():
		return fmt.Errorf("waiting for the GPUs' release: %w", ctx.Err())
	}
}

// WatchXID implements Reader.
func (t *Timeout) WatchXID(ctx context.Context, out chan<- agent.XIDEvent) error {
	return t.R.WatchXID(ctx, out)
}

// Close implements Reader.
func (t *Timeout) Close() error { return t.R.Close() }
