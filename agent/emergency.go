package agent

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/preemptd/preemptd/internal/redact"
)

// EmergencyReport records one run of the emergency path.
type EmergencyReport struct {
	Notice    Notice        `json:"notice"`
	StartedAt time.Time     `json:"started_at"`
	Deadline  time.Time     `json:"deadline"`
	Signal    *SignalReport `json:"signal,omitempty"`
	Steps     []StepReport  `json:"steps"`
	Trainer   *ExitReport   `json:"trainer,omitempty"`
	Hooks     []HookReport  `json:"hooks,omitempty"`
	// GPUs is the snapshot taken right after the trainer was signalled.
	GPUs *GPUSnapshot `json:"gpus,omitempty"`
	// Checkpoint is what the checkpoint step committed; LastCommitBefore is
	// when the newest checkpoint committed before the notice was.
	Checkpoint       *CheckpointResult `json:"checkpoint,omitempty"`
	LastCommitBefore time.Time         `json:"last_commit_before,omitzero"`
	Acked            bool              `json:"acked,omitempty"`
	AckError         string            `json:"ack_error,omitempty"`
	// Plan names the steps the path runs, in order.
	Plan []string `json:"plan,omitempty"`
	// FinishedAt is zero while the path runs.
	FinishedAt time.Time `json:"finished_at,omitzero"`
	// Outcome is "running", "completed", or "deadline" when the deadline cut it.
	Outcome string `json:"outcome"`
}

// StepReport is one step's result.
type StepReport struct {
	Name      string        `json:"name"`
	StartedAt time.Time     `json:"started_at"`
	Duration  time.Duration `json:"duration_ns"`
	Error     string        `json:"error,omitempty"`
}

// startEmergency runs the emergency path for a fatal notice. It is
// detached from the root context: a SIGTERM at machine shutdown must not cut
// the upload in half; its deadline comes from the notice. A fatal notice
// that arrives while a path runs only shortens that path's deadline when its
// own is earlier; once a path is over the agent is armed for the next.
func (a *Agent) startEmergency(n Notice) {
	now := a.now()
	deadline := n.Deadline
	if deadline.IsZero() || deadline.Sub(now) < a.cfg.MinBudget {
		deadline = now.Add(a.cfg.MinBudget)
	}
	a.mu.Lock()
	if a.path != nil {
		a.mu.Unlock()
		a.log.Info("fatal notice during the emergency path; already handling",
			"provider", n.Provider, "kind", n.Kind, "id", n.ID, "deadline", n.Deadline)
		a.shortenPath(n.Key(), deadline)
		return
	}
	rep := &EmergencyReport{Notice: n, StartedAt: now, Deadline: deadline, Outcome: "running"}
	for _, s := range a.deps.Steps {
		rep.Plan = append(rep.Plan, s.Name())
	}
	if a.emergency != nil { // the last path's channel is closed: a new one
		a.emDone = make(chan struct{})
	}
	a.emergency = rep
	a.path = newPathCtx(deadline, a.now)
	path, done := a.path, a.emDone
	a.notifyChangeLocked()
	a.mu.Unlock()

	a.log.Warn("emergency path started", "provider", n.Provider, "kind", n.Kind, "id", n.ID,
		"deadline", deadline, "budget", deadline.Sub(now).Round(time.Millisecond).String())
	go a.emergencyPath(path, done, n)
}

// shortenPath brings the running path's deadline forward to deadline when
// that is earlier (a second notice, or the same one moved earlier).
func (a *Agent) shortenPath(key string, deadline time.Time) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.path == nil || !a.path.shorten(deadline) {
		return
	}
	a.emergency.Deadline = deadline
	a.notifyChangeLocked()
	a.log.Warn("emergency path deadline moved earlier", "by", key, "deadline", deadline)
}

// pathCtx is an emergency path's context: detached from every other, done at
// its deadline, which can only move earlier.
type pathCtx struct {
	context.Context
	cancel context.CancelCauseFunc
	now    func() time.Time

	mu       sync.Mutex
	deadline time.Time
	timer    *time.Timer
}

func newPathCtx(deadline time.Time, now func() time.Time) *pathCtx {
	ctx, cancel := context.WithCancelCause(context.Background())
	p := &pathCtx{Context: ctx, cancel: cancel, now: now, deadline: deadline}
	p.timer = time.AfterFunc(deadline.Sub(now()), func() { cancel(context.DeadlineExceeded) })
	return p
}

// Deadline implements context.Context; it is read afresh by each caller.
func (p *pathCtx) Deadline() (time.Time, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.deadline, true
}

// Err implements context.Context: the path ends only at its deadline (or
// when it finishes, after which nobody asks).
func (p *pathCtx) Err() error {
	if p.Context.Err() == nil {
		return nil
	}
	return context.DeadlineExceeded
}

func (p *pathCtx) shorten(deadline time.Time) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !deadline.Before(p.deadline) {
		return false
	}
	p.deadline = deadline
	p.timer.Reset(deadline.Sub(p.now()))
	return true
}

func (p *pathCtx) stop() {
	p.timer.Stop()
	p.cancel(context.Canceled)
}

func (a *Agent) emergencyPath(path *pathCtx, done chan struct{}, n Notice) {
	var ctx context.Context = path
	deadline, _ := path.Deadline()
	defer func() {
		path.stop()
		a.mu.Lock()
		a.path = nil // armed for the next path
		rep := *a.emergency
		a.notifyChangeLocked()
		a.mu.Unlock()
		a.log.Info("armed for the next notice")
		a.publishFile()
		if a.deps.OnEmergencyDone != nil {
			a.deps.OnEmergencyDone(rep)
		}
		close(done)
	}()

	// 1. Tell the trainer, and everyone reading notice.json, first; the
	// reporters (webhooks first of all) go out alongside, never in the way.
	a.publishFile()
	var sig SignalReport
	if a.deps.Trainer != nil {
		var err error
		sig, err = a.deps.Trainer.Signal(ctx, a.cfg.Signal)
		a.recordSignal(sig, err)
		a.update(func(r *EmergencyReport) { s := sig; r.Signal = &s })
	}
	a.mu.Lock()
	started := *a.emergency
	a.mu.Unlock()
	a.report(context.Background(), deadline, Event{Phase: PhaseNotice, Notice: n, Class: ClassFatal, Emergency: &started})
	if a.deps.GPUs != nil {
		snap := a.deps.GPUs.Snapshot(ctx)
		a.update(func(r *EmergencyReport) { r.GPUs = &snap })
		a.publishFile()
	}

	// 2. Hooks and the trainer's exit run alongside the steps.
	var side sync.WaitGroup
	side.Go(func() {
		hooks := a.runHooks(ctx, n, deadline)
		a.update(func(r *EmergencyReport) { r.Hooks = hooks })
	})
	var exited chan struct{} // closed when the trainer is gone; nil when none was signalled
	if a.deps.Trainer != nil && len(sig.PIDs) > 0 {
		exited = make(chan struct{})
		killAt := time.Time{}
		if a.cfg.KillAfter > 0 {
			killAt = sig.At.Add(a.cfg.KillAfter)
			if killAt.After(deadline) {
				killAt = deadline
			}
		}
		side.Go(func() {
			defer close(exited)
			ex, err := a.deps.Trainer.WaitExit(ctx, sig, killAt)
			if err != nil && !errors.Is(err, context.DeadlineExceeded) {
				a.log.Error("waiting for trainer", "err", err)
			}
			a.log.Info("trainer wait over", "exited", ex.Exited, "killed", ex.Killed, "running", ex.Running)
			a.update(func(r *EmergencyReport) { e := ex; r.Trainer = &e })
		})
	}

	// 3. The steps later parts add: checkpoint, upload, log flush. They
	// learn when the trainer is gone through TrainerExited.
	stepCtx := WithTrainerExited(ctx, exited)
	for _, s := range a.deps.Steps {
		if cr, ok := s.(CheckpointReporter); ok {
			last := cr.LastCommitBefore()
			a.update(func(r *EmergencyReport) { r.LastCommitBefore = last })
		}
		start := a.now()
		err := s.Run(stepCtx, n)
		sr := StepReport{Name: s.Name(), StartedAt: start, Duration: a.now().Sub(start)}
		if err != nil {
			sr.Error = redact.String(err.Error())
			a.log.Error("emergency step failed", "step", s.Name(), "err", err)
		} else {
			a.log.Info("emergency step done", "step", s.Name(), "took", sr.Duration.Round(time.Millisecond).String())
		}
		a.update(func(r *EmergencyReport) { r.Steps = append(r.Steps, sr) })
		if cr, ok := s.(CheckpointReporter); ok {
			if res := cr.Committed(); res != nil {
				a.update(func(r *EmergencyReport) { c := *res; r.Checkpoint = &c })
			}
		}
	}
	side.Wait()

	outcome := "completed"
	if ctx.Err() != nil {
		outcome = "deadline"
	}
	deadline, _ = path.Deadline() // a later notice may have moved it earlier

	// 4. Acknowledge: the platform may proceed now.
	if a.deps.Acker != nil {
		ackCtx, ackCancel := context.WithTimeout(context.Background(), 5*time.Second)
		err := a.deps.Acker.Ack(ackCtx, n)
		ackCancel()
		a.update(func(r *EmergencyReport) {
			r.Acked = err == nil
			if err != nil {
				r.AckError = redact.String(err.Error())
			}
		})
		if err != nil {
			a.log.Error("acknowledge notice", "err", err)
		} else {
			a.log.Info("notice acknowledged", "provider", n.Provider, "id", n.ID)
		}
	}
	finished := a.now()
	a.update(func(r *EmergencyReport) {
		r.FinishedAt = finished
		r.Outcome = outcome
	})
	a.log.Warn("emergency path finished", "outcome", outcome,
		"took", finished.Sub(n.NoticedAt).Round(time.Millisecond).String(), "left", deadline.Sub(finished).Round(time.Millisecond).String())

	// 5. The outcome, to webhooks and the event record, within the deadline
	// (or a few seconds when it has passed).
	a.mu.Lock()
	rep := *a.emergency
	a.mu.Unlock()
	outDeadline := deadline
	if min := a.now().Add(5 * time.Second); outDeadline.Before(min) {
		outDeadline = min
	}
	a.report(context.Background(), outDeadline, Event{Phase: PhaseOutcome, Notice: n, Class: ClassFatal, Emergency: &rep})
}

func (a *Agent) update(f func(r *EmergencyReport)) {
	a.mu.Lock()
	f(a.emergency)
	a.notifyChangeLocked()
	a.mu.Unlock()
}
