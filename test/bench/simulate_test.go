package bench

import (
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"math"
	mrand "math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/preemptd/preemptd/advice"
	"github.com/preemptd/preemptd/checkpoint/storage"
	"github.com/preemptd/preemptd/test/peers"
)

// A trace is a 30-day run's interruptions and risk signals.
type trace struct {
	name string
	// perHour is the published rate the advisor starts from (its prior).
	perHour float64
	// rate is the true rate at hour h (what interruptions are drawn from).
	rate func(h float64) float64
	// bursts are [start, end) hours of clustered interruptions; the fleet's
	// records show other machines interrupted from 5 min after each start,
	// every 15 min while it lasts (fleet-zone risk signals).
	bursts [][2]float64
}

type interruption struct {
	at     float64 // hours
	abrupt bool    // no usable notice (hardware, host error): the emergency path cannot save
	// lifetime is how long the interrupted machine had run (hours): in a
	// job of several nodes, since that node's machine started, not since
	// the job's last restart.
	lifetime float64
}

// draw makes the interruptions of a job of nodes machines, each
// interrupted at the trace's rate, by thinning a Poisson process at nodes ×
// the trace's highest rate; each hits one node at random, whose machine is
// replaced (its lifetime starts again).
func draw(rng *mrand.Rand, tr trace, hours, peak, abrupt float64, nodes int) []interruption {
	var out []interruption
	started := make([]float64, nodes)
	for h := 0.0; ; {
		h += rng.ExpFloat64() / (peak * float64(nodes))
		if h >= hours {
			return out
		}
		if rng.Float64() < tr.rate(h)/peak {
			n := rng.IntN(nodes)
			out = append(out, interruption{at: h, abrupt: rng.Float64() < abrupt, lifetime: h - started[n]})
			started[n] = h
		}
	}
}

// policy says when the next checkpoint is due (hours), given the time now,
// the last checkpoint's time and the risk signals active.
type policy interface {
	next(now, last float64, risky bool) float64
	interrupted(lifetime float64, committed bool)
	name() string
}

type fixed float64

func (f fixed) next(_, last float64, _ bool) float64 { return last + float64(f) }
func (fixed) interrupted(float64, bool)              {}
func (f fixed) name() string                         { return fmt.Sprintf("fixed %d min", int(float64(f)*60)) }

// adaptive is preemptd's advice: advice.Interval over advice.Estimate of
// the interruptions seen so far (the job's own records), with the fleet's
// risk signals; a new risk asks for a checkpoint at once.
type adaptive struct {
	prior, save, upload, window float64 // per hour; seconds
	nodes                       int     // the job's nodes the advice is told of (advice.Inputs.Nodes)
	obs                         []advice.Obs
	rate                        advice.Rate
}

func (a *adaptive) name() string { return "preemptd advice" }
func (a *adaptive) interrupted(lifetime float64, committed bool) {
	a.obs = append(a.obs, advice.Obs{Lifetime: time.Duration(lifetime * float64(time.Hour)), Watched: true, Committed: committed})
	a.rate = advice.Estimate(a.prior, "prior", a.obs)
}
func (a *adaptive) next(now, last float64, risky bool) float64 {
	if a.rate.MTBI == 0 {
		a.rate = advice.Estimate(a.prior, "prior", nil)
	}
	sec := func(s float64) time.Duration { return time.Duration(s * float64(time.Second)) }
	// p with the advisor's prior: does a save and its upload fit the notice?
	in := advice.Inputs{Save: sec(a.save), Upload: sec(a.upload), Rate: a.rate.WithPrior(sec(a.save), sec(a.upload), sec(a.window)), Nodes: a.nodes}
	if risky {
		in.Risks = []advice.Risk{{Kind: "fleet-zone"}}
	}
	t, _ := advice.Interval(in)
	return last + t.Hours()
}

// simulate runs one policy over one drawn trace: hours of wall clock, save
// and upload in seconds, the notice window in seconds. It returns the hours
// lost: the work since the last durable checkpoint at each interruption the
// emergency path could not save, and every blocking save (overhead).
func simulate(p policy, its []interruption, risks [][2]float64, hours, save, upload, window float64) (lost, overhead float64) {
	c, u := save/3600, upload/3600
	emergencyFits := save+upload+5 <= window // 5 s to notice and signal
	type ck struct{ at, durableAt float64 }
	cks := []ck{{0, 0}} // since the last (re)start; the start itself is durable
	now, last, started := 0.0, 0.0, 0.0
	riskyAt := func(t float64) (bool, float64, float64) { // active (and its start), and the next edge
		next := math.Inf(1)
		for _, r := range risks {
			if t >= r[0] && t < r[1] {
				return true, r[0], r[1]
			}
			if r[0] > t && r[0] < next {
				next = r[0]
			}
		}
		return false, 0, next
	}
	raisedFor := -1.0
	interrupt := func(it interruption) {
		committed := !it.abrupt && emergencyFits
		if committed {
			overhead += c // the final save
		} else {
			ref := 0.0
			for _, k := range cks {
				if k.durableAt <= it.at && k.at > ref {
					ref = k.at
				}
			}
			done := ref
			for _, k := range cks { // saves after ref are overhead, not work
				if k.at > ref && k.at < it.at {
					done += min(c, it.at-k.at)
				}
			}
			lost += it.at - done
		}
		life := it.at - started
		if it.lifetime > 0 {
			life = it.lifetime // the machine's, in a job of several nodes
		}
		p.interrupted(life, committed)
		// The job resumes at once on a new machine from what is durable.
		now, last, started = it.at, it.at, it.at
		cks = []ck{{it.at, it.at}}
	}
	i := 0
	for now < hours {
		risky, riskStart, edge := riskyAt(now)
		due := p.next(now, last, risky)
		if risky && riskStart != raisedFor {
			raisedFor = riskStart
			if now-last >= c+u { // a new risk: at once, unless a save just ran
				due = now
			}
		}
		nextIt := math.Inf(1)
		if i < len(its) {
			nextIt = its[i].at
		}
		switch {
		case nextIt < hours && nextIt <= edge && nextIt < max(now, due)+c:
			interrupt(its[i]) // before the checkpoint is due, or during its save
			i++
		case due < hours && due <= edge:
			at := max(now, due)
			overhead += c
			cks = append(cks, ck{at, at + c + u})
			last, now = at, at+c
		default:
			now = min(edge, hours)
		}
	}
	return lost, overhead
}

// measureRates times this machine's disk (a 1 GiB file written and
// fsynced, as a trainer's save is) and an upload of it to a local MinIO
// through preemptd's store, in bytes per second.
func measureRates(t *testing.T) (write, upload float64) {
	t.Helper()
	s3 := peers.StartMinIO(t)
	s3.SetEnv(t)
	st, err := storage.Open(fmt.Sprintf("s3://%s/rates", s3.Bucket), storage.Options{Endpoint: s3.Endpoint, Region: "us-east-1"})
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "shard")
	const size = 1 << 30
	buf := make([]byte, 8<<20)
	rand.Read(buf)
	start := time.Now()
	f, _ := os.Create(path)
	for w := 0; w < size; w += len(buf) {
		f.Write(buf)
	}
	f.Sync()
	write = size / time.Since(start).Seconds()
	f.Seek(0, io.SeekStart)
	start = time.Now()
	if err := st.PutFile(context.Background(), "shard", f, size); err != nil {
		t.Fatal(err)
	}
	upload = size / time.Since(start).Seconds()
	f.Close()
	return write, upload
}

// TestAdviceSimulation: expected GPU-hours lost over a 30-day job, preemptd's
// advice against fixed 10, 30 and 60 minute intervals, on interruptions
// drawn at H100, A100 and V100 rates and on a bursty trace; save and upload
// times from this machine's disk and a local MinIO. Deterministic (seeded).
// One node, then jobs of 8 and 64 nodes (every node's interruption stops
// the job), where the advice per machine (what it was before it knew of the
// job) is shown beside the advice per job.
func TestAdviceSimulation(t *testing.T) {
	requireBench(t)
	write, up := measureRates(t)
	var b strings.Builder
	fmt.Fprintf(&b, "### Adaptive checkpointing: simulated GPU-hours lost over a 30-day job (%s)\n\n", time.Now().UTC().Format("2006-01-02"))
	fmt.Fprintf(&b, "Machine: %s. Measured here: a checkpoint written and fsynced at %.0f MB/s, uploaded to a local MinIO through preemptd's store at %.0f MB/s. "+
		"8-GPU nodes, 30 days, 400 runs per row for one node and 100 for jobs (seeded, the same interruptions for every policy), means. An interruption comes with the cloud's notice (AWS 120 s, GCP 30 s), except %.0f %% without a usable one (host failures); "+
		"with a notice the emergency path saves and commits when save + upload + 5 s fit in it, losing nothing. Lost = the work since the last durable checkpoint at the other interruptions + every blocking save, × 8 GPUs × the nodes. "+
		"preemptd's advice is `advice.Interval` over `advice.Estimate` of the interruptions seen so far (each machine's lifetime; the published rate as the prior), with the fleet's risk signals in the bursty trace. "+
		"Bursty: 1 %%/h, plus on average one 2-hour capacity crunch every 4 days at 50 %%/h; other machines' interruptions show in the store from 5 minutes into a crunch (fleet-zone risk). "+
		"In a job every node is interrupted at the trace's rate and any node's interruption stops the job (its machine replaced, the job resumed from what is durable): "+
		"*advice per machine* is the advice without `job.nodes` (M a machine's), *advice per job* with it (M ÷ nodes, `advice.JobMTBI`).\n\n",
		machine(), write/1e6, up/1e6, 0.1*100)
	for _, nodes := range []int{1, 8, 64} {
		runs := 400
		if nodes > 1 {
			runs = 100
		}
		adviceTables(&b, nodes, runs, write, up)
	}
	appendResults(t, b.String())
}

// adviceTables writes the simulation's tables for jobs of nodes nodes:
// each checkpoint size and cloud, each trace.
func adviceTables(b *strings.Builder, nodes, runs int, write, up float64) {
	const (
		hours  = 30 * 24.0
		gpus   = 8
		abrupt = 0.1 // interruptions without a usable notice
	)
	steady := func(name string, r float64) trace {
		return trace{name: name, perHour: r, rate: func(float64) float64 { return r }}
	}
	traces := []trace{steady("H100, 4 %/h", 0.04), steady("A100, 2.3 %/h", 0.023), steady("V100, 0.8 %/h", 0.008)}
	for _, cs := range []struct {
		size   float64
		cloud  string
		window float64
	}{{16 << 30, "AWS (120 s notice)", 120}, {2 << 30, "AWS (120 s notice)", 120}, {16 << 30, "GCP (30 s notice)", 30}, {2 << 30, "GCP (30 s notice)", 30}} {
		size, window := cs.size, cs.window
		save, upload := size/write, size/up
		what := "one node"
		if nodes > 1 {
			what = fmt.Sprintf("a job of %d nodes", nodes)
		}
		fmt.Fprintf(b, "**%s, %s, checkpoint of %.0f GiB per node**: save C = %.1f s, upload %.1f s; the emergency path %s.\n\n", what, cs.cloud, size/(1<<30), save, upload,
			map[bool]string{true: "commits at a notice", false: "cannot commit in the notice: every interruption loses the work since the last durable checkpoint"}[save+upload+5 <= window])
		cols := "| trace | fixed 10 min | fixed 30 min | fixed 60 min | preemptd advice | advice ÷ best fixed | goal |\n|---|---|---|---|---|---|---|\n"
		if nodes > 1 {
			cols = "| trace | fixed 10 min | fixed 30 min | fixed 60 min | advice per machine | advice per job | per job ÷ best fixed | per job ÷ per machine |\n|---|---|---|---|---|---|---|---|\n"
		}
		b.WriteString(cols)
		rows := append(append([]trace{}, traces...), trace{name: "bursty (clustered)", perHour: 0.01})
		for ti, tr := range rows {
			bursty := tr.name == "bursty (clustered)"
			var sum [5]float64
			for r := range runs {
				rng := mrand.New(mrand.NewPCG(uint64(ti), uint64(r)))
				var risks [][2]float64
				if bursty {
					var bs [][2]float64
					for h := rng.ExpFloat64() * 96; h < hours; h += rng.ExpFloat64() * 96 {
						bs = append(bs, [2]float64{h, h + 2})
					}
					tr.rate = func(h float64) float64 {
						for _, x := range bs {
							if h >= x[0] && h < x[1] {
								return 0.5
							}
						}
						return 0.01
					}
					for _, x := range bs {
						for s := x[0] + 5.0/60; s < x[1]; s += 0.25 {
							risks = append(risks, [2]float64{s, s + 0.25})
						}
					}
				}
				its := draw(rng, tr, hours, 0.5, abrupt, nodes)
				policies := []policy{fixed(10.0 / 60), fixed(0.5), fixed(1),
					&adaptive{prior: tr.perHour, save: save, upload: upload, window: window},
					&adaptive{prior: tr.perHour, save: save, upload: upload, window: window, nodes: nodes}}
				if nodes == 1 {
					policies = policies[:4]
				}
				for k, p := range policies {
					var rk [][2]float64
					if _, ok := p.(*adaptive); ok {
						rk = risks
					}
					lost, over := simulate(p, its, rk, hours, save, upload, window)
					sum[k] += (lost + over) * gpus * float64(nodes)
				}
			}
			best := math.Min(sum[0], math.Min(sum[1], sum[2]))
			n := float64(runs)
			if nodes > 1 {
				fmt.Fprintf(b, "| %s | %.1f | %.1f | %.1f | %.1f | %.1f | %.2f | %.2f |\n", tr.name, sum[0]/n, sum[1]/n, sum[2]/n, sum[3]/n, sum[4]/n, sum[4]/best, sum[4]/sum[3])
				continue
			}
			goal := 0.8
			if bursty {
				goal = 0.5
			}
			ratio := sum[3] / best
			met := "met"
			if ratio > goal {
				met = "**not met**"
			}
			fmt.Fprintf(b, "| %s | %.1f | %.1f | %.1f | %.1f | %.2f | ≤ %.1f: %s |\n", tr.name, sum[0]/n, sum[1]/n, sum[2]/n, sum[3]/n, ratio, goal, met)
		}
		b.WriteString("\n")
	}
}
