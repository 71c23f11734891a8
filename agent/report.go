package agent

import (
	"context"
	"time"

	"github.com/preemptd/preemptd/advice"
)

// Instance is the machine's identity, for records, webhooks and metrics.
type Instance struct {
	Provider string `json:"provider"`
	ID       string `json:"id,omitempty"`
	Type     string `json:"type,omitempty"`
	Region   string `json:"region,omitempty"`
	Zone     string `json:"zone,omitempty"`
	// Lifecycle is spot, preemptible, on-demand or "" when unknown.
	Lifecycle string    `json:"lifecycle,omitempty"`
	Hostname  string    `json:"hostname,omitempty"`
	StartedAt time.Time `json:"started_at,omitzero"`
}

// Identifier reads the instance's identity from its cloud.
type Identifier interface {
	Identity(ctx context.Context) (Instance, error)
}

// Phase says when an Event is reported.
type Phase string

// The phases of an event.
const (
	// PhaseNotice is reported when a notice arrives, before the slow work.
	PhaseNotice Phase = "notice"
	// PhaseOutcome is reported when the emergency path is over.
	PhaseOutcome Phase = "outcome"
)

// Event is what reporters (webhooks, the event record, metrics) are told.
type Event struct {
	Phase    Phase    `json:"event"`
	Notice   Notice   `json:"notice"`
	Class    Class    `json:"class"`
	Instance Instance `json:"instance"`
	Run      string   `json:"run,omitempty"`
	// Emergency is set for fatal notices (at the outcome, complete).
	Emergency *EmergencyReport `json:"emergency,omitempty"`
	// Advice is the checkpoint advice at the time (its measured inputs).
	Advice *advice.Advice `json:"advice,omitempty"`
	At     time.Time      `json:"at"`
}

// Reporter is told of every notice and of every emergency path's outcome.
// It must respect ctx (the notice's deadline) and never block the path:
// the agent calls reporters concurrently.
type Reporter interface {
	Report(ctx context.Context, ev Event)
}

// CheckpointResult is what the checkpoint step made durable.
type CheckpointResult struct {
	Name        string        `json:"name"`
	Step        int64         `json:"step"`
	Bytes       int64         `json:"bytes"`
	SentBytes   int64         `json:"sent_bytes"`
	CompleteAt  time.Time     `json:"complete_at"`
	CommittedAt time.Time     `json:"committed_at"`
	Upload      time.Duration `json:"upload_ns"`
}

// CheckpointReporter is a Step that says what it committed, if anything,
// and when the newest committed checkpoint before the notice was.
type CheckpointReporter interface {
	Step
	Committed() *CheckpointResult
	LastCommitBefore() time.Time
}
