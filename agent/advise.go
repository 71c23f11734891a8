package agent

import (
	"context"
	"encoding/json"
	"net/http"
	"path/filepath"
	"time"

	"github.com/preemptd/preemptd/advice"
)

// AdviceFileName is the file in run_dir that tells the trainer when to
// checkpoint.
const AdviceFileName = "advice.json"

// adviceTick is how often the advice is looked at between changes (a risk
// that starts or ends with time); the interval's end wakes it on time.
const adviceTick = time.Second

// riskKinds are the advisory notices that make an interruption likelier now.
var riskKinds = map[Kind]bool{KindRebalance: true, KindMaintenance: true, KindReboot: true}

// noteRisk tells the advisor of a new advisory notice (a rebalance
// recommendation, planned maintenance): a risk signal.
func (a *Agent) noteRisk(n Notice, class Class) {
	if a.deps.Advisor == nil || class == ClassFatal || !riskKinds[n.Kind] {
		return
	}
	detail := n.Action
	if !n.Deadline.IsZero() {
		detail += " at " + n.Deadline.UTC().Format(time.RFC3339)
	}
	r := advice.Risk{Key: n.Key(), Kind: string(n.Kind), Detail: n.Provider + " " + detail, At: n.NoticedAt}
	if !n.Deadline.IsZero() && n.Deadline.Sub(n.NoticedAt) > advice.RiskLead {
		r.From = n.Deadline.Add(-advice.RiskLead)
	}
	a.deps.Advisor.AddRisk(r)
}

func (a *Agent) endRisk(key string) {
	if a.deps.Advisor != nil {
		a.deps.Advisor.EndRisk(key)
	}
}

// advise publishes the advice (advice.json, GET /v1/advice, metrics) on
// every change and sends trainer.checkpoint_signal when a checkpoint is
// asked for, never sooner after the last one than a save and its upload
// take, and never during an emergency path.
func (a *Agent) advise(ctx context.Context) {
	adv := a.deps.Advisor
	path := filepath.Join(a.cfg.RunDir, AdviceFileName)
	var last advice.Advice
	var signalled int
	var signalledAt time.Time
	for {
		changed := adv.Changed()
		cur := adv.Advice(a.now())
		if !advice.Same(cur, last) {
			b, _ := json.MarshalIndent(cur, "", "  ")
			if err := WriteFileAtomic(path, append(b, '\n'), 0o644); err != nil {
				a.log.Error("write advice file", "err", err)
			}
			if cur.CheckpointNow && !last.CheckpointNow {
				a.log.Info("checkpoint advised", "reason", cur.Reason, "every_s", cur.CheckpointEvery)
			} else if cur.CheckpointEvery != last.CheckpointEvery {
				a.log.Info("checkpoint interval", "every_s", cur.CheckpointEvery, "formula", cur.Inputs.Formula)
			}
			a.mu.Lock()
			a.advice = &cur
			close(a.adviceChanged)
			a.adviceChanged = make(chan struct{})
			a.mu.Unlock()
			if a.deps.OnAdvice != nil {
				a.deps.OnAdvice(cur)
			}
			last = cur
		}
		if cur.CheckpointNow && cur.Request != signalled && a.cfg.CheckpointSignal != "" && a.deps.Trainer != nil {
			running, _ := a.EmergencyRunning()
			if !running && (signalledAt.IsZero() || a.now().Sub(signalledAt) >= adv.MinGap()) {
				rep, err := a.deps.Trainer.Signal(ctx, a.cfg.CheckpointSignal)
				a.recordSignal(rep, err)
				signalled, signalledAt = cur.Request, a.now()
			}
		}
		// Wake at the due time itself, not up to a tick after it.
		wake := adviceTick
		if due := cur.DueAt.Sub(a.now()); !cur.CheckpointNow && due > 0 && due < wake {
			wake = due
		}
		timer := time.NewTimer(wake)
		select {
		case <-ctx.Done():
			timer.Stop()
			return
		case <-changed:
		case <-timer.C:
		}
		timer.Stop()
	}
}

// Advice returns the advice last published, and the channel closed at the
// next; nil when advice is off or not published yet.
func (a *Agent) Advice() (*advice.Advice, <-chan struct{}) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.advice, a.adviceChanged
}

// serveAdvice answers GET /v1/advice; with ?wait=30s it holds the request
// until checkpoint_now is true or the wait ends (then the advice as it is).
func (a *Agent) serveAdvice(w http.ResponseWriter, r *http.Request) {
	if a.deps.Advisor == nil {
		writeJSON(w, http.StatusNotFound, map[string]string{"error": "checkpoint advice is off (advice.enabled: false)"})
		return
	}
	wait, ok := parseWait(w, r)
	if !ok {
		return
	}
	if !hold(r, wait, func() (bool, <-chan struct{}) {
		cur, changed := a.Advice()
		return cur != nil && cur.CheckpointNow, changed
	}) {
		return
	}
	cur, _ := a.Advice()
	if cur == nil { // not published yet
		c := a.deps.Advisor.Advice(a.now())
		cur = &c
	}
	writeJSON(w, http.StatusOK, cur)
}
