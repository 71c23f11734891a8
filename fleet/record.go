// Package fleet keeps one event record per notice in the store (under
// _events/), written when the notice arrives and updated with the outcome,
// and turns all of them into the fleet report: interruptions by instance
// type, region and zone, lifetimes, notice→durable times, checkpoints lost,
// and what spot cost and saved against on-demand.
package fleet

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"log/slog"
	"path"
	"slices"
	"strings"
	"time"

	"github.com/preemptd/preemptd/agent"
	"github.com/preemptd/preemptd/checkpoint/storage"
)

// EventsPrefix is where records live in the store.
const EventsPrefix = "_events"

// RecordVersion is the version written; Load reads 1 to it.
const RecordVersion = 3

// Record is one notice's record.
type Record struct {
	Version  int            `json:"version"`
	Run      string         `json:"run,omitempty"`
	Instance agent.Instance `json:"instance"`
	Provider string         `json:"provider"`
	Kind     agent.Kind     `json:"kind"`
	NoticeID string         `json:"notice_id"`
	Action   string         `json:"action,omitempty"`
	Class    agent.Class    `json:"class"`
	// Simulated marks records of `preemptd simulate` (left out of reports
	// by default), and of job notices a drill started.
	Simulated bool `json:"simulated,omitempty"`
	// JobOrigin, on a job notice's record, is the node whose notice stopped
	// the job, and JobOrigins every node's notice of that stop.
	JobOrigin          string            `json:"job_origin,omitempty"`
	JobOrigins         []json.RawMessage `json:"job_origins,omitempty"`
	NoticedAt          time.Time         `json:"noticed_at"`
	Deadline           time.Time         `json:"deadline,omitzero"`
	SignalledAt        time.Time         `json:"signalled_at,omitzero"`
	CheckpointComplete time.Time         `json:"checkpoint_complete_at,omitzero"`
	CommittedAt        time.Time         `json:"committed_at,omitzero"`
	// LastCommitBefore is the newest checkpoint committed before the notice.
	LastCommitBefore time.Time `json:"last_commit_before,omitzero"`
	Checkpoint       string    `json:"checkpoint,omitempty"`
	Bytes            int64     `json:"bytes,omitempty"`
	// Watched says the machine watched checkpoints (checkpoint.dir was set):
	// only then can a notice lose one. Version-1 records lack it.
	Watched bool `json:"checkpoints_watched,omitempty"`
	// Outcome is "pending" until the emergency path ends, then "completed"
	// or "deadline"; advisory and informational notices stay "notice".
	Outcome string `json:"outcome"`
	Reason  string `json:"reason,omitempty"`
	// SaveSeconds and UploadSeconds are the trainer's save time and the
	// last upload's as the advisor measured them before the notice (0:
	// not measured); version 3.
	SaveSeconds   float64 `json:"save_s,omitempty"`
	UploadSeconds float64 `json:"upload_s,omitempty"`
	// Restore is set on the record of a restore (kind "restore"): what a
	// machine fetched before its trainer could start again.
	Restore *Restore `json:"restore,omitempty"`
	// Key is the per-notice object a rollup line came from.
	Key       string             `json:"key,omitempty"`
	GPUs      *agent.GPUSnapshot `json:"gpus,omitempty"`
	UpdatedAt time.Time          `json:"updated_at"`
}

// KindRestore is the kind of a restore's record.
const KindRestore agent.Kind = "restore"

// Restore is what one `preemptd restore` did.
type Restore struct {
	Seconds      float64 `json:"seconds"`
	FetchedBytes int64   `json:"fetched_bytes"`
	KeptBytes    int64   `json:"kept_bytes"`
	Files        int     `json:"files"`
	FilesKept    int     `json:"files_kept"`
}

// Key is the record's object key:
// _events/day=<YYYY-MM-DD>/<zone>__<type>__<run>__<instance>-<provider>-<notice>.json
// (a Hive-style partition, so that DuckDB, Athena and BigQuery read the
// day from the path; the zone, instance type and a tag of the run in the
// name, so that a daemon looking for interruptions near it reads only
// those records). Records before version 3 are under _events/<day>/, and
// version 3's names lack the zone, type and run.
func Key(r Record) string {
	inst := r.Instance.ID
	if inst == "" {
		inst = r.Instance.Hostname
	}
	if inst == "" {
		inst = "unknown"
	}
	return fmt.Sprintf("%s/day=%s/%s__%s__%s__%s-%s-%s.json", EventsPrefix, r.NoticedAt.UTC().Format("2006-01-02"),
		orUnknownKey(r.Instance.Zone), orUnknownKey(r.Instance.Type), RunTag(r.Run),
		storage.SafeElement(inst), storage.SafeElement(r.Provider), storage.SafeElement(r.NoticeID))
}

func orUnknownKey(s string) string { return storage.SafeElement(orUnknown(s)) }

// RunTag names a run in record keys: a short hash ("none" without one).
func RunTag(run string) string {
	if run == "" {
		return "none"
	}
	sum := sha256.Sum256([]byte(run))
	return hex.EncodeToString(sum[:4])
}

// keyFields reads the zone, instance type and run tag from a record's key
// (ok false for the names of earlier releases, which lack them).
func keyFields(key string) (zone, typ, run string, ok bool) {
	name := path.Base(key)
	f := strings.SplitN(name, "__", 4)
	if len(f) != 4 {
		return "", "", "", false
	}
	return f[0], f[1], f[2], true
}

// FromEvent builds the record of ev.
func FromEvent(ev agent.Event) Record {
	n := ev.Notice
	r := Record{Version: RecordVersion, Run: ev.Run, Instance: ev.Instance, Provider: n.Provider, Kind: n.Kind, NoticeID: n.ID,
		Action: n.Action, Class: ev.Class, Simulated: n.Provider == "simulate", NoticedAt: n.NoticedAt.UTC(),
		Deadline: n.Deadline.UTC(), Outcome: "notice", UpdatedAt: ev.At.UTC()}
	if n.Deadline.IsZero() {
		r.Deadline = time.Time{}
	}
	if n.Kind == agent.KindJob {
		var raw struct {
			Node    string            `json:"node"`
			Origins []json.RawMessage `json:"origins"`
		}
		if json.Unmarshal(n.Raw, &raw) == nil {
			r.JobOrigin, r.JobOrigins = raw.Node, raw.Origins
			for _, o := range raw.Origins {
				var p struct{ Provider string }
				if json.Unmarshal(o, &p) == nil && p.Provider == agent.ProviderSimulate {
					r.Simulated = true
				}
			}
		}
	}
	if a := ev.Advice; a != nil {
		if a.Inputs.SaveMeasured > 0 {
			r.SaveSeconds = a.Inputs.SaveSeconds
		}
		r.UploadSeconds = a.Inputs.UploadSeconds
	}
	if e := ev.Emergency; e != nil {
		r.Outcome = "pending"
		if ev.Phase == agent.PhaseOutcome {
			r.Outcome = e.Outcome
		}
		if e.Signal != nil && len(e.Signal.PIDs) > 0 {
			r.SignalledAt = e.Signal.At.UTC()
		}
		r.GPUs = e.GPUs
		r.Watched = slices.Contains(e.Plan, "checkpoint")
		r.LastCommitBefore = e.LastCommitBefore.UTC()
		if e.LastCommitBefore.IsZero() {
			r.LastCommitBefore = time.Time{}
		}
		if c := e.Checkpoint; c != nil {
			r.Checkpoint, r.Bytes = c.Name, c.Bytes
			r.CheckpointComplete, r.CommittedAt = c.CompleteAt.UTC(), c.CommittedAt.UTC()
		}
		for _, s := range e.Steps {
			if s.Error != "" {
				r.Reason = s.Name + ": " + s.Error
			}
		}
	}
	return r
}

// Recorder writes records to the store; it implements agent.Reporter.
type Recorder struct {
	Store storage.Store
	Log   *slog.Logger
}

// Report implements agent.Reporter.
func (rc *Recorder) Report(ctx context.Context, ev agent.Event) {
	r := FromEvent(ev)
	b, _ := json.MarshalIndent(r, "", "  ")
	if err := rc.Store.PutBytes(ctx, Key(r), b); err != nil && rc.Log != nil {
		rc.Log.Warn("event record not written", "key", Key(r), "err", err)
	}
}

// jsonBuf collects an object of at most limit bytes (0: 4 MiB).
type jsonBuf struct {
	b     []byte
	limit int
}

func (j *jsonBuf) Write(p []byte) (int, error) {
	limit := j.limit
	if limit == 0 {
		limit = 4 << 20
	}
	if len(j.b)+len(p) > limit {
		return 0, fmt.Errorf("object larger than %d MiB", limit>>20)
	}
	j.b = append(j.b, p...)
	return len(p), nil
}
