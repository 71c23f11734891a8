package advice

import (
	"fmt"
	"math"
	"math/rand/v2"
	"strings"
	"testing"
	"time"
)

func sec(s float64) time.Duration { return time.Duration(s * float64(time.Second)) }

// TestInterval checks T* = √(2·C·M/(1−p)) against values worked by hand.
func TestInterval(t *testing.T) {
	day := 25 * time.Hour // 4 %/h
	tests := []struct {
		name string
		in   Inputs
		want time.Duration
		why  string
	}{
		// √(2·10·90000) = √1.8e6 = 1341.6
		{"young/daly, p=0", Inputs{Save: sec(10), Rate: Rate{MTBI: day}}, sec(1342), "C=10s"},
		// √(2·10·90000/0.1) = √1.8e7 = 4242.6
		{"nine in ten notices commit", Inputs{Save: sec(10), Rate: Rate{MTBI: day, Committed: 0.9}}, sec(4243), "p=0.90"},
		{"p above the cap counts as PMax", Inputs{Save: sec(10), Rate: Rate{MTBI: day, Committed: 0.99}}, sec(4243), "p=0.90"},
		// √(2·10·3600) = 268.3 < 10 + 600
		{"never sooner than save + upload", Inputs{Save: sec(10), Upload: sec(600), Rate: Rate{MTBI: time.Hour}}, sec(610), "raised to"},
		// risk: M = 1h → √(2·10·3600) = 268.3
		{"a risk takes M as an hour", Inputs{Save: sec(10), Rate: Rate{MTBI: day}, Risks: []Risk{{Kind: "rebalance"}}}, sec(268), "risk: rebalance"},
		{"capped at max", Inputs{Save: sec(600), Rate: Rate{MTBI: 1000 * time.Hour, Committed: 0.9}, Max: time.Hour}, time.Hour, "capped"},
		{"min_interval", Inputs{Save: sec(1), Rate: Rate{MTBI: time.Hour}, Min: 30 * time.Minute}, 30 * time.Minute, "raised to"},
		// C unmeasured: 30 s → √(2·30·90000) = 2323.8
		{"save not measured yet", Inputs{Rate: Rate{MTBI: day}}, sec(2324), "not measured yet"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, why := Interval(tt.in)
			if got != tt.want || !strings.Contains(why, tt.why) {
				t.Fatalf("Interval = %s (%s), want %s with %q", got, why, tt.want, tt.why)
			}
		})
	}
}

func TestEstimate(t *testing.T) {
	// Prior only: M = 1/0.04 = 25 h, p = 0.
	r := Estimate(0.04, "prior", nil)
	if r.MTBI != 25*time.Hour || r.Committed != 0 || !strings.HasPrefix(r.Basis, "prior") {
		t.Fatalf("prior only: %+v", r)
	}
	// Two interruptions after 5 h and 7 h, both watched, one committed:
	// M = (3·25 + 12) / (3 + 2) = 17.4 h; p = 1 / (2 + 3 + 1).
	r = Estimate(0.04, "prior", []Obs{{Lifetime: 5 * time.Hour, Watched: true, Committed: true}, {Lifetime: 7 * time.Hour, Watched: true}})
	if math.Abs(r.MTBI.Hours()-17.4) > 1e-9 || math.Abs(r.Committed-1.0/6) > 1e-9 || r.Interruptions != 2 || r.Hours != 12 {
		t.Fatalf("two measured: %+v", r)
	}
	// Many interruptions outweigh the prior: 300 after 2 h each → (75 + 600) / 303.
	var obs []Obs
	for range 300 {
		obs = append(obs, Obs{Lifetime: 2 * time.Hour, Watched: true, Committed: true})
	}
	r = Estimate(0.04, "prior", obs)
	if math.Abs(r.MTBI.Hours()-675.0/303) > 1e-9 || r.Committed != PMax {
		t.Fatalf("many: %+v (p capped at %v)", r, PMax)
	}
	// Unknown lifetime counts for p, not for M.
	r = Estimate(0.04, "prior", []Obs{{Watched: true, Committed: true}})
	if r.MTBI != 25*time.Hour || r.Committed != 0.2 {
		t.Fatalf("no lifetime: %+v", r)
	}
}

// TestCommittedPrior: p's prior is PMax when a save and its upload fit the
// notice window (with the margin), else 0; measured notices move it.
func TestCommittedPrior(t *testing.T) {
	if p0 := PriorCommitted(sec(30), sec(60), 2*time.Minute); p0 != PMax {
		t.Fatalf("30 s + 60 s in 120 s: p0 = %v", p0)
	}
	if p0 := PriorCommitted(sec(30), sec(60), 30*time.Second); p0 != 0 {
		t.Fatalf("30 s + 60 s in GCP's 30 s: p0 = %v", p0)
	}
	if p0 := PriorCommitted(sec(1), 0, 0); p0 != 0 {
		t.Fatalf("unknown window: p0 = %v", p0)
	}
	// (0 + 3·0.9) / (0 + 3 + 1) = 0.675; after 4 failures (0 + 2.7) / 8 = 0.3375.
	if p := Committed(0, 0, PMax); math.Abs(p-0.675) > 1e-9 {
		t.Fatalf("prior only: %v", p)
	}
	if p := Committed(0, 4, PMax); math.Abs(p-0.3375) > 1e-9 {
		t.Fatalf("four failures: %v", p)
	}
}

func TestPrior(t *testing.T) {
	for _, tt := range []struct {
		gpus []string
		typ  string
		want float64
	}{
		{[]string{"NVIDIA H100 80GB HBM3"}, "", 0.04},
		{[]string{"Tesla V100-SXM2-16GB"}, "p5.48xlarge", 0.008}, // NVML first
		{nil, "p4d.24xlarge", 0.023},
		{nil, "p3.2xlarge", 0.008},
		{nil, "a2-highgpu-1g", 0.023},
		{nil, "Standard_ND96isr_H100_v5", 0.04},
		{nil, "m5.large", DefaultPerHour},
	} {
		if got, basis := Prior(tt.gpus, tt.typ); got != tt.want || basis == "" {
			t.Errorf("Prior(%v, %q) = %v (%s), want %v", tt.gpus, tt.typ, got, basis, tt.want)
		}
	}
}

func TestAdvisor(t *testing.T) {
	t0 := time.Date(2026, 11, 30, 12, 0, 0, 0, time.UTC)
	a := New(Config{}, t0, Rate{MTBI: 25 * time.Hour})
	a.Saved(t0, sec(10)) // √(2·10·90000) = 1342 s
	adv := a.Advice(t0.Add(time.Minute))
	if adv.CheckpointNow || adv.CheckpointEvery != 1342 || adv.Request != 0 || !adv.DueAt.Equal(t0.Add(sec(1342))) {
		t.Fatalf("fresh: %+v", adv)
	}
	// The interval passes: checkpoint now, once, until the next save.
	adv = a.Advice(t0.Add(sec(1342)))
	if !adv.CheckpointNow || adv.Request != 1 || !strings.Contains(adv.Reason, "interval has passed") {
		t.Fatalf("due: %+v", adv)
	}
	if again := a.Advice(t0.Add(sec(1400))); again.Request != 1 {
		t.Fatalf("asked twice for one checkpoint: %+v", again)
	}
	// Saves get slower (40 s, three times): C follows within three saves.
	at := t0.Add(sec(1400))
	for range 3 {
		a.Saved(at, sec(40))
		at = at.Add(time.Minute)
	}
	adv = a.Advice(at)
	if adv.CheckpointNow || adv.CheckpointEvery != 2683 || adv.Inputs.SaveSeconds != 40 { // √(2·40·90000) = 2683
		t.Fatalf("after slower saves: %+v", adv)
	}
	// A rebalance: checkpoint now at once, and the interval shortens.
	a.AddRisk(Risk{Key: "aws/rebalance", Kind: "rebalance", At: at})
	adv = a.Advice(at)
	if !adv.CheckpointNow || adv.Request != 2 || adv.CheckpointEvery != 537 || len(adv.Inputs.Risks) != 1 { // √(2·40·3600)
		t.Fatalf("risk: %+v", adv)
	}
	a.Saved(at.Add(sec(40)), sec(40))
	if adv = a.Advice(at.Add(sec(41))); adv.CheckpointNow || adv.CheckpointEvery != 537 {
		t.Fatalf("saved during the risk: %+v", adv)
	}
	a.EndRisk("aws/rebalance")
	if adv = a.Advice(at.Add(sec(42))); adv.CheckpointEvery != 2683 || len(adv.Inputs.Risks) != 0 {
		t.Fatalf("risk withdrawn: %+v", adv)
	}
	// Planned maintenance counts from its From, and a neighbour's
	// interruption until its Until.
	later := at.Add(time.Hour)
	a.Saved(later, 0)
	a.AddRisk(Risk{Key: "gcp/upcoming", Kind: "maintenance", At: later, From: later.Add(2 * time.Hour)})
	a.AddRisk(Risk{Key: "record/x", Kind: "fleet-zone", At: later, Until: later.Add(15 * time.Minute)})
	adv = a.Advice(later)
	if !adv.CheckpointNow || len(adv.Inputs.Risks) != 1 || adv.Inputs.Risks[0].Kind != "fleet-zone" {
		t.Fatalf("neighbour: %+v", adv)
	}
	a.Saved(later.Add(time.Minute), 0)
	if adv = a.Advice(later.Add(16 * time.Minute)); adv.CheckpointNow || len(adv.Inputs.Risks) != 0 {
		t.Fatalf("after the neighbour's window: %+v", adv)
	}
	req := adv.Request
	if adv = a.Advice(later.Add(2 * time.Hour)); !adv.CheckpointNow || adv.Request != req+1 || adv.Inputs.Risks[0].Kind != "maintenance" {
		t.Fatalf("maintenance window near: %+v", adv)
	}
	if g := a.MinGap(); g != sec(40) {
		t.Fatalf("MinGap = %s, want the save time (no upload measured)", g)
	}
}

// A job's interval is a machine's ÷ √nodes, and says why.
func TestJobInterval(t *testing.T) {
	in := Inputs{Save: 30 * time.Second, Rate: Rate{MTBI: 50 * time.Hour}, Max: 48 * time.Hour}
	one, _ := Interval(in)
	for _, n := range []int{8, 64} {
		in.Nodes = n
		got, why := Interval(in)
		want := time.Duration(float64(one) / math.Sqrt(float64(n)))
		if d := got - want; d < -time.Second || d > time.Second {
			t.Errorf("%d nodes: %v; want a machine's %v ÷ √%d = %v", n, got, one, n, want)
		}
		if !strings.Contains(why, fmt.Sprintf("a job of %d nodes", n)) {
			t.Errorf("%d nodes: the reason %q does not say it is a job's", n, why)
		}
	}
}

// TestJobIntervalMinimisesSimulatedLoss checks JobMTBI's derivation by
// simulation: 16 machines, each interrupted at random (Poisson) every 50 h
// on average, every interruption stopping the job and losing the work since
// its last complete checkpoint, each checkpoint blocking it for C = 30 s.
// The share of the job's time lost (work lost and saves) is lowest at the
// interval Interval gives for the job (a machine's ÷ √16), and clearly
// higher at half or twice it, and at a single machine's interval.
func TestJobIntervalMinimisesSimulatedLoss(t *testing.T) {
	const nodes = 16
	m, c := 50*time.Hour, 30*time.Second
	single, _ := Interval(Inputs{Save: c, Rate: Rate{MTBI: m}})
	job, _ := Interval(Inputs{Save: c, Rate: Rate{MTBI: m}, Nodes: nodes})
	lost := func(every time.Duration) float64 {
		rng := rand.New(rand.NewPCG(1, 2)) // the same interruptions for every interval
		mean := JobMTBI(m, nodes).Seconds()
		cycle := (every + c).Seconds()
		var total, useful float64
		for range 40000 {
			gap := rng.ExpFloat64() * mean // the job's time between interruptions of any node
			total += gap
			useful += math.Floor(gap/cycle) * every.Seconds()
		}
		return 1 - useful/total
	}
	at := lost(job)
	t.Logf("share lost: job interval %v %.4f; half %.4f; twice %.4f; a machine's interval %v %.4f",
		job, at, lost(job/2), lost(2*job), single, lost(single))
	for _, other := range []time.Duration{job / 2, 2 * job, single} {
		if l := lost(other); l < at*1.05 {
			t.Errorf("interval %v loses %.4f of the job's time; the job's interval %v should lose at least 5%% less (%.4f)", other, l, job, at)
		}
	}
}
