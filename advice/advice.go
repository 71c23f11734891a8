// Package advice decides when the trainer should checkpoint: the
// Young/Daly interval from what preemptd has measured (the trainer's save
// time, the upload time, how often this kind of machine is interrupted and
// how often a notice still ended with a committed checkpoint), shortened at
// once by risk signals. It does no I/O: the agent feeds it measurements and
// publishes what it says.
package advice

import (
	"fmt"
	"math"
	"strings"
	"time"
)

// PMax caps the fraction of notices that end with a committed checkpoint:
// at p = 1 the interval would be infinite (no work is ever lost at a
// notice), which would trust a handful of lucky notices with days of work.
const PMax = 0.9

// Priors are published spot interruption rates per hour by GPU model, used
// until enough records exist (the rates behind AWS's Spot Instance Advisor
// buckets and GCP's and Azure's published eviction rates for these parts).
var Priors = []struct {
	Model   string
	PerHour float64
}{{"H100", 0.04}, {"H200", 0.04}, {"A100", 0.023}, {"L4", 0.015}, {"A10G", 0.012}, {"V100", 0.008}, {"T4", 0.008}}

// DefaultPerHour is the prior for a machine whose GPU model is unknown:
// the highest published rate, so that an unknown machine errs towards
// checkpointing more often.
const DefaultPerHour = 0.04

// instanceModels maps instance-type prefixes of the three clouds to their GPU.
var instanceModels = []struct{ prefix, model string }{
	{"p5", "H100"}, {"p5e", "H200"}, {"p4d", "A100"}, {"p4de", "A100"}, {"p3", "V100"}, {"g5", "A10G"},
	{"g6", "L4"}, {"g4dn", "T4"}, {"a3-", "H100"}, {"a2-", "A100"}, {"g2-", "L4"},
	{"standard_nd96isr_h100", "H100"}, {"standard_nd96asr_a100", "A100"}, {"standard_nd96amsr_a100", "A100"},
	{"standard_nc24ads_a100", "A100"}, {"standard_nc6s_v3", "V100"}, {"standard_nc12s_v3", "V100"}, {"standard_nc24s_v3", "V100"},
}

// Prior returns the prior interruption rate for a machine, from the GPU
// names NVML reports or else its instance type, and says where it came from.
func Prior(gpuNames []string, instanceType string) (perHour float64, basis string) {
	for _, name := range gpuNames {
		for _, p := range Priors {
			if strings.Contains(strings.ToUpper(name), p.Model) {
				return p.PerHour, fmt.Sprintf("published rate for %s, %.1f%%/h", p.Model, p.PerHour*100)
			}
		}
	}
	t := strings.ToLower(instanceType)
	best := ""
	model := ""
	for _, m := range instanceModels {
		if strings.HasPrefix(t, m.prefix) && len(m.prefix) > len(best) {
			best, model = m.prefix, m.model
		}
	}
	for _, p := range Priors {
		if p.Model == model {
			return p.PerHour, fmt.Sprintf("published rate for %s (%s), %.1f%%/h", p.Model, instanceType, p.PerHour*100)
		}
	}
	return DefaultPerHour, fmt.Sprintf("GPU model unknown: the highest published rate, %.1f%%/h", DefaultPerHour*100)
}

// Obs is one interruption of the machine's kind, from an event record.
type Obs struct {
	// Lifetime is how long the machine ran before the notice (0: unknown).
	Lifetime time.Duration
	// Watched says checkpoints were watched, so the notice could commit one;
	// Committed that it committed one saved after the notice's signal (a
	// commit of a checkpoint saved before it saved no work).
	Watched, Committed bool
}

// PriorWeight is how many interruptions the prior counts as: with n
// measured, the estimate weighs them n : PriorWeight against the prior.
const PriorWeight = 3

// Rate is the estimated interruption rate of the machine's kind.
type Rate struct {
	// MTBI is the mean time between interruptions, M.
	MTBI time.Duration `json:"mtbi_ns"`
	// Interruptions is how many measured interruptions went into it, and
	// Hours their lifetimes' total.
	Interruptions int     `json:"interruptions"`
	Hours         float64 `json:"observed_hours"`
	// Committed is p, the fraction of watched notices that ended with a
	// committed checkpoint (see Committed); CommittedN of Watched did.
	Committed  float64 `json:"committed_fraction"`
	Watched    int     `json:"watched"`
	CommittedN int     `json:"committed"`
	// Basis says where M came from.
	Basis string `json:"basis"`
}

// Estimate combines the prior (per hour) with measured interruptions. M is
// the mean lifetime before an interruption, shrunk towards the prior's
// 1/rate by PriorWeight pseudo-interruptions; p is Committed with no prior
// of its own (the advisor adds one from the notice window).
func Estimate(priorPerHour float64, priorBasis string, obs []Obs) Rate {
	if priorPerHour <= 0 {
		priorPerHour = DefaultPerHour
	}
	priorHours := 1 / priorPerHour
	r := Rate{}
	for _, o := range obs {
		if o.Lifetime > 0 {
			r.Interruptions++
			r.Hours += o.Lifetime.Hours()
		}
		if o.Watched {
			r.Watched++
			if o.Committed {
				r.CommittedN++
			}
		}
	}
	m := (PriorWeight*priorHours + r.Hours) / float64(PriorWeight+r.Interruptions)
	r.MTBI = time.Duration(m * float64(time.Hour))
	r.Committed = Committed(r.CommittedN, r.Watched, 0)
	switch {
	case r.Interruptions == 0:
		r.Basis = "prior: " + priorBasis
	default:
		r.Basis = fmt.Sprintf("%d measured interruptions over %.1f h, weighed with the prior (%s) as %d more",
			r.Interruptions, r.Hours, priorBasis, PriorWeight)
	}
	return r
}

// Committed is p: the committed notices among the watched ones, weighed
// with a prior p0 as PriorWeight more and one notice that did not commit
// (so that a few lucky notices never claim certainty), at most PMax.
func Committed(committed, watched int, p0 float64) float64 {
	return min((float64(committed)+PriorWeight*p0)/float64(watched+PriorWeight+1), PMax)
}

// WithPrior is r with p blended with its prior: PriorCommitted of a save
// (DefaultSave when not measured) and its upload in the notice window.
func (r Rate) WithPrior(save, upload, window time.Duration) Rate {
	if save <= 0 {
		save = DefaultSave
	}
	r.Committed = Committed(r.CommittedN, r.Watched, PriorCommitted(save, upload, window))
	return r
}

// NoticeMargin is the time a notice takes to reach the trainer.
const NoticeMargin = 5 * time.Second

// NoticeWindow is the notice a cloud gives before it takes a spot machine:
// Alibaba 5 minutes, AWS and Tencent 2 minutes, GCP and Azure 30 seconds;
// 0 for others.
func NoticeWindow(provider string) time.Duration {
	switch provider {
	case "alibaba":
		return 5 * time.Minute
	case "aws", "tencent":
		return 2 * time.Minute
	case "gcp", "azure":
		return 30 * time.Second
	}
	return 0
}

// PriorCommitted is p0, what a notice is expected to achieve before any
// has been seen: PMax when a save and its upload fit the cloud's notice
// window with NoticeMargin to spare (the emergency path will commit), else
// 0; 0 when the window is unknown.
func PriorCommitted(save, upload, window time.Duration) float64 {
	if window <= 0 || save+upload+NoticeMargin > window {
		return 0
	}
	return PMax
}

// Risk is a signal that an interruption is more likely than usual now.
type Risk struct {
	// Key identifies it (the notice's key, or a record's); Kind names it:
	// rebalance, maintenance, upcoming-maintenance, job-node, fleet-zone.
	Key    string    `json:"key"`
	Kind   string    `json:"kind"`
	Detail string    `json:"detail,omitempty"`
	At     time.Time `json:"at"`
	// From is when it starts counting (zero: at once): planned maintenance
	// counts from RiskLead before its window. Until is when it stops
	// (zero: until withdrawn).
	From  time.Time `json:"from,omitzero"`
	Until time.Time `json:"until,omitzero"`
}

// RiskLead is how long before a planned event's start it counts as a risk.
const RiskLead = time.Hour

// RiskMTBI is the mean time between interruptions assumed while a risk
// signal is active: a rebalance recommendation or a neighbour's interruption
// means the capacity is being taken back now, within the hour.
const RiskMTBI = time.Hour

// Inputs are what the interval is computed from.
type Inputs struct {
	// Save is C, the trainer's save time (first write to completion marker).
	Save time.Duration
	// Upload is how long the last commit took.
	Upload time.Duration
	Rate   Rate
	Risks  []Risk
	// Nodes is how many machines the job stops for (0 or 1: one): see
	// JobMTBI.
	Nodes int
	// Min and Max bound the interval (Max 0: 24 h).
	Min, Max time.Duration
}

// JobMTBI is M for a job of nodes machines whose every interruption stops
// the whole job (its other nodes get a job notice and save with it): each
// machine interrupted independently at rate 1/m makes the job's
// interruptions the sum of nodes Poisson processes, itself Poisson at rate
// nodes/m, so the job's mean time between interruptions of any of its
// nodes is m/nodes. In T* = √(2·C·M/(1−p)) that makes a job's interval
// the single machine's ÷ √nodes (8× shorter at 64 nodes):
// TestJobIntervalMinimisesSimulatedLoss checks the minimum by simulation.
func JobMTBI(m time.Duration, nodes int) time.Duration {
	if nodes <= 1 {
		return m
	}
	return m / time.Duration(nodes)
}

// DefaultSave is C before any save was measured.
const DefaultSave = 30 * time.Second

// Interval is T* = √(2·C·M/(1−p)), with M the risk MTBI while a risk is
// active, at least the time to save and upload one checkpoint and Min, at
// most Max; and the reason, in words.
func Interval(in Inputs) (time.Duration, string) {
	c := in.Save
	measured := true
	if c <= 0 {
		c, measured = DefaultSave, false
	}
	m := in.Rate.MTBI
	if m <= 0 {
		m = time.Duration(float64(time.Hour) / DefaultPerHour)
	}
	why := []string{}
	if in.Nodes > 1 {
		why = append(why, fmt.Sprintf("a job of %d nodes: M is a machine's %s ÷ %d", in.Nodes, round(m), in.Nodes))
		m = JobMTBI(m, in.Nodes)
	}
	if len(in.Risks) > 0 {
		if m > RiskMTBI {
			m = RiskMTBI
		}
		kinds := []string{}
		for _, r := range in.Risks {
			kinds = append(kinds, r.Kind)
		}
		why = append(why, "risk: "+strings.Join(kinds, ", ")+" (M taken as "+RiskMTBI.String()+")")
	}
	p := min(max(in.Rate.Committed, 0), PMax)
	t := time.Duration(math.Sqrt(2*c.Seconds()*m.Seconds()/(1-p)) * float64(time.Second))
	why = append(why, fmt.Sprintf("√(2·C·M/(1−p)) with C=%s%s, M=%s, p=%.2f", round(c), map[bool]string{false: " (not measured yet)", true: ""}[measured], round(m), p))
	floor := max(in.Min, c+in.Upload)
	if t < floor {
		t = floor
		why = append(why, "raised to "+round(floor)+": no sooner than a save and its upload, or advice.min_interval")
	}
	limit := in.Max
	if limit <= 0 {
		limit = 24 * time.Hour
	}
	if t > limit {
		t = limit
		why = append(why, "capped at advice.max_interval "+round(limit))
	}
	return t.Round(time.Second), strings.Join(why, "; ")
}

func round(d time.Duration) string {
	if d >= time.Minute {
		return d.Round(time.Second).String()
	}
	return d.Round(100 * time.Millisecond).String()
}
