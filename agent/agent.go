package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/preemptd/preemptd/advice"

	"github.com/preemptd/preemptd/internal/redact"
)

// Config is what the agent needs of preemptd's configuration.
type Config struct {
	// FatalWithin turns an advisory notice fatal when its deadline is this close.
	FatalWithin time.Duration
	// RunDir holds notice.json and the socket.
	RunDir string
	// Signal is sent to the trainer on a fatal notice.
	Signal string
	// RebalanceSignal, if set, is sent on an advisory notice.
	RebalanceSignal string
	// KillAfter escalates to SIGKILL this long after Signal (0: never), never
	// later than the deadline.
	KillAfter time.Duration
	// Hooks are shell commands run on every notice.
	Hooks []string
	// MinBudget is the least time the emergency path gets when a notice
	// arrives with its deadline already (nearly) past.
	MinBudget time.Duration
	// SimulateGroups are the groups whose members may POST /v1/simulate
	// beside root and the daemon's own user.
	SimulateGroups []int
	// CheckpointSignal, if set, is sent when a checkpoint is advised
	// ("checkpoint, keep training").
	CheckpointSignal string
}

// Deps are the parts the agent drives; nil ones are skipped.
type Deps struct {
	Watchers []Watcher
	// Relay, if set, is told of fatal and withdrawn notices (job fan-out).
	Relay   Relay
	Trainer Trainer
	Acker   Acker
	Steps   []Step
	// GPUs, if set, is snapshotted into the notice and status, and watched
	// for critical XID events.
	GPUs   GPUs
	Logger *slog.Logger
	// Now is the clock; time.Now when nil.
	Now func() time.Time
	// Reporters are told of every notice and emergency outcome.
	Reporters []Reporter
	// Identifier, if set, is asked for the instance's identity at start.
	Identifier Identifier
	// Instance is the identity known without asking (hostname, boot time).
	Instance Instance
	// OnEmergencyDone, if set, is called when an emergency path has
	// finished (the daemon releases its shutdown lock there).
	OnEmergencyDone func(EmergencyReport)
	// Job, if set, describes the multi-node job for status.
	Job func() *JobStatus
	// Advisor, if set, says when to checkpoint: published as advice.json
	// and GET /v1/advice; risk notices are fed to it. OnAdvice is told of
	// every change (metrics).
	Advisor  *advice.Advisor
	OnAdvice func(advice.Advice)
	// Run names the training run.
	Run string
	// Provider names the notice source for status.
	Provider string
	Version  string
}

// Agent is the state machine: watch → notify → signal trainer → steps →
// wait for trainer → ack → done.
type Agent struct {
	cfg  Config
	deps Deps
	log  *slog.Logger
	now  func() time.Time

	inject   chan Notice
	escalate chan string
	expire   chan string

	mu      sync.Mutex
	started time.Time
	active  map[string]*tracked
	order   []string // keys of active, oldest first
	last    *Notice
	changed chan struct{} // closed and replaced when notices change
	// emergency is the running emergency path's report, or the last one's;
	// path is the running one (nil when the agent is armed for the next).
	emergency *EmergencyReport
	path      *pathCtx
	emDone    chan struct{} // closed when the running (or next) path ends
	lastSig   *SignalReport
	watchErrs map[string]string
	xids      []XIDEvent
	instance  Instance
	// advice is the advice last published; adviceChanged is closed and
	// replaced at every change.
	advice        *advice.Advice
	adviceChanged chan struct{}
	running       bool
	stopped       bool
	reports       sync.WaitGroup
}

// maxXIDs is how many recent XID events status keeps.
const maxXIDs = 16

type tracked struct {
	n     Notice
	class Class
	timer *time.Timer // an advisory notice's escalation
	// expiry withdraws a simulated notice at its deadline.
	expiry *time.Timer
}

// New builds an agent; call Run to start it.
func New(cfg Config, deps Deps) *Agent {
	if deps.Logger == nil {
		deps.Logger = slog.New(slog.DiscardHandler)
	}
	if deps.Now == nil {
		deps.Now = time.Now
	}
	if cfg.MinBudget <= 0 {
		cfg.MinBudget = 10 * time.Second
	}
	return &Agent{
		instance:  deps.Instance,
		cfg:       cfg,
		deps:      deps,
		log:       deps.Logger,
		now:       deps.Now,
		inject:    make(chan Notice, 8),
		escalate:  make(chan string, 8),
		expire:    make(chan string, 8),
		active:    map[string]*tracked{},
		changed:   make(chan struct{}),
		emDone:    make(chan struct{}),
		watchErrs: map[string]string{},

		adviceChanged: make(chan struct{}),
	}
}

// ErrNotWatching is returned by Inject when the agent's loop has stopped
// (or is too busy to take the notice within a second).
var ErrNotWatching = errors.New("the agent is not watching")

// Inject hands the agent a notice from outside its watchers: a simulation
// through the local API, or the shutdown notice made from systemd's SIGTERM.
func (a *Agent) Inject(n Notice) error {
	if n.NoticedAt.IsZero() {
		n.NoticedAt = a.now()
	}
	a.mu.Lock()
	stopped := a.stopped
	a.mu.Unlock()
	if stopped {
		return ErrNotWatching
	}
	select { // before Run starts, the notice waits for it in the channel
	case a.inject <- n:
		return nil
	case <-time.After(time.Second):
		return ErrNotWatching
	}
}

// EmergencyDone is closed when the running emergency path has finished;
// when none runs, it is the last path's (closed), or before any path the
// first one's. The agent re-arms after every path: a drill, a false alarm
// or a withdrawn notice never leaves it unable to act on the next fatal
// notice.
func (a *Agent) EmergencyDone() <-chan struct{} {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.emDone
}

// EmergencyStarted reports whether an emergency path has begun since the
// agent was made (it may have finished).
func (a *Agent) EmergencyStarted() bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.emergency != nil
}

// EmergencyRunning reports whether an emergency path runs now, and the
// channel closed when it ends.
func (a *Agent) EmergencyRunning() (bool, <-chan struct{}) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.path != nil, a.emDone
}

// FatalHandled reports whether a fatal notice that is still active has had
// its emergency path, which has finished: the machine is going away and
// there is nothing left to do for it (a shutdown that follows it needs no
// second path).
func (a *Agent) FatalHandled() bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.handledLocked() != nil
}

// handledLocked returns the notice of the last emergency path when that
// path has finished and its notice is still active (the machine is going
// away), else nil.
func (a *Agent) handledLocked() *tracked {
	if a.path != nil || a.emergency == nil {
		return nil
	}
	return a.active[a.emergency.Notice.Key()]
}

// Run watches until ctx ends. An emergency path it started goes on after
// ctx ends, under its own deadline; wait for it with EmergencyDone.
func (a *Agent) Run(ctx context.Context) error {
	a.mu.Lock()
	a.started = a.now()
	a.running = true
	a.mu.Unlock()
	// A notice.json left by an earlier life of the daemon describes a notice
	// nobody is handling: a trainer must never act on it.
	if err := removeNoticeFile(a.cfg.RunDir); err != nil {
		a.log.Error("remove stale notice file", "err", err)
	}
	defer func() {
		a.mu.Lock()
		a.running, a.stopped = false, true
		a.mu.Unlock()
	}()

	notices := make(chan Notice, 32)
	var wg sync.WaitGroup
	for i, w := range a.deps.Watchers {
		wg.Go(func() {
			if err := w.Watch(ctx, notices); err != nil && !errors.Is(err, context.Canceled) {
				a.log.Error("watcher stopped", "watcher", i, "err", err)
				a.mu.Lock()
				a.watchErrs[fmt.Sprint(i)] = redact.String(err.Error())
				a.mu.Unlock()
			}
		})
	}
	if a.deps.Identifier != nil {
		wg.Go(func() { a.identify(ctx) })
	}
	if a.deps.Advisor != nil {
		wg.Go(func() { a.advise(ctx) })
	}
	if a.deps.GPUs != nil {
		xids := make(chan XIDEvent, 8)
		wg.Go(func() {
			if err := a.deps.GPUs.WatchXID(ctx, xids); err != nil && !errors.Is(err, context.Canceled) {
				a.log.Warn("GPU event watch stopped", "err", err)
			}
		})
		wg.Go(func() { a.recordXIDs(ctx, xids) })
	}
	defer wg.Wait()

	for {
		select {
		case <-ctx.Done():
			a.stopTimers()
			return nil
		case n := <-notices:
			a.handle(ctx, n)
		case n := <-a.inject:
			a.handle(ctx, n)
		case key := <-a.escalate:
			a.reclassify(ctx, key)
		case key := <-a.expire:
			a.expireNotice(key)
		}
	}
}

func (a *Agent) stopTimers() {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, t := range a.active {
		if t.timer != nil {
			t.timer.Stop()
		}
		if t.expiry != nil {
			t.expiry.Stop()
		}
	}
}

func (a *Agent) handle(ctx context.Context, n Notice) {
	key := n.Key()
	a.mu.Lock()
	t, seen := a.active[key]
	if n.Withdrawn {
		if !seen {
			a.mu.Unlock()
			return
		}
		a.dropLocked(key, t)
		a.mu.Unlock()
		a.relayWithdrawn(t.n)
		a.endRisk(key)
		a.log.Info("notice withdrawn", "provider", n.Provider, "kind", n.Kind, "id", n.ID)
		a.publishUnlessEmergency()
		return
	}
	if seen {
		// The same notice again: only a moved deadline matters.
		if n.Deadline.Equal(t.n.Deadline) || n.Deadline.IsZero() {
			a.mu.Unlock()
			return
		}
		from := t.n.Deadline
		t.n.Deadline = n.Deadline
		if !n.WindowEnd.IsZero() {
			t.n.WindowEnd = n.WindowEnd
		}
		a.notifyChangeLocked()
		a.mu.Unlock()
		a.log.Info("notice deadline moved", "provider", n.Provider, "id", n.ID, "from", from, "to", n.Deadline)
		a.noteRisk(t.n, t.class)
		a.rearm(ctx, key)
		if from.IsZero() || n.Deadline.Before(from) {
			a.reclassify(ctx, key) // it may be fatal now, or shorten the running path
		}
		a.publishUnlessEmergency()
		return
	}
	class := Classify(n, a.now(), a.cfg.FatalWithin)
	t = &tracked{n: n, class: class}
	a.active[key] = t
	a.order = append(a.order, key)
	a.last = &t.n
	a.notifyChangeLocked()
	if n.Provider == ProviderSimulate && !n.Deadline.IsZero() {
		// A drill's notice ends at its deadline: nothing else withdraws it.
		t.expiry = time.AfterFunc(n.Deadline.Sub(a.now()), func() {
			select {
			case a.expire <- key:
			case <-ctx.Done():
			}
		})
	}
	a.mu.Unlock()

	a.log.Info("notice", "provider", n.Provider, "kind", n.Kind, "id", n.ID, "action", n.Action,
		"class", class, "deadline", n.Deadline, "seconds_left", n.SecondsLeft(a.now()))
	a.noteRisk(n, class)
	if class != ClassFatal { // a fatal notice is reported by its emergency path
		a.report(context.WithoutCancel(ctx), a.hookDeadline(n), Event{Phase: PhaseNotice, Notice: n, Class: class})
	}
	a.act(ctx, t)
}

// dropLocked forgets an active notice (withdrawn or expired).
func (a *Agent) dropLocked(key string, t *tracked) {
	if t.timer != nil {
		t.timer.Stop()
	}
	if t.expiry != nil {
		t.expiry.Stop()
	}
	delete(a.active, key)
	a.order = slices.DeleteFunc(a.order, func(k string) bool { return k == key })
	t.n.Withdrawn = true
	a.last = &t.n
	a.notifyChangeLocked()
}

// expireNotice drops a simulated notice whose deadline has passed.
func (a *Agent) expireNotice(key string) {
	a.mu.Lock()
	t, ok := a.active[key]
	if !ok {
		a.mu.Unlock()
		return
	}
	a.dropLocked(key, t)
	a.mu.Unlock()
	a.relayWithdrawn(t.n)
	a.endRisk(key)
	a.log.Info("simulated notice expired at its deadline", "id", t.n.ID, "kind", t.n.Kind)
	a.publishUnlessEmergency()
}

func (a *Agent) relayWithdrawn(n Notice) {
	if a.deps.Relay != nil {
		a.deps.Relay.Withdrawn(n)
	}
}

// publishUnlessEmergency rewrites notice.json from the active notices; while
// an emergency path runs, the file stays its notice's.
func (a *Agent) publishUnlessEmergency() {
	a.mu.Lock()
	running := a.path != nil
	a.mu.Unlock()
	if !running {
		a.publishFile()
	}
}

// rearm moves an advisory notice's escalation with its deadline (an AWS
// scheduled event rescheduled, either way). A path already running keeps
// its deadline unless the new one is earlier (reclassify shortens it).
func (a *Agent) rearm(ctx context.Context, key string) {
	a.mu.Lock()
	t, ok := a.active[key]
	if !ok || t.class != ClassAdvisory {
		a.mu.Unlock()
		return
	}
	if t.timer != nil {
		t.timer.Stop()
		t.timer = nil
	}
	a.mu.Unlock()
	a.armEscalation(ctx, t)
}

// act carries out what a notice's class calls for.
func (a *Agent) act(ctx context.Context, t *tracked) {
	switch t.class {
	case ClassFatal:
		if a.deps.Relay != nil {
			a.mu.Lock()
			n := t.n
			a.mu.Unlock()
			a.deps.Relay.Fatal(n) // the job's other nodes first: they have saving to do too
		}
		a.startEmergency(t.n)
	case ClassAdvisory:
		a.publishFile()
		go a.runHooks(context.WithoutCancel(ctx), t.n, a.hookDeadline(t.n))
		if a.cfg.RebalanceSignal != "" && a.deps.Trainer != nil {
			rep, err := a.deps.Trainer.Signal(ctx, a.cfg.RebalanceSignal)
			a.recordSignal(rep, err)
		}
		a.armEscalation(ctx, t)
	case ClassInfo:
		a.publishUnlessEmergency()
	}
}

// armEscalation sets an advisory notice's timer to fire fatal_within before
// its deadline.
func (a *Agent) armEscalation(ctx context.Context, t *tracked) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if t.n.Deadline.IsZero() || t.n.Kind == KindDisruption {
		return
	}
	key := t.n.Key()
	wait := t.n.Deadline.Sub(a.now()) - a.cfg.FatalWithin
	t.timer = time.AfterFunc(wait, func() {
		select {
		case a.escalate <- key:
		case <-ctx.Done():
		}
	})
}

// reclassify looks at an active notice again (its timer fired or its
// deadline moved) and escalates it when it has turned fatal.
func (a *Agent) reclassify(ctx context.Context, key string) {
	a.mu.Lock()
	t, ok := a.active[key]
	if !ok {
		a.mu.Unlock()
		return
	}
	class := Classify(t.n, a.now(), a.cfg.FatalWithin)
	if class == t.class {
		deadline := t.n.Deadline
		a.mu.Unlock()
		if class == ClassFatal {
			a.shortenPath(key, deadline) // a fatal notice's deadline moved earlier
		}
		return
	}
	if t.timer != nil {
		t.timer.Stop()
		t.timer = nil
	}
	t.class = class
	a.notifyChangeLocked()
	a.mu.Unlock()
	a.log.Info("notice escalated", "provider", t.n.Provider, "kind", t.n.Kind, "id", t.n.ID, "class", class)
	a.act(ctx, t)
}

func (a *Agent) recordSignal(rep SignalReport, err error) {
	if err != nil {
		rep.Problems = append(rep.Problems, err.Error())
	}
	if len(rep.PIDs) == 0 {
		a.log.Warn("no trainer process found to signal", "signal", rep.Signal, "problems", rep.Problems)
	} else {
		a.log.Info("trainer signalled", "signal", rep.Signal, "pids", rep.PIDs, "groups", rep.Groups,
			"sources", rep.Sources)
	}
	a.mu.Lock()
	a.lastSig = &rep
	a.mu.Unlock()
}

func (a *Agent) notifyChangeLocked() {
	close(a.changed)
	a.changed = make(chan struct{})
}

// hookDeadline bounds the hooks of a notice: its deadline, or a minute for a
// notice that has none.
func (a *Agent) hookDeadline(n Notice) time.Time {
	if n.Deadline.IsZero() {
		return a.now().Add(time.Minute)
	}
	return n.Deadline
}

// current returns the notice notice.json should describe: the emergency's if
// one runs or its notice is still active, else the newest active one.
func (a *Agent) current() (Notice, Class, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.path != nil {
		return a.emergency.Notice, ClassFatal, true
	}
	if t := a.handledLocked(); t != nil { // handled, and the machine still going away
		return t.n, ClassFatal, true
	}
	if len(a.order) == 0 {
		return Notice{}, "", false
	}
	t := a.active[a.order[len(a.order)-1]]
	return t.n, t.class, true
}

func (a *Agent) publishFile() {
	n, class, ok := a.current()
	if !ok {
		if err := removeNoticeFile(a.cfg.RunDir); err != nil {
			a.log.Error("remove notice file", "err", err)
		}
		return
	}
	a.mu.Lock()
	var gpus *GPUSnapshot
	if a.emergency != nil && a.emergency.Notice.Key() == n.Key() {
		gpus = a.emergency.GPUs
	}
	a.mu.Unlock()
	if err := writeNoticeFile(a.cfg.RunDir, n, class, gpus, a.now()); err != nil {
		a.log.Error("write notice file", "err", err)
	}
}

func (a *Agent) recordXIDs(ctx context.Context, xids <-chan XIDEvent) {
	for {
		select {
		case <-ctx.Done():
			return
		case x := <-xids:
			level := slog.LevelWarn
			if x.Hardware {
				level = slog.LevelError
			}
			a.log.Log(ctx, level, "GPU XID event", "device", x.Device, "uuid", x.UUID, "xid", x.XID, "hardware", x.Hardware)
			a.mu.Lock()
			a.xids = append(a.xids, x)
			if len(a.xids) > maxXIDs {
				a.xids = a.xids[len(a.xids)-maxXIDs:]
			}
			a.mu.Unlock()
		}
	}
}

// identify asks the cloud for the instance's identity, retrying with
// backoff until it answers or ctx ends.
func (a *Agent) identify(ctx context.Context) {
	wait := time.Second
	for {
		inst, err := a.deps.Identifier.Identity(ctx)
		if err == nil {
			a.mu.Lock()
			base := a.instance
			if inst.Hostname == "" {
				inst.Hostname = base.Hostname
			}
			if inst.StartedAt.IsZero() {
				inst.StartedAt = base.StartedAt
			}
			a.instance = inst
			a.mu.Unlock()
			a.log.Info("instance", "id", inst.ID, "type", inst.Type, "region", inst.Region, "zone", inst.Zone,
				"lifecycle", inst.Lifecycle)
			return
		}
		a.log.Debug("instance identity not available yet", "err", err)
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
		wait = min(wait*2, time.Minute)
	}
}

// Instance is the identity known so far.
func (a *Agent) Instance() Instance {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.instance
}

// Ready reports whether the agent is watching and every watcher is alive.
func (a *Agent) Ready() bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.running && len(a.watchErrs) == 0
}

// report tells every reporter about ev, each in its own goroutine bounded
// by deadline; WaitReports waits for them.
func (a *Agent) report(ctx context.Context, deadline time.Time, ev Event) {
	if len(a.deps.Reporters) == 0 {
		return
	}
	ev.Instance = a.Instance()
	ev.Run = a.deps.Run
	ev.At = a.now()
	if ev.Advice == nil {
		ev.Advice, _ = a.Advice()
	}
	for _, r := range a.deps.Reporters {
		a.reports.Go(func() {
			rctx, cancel := context.WithDeadline(ctx, deadline)
			defer cancel()
			r.Report(rctx, ev)
		})
	}
}

// WaitReports waits for the reports in flight (at exit).
func (a *Agent) WaitReports() { a.reports.Wait() }
