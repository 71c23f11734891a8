package agent

import (
	"context"
	"time"
)

// Watcher is a source of notices: a cloud provider or the local trigger file.
// Watch sends notices (and withdrawals) on out until ctx ends; it absorbs
// metadata outages itself and returns only when ctx is done or it cannot
// work at all.
type Watcher interface {
	Watch(ctx context.Context, out chan<- Notice) error
}

// Relay hears, as it happens, of every notice that turns fatal and of
// every notice withdrawn or expired: a multi-node job's fan-out. It must
// return at once.
type Relay interface {
	Fatal(n Notice)
	Withdrawn(n Notice)
}

// Relays tells each of its relays, in order.
type Relays []Relay

// Fatal implements Relay.
func (rs Relays) Fatal(n Notice) {
	for _, r := range rs {
		r.Fatal(n)
	}
}

// Withdrawn implements Relay.
func (rs Relays) Withdrawn(n Notice) {
	for _, r := range rs {
		r.Withdrawn(n)
	}
}

// Acker acknowledges a notice once the emergency path is over, letting the
// platform proceed early (Azure Scheduled Events).
type Acker interface {
	Ack(ctx context.Context, n Notice) error
}

// Trainer finds and signals the training process(es).
type Trainer interface {
	// Signal sends the named signal (e.g. "SIGTERM") to every target found
	// now. Finding no target is not an error: the report says so.
	Signal(ctx context.Context, signal string) (SignalReport, error)
	// WaitExit waits until the signalled processes have exited, sending
	// SIGKILL at killAt if it is not zero, until ctx ends.
	WaitExit(ctx context.Context, sig SignalReport, killAt time.Time) (ExitReport, error)
}

// SignalReport says which processes got which signal.
type SignalReport struct {
	Signal string    `json:"signal"`
	At     time.Time `json:"at"`
	// PIDs are the processes signalled; empty when no target was found.
	PIDs []int `json:"pids"`
	// Groups are the process groups signalled as a whole.
	Groups []int `json:"groups,omitempty"`
	// Sources says how the targets were found (pid_file, match, unit, …).
	Sources []string `json:"sources,omitempty"`
	// Problems lists what went wrong finding or signalling a target.
	Problems []string `json:"problems,omitempty"`
	// Handle is the implementation's own record of the targets (pidfds),
	// passed back to WaitExit.
	Handle any `json:"-"`
}

// ExitReport says how the signalled processes ended.
type ExitReport struct {
	// Exited are the PIDs seen gone.
	Exited []int `json:"exited"`
	// Killed are the PIDs that got SIGKILL.
	Killed []int `json:"killed,omitempty"`
	// Running are the PIDs still alive when the wait ended.
	Running []int     `json:"running,omitempty"`
	At      time.Time `json:"at"`
}

// Step is one stage of the emergency path after the trainer is signalled
// (waiting for a checkpoint, uploading it, flushing logs). ctx carries the
// emergency deadline.
type Step interface {
	Name() string
	Run(ctx context.Context, n Notice) error
}

type trainerExitKey struct{}

// TrainerExited returns, inside an emergency step, the channel closed once
// the trainer signalled by this path has exited (or the wait for it ended);
// nil when no trainer process was signalled, so nothing tells when its
// saves are over.
func TrainerExited(ctx context.Context) <-chan struct{} {
	ch, _ := ctx.Value(trainerExitKey{}).(<-chan struct{})
	return ch
}

// WithTrainerExited returns ctx carrying exited for TrainerExited (for
// steps run outside the agent, and tests).
func WithTrainerExited(ctx context.Context, exited <-chan struct{}) context.Context {
	return context.WithValue(ctx, trainerExitKey{}, exited)
}
