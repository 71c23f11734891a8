package fleet

import (
	"bytes"
	"context"
	"encoding/json"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/preemptd/preemptd/agent"
	"github.com/preemptd/preemptd/checkpoint/storage"
)

var t0 = time.Date(2026, 3, 1, 0, 0, 0, 0, time.UTC)

// fleetRecords are six simulated instances' records: four interruptions
// (one without a committed checkpoint), an advisory rebalance and a
// `preemptd simulate` test run.
func fleetRecords() []Record {
	inst := func(id, typ, region, zone string, started time.Time) agent.Instance {
		return agent.Instance{Provider: "aws", ID: id, Type: typ, Region: region, Zone: zone, Lifecycle: "spot", StartedAt: started}
	}
	rec := func(in agent.Instance, kind agent.Kind, class agent.Class, noticed time.Time, committed time.Duration, last time.Time) Record {
		r := Record{Version: 1, Instance: in, Provider: in.Provider, Kind: kind, NoticeID: "n-" + in.ID, Class: class,
			NoticedAt: noticed, Deadline: noticed.Add(2 * time.Minute), Outcome: "completed", LastCommitBefore: last}
		if committed > 0 {
			r.CommittedAt = noticed.Add(committed)
		}
		return r
	}
	return []Record{
		rec(inst("i-1", "p5.48xlarge", "us-east-1", "us-east-1a", t0), agent.KindTerminate, agent.ClassFatal, t0.Add(10*time.Hour), 20*time.Second, time.Time{}),
		rec(inst("i-2", "p5.48xlarge", "us-east-1", "us-east-1a", t0), agent.KindTerminate, agent.ClassFatal, t0.Add(2*time.Hour), 40*time.Second, time.Time{}),
		rec(inst("i-3", "p5.48xlarge", "us-east-1", "us-east-1b", t0), agent.KindStop, agent.ClassFatal, t0.Add(4*time.Hour), 0, t0.Add(3*time.Hour)),
		rec(inst("i-4", "g5.xlarge", "us-west-2", "us-west-2b", t0), agent.KindPreempt, agent.ClassFatal, t0.Add(8*time.Hour), 60*time.Second, time.Time{}),
		rec(inst("i-5", "g5.xlarge", "us-west-2", "us-west-2b", t0), agent.KindRebalance, agent.ClassAdvisory, t0.Add(1*time.Hour), 0, time.Time{}),
		func() Record {
			r := rec(inst("i-6", "g5.xlarge", "us-west-2", "us-west-2b", t0), agent.KindTerminate, agent.ClassFatal, t0.Add(30*time.Minute), 0, time.Time{})
			r.Simulated, r.Provider = true, "simulate"
			return r
		}(),
	}
}

func near(a, b float64) bool { return math.Abs(a-b) < 1e-6 }

func TestBuildReport(t *testing.T) {
	prices := map[string]Price{"p5.48xlarge": {OnDemand: 98, Spot: 20}, "g5.xlarge": {OnDemand: 1, Spot: 0.5}}
	r := Build(fleetRecords(), time.Time{}, prices, false)
	if r.Records != 5 || r.Interruptions != 4 || r.CheckpointsLost != 1 {
		t.Fatalf("records %d, interruptions %d, lost %d; want 5, 4, 1", r.Records, r.Interruptions, r.CheckpointsLost)
	}
	if len(r.ByType) != 2 || r.ByType[0] != (Count{"p5.48xlarge", 3}) || r.ByType[1] != (Count{"g5.xlarge", 1}) {
		t.Fatalf("by type = %+v", r.ByType)
	}
	if len(r.ByZone) != 3 || r.ByZone[0] != (Count{"us-east-1a", 2}) {
		t.Fatalf("by zone = %+v", r.ByZone)
	}
	if r.ByRegion[0] != (Count{"us-east-1", 3}) || r.ByRegion[1] != (Count{"us-west-2", 1}) {
		t.Fatalf("by region = %+v", r.ByRegion)
	}
	// Lifetimes 10h, 2h, 4h, 8h: nearest-rank p50 = 4h, p95 = 10h, mean 6h.
	if r.Lifetime.N != 4 || r.Lifetime.P50 != 4*3600 || r.Lifetime.P95 != 10*3600 || r.Lifetime.Mean != 6*3600 {
		t.Fatalf("lifetime = %+v", r.Lifetime)
	}
	// Notice → durable 20s, 40s, 60s.
	if r.NoticeToDurable.N != 3 || r.NoticeToDurable.P50 != 40 || r.NoticeToDurable.P95 != 60 {
		t.Fatalf("notice to durable = %+v", r.NoticeToDurable)
	}
	c := r.Cost
	// Spot hours: p5 10+2+4 = 16 h, g5 8 h.
	if !near(c.SpotHours, 24) || !near(c.SpotCost, 16*20+8*0.5) || !near(c.OnDemandCost, 16*98+8*1) || !near(c.Saved, 16*78+8*0.5) {
		t.Fatalf("cost = %+v", c)
	}
	// i-3 lost the hour since its last commit, at the p5 spot price.
	if !near(c.LostHours, 1) || !near(c.LostCost, 20) {
		t.Fatalf("lost = %v h, $%v", c.LostHours, c.LostCost)
	}
	if all := Build(fleetRecords(), time.Time{}, nil, true); all.Interruptions != 5 || all.Cost != nil {
		t.Fatalf("with simulated: %d interruptions, cost %v", all.Interruptions, all.Cost)
	}
	if recent := Build(fleetRecords(), t0.Add(5*time.Hour), nil, false); recent.Interruptions != 2 {
		t.Fatalf("since +5h: %d interruptions, want 2", recent.Interruptions)
	}
	unpriced := Build(fleetRecords(), time.Time{}, map[string]Price{"p5.48xlarge": {98, 20}}, false)
	if len(unpriced.Cost.UnpricedTypes) != 1 || unpriced.Cost.UnpricedTypes[0] != "g5.xlarge" {
		t.Fatalf("unpriced = %v", unpriced.Cost.UnpricedTypes)
	}
}

// TestStoreRoundTripAndPrint: records written by the Recorder's key scheme
// are loaded back (a bad one skipped), and the table prints.
func TestStoreRoundTripAndPrint(t *testing.T) {
	dir := t.TempDir()
	st, _ := storage.NewDir(dir)
	ctx := context.Background()
	for _, r := range fleetRecords() {
		b, _ := json.Marshal(r)
		if err := st.PutBytes(ctx, Key(r), b); err != nil {
			t.Fatal(err)
		}
	}
	os.MkdirAll(filepath.Join(dir, EventsPrefix, "day=2026-03-01"), 0o755)
	os.WriteFile(filepath.Join(dir, EventsPrefix, "day=2026-03-01", "garbage.json"), []byte("{"), 0o644)
	recs, bad, err := Load(ctx, st)
	if err != nil || len(recs) != 6 || bad != 1 {
		t.Fatalf("Load = %d records, %d bad, %v", len(recs), bad, err)
	}
	var out bytes.Buffer
	Print(&out, Build(recs, time.Time{}, map[string]Price{"p5.48xlarge": {98, 20}, "g5.xlarge": {1, 0.5}}, false))
	for _, want := range []string{"interruptions", "4", "p5.48xlarge", "us-east-1a", "saved", "$1252.00", "checkpoints lost"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("report lacks %q:\n%s", want, out.String())
		}
	}
	out.Reset()
	Print(&out, Build(nil, time.Time{}, nil, false))
	if !strings.Contains(out.String(), "no event records") {
		t.Fatalf("empty report: %q", out.String())
	}
}

func TestFromEvent(t *testing.T) {
	n := agent.Notice{Provider: "gcp", Kind: agent.KindPreempt, ID: "preempted", NoticedAt: t0, Deadline: t0.Add(30 * time.Second)}
	e := &agent.EmergencyReport{Outcome: "completed", Signal: &agent.SignalReport{At: t0.Add(time.Millisecond), PIDs: []int{1}},
		Checkpoint: &agent.CheckpointResult{Name: "step-9", Bytes: 10, CommittedAt: t0.Add(12 * time.Second)},
		Steps:      []agent.StepReport{{Name: "logs", Error: "store down"}}}
	r := FromEvent(agent.Event{Phase: agent.PhaseOutcome, Notice: n, Class: agent.ClassFatal, Emergency: e, At: t0.Add(13 * time.Second),
		Instance: agent.Instance{ID: "123", Type: "a3-highgpu-8g"}})
	if r.Outcome != "completed" || r.Checkpoint != "step-9" || !r.CommittedAt.Equal(t0.Add(12*time.Second)) ||
		!r.SignalledAt.Equal(t0.Add(time.Millisecond)) || r.Reason != "logs: store down" {
		t.Fatalf("record = %+v", r)
	}
	if k := Key(r); k != "_events/day=2026-03-01/unknown__a3-highgpu-8g__none__123-gcp-preempted.json" {
		t.Fatalf("key = %s", k)
	}
	r.Instance.Zone, r.Run = "us-central1-a", "llama-70b"
	zone, typ, run, ok := keyFields(Key(r))
	if !ok || zone != "us-central1-a" || typ != "a3-highgpu-8g" || run != RunTag("llama-70b") || run == RunTag("other") {
		t.Fatalf("fields of %s: %q %q %q %v", Key(r), zone, typ, run, ok)
	}
	if _, _, _, ok := keyFields("_events/day=2026-03-01/123-gcp-preempted.json"); ok {
		t.Fatal("an earlier release's key read as having fields")
	}
}

func TestLoadPrices(t *testing.T) {
	p := filepath.Join(t.TempDir(), "prices.yaml")
	os.WriteFile(p, []byte("p5.48xlarge: {on_demand: 98.32, spot: 20.1}\n"), 0o644)
	m, err := LoadPrices(p)
	if err != nil || m["p5.48xlarge"].Spot != 20.1 {
		t.Fatalf("LoadPrices = %v, %v", m, err)
	}
	os.WriteFile(p, []byte("p5: {ondemand: 1}\n"), 0o644)
	if _, err := LoadPrices(p); err == nil {
		t.Fatal("a misspelt key was accepted")
	}
}

// TestReportSaysWhatItLeftOut: simulated records are counted as left out
// (and --all includes them); an interruption on a machine that watched no
// checkpoints loses none.
func TestReportSaysWhatItLeftOut(t *testing.T) {
	recs := fleetRecords()
	rep := Build(recs, time.Time{}, nil, false)
	if rep.SimulatedLeftOut != 1 {
		t.Fatalf("simulated left out = %d, want 1", rep.SimulatedLeftOut)
	}
	var b bytes.Buffer
	Print(&b, rep)
	if !strings.Contains(b.String(), "--all shows them") {
		t.Fatalf("the report does not say drills were left out:\n%s", b.String())
	}
	if all := Build(recs, time.Time{}, nil, true); all.SimulatedLeftOut != 0 {
		t.Fatalf("--all left out %d", all.SimulatedLeftOut)
	}
	noDir := Record{Version: 2, Instance: agent.Instance{ID: "i-9", Type: "p5.48xlarge"}, Provider: "aws", Kind: agent.KindTerminate,
		NoticeID: "x", Class: agent.ClassFatal, NoticedAt: t0, Outcome: "completed"}
	if r := Build([]Record{noDir}, time.Time{}, nil, false); r.Interruptions != 1 || r.CheckpointsLost != 0 {
		t.Fatalf("no checkpoint.dir: %d interruptions, %d lost; want 1, 0", r.Interruptions, r.CheckpointsLost)
	}
	noDir.Watched = true
	if r := Build([]Record{noDir}, time.Time{}, nil, false); r.CheckpointsLost != 1 {
		t.Fatalf("watched, nothing committed: %d lost, want 1", r.CheckpointsLost)
	}
}

// A job notice's record names the node that stopped the job; one a drill
// started is a drill's record, and no job notice counts as an interruption
// of this machine (the noticed node's own record does).
func TestJobNoticeRecord(t *testing.T) {
	raw := []byte(`{"node":"node2","origins":[{"run":"r","id":"node2--simulate-sim-1","node":"node2","provider":"simulate","kind":"terminate","notice_id":"sim-1"}]}`)
	now := time.Now()
	ev := agent.Event{Phase: agent.PhaseNotice, Class: agent.ClassFatal, At: now,
		Notice: agent.Notice{Provider: "job", Kind: agent.KindJob, ID: "node2--simulate-sim-1", NoticedAt: now, Deadline: now.Add(time.Minute), Raw: raw}}
	r := FromEvent(ev)
	if r.JobOrigin != "node2" || len(r.JobOrigins) != 1 || !r.Simulated {
		t.Fatalf("record %+v: want job origin node2, simulated", r)
	}
	if Interruption(r) {
		t.Fatal("a job notice counted as this machine's interruption")
	}
	ev.Notice.Raw = []byte(`{"node":"node1","origins":[{"provider":"aws","kind":"terminate"}]}`)
	if r := FromEvent(ev); r.Simulated || r.JobOrigin != "node1" {
		t.Fatalf("a cloud's job notice: %+v", r)
	}
}

// TestReportShowsResume: restore records give the time lost to resume
// (the restore's seconds) and what was fetched; failed restores and fresh
// starts are left out of it.
func TestReportShowsResume(t *testing.T) {
	at := time.Date(2026, 5, 1, 10, 0, 0, 0, time.UTC)
	rec := func(outcome string, sec float64, fetched int64) Record {
		return Record{Version: RecordVersion, Kind: KindRestore, Provider: "restore", NoticedAt: at, Outcome: outcome,
			Restore: &Restore{Seconds: sec, FetchedBytes: fetched}}
	}
	rep := Build([]Record{rec("restored", 20, 2<<30), rec("restored", 40, 2<<30), rec("failed", 5, 0)}, time.Time{}, nil, false)
	if rep.Resume.N != 2 || rep.Resume.Mean != 30 || rep.ResumeFetchedBytes != 4<<30 || rep.Interruptions != 0 {
		t.Fatalf("resume %+v, fetched %d, interruptions %d", rep.Resume, rep.ResumeFetchedBytes, rep.Interruptions)
	}
	var b strings.Builder
	Print(&b, rep)
	if !strings.Contains(b.String(), "resume (restore before training)") || !strings.Contains(b.String(), "4.0 GiB fetched") {
		t.Fatalf("report:\n%s", b.String())
	}
}

// p counts a notice as committed only when the checkpoint it committed was
// completed after the trainer's signal: committing the newest checkpoint
// saved before it (the trainer saved nothing new) kept no work.
func TestObservationsCountOnlySavesAfterTheSignal(t *testing.T) {
	at := time.Date(2026, 12, 1, 10, 0, 0, 0, time.UTC)
	rec := func(signalled, complete, committed time.Time) Record {
		return Record{Version: RecordVersion, Kind: agent.KindTerminate, Class: agent.ClassFatal, Watched: true, NoticedAt: at,
			SignalledAt: signalled, CheckpointComplete: complete, CommittedAt: committed}
	}
	s := at.Add(time.Second)
	for _, tc := range []struct {
		name string
		r    Record
		want bool
	}{
		{"saved after the signal, committed", rec(s, s.Add(20*time.Second), s.Add(40*time.Second)), true},
		{"an older checkpoint committed", rec(s, at.Add(-10*time.Minute), s.Add(30*time.Second)), false},
		{"saved after the signal, not committed", rec(s, s.Add(20*time.Second), time.Time{}), false},
		{"no signal: saved after the notice, committed", rec(time.Time{}, at.Add(5*time.Second), at.Add(9*time.Second)), true},
		{"no signal: an older checkpoint committed", rec(time.Time{}, at.Add(-time.Hour), at.Add(9*time.Second)), false},
	} {
		obs := Observations([]Record{tc.r}, agent.Instance{})
		if len(obs) != 1 || obs[0].Committed != tc.want {
			t.Errorf("%s: %+v; want committed %v", tc.name, obs, tc.want)
		}
	}
}
