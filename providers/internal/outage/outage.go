// Package outage logs metadata failures without flooding: the first failure
// of a run, then a summary at most once a period, then the recovery.
package outage

import (
	"log/slog"
	"sync"
	"time"
)

// Tracker follows one source's failures.
type Tracker struct {
	log   *slog.Logger
	every time.Duration
	now   func() time.Time

	// OnFail, if set, is called on every failure (a metrics counter).
	OnFail func()

	mu      sync.Mutex
	failing bool
	since   time.Time
	count   int
	logged  time.Time
}

// New returns a tracker that logs to log at most once per every while
// failing, and calls onFail (if not nil) on every failure.
func New(log *slog.Logger, every time.Duration, onFail func()) *Tracker {
	return &Tracker{log: log, every: every, now: time.Now, OnFail: onFail}
}

// Fail records a failure of what.
func (t *Tracker) Fail(what string, err error) {
	if t.OnFail != nil {
		t.OnFail()
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	now := t.now()
	t.count++
	if !t.failing {
		t.failing, t.since, t.count, t.logged = true, now, 1, now
		t.log.Warn("metadata unavailable; retrying, no notice assumed", "what", what, "err", err)
		return
	}
	if now.Sub(t.logged) >= t.every {
		t.logged = now
		t.log.Warn("metadata still unavailable", "what", what, "err", err,
			"failures", t.count, "for", now.Sub(t.since).Round(time.Second).String())
	}
}

// OK records a success; it logs the recovery after a failure.
func (t *Tracker) OK() {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.failing {
		t.log.Info("metadata reachable again", "failures", t.count,
			"after", t.now().Sub(t.since).Round(time.Millisecond).String())
		t.failing = false
	}
}

// Failing reports whether the last attempt failed.
func (t *Tracker) Failing() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.failing
}
