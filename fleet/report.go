package fleet

import (
	"fmt"
	"io"
	"maps"
	"math"
	"os"
	"slices"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/preemptd/preemptd/advice"
	"github.com/preemptd/preemptd/agent"
)

// Price is an instance type's hourly prices.
type Price struct {
	OnDemand float64 `yaml:"on_demand" json:"on_demand"`
	Spot     float64 `yaml:"spot" json:"spot"`
}

// LoadPrices reads a YAML (or JSON) file: instance type → {on_demand, spot} in $/h.
func LoadPrices(path string) (map[string]Price, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("prices: %w", err)
	}
	var p map[string]Price
	dec := yaml.NewDecoder(strings.NewReader(string(b)))
	dec.KnownFields(true)
	if err := dec.Decode(&p); err != nil {
		return nil, fmt.Errorf("prices %s: %w (want `type: {on_demand: 98.32, spot: 20.10}` per instance type)", path, err)
	}
	for t, v := range p {
		if v.OnDemand < 0 || v.Spot < 0 {
			return nil, fmt.Errorf("prices %s: %s has a negative price", path, t)
		}
	}
	return p, nil
}

// Count is interruptions under one key.
type Count struct {
	Key           string `json:"key"`
	Interruptions int    `json:"interruptions"`
}

// Stats summarises durations, in seconds.
type Stats struct {
	N    int     `json:"n"`
	P50  float64 `json:"p50_seconds"`
	P95  float64 `json:"p95_seconds"`
	Mean float64 `json:"mean_seconds"`
}

// Cost is what spot cost and saved, given prices.
type Cost struct {
	SpotHours     float64  `json:"spot_hours"`
	SpotCost      float64  `json:"spot_cost"`
	OnDemandCost  float64  `json:"on_demand_cost"`
	Saved         float64  `json:"saved"`
	LostHours     float64  `json:"lost_hours"`
	LostCost      float64  `json:"lost_cost"`
	UnpricedTypes []string `json:"unpriced_types,omitempty"`
}

// Report is the fleet report.
type Report struct {
	Since           time.Time `json:"since,omitzero"`
	Records         int       `json:"records"`
	Interruptions   int       `json:"interruptions"`
	ByType          []Count   `json:"by_instance_type"`
	ByRegion        []Count   `json:"by_region"`
	ByZone          []Count   `json:"by_zone"`
	Lifetime        Stats     `json:"lifetime_before_interruption"`
	NoticeToDurable Stats     `json:"notice_to_durable"`
	CheckpointsLost int       `json:"checkpoints_lost"`
	// Resume is how long restores took (the time a new machine's GPUs
	// waited for the checkpoint), ResumeFetchedBytes what they fetched.
	Resume             Stats `json:"resume_seconds"`
	ResumeFetchedBytes int64 `json:"resume_fetched_bytes"`
	// SimulatedLeftOut counts the records of drills not in the report.
	SimulatedLeftOut int   `json:"simulated_left_out,omitempty"`
	Cost             *Cost `json:"cost,omitempty"`
	// Advice is, per instance type, the measured interruption rate, the
	// checkpoint interval it calls for, and the work lost per interruption.
	Advice []TypeAdvice `json:"advice_by_instance_type"`
}

// TypeAdvice is the checkpoint advice for one instance type.
type TypeAdvice struct {
	Type          string `json:"instance_type"`
	Interruptions int    `json:"interruptions"`
	// MTBIHours is the estimate of M (records and prior, see Basis).
	MTBIHours float64 `json:"mtbi_h"`
	Basis     string  `json:"basis"`
	// Committed is p; SaveSeconds the mean save time the records carry
	// (advice.DefaultSave when none does).
	Committed       float64 `json:"committed_fraction"`
	SaveSeconds     float64 `json:"save_s"`
	IntervalSeconds float64 `json:"checkpoint_every_s"`
	// LostSeconds is the mean work lost per interruption (time since the
	// last durable checkpoint, for those whose notice committed none).
	LostSeconds float64 `json:"lost_per_interruption_s"`
}

// Interruption reports whether r is a record of the cloud taking the machine.
func Interruption(r Record) bool {
	switch r.Kind {
	case agent.KindTerminate, agent.KindStop, agent.KindHibernate, agent.KindPreempt:
		return r.Class == agent.ClassFatal
	}
	return false
}

// Build computes the report over records noticed at or after since
// (zero: all); simulated ones only when withSimulated.
func Build(records []Record, since time.Time, prices map[string]Price, withSimulated bool) Report {
	rep := Report{Since: since}
	byType, byRegion, byZone := map[string]int{}, map[string]int{}, map[string]int{}
	var life, durable, resume []float64
	if prices != nil {
		rep.Cost = &Cost{}
	}
	unpriced := map[string]bool{}
	type acc struct {
		obs                []advice.Obs // the type's interruptions, drills left out
		n                  int
		provider           string
		lost, save, upload float64
		saves              int
	}
	perType := map[string]*acc{}
	for i := range records {
		r := &records[i]
		if r.NoticedAt.Before(since) {
			continue
		}
		if r.Simulated && !withSimulated {
			rep.SimulatedLeftOut++
			continue
		}
		rep.Records++
		if r.Kind == KindRestore && r.Restore != nil && r.Outcome == "restored" {
			resume = append(resume, r.Restore.Seconds)
			rep.ResumeFetchedBytes += r.Restore.FetchedBytes
		}
		if !Interruption(*r) {
			continue
		}
		rep.Interruptions++
		byType[orUnknown(r.Instance.Type)]++
		byRegion[orUnknown(r.Instance.Region)]++
		byZone[orUnknown(r.Instance.Zone)]++
		lifetime := 0.0
		if !r.Instance.StartedAt.IsZero() && r.NoticedAt.After(r.Instance.StartedAt) {
			lifetime = r.NoticedAt.Sub(r.Instance.StartedAt).Seconds()
			life = append(life, lifetime)
		}
		lost := 0.0
		watched := r.Watched || r.Version < 2
		if r.CommittedAt.IsZero() && watched {
			rep.CheckpointsLost++
			switch {
			case !r.LastCommitBefore.IsZero() && r.NoticedAt.After(r.LastCommitBefore):
				lost = r.NoticedAt.Sub(r.LastCommitBefore).Seconds()
			default:
				lost = lifetime // nothing durable: all of it
			}
		} else if !r.CommittedAt.IsZero() {
			durable = append(durable, r.CommittedAt.Sub(r.NoticedAt).Seconds())
		}
		t := perType[orUnknown(r.Instance.Type)]
		if t == nil {
			t = &acc{provider: r.Instance.Provider}
			perType[orUnknown(r.Instance.Type)] = t
		}
		t.n++
		if !r.Simulated {
			t.obs = append(t.obs, obsOf(r))
		}
		t.lost += lost
		if r.SaveSeconds > 0 {
			t.save += r.SaveSeconds
			t.upload += r.UploadSeconds
			t.saves++
		}
		if rep.Cost != nil {
			p, ok := prices[r.Instance.Type]
			if !ok {
				unpriced[orUnknown(r.Instance.Type)] = true
				continue
			}
			h := lifetime / 3600
			rep.Cost.SpotHours += h
			rep.Cost.SpotCost += h * p.Spot
			rep.Cost.OnDemandCost += h * p.OnDemand
			rep.Cost.LostHours += lost / 3600
			rep.Cost.LostCost += lost / 3600 * p.Spot
		}
	}
	if rep.Cost != nil {
		rep.Cost.Saved = rep.Cost.OnDemandCost - rep.Cost.SpotCost
		for t := range unpriced {
			rep.Cost.UnpricedTypes = append(rep.Cost.UnpricedTypes, t)
		}
		slices.Sort(rep.Cost.UnpricedTypes)
	}
	rep.Advice = []TypeAdvice{}
	for _, typ := range slices.Sorted(maps.Keys(perType)) {
		t := perType[typ]
		inst := agent.Instance{Type: typ}
		if typ == "unknown" {
			inst.Type = ""
		}
		prior, basis := advice.Prior(nil, inst.Type)
		rate := advice.Estimate(prior, basis, t.obs)
		in := advice.Inputs{Rate: rate}
		if t.saves > 0 {
			in.Save = time.Duration(t.save / float64(t.saves) * float64(time.Second))
			in.Upload = time.Duration(t.upload / float64(t.saves) * float64(time.Second))
		}
		rate = rate.WithPrior(in.Save, in.Upload, advice.NoticeWindow(t.provider))
		in.Rate = rate
		every, _ := advice.Interval(in)
		save := in.Save
		if save <= 0 {
			save = advice.DefaultSave
		}
		rep.Advice = append(rep.Advice, TypeAdvice{Type: typ, Interruptions: t.n, MTBIHours: rate.MTBI.Hours(), Basis: rate.Basis,
			Committed: rate.Committed, SaveSeconds: save.Seconds(), IntervalSeconds: every.Seconds(), LostSeconds: t.lost / float64(t.n)})
	}
	rep.ByType, rep.ByRegion, rep.ByZone = counts(byType), counts(byRegion), counts(byZone)
	rep.Lifetime, rep.NoticeToDurable, rep.Resume = stats(life), stats(durable), stats(resume)
	return rep
}

func orUnknown(s string) string {
	if s == "" {
		return "unknown"
	}
	return s
}

func counts(m map[string]int) []Count {
	out := []Count{}
	for k, v := range m {
		out = append(out, Count{Key: k, Interruptions: v})
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].Interruptions != out[j].Interruptions {
			return out[i].Interruptions > out[j].Interruptions
		}
		return out[i].Key < out[j].Key
	})
	return out
}

// stats uses the nearest-rank percentile.
func stats(v []float64) Stats {
	if len(v) == 0 {
		return Stats{}
	}
	s := slices.Clone(v)
	slices.Sort(s)
	rank := func(p float64) float64 {
		i := int(math.Ceil(p*float64(len(s)))) - 1
		return s[max(i, 0)]
	}
	sum := 0.0
	for _, x := range s {
		sum += x
	}
	return Stats{N: len(s), P50: rank(.5), P95: rank(.95), Mean: sum / float64(len(s))}
}

func dur(sec float64) string {
	return time.Duration(sec * float64(time.Second)).Round(time.Second).String()
}

// Print writes the report as aligned tables.
func Print(w io.Writer, r Report) error {
	if r.Records == 0 {
		_, err := fmt.Fprintln(w, "no event records in the store for this period")
		return err
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "records\t%d\n", r.Records)
	fmt.Fprintf(tw, "interruptions\t%d\n", r.Interruptions)
	fmt.Fprintf(tw, "checkpoints lost\t%d\n", r.CheckpointsLost)
	if r.SimulatedLeftOut > 0 {
		fmt.Fprintf(tw, "simulated notices\t%d left out (--all shows them)\n", r.SimulatedLeftOut)
	}
	if r.Lifetime.N > 0 {
		fmt.Fprintf(tw, "lifetime before interruption\tp50 %s\tp95 %s\tmean %s\t(n=%d)\n", dur(r.Lifetime.P50), dur(r.Lifetime.P95), dur(r.Lifetime.Mean), r.Lifetime.N)
	}
	if r.NoticeToDurable.N > 0 {
		fmt.Fprintf(tw, "notice → durable\tp50 %.1fs\tp95 %.1fs\tmean %.1fs\t(n=%d)\n", r.NoticeToDurable.P50, r.NoticeToDurable.P95, r.NoticeToDurable.Mean, r.NoticeToDurable.N)
	}
	if r.Resume.N > 0 {
		fmt.Fprintf(tw, "resume (restore before training)\tp50 %.1fs\tp95 %.1fs\tmean %.1fs\t(n=%d, %.1f GiB fetched)\n", r.Resume.P50, r.Resume.P95,
			r.Resume.Mean, r.Resume.N, float64(r.ResumeFetchedBytes)/(1<<30))
	}
	tw.Flush()
	for _, sec := range []struct {
		title string
		c     []Count
	}{{"INSTANCE TYPE", r.ByType}, {"REGION", r.ByRegion}, {"ZONE", r.ByZone}} {
		if len(sec.c) == 0 {
			continue
		}
		fmt.Fprintln(w)
		tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', tabwriter.AlignRight)
		fmt.Fprintf(tw, "%s\tINTERRUPTIONS\t\n", sec.title)
		for _, c := range sec.c {
			fmt.Fprintf(tw, "%s\t%d\t\n", c.Key, c.Interruptions)
		}
		tw.Flush()
	}
	if len(r.Advice) > 0 {
		fmt.Fprintln(w)
		tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', tabwriter.AlignRight)
		fmt.Fprintf(tw, "INSTANCE TYPE\tINTERRUPTIONS\tM (MEASURED+PRIOR)\tCOMMITTED p\tSAVE C\tCHECKPOINT EVERY\tLOST PER INTERRUPTION\t\n")
		for _, a := range r.Advice {
			fmt.Fprintf(tw, "%s\t%d\t%.1f h\t%.2f\t%.0fs\t%s\t%s\t\n", a.Type, a.Interruptions, a.MTBIHours, a.Committed, a.SaveSeconds,
				dur(a.IntervalSeconds), dur(a.LostSeconds))
		}
		tw.Flush()
	}
	if c := r.Cost; c != nil {
		fmt.Fprintln(w)
		tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', tabwriter.AlignRight)
		fmt.Fprintf(tw, "spot hours\t%.1f\t\n", c.SpotHours)
		fmt.Fprintf(tw, "spot cost\t$%.2f\t\n", c.SpotCost)
		fmt.Fprintf(tw, "on-demand cost of the same hours\t$%.2f\t\n", c.OnDemandCost)
		fmt.Fprintf(tw, "saved\t$%.2f\t\n", c.Saved)
		fmt.Fprintf(tw, "time lost (work since the last durable checkpoint)\t%.1f h\t\n", c.LostHours)
		fmt.Fprintf(tw, "cost of time lost\t$%.2f\t\n", c.LostCost)
		tw.Flush()
		if len(c.UnpricedTypes) > 0 {
			fmt.Fprintf(w, "no price for: %s\n", strings.Join(c.UnpricedTypes, ", "))
		}
	}
	return nil
}
