package fleet

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/preemptd/preemptd/advice"
	"github.com/preemptd/preemptd/agent"
	"github.com/preemptd/preemptd/checkpoint/storage"
)

// RecentWindow is how long another machine's interruption nearby (same
// job, or same instance type and zone) counts as a risk signal.
const RecentWindow = 15 * time.Minute

// rateEvery is how many polls pass between estimates of the rate.
const rateEvery = 10

// RateWindow is how far back the daemon's estimate of the interruption
// rate reads: the compacted days of the last four weeks (a daemon reads
// each day's rollup once, not the fleet's whole history).
const RateWindow = 28

// LateDays is how long a day's records may still arrive late (a machine
// that came back, a clock): the feed compacts the days from LateDays ago to
// the day before yesterday, and reads their rollups again now and then.
const LateDays = 7

// compactEvery is how often a daemon compacts the late days, and
// rereadEvery how often it reads their rollups again.
const (
	compactEvery = time.Hour
	rereadEvery  = 6 * time.Hour
)

// Feed reads the store's event records for the advisor: interruptions
// nearby in the last RecentWindow (every Poll: one listing of today's
// records, and a GET only of those of this machine's zone and type or of
// its job) and the interruption rate of this machine's instance type and
// region (every tenth poll: the rollups of the last RateWindow days, each
// read once), compacting the late days every hour. Its requests a day do
// not grow with the days of records the store holds.
type Feed struct {
	Store   storage.Store
	Advisor *advice.Advisor
	// Instance is this machine's identity as known now.
	Instance func() agent.Instance
	// Job is the run this machine trains (its other nodes are "job-node" risks).
	Job string
	// PerHour is the configured prior (0: from GPUs or the instance type).
	PerHour float64
	// GPUs names this machine's GPUs (NVML), for the prior.
	GPUs func() []string
	Poll time.Duration
	Log  *slog.Logger
	Now  func() time.Time

	seen      map[string]bool
	days      map[string]dayRecords // rollups read, by day
	compacted time.Time             // the late days' last compaction
}

// dayRecords is a day's rollup as the feed read it.
type dayRecords struct {
	records []Record
	read    time.Time
}

// PriorFor is the prior rate for inst: perHour when set, else from the GPU
// names or the instance type.
func PriorFor(perHour float64, gpus []string, inst agent.Instance) (float64, string) {
	if perHour > 0 {
		return perHour, fmt.Sprintf("advice.interruptions_per_hour %g%%/h", perHour*100)
	}
	return advice.Prior(gpus, inst.Type)
}

// Observations are the interruptions of records whose instance type and
// region are inst's (all of them when inst's type is unknown), drills left out.
func Observations(records []Record, inst agent.Instance) []advice.Obs {
	var out []advice.Obs
	for i := range records {
		r := &records[i]
		if r.Simulated || !Interruption(*r) {
			continue
		}
		if inst.Type != "" && (r.Instance.Type != inst.Type || (inst.Region != "" && r.Instance.Region != inst.Region)) {
			continue
		}
		out = append(out, obsOf(r))
	}
	return out
}

// obsOf is interruption r as the estimate takes it.
func obsOf(r *Record) advice.Obs {
	o := advice.Obs{Watched: r.Watched || r.Version < 2, Committed: SavedAfterSignal(*r)}
	if !r.Instance.StartedAt.IsZero() && r.NoticedAt.After(r.Instance.StartedAt) {
		o.Lifetime = r.NoticedAt.Sub(r.Instance.StartedAt)
	}
	return o
}

// near says whether a record's key may be of an interruption this feed
// turns into a risk: of this machine's zone and type, or of its job (keys
// of earlier releases name neither: read).
func (f *Feed) near(key string, inst agent.Instance) bool {
	zone, typ, run, ok := keyFields(key)
	if !ok {
		return true
	}
	if f.Job != "" && run == RunTag(f.Job) {
		return true
	}
	return inst.Type != "" && inst.Zone != "" && zone == orUnknownKey(inst.Zone) && typ == orUnknownKey(inst.Type)
}

// SavedAfterSignal says whether r's notice ended with a checkpoint that
// the trainer completed after it was signalled (after the notice, where no
// signal was sent) and that was committed: the work up to the notice was
// kept. A commit of a checkpoint completed before — the newest one taken up
// when the trainer saved nothing new — kept only what was already saved.
func SavedAfterSignal(r Record) bool {
	from := r.SignalledAt
	if from.IsZero() {
		from = r.NoticedAt
	}
	return !r.CommittedAt.IsZero() && !r.CheckpointComplete.IsZero() && !r.CheckpointComplete.Before(from)
}

// Run polls until ctx ends.
func (f *Feed) Run(ctx context.Context) error {
	tick := time.NewTicker(f.Poll)
	defer tick.Stop()
	for i := 0; ; i++ {
		f.Step(ctx, i)
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		}
	}
}

// Step is poll i of Run: the recent records, and every rateEvery-th poll
// (the first included) the rate and, hourly, the late days' compaction.
func (f *Feed) Step(ctx context.Context, i int) {
	if f.Now == nil {
		f.Now = time.Now
	}
	if f.Log == nil {
		f.Log = slog.New(slog.DiscardHandler)
	}
	if f.seen == nil {
		f.seen = map[string]bool{}
	}
	if i%rateEvery == 0 {
		f.rate(ctx)
	}
	f.recent(ctx)
}

func (f *Feed) rate(ctx context.Context) {
	now := f.Now().UTC()
	if now.Sub(f.compacted) >= compactEvery {
		f.compacted = now
		f.compactLate(ctx, now)
	}
	if f.days == nil {
		f.days = map[string]dayRecords{}
	}
	var records []Record
	for d := 2; d < RateWindow+2; d++ { // the compacted days: before yesterday
		day := now.AddDate(0, 0, -d).Format(time.DateOnly)
		dr, ok := f.days[day]
		if !ok || (d <= LateDays && now.Sub(dr.read) >= rereadEvery) {
			recs, err := readRollup(ctx, f.Store, day)
			if err != nil {
				f.Log.Debug("a day's event records not read; the estimate stays", "day", day, "err", err)
				return
			}
			dr = dayRecords{records: recs, read: now}
			f.days[day] = dr
		}
		records = append(records, dr.records...)
	}
	for day := range f.days {
		if day < now.AddDate(0, 0, -RateWindow-1).Format(time.DateOnly) {
			delete(f.days, day)
		}
	}
	inst := f.Instance()
	var gpus []string
	if f.GPUs != nil {
		gpus = f.GPUs()
	}
	prior, basis := PriorFor(f.PerHour, gpus, inst)
	f.Advisor.SetRate(advice.Estimate(prior, basis, Observations(records, inst)))
}

// readRollup reads day's rollup (no records when there is none).
func readRollup(ctx context.Context, st storage.Store, day string) ([]Record, error) {
	recs, _, err := getRollup(ctx, st, RollupKey(day))
	if errors.Is(err, storage.ErrNotFound) {
		return nil, nil
	}
	return recs, err
}

// compactLate compacts the days from LateDays ago to the day before
// yesterday that hold records read on their own: a listing of each day's
// partition, and for a day with records, their GETs, the rollup's
// conditional replace and their deletion (CompactDay).
func (f *Feed) compactLate(ctx context.Context, now time.Time) {
	for d := 2; d <= LateDays; d++ {
		day := now.AddDate(0, 0, -d).Format(time.DateOnly)
		objs, err := f.Store.List(ctx, EventsPrefix+"/day="+day)
		if err != nil {
			f.Log.Debug("event records not listed for compaction", "day", day, "err", err)
			return
		}
		if len(objs) == 0 {
			continue
		}
		singles, _, err := readRecords(ctx, f.Store, objs) // the unreadable stay, for the report to count
		if err != nil {
			f.Log.Debug("event records not read for compaction", "day", day, "err", err)
			return
		}
		n, deleted, err := CompactDay(ctx, f.Store, day, singles)
		if err != nil {
			f.Log.Warn("event records not compacted", "day", day, "err", err)
			continue
		}
		if n > 0 {
			delete(f.days, day) // read again
			f.Log.Info("event records compacted", "day", day, "records", n, "deleted", deleted)
		}
	}
}

// recent reads the records of the last RecentWindow that it has not read,
// and tells the advisor of interruptions of the job's other nodes, or of
// machines of the same type in the same zone.
func (f *Feed) recent(ctx context.Context) {
	now := f.Now().UTC()
	inst := f.Instance()
	days := []string{now.Format(time.DateOnly)}
	if d := now.Add(-RecentWindow).Format(time.DateOnly); d != days[0] {
		days = append(days, d)
	}
	seen := map[string]bool{} // the keys still listed: older days drop out
	defer func() { f.seen = seen }()
	for _, day := range days {
		objs, err := f.Store.List(ctx, EventsPrefix+"/day="+day)
		if err != nil {
			f.Log.Debug("recent event records not listed", "err", err)
			seen = f.seen
			return
		}
		for _, o := range objs {
			if f.seen[o.Key] {
				seen[o.Key] = true
				continue
			}
			if o.ModTime.Before(now.Add(-RecentWindow)) && !o.ModTime.IsZero() {
				continue
			}
			if !f.near(o.Key, inst) {
				continue // another zone's or type's, of another job: not read
			}
			var buf jsonBuf
			var r Record
			if f.Store.Get(ctx, o.Key, &buf) != nil || json.Unmarshal(buf.b, &r) != nil {
				continue
			}
			seen[o.Key] = true
			if r.Simulated || !Interruption(r) || r.Instance.ID == inst.ID || now.Sub(r.NoticedAt) > RecentWindow {
				continue
			}
			kind := ""
			switch {
			case f.Job != "" && r.Run == f.Job:
				kind = "job-node"
			case inst.Type != "" && inst.Zone != "" && r.Instance.Type == inst.Type && r.Instance.Zone == inst.Zone:
				kind = "fleet-zone"
			default:
				continue
			}
			f.Advisor.AddRisk(advice.Risk{Key: "record/" + o.Key, Kind: kind, At: r.NoticedAt, Until: r.NoticedAt.Add(RecentWindow),
				Detail: r.Instance.ID + " (" + r.Instance.Type + ", " + r.Instance.Zone + ") " + string(r.Kind) + " at " + r.NoticedAt.Format(time.RFC3339)})
			f.Log.Info("interruption nearby: checkpoint advised", "kind", kind, "instance", r.Instance.ID, "zone", r.Instance.Zone)
		}
	}
}
