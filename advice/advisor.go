package advice

import (
	"bytes"
	"encoding/json"
	"slices"
	"sync"
	"time"
)

// Advice is what the trainer is told: advice.json, GET /v1/advice.
type Advice struct {
	Version int `json:"version"`
	// CheckpointEvery is the recommended interval between checkpoints.
	CheckpointEvery float64 `json:"checkpoint_every_s"`
	// CheckpointNow asks for a checkpoint now: the interval has passed since
	// the last complete one, or a risk signal arrived. It clears when the
	// next checkpoint completes.
	CheckpointNow bool `json:"checkpoint_now"`
	// Request counts the times CheckpointNow was raised: a trainer acts once
	// per value.
	Request int    `json:"request"`
	Reason  string `json:"reason"`
	// LastCheckpoint is when the newest checkpoint completed; DueAt is when
	// the next one is due.
	LastCheckpoint time.Time `json:"last_checkpoint_at,omitzero"`
	DueAt          time.Time `json:"due_at,omitzero"`
	Inputs         Inputs2   `json:"inputs"`
	UpdatedAt      time.Time `json:"updated_at"`
}

// Inputs2 are the inputs as published, in seconds and hours.
type Inputs2 struct {
	SaveSeconds   float64 `json:"save_s"`
	SaveMeasured  int     `json:"saves_measured"`
	UploadSeconds float64 `json:"upload_s"`
	MTBIHours     float64 `json:"mtbi_h"`
	// JobNodes is the job's size when it has more than one node: the
	// interval uses its M, mtbi_h ÷ job_nodes (advice.JobMTBI).
	JobNodes      int     `json:"job_nodes,omitempty"`
	Interruptions int     `json:"interruptions"`
	ObservedHours float64 `json:"observed_hours"`
	Committed     float64 `json:"committed_fraction"`
	Watched       int     `json:"notices_watched"`
	Basis         string  `json:"basis"`
	Risks         []Risk  `json:"risks"`
	Formula       string  `json:"formula"`
}

// Same reports whether a and b say the same thing (UpdatedAt aside).
func Same(a, b Advice) bool {
	a.UpdatedAt, b.UpdatedAt = time.Time{}, time.Time{}
	ja, _ := json.Marshal(a)
	jb, _ := json.Marshal(b)
	return bytes.Equal(ja, jb)
}

// Config bounds the advisor.
type Config struct {
	Min, Max time.Duration
	// Window is the cloud's notice window (AWS 2 min, GCP and Azure 30 s):
	// whether a save and its upload fit in it is p's prior.
	Window time.Duration
	// Nodes is the job's number of nodes (0 or 1: a single machine).
	Nodes int
}

// savesKept is how many recent saves C is the mean of: few, so that the
// interval follows a trainer whose saves got slower (a bigger model, a
// slower disk) within a few checkpoints.
const savesKept = 3

// Advisor holds the measurements and says what to do; safe for concurrent
// use. It does no I/O and reads no clock: every call passes the time.
type Advisor struct {
	cfg Config

	mu      sync.Mutex
	saves   []time.Duration
	upload  time.Duration
	rate    Rate
	risks   map[string]*held
	last    time.Time // newest complete checkpoint
	started time.Time
	request int
	pending string // why checkpoint_now is raised; "" when it is not
	changed chan struct{}
}

// held is a risk and whether it has asked for its checkpoint yet.
type held struct {
	Risk
	raised bool
}

// New returns an advisor that starts counting the interval at start, with
// the prior rate until SetRate.
func New(cfg Config, start time.Time, rate Rate) *Advisor {
	return &Advisor{cfg: cfg, started: start, rate: rate, risks: map[string]*held{}, changed: make(chan struct{})}
}

func (a *Advisor) notifyLocked() {
	close(a.changed)
	a.changed = make(chan struct{})
}

// Changed is closed at the next change of the inputs.
func (a *Advisor) Changed() <-chan struct{} {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.changed
}

// Saved records a checkpoint completed at at; took is its save time (first
// write to completion marker), 0 when not measured (one found at start).
func (a *Advisor) Saved(at time.Time, took time.Duration) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if at.After(a.last) {
		a.last = at
		a.pending = ""
	}
	if took > 0 {
		a.saves = append(a.saves, took)
		if len(a.saves) > savesKept {
			a.saves = a.saves[len(a.saves)-savesKept:]
		}
	}
	a.notifyLocked()
}

// Uploaded records how long a commit took.
func (a *Advisor) Uploaded(took time.Duration) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.upload = took
	a.notifyLocked()
}

// SetRate replaces the interruption estimate.
func (a *Advisor) SetRate(r Rate) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.rate = r
	a.notifyLocked()
}

// AddRisk records a risk signal; once it counts (From), it asks for a
// checkpoint at once and shortens the interval while it lasts.
func (a *Advisor) AddRisk(r Risk) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if old, ok := a.risks[r.Key]; ok {
		old.Until, old.From = r.Until, r.From
		return
	}
	a.risks[r.Key] = &held{Risk: r}
	a.notifyLocked()
}

// EndRisk drops a risk signal (its notice was withdrawn).
func (a *Advisor) EndRisk(key string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if _, ok := a.risks[key]; ok {
		delete(a.risks, key)
		a.notifyLocked()
	}
}

func (a *Advisor) raiseLocked(why string) {
	if a.pending == "" {
		a.request++
	}
	a.pending = why
}

func (a *Advisor) saveLocked() (time.Duration, int) {
	if len(a.saves) == 0 {
		return 0, 0
	}
	var sum time.Duration
	for _, s := range a.saves {
		sum += s
	}
	return sum / time.Duration(len(a.saves)), len(a.saves)
}

// Advice is the advice at now; it raises checkpoint_now when the interval
// has passed since the last complete checkpoint (or the start).
func (a *Advisor) Advice(now time.Time) Advice {
	a.mu.Lock()
	defer a.mu.Unlock()
	var risks []Risk
	for k, r := range a.risks {
		if !r.Until.IsZero() && !now.Before(r.Until) {
			delete(a.risks, k)
			continue
		}
		if !r.From.IsZero() && now.Before(r.From) {
			continue // not yet: planned maintenance days ahead
		}
		if !r.raised {
			r.raised = true
			a.raiseLocked(r.Kind + ": " + r.Detail)
		}
		risks = append(risks, r.Risk)
	}
	slices.SortFunc(risks, func(x, y Risk) int { return x.At.Compare(y.At) })
	save, n := a.saveLocked()
	rate := a.rate.WithPrior(save, a.upload, a.cfg.Window)
	t, formula := Interval(Inputs{Save: save, Upload: a.upload, Rate: rate, Risks: risks, Nodes: a.cfg.Nodes, Min: a.cfg.Min, Max: a.cfg.Max})
	from := a.last
	if from.IsZero() {
		from = a.started
	}
	due := from.Add(t)
	if a.pending == "" && !now.Before(due) {
		a.raiseLocked("the interval has passed since the last checkpoint")
	}
	reason := "next checkpoint due at " + due.UTC().Format(time.RFC3339)
	if a.pending != "" {
		reason = "checkpoint now: " + a.pending
	}
	if save <= 0 {
		save = DefaultSave
	}
	return Advice{
		Version: 1, CheckpointEvery: t.Seconds(), CheckpointNow: a.pending != "", Request: a.request, Reason: reason,
		LastCheckpoint: a.last, DueAt: due, UpdatedAt: now,
		Inputs: Inputs2{SaveSeconds: save.Seconds(), SaveMeasured: n, UploadSeconds: a.upload.Seconds(),
			MTBIHours: rate.MTBI.Hours(), JobNodes: jobNodes(a.cfg.Nodes), Interruptions: rate.Interruptions, ObservedHours: rate.Hours,
			Committed: rate.Committed, Watched: rate.Watched, Basis: rate.Basis, Risks: risks, Formula: formula},
	}
}

func jobNodes(n int) int {
	if n > 1 {
		return n
	}
	return 0
}

// MinGap is the least time between two checkpoint requests by signal: the
// time the trainer takes to save and upload one.
func (a *Advisor) MinGap() time.Duration {
	a.mu.Lock()
	defer a.mu.Unlock()
	save, _ := a.saveLocked()
	if save <= 0 {
		save = DefaultSave
	}
	return save + a.upload
}
