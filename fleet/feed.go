package fleet

import (
	"context"
	"encoding/json"
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

// Feed reads the store's event records for the advisor: interruptions
// nearby in the last RecentWindow (every Poll) and the interruption rate of
// this machine's instance type and region (every tenth poll, compacting past
// days it had to read record by record).
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

	seen map[string]bool
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
	for _, r := range records {
		if r.Simulated || !Interruption(r) {
			continue
		}
		if inst.Type != "" && (r.Instance.Type != inst.Type || (inst.Region != "" && r.Instance.Region != inst.Region)) {
			continue
		}
		o := advice.Obs{Watched: r.Watched || r.Version < 2, Committed: !r.CommittedAt.IsZero()}
		if !r.Instance.StartedAt.IsZero() && r.NoticedAt.After(r.Instance.StartedAt) {
			o.Lifetime = r.NoticedAt.Sub(r.Instance.StartedAt)
		}
		out = append(out, o)
	}
	return out
}

// Run polls until ctx ends.
func (f *Feed) Run(ctx context.Context) error {
	if f.Now == nil {
		f.Now = time.Now
	}
	if f.Log == nil {
		f.Log = slog.New(slog.DiscardHandler)
	}
	f.seen = map[string]bool{}
	tick := time.NewTicker(f.Poll)
	defer tick.Stop()
	for i := 0; ; i++ {
		if i%rateEvery == 0 {
			f.rate(ctx)
		}
		f.recent(ctx)
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		}
	}
}

func (f *Feed) rate(ctx context.Context) {
	l, err := Read(ctx, f.Store, time.Time{})
	if err != nil {
		f.Log.Debug("event records not read; the estimate stays", "err", err)
		return
	}
	inst := f.Instance()
	var gpus []string
	if f.GPUs != nil {
		gpus = f.GPUs()
	}
	prior, basis := PriorFor(f.PerHour, gpus, inst)
	f.Advisor.SetRate(advice.Estimate(prior, basis, Observations(l.Records, inst)))
	// Days before yesterday read record by record get their rollup.
	days, n, err := Compact(ctx, f.Store, l, f.Now().UTC().AddDate(0, 0, -1))
	if err != nil {
		f.Log.Warn("event records not compacted", "err", err)
	} else if days > 0 {
		f.Log.Info("event records compacted", "days", days, "records", n)
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
