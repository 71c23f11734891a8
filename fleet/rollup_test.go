package fleet

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/preemptd/preemptd/advice"
	"github.com/preemptd/preemptd/agent"
	"github.com/preemptd/preemptd/checkpoint/storage"
)

func put(t *testing.T, st storage.Store, key string, r Record) {
	t.Helper()
	b, _ := json.MarshalIndent(r, "", "  ")
	if err := st.PutBytes(context.Background(), key, b); err != nil {
		t.Fatal(err)
	}
}

// TestRollupKeepsLateRecords: compaction writes one object per past day,
// is idempotent, and a record that arrives (or is updated) after its day
// was compacted is still read; records of the old layout (_events/<day>/)
// are read beside the new (_events/day=<day>/).
func TestRollupKeepsLateRecords(t *testing.T) {
	ctx := context.Background()
	root := t.TempDir()
	st, _ := storage.NewDir(root)
	recs := fleetRecords()
	put(t, st, fmt.Sprintf("%s/%s/old-layout.json", EventsPrefix, t0.Format(time.DateOnly)), recs[0])
	for _, r := range recs[1:] {
		put(t, st, Key(r), r)
	}
	l, err := Read(ctx, st, time.Time{})
	if err != nil || len(l.Records) != 6 || l.Rollups != 0 || len(l.Singly[t0.Format(time.DateOnly)]) != 6 {
		t.Fatalf("before compaction: %d records, %d rollups, %v", len(l.Records), l.Rollups, err)
	}
	days, n, err := Compact(ctx, st, l, t0.AddDate(0, 0, 2))
	if err != nil || days != 1 || n != 6 {
		t.Fatalf("Compact = %d days, %d records, %v", days, n, err)
	}
	// Rollups are newer than the records by more than the slack: back-date
	// the records as a store's clock would have them.
	old := time.Now().Add(-time.Minute)
	filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
		if err == nil && !d.IsDir() && !strings.Contains(p, "rollups") {
			os.Chtimes(p, old, old)
		}
		return nil
	})
	l, err = Read(ctx, st, time.Time{})
	if err != nil || len(l.Records) != 6 || l.Rollups != 1 || len(l.Singly) != 0 {
		t.Fatalf("after compaction: %d records, %d rollups, singly %v, %v", len(l.Records), l.Rollups, l.Singly, err)
	}
	if days, _, _ := Compact(ctx, st, l, t0.AddDate(0, 0, 2)); days != 0 {
		t.Fatalf("second compaction wrote %d days; want none (idempotent)", days)
	}
	// A late record, and an update of one already rolled up.
	late := recs[0]
	late.Instance.ID, late.NoticeID = "i-late", "late"
	put(t, st, Key(late), late)
	upd := recs[3]
	upd.Outcome = "deadline"
	put(t, st, Key(upd), upd)
	l, err = Read(ctx, st, time.Time{})
	if err != nil || len(l.Records) != 7 {
		t.Fatalf("late record: %d records, %v", len(l.Records), err)
	}
	found := false
	for _, r := range l.Records {
		if r.Instance.ID == upd.Instance.ID && r.Outcome == "deadline" {
			found = true
		}
	}
	if !found {
		t.Fatalf("the update after compaction was not read")
	}
	if days, n, _ := Compact(ctx, st, l, t0.AddDate(0, 0, 2)); days != 1 || n != 7 {
		t.Fatalf("recompaction = %d days, %d records; want 1, 7", days, n)
	}
	// Today's records are never compacted.
	if days, _, _ := Compact(ctx, st, l, t0); days != 0 {
		t.Fatalf("compacted the current day")
	}
	// Since skips whole days.
	if l, _ := Read(ctx, st, t0.AddDate(0, 0, 1)); len(l.Records) != 0 {
		t.Fatalf("since the next day: %d records", len(l.Records))
	}
}

func TestReportAdvicePerType(t *testing.T) {
	rep := Build(fleetRecords(), time.Time{}, nil, false)
	var p5 *TypeAdvice
	for i := range rep.Advice {
		if rep.Advice[i].Type == "p5.48xlarge" {
			p5 = &rep.Advice[i]
		}
	}
	// p5: interruptions after 10 h, 2 h, 4 h; one lost 1 h of work
	// (noticed 4 h, last commit 3 h). M = (3·25 + 16) / 6 = 15.17 h.
	if p5 == nil || p5.Interruptions != 3 || fmt.Sprintf("%.2f", p5.MTBIHours) != "15.17" || p5.LostSeconds != 1200 ||
		p5.SaveSeconds != advice.DefaultSave.Seconds() || p5.IntervalSeconds <= 0 {
		t.Fatalf("p5 advice = %+v", p5)
	}
}

// TestFeedRisks: the feed turns a recent interruption of the same job, or
// of the same type in the same zone, into a risk; not its own, not a
// drill's, not an old one's, not another zone's.
func TestFeedRisks(t *testing.T) {
	ctx := context.Background()
	st, _ := storage.NewDir(t.TempDir())
	now := time.Now().UTC()
	me := agent.Instance{ID: "i-me", Type: "p5.48xlarge", Region: "us-east-1", Zone: "us-east-1a"}
	rec := func(id, zone, run string, ago time.Duration, sim bool) Record {
		return Record{Version: RecordVersion, Run: run, Instance: agent.Instance{ID: id, Type: me.Type, Zone: zone, Region: "us-east-1"},
			Provider: "aws", Kind: agent.KindTerminate, Class: agent.ClassFatal, NoticeID: id, NoticedAt: now.Add(-ago), Simulated: sim}
	}
	for _, r := range []Record{rec("i-me", "us-east-1a", "", time.Minute, false), rec("i-drill", "us-east-1a", "", time.Minute, true),
		rec("i-old", "us-east-1a", "", time.Hour, false), rec("i-far", "us-east-1c", "", time.Minute, false)} {
		put(t, st, Key(r), r)
	}
	adv := advice.New(advice.Config{}, now, advice.Rate{MTBI: 25 * time.Hour})
	adv.Saved(now, time.Second)
	f := &Feed{Store: st, Advisor: adv, Instance: func() agent.Instance { return me }, Job: "run-a", Now: time.Now, seen: map[string]bool{}}
	f.Log = slog.New(slog.DiscardHandler)
	f.recent(ctx)
	if a := adv.Advice(now); a.CheckpointNow || len(a.Inputs.Risks) != 0 {
		t.Fatalf("no risk expected: %+v", a.Inputs.Risks)
	}
	put(t, st, Key(rec("i-zone", "us-east-1a", "", 2*time.Minute, false)), rec("i-zone", "us-east-1a", "", 2*time.Minute, false))
	put(t, st, Key(rec("i-node", "us-east-1c", "run-a", time.Minute, false)), rec("i-node", "us-east-1c", "run-a", time.Minute, false))
	other := rec("i-other-type", "us-east-1a", "", time.Minute, false)
	other.Instance.Type = "g5.xlarge"
	put(t, st, Key(other), other)
	counted := &countReads{Store: st}
	f.Store = counted
	f.recent(ctx)
	if counted.gets != 2 {
		t.Fatalf("%d records read; want the 2 near this machine (its zone and type, its job), not another zone's or type's", counted.gets)
	}
	a := adv.Advice(now)
	kinds := map[string]bool{}
	for _, r := range a.Inputs.Risks {
		kinds[r.Kind] = true
	}
	if !a.CheckpointNow || !kinds["fleet-zone"] || !kinds["job-node"] || len(kinds) != 2 {
		t.Fatalf("risks = %+v", a.Inputs.Risks)
	}
	if a := adv.Advice(now.Add(RecentWindow)); len(a.Inputs.Risks) != 0 {
		t.Fatalf("risks outlived their window: %+v", a.Inputs.Risks)
	}
}

// TestFeedRateCompacts: the feed compacts the days before yesterday (their
// records replaced by the day's rollup, their objects deleted), never
// today's, and estimates from the compacted days' records of this instance
// type and region (not others', not drills; today's wait for their
// rollup), reading each day's rollup once.
func TestFeedRateCompacts(t *testing.T) {
	ctx := context.Background()
	root := t.TempDir()
	st, _ := storage.NewDir(root)
	now := time.Now().UTC()
	me := agent.Instance{ID: "i-me", Type: "p4d.24xlarge", Region: "us-east-1", Zone: "us-east-1a"}
	rec := func(id, typ string, ago, life time.Duration, sim bool) Record {
		at := now.Add(-ago)
		return Record{Version: RecordVersion, Instance: agent.Instance{ID: id, Type: typ, Region: "us-east-1", StartedAt: at.Add(-life)},
			Provider: "aws", Kind: agent.KindTerminate, Class: agent.ClassFatal, NoticeID: id, NoticedAt: at, Watched: true, CommittedAt: at.Add(time.Minute), Simulated: sim}
	}
	for _, r := range []Record{rec("a", me.Type, 72*time.Hour, 10*time.Hour, false), rec("b", me.Type, 96*time.Hour, 20*time.Hour, false),
		rec("c", "g5.xlarge", 72*time.Hour, time.Hour, false), rec("d", me.Type, 72*time.Hour, time.Hour, true),
		rec("e", me.Type, time.Minute, 30*time.Hour, false)} {
		put(t, st, Key(r), r)
	}
	adv := advice.New(advice.Config{}, now, advice.Rate{})
	f := &Feed{Store: st, Advisor: adv, Instance: func() agent.Instance { return me }, Now: time.Now, Log: slog.New(slog.DiscardHandler)}
	f.rate(ctx)
	// a, b: lifetimes 10 + 20 h; prior A100 2.3 %/h weighed as 3.
	a := adv.Advice(now)
	wantM := (3/0.023 + 30) / 5
	if a.Inputs.Interruptions != 2 || math.Abs(a.Inputs.MTBIHours-wantM) > 1e-6 {
		t.Fatalf("estimate: %d interruptions, M %.3f h; want 2, %.3f h", a.Inputs.Interruptions, a.Inputs.MTBIHours, wantM)
	}
	l, _ := Read(ctx, st, time.Time{})
	if l.Rollups != 2 || len(l.Records) != 5 || len(l.Singly) != 1 {
		t.Fatalf("after the feed: %d rollups, %d records, read singly %v; want the 2 past days compacted, all 5 records, only today's read singly",
			l.Rollups, len(l.Records), l.Singly)
	}
	for _, ago := range []time.Duration{72 * time.Hour, 96 * time.Hour} {
		if objs, _ := st.List(ctx, EventsPrefix+"/day="+now.Add(-ago).Format(time.DateOnly)); len(objs) != 0 {
			t.Fatalf("%v ago: %d records left beside the rollup; want them replaced by it", ago, len(objs))
		}
	}
	// Again: nothing new to compact, no rollup read again.
	counted := &countReads{Store: st}
	f.Store = counted
	f.rate(ctx)
	if counted.gets != 0 || counted.lists != 0 {
		t.Fatalf("a second estimate within the hour: %d GETs, %d LISTs; want none (the rollups were read)", counted.gets, counted.lists)
	}
	if _, err := os.Stat(filepath.Join(root, filepath.FromSlash(RollupKey(now.Format(time.DateOnly))))); err == nil {
		t.Fatal("today was compacted")
	}
}

// countReads counts a store's GETs and listings.
type countReads struct {
	storage.Store
	gets, lists int
}

func (c *countReads) Get(ctx context.Context, key string, w io.Writer) error {
	c.gets++
	return c.Store.Get(ctx, key, w)
}

func (c *countReads) List(ctx context.Context, prefix string) ([]storage.Object, error) {
	c.lists++
	return c.Store.List(ctx, prefix)
}

// racing is a store on which another compactor writes the rollup between
// this one's read of it and its conditional replace.
type racing struct {
	storage.Store
	between func()
}

func (r *racing) GetVersion(ctx context.Context, key string, w io.Writer) (string, error) {
	v, err := r.Store.(storage.Swapper).GetVersion(ctx, key, w)
	if r.between != nil {
		r.between()
		r.between = nil
	}
	return v, err
}

func (r *racing) PutIf(ctx context.Context, key string, b []byte, version string) error {
	return r.Store.(storage.Swapper).PutIf(ctx, key, b, version)
}

// Of two daemons compacting a day at once one writes the rollup and
// deletes the records it holds; the other gives way and deletes nothing;
// a record that arrived after they listed the day stays, and every record
// is read.
func TestCompactDayOneWriterNoRecordLost(t *testing.T) {
	ctx := context.Background()
	dir, _ := storage.NewDir(t.TempDir())
	day := t0.Format(time.DateOnly)
	var singles []Record
	for i := range 5 {
		r := Record{Version: RecordVersion, Instance: agent.Instance{ID: fmt.Sprintf("i-%d", i), Type: "p5.48xlarge"}, Provider: "aws",
			Kind: agent.KindTerminate, Class: agent.ClassFatal, NoticeID: "n", NoticedAt: t0.Add(time.Duration(i) * time.Hour), UpdatedAt: t0}
		r.Key = Key(r)
		put(t, dir, r.Key, r)
		singles = append(singles, r)
	}
	late := Record{Version: RecordVersion, Instance: agent.Instance{ID: "i-late", Type: "p5.48xlarge"}, Provider: "aws",
		Kind: agent.KindTerminate, Class: agent.ClassFatal, NoticeID: "n", NoticedAt: t0.Add(20 * time.Hour), UpdatedAt: t0}
	st := &racing{Store: dir}
	var otherN, otherDeleted int
	var otherErr error
	st.between = func() {
		otherN, otherDeleted, otherErr = CompactDay(ctx, dir, day, singles[:3]) // the other daemon saw only three
		put(t, dir, Key(late), late)                                            // and a record arrives late
	}
	n, deleted, err := CompactDay(ctx, st, day, singles)
	if err != nil || otherErr != nil {
		t.Fatal(err, otherErr)
	}
	if otherN != 3 || otherDeleted != 3 || n != 0 || deleted != 0 {
		t.Fatalf("the other daemon wrote %d and deleted %d, this one %d and %d; want 3 and 3, then this one giving way", otherN, otherDeleted, n, deleted)
	}
	l, err := Read(ctx, dir, time.Time{})
	if err != nil || len(l.Records) != 6 || l.Rollups != 1 || len(l.Singly[day]) != 3 {
		t.Fatalf("%d records, %d rollups, %d read singly (%v); want all 6, the rollup, the 2 not in it and the late one singly", len(l.Records), l.Rollups, len(l.Singly[day]), err)
	}
	// The next compaction takes the rest into the rollup.
	n, deleted, err = CompactDay(ctx, dir, day, l.Singly[day])
	if err != nil || n != 6 || deleted != 3 {
		t.Fatalf("second compaction: %d records, %d deleted, %v; want 6 and 3", n, deleted, err)
	}
	if objs, _ := dir.List(ctx, EventsPrefix+"/day="+day); len(objs) != 0 {
		t.Fatalf("%d records left beside the rollup", len(objs))
	}
	if l, _ := Read(ctx, dir, time.Time{}); len(l.Records) != 6 {
		t.Fatalf("%d records after the second compaction; want 6", len(l.Records))
	}
}
