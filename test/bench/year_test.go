package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/preemptd/preemptd/advice"
	"github.com/preemptd/preemptd/agent"
	"github.com/preemptd/preemptd/checkpoint/storage"
	"github.com/preemptd/preemptd/fleet"
	"github.com/preemptd/preemptd/test/fakes"
	"github.com/preemptd/preemptd/test/peers"
)

// yearPerDay is how many records a simulated fleet writes a day: 365 days
// of them are over a million.
const yearPerDay = 2800

// yearRecord is record i of day: one of 4 instance types in one of 4
// zones, a run of 200, every tenth notice without a committed checkpoint.
func yearRecord(day time.Time, i int) fleet.Record {
	types := []string{"p5.48xlarge", "p4d.24xlarge", "p3.2xlarge", "g5.xlarge"}
	zones := []string{"us-east-1a", "us-east-1b", "us-east-1c", "us-east-1d"}
	noticed := day.Add(time.Duration(i) * 24 * time.Hour / yearPerDay)
	r := fleet.Record{Version: fleet.RecordVersion, Run: fmt.Sprintf("run-%d", i%200), Provider: "aws",
		Instance: agent.Instance{Provider: "aws", ID: fmt.Sprintf("i-%s-%05d", day.Format("060102"), i), Type: types[i%4], Region: "us-east-1",
			Zone: zones[(i/4)%4], Lifecycle: "spot", StartedAt: noticed.Add(-time.Duration(1+i%40) * time.Hour)},
		Kind: agent.KindTerminate, Class: agent.ClassFatal, NoticeID: "spot-itn", NoticedAt: noticed, Deadline: noticed.Add(2 * time.Minute),
		SignalledAt: noticed.Add(time.Second), Watched: true, Outcome: "completed", Checkpoint: "step-100", Bytes: 8 << 30,
		SaveSeconds: 20, UploadSeconds: 40, UpdatedAt: noticed.Add(time.Minute)}
	if i%10 != 0 {
		r.CheckpointComplete, r.CommittedAt = noticed.Add(20*time.Second), noticed.Add(50*time.Second)
	}
	r.Key = fleet.Key(r)
	return r
}

// rollupOf is day's rollup as the compaction writes it.
func rollupOf(day time.Time) []byte {
	var b bytes.Buffer
	recs := make([]fleet.Record, yearPerDay)
	for i := range recs {
		recs[i] = yearRecord(day, i)
	}
	for _, r := range recs {
		line, _ := json.Marshal(r)
		b.Write(line)
		b.WriteByte('\n')
	}
	return b.Bytes()
}

// billed counts the requests asked of a store as a service bills them (a
// listing a page per 1,000 keys); its listings carry the simulated time
// each key was written at, where one was set.
type billed struct {
	storage.Store
	lists, gets, puts, deletes atomic.Int64
	mu                         sync.Mutex
	written                    map[string]time.Time
}

func (c *billed) List(ctx context.Context, prefix string) ([]storage.Object, error) {
	objs, err := c.Store.List(ctx, prefix)
	c.lists.Add(int64(max(1, (len(objs)+999)/1000)))
	c.mu.Lock()
	for i := range objs {
		if at, ok := c.written[objs[i].Key]; ok {
			objs[i].ModTime = at
		}
	}
	c.mu.Unlock()
	return objs, err
}

func (c *billed) Get(ctx context.Context, key string, w io.Writer) error {
	c.gets.Add(1)
	return c.Store.Get(ctx, key, w)
}

func (c *billed) GetVersion(ctx context.Context, key string, w io.Writer) (string, error) {
	c.gets.Add(1)
	return c.Store.(storage.Swapper).GetVersion(ctx, key, w)
}

func (c *billed) PutIf(ctx context.Context, key string, b []byte, version string) error {
	c.puts.Add(1)
	return c.Store.(storage.Swapper).PutIf(ctx, key, b, version)
}

func (c *billed) PutBytes(ctx context.Context, key string, b []byte) error {
	c.puts.Add(1)
	return c.Store.PutBytes(ctx, key, b)
}

func (c *billed) Delete(ctx context.Context, keys ...string) error {
	c.deletes.Add(int64(len(keys)))
	return c.Store.Delete(ctx, keys...)
}

// writeAt writes r as written at the simulated time at.
func (c *billed) writeAt(ctx context.Context, r fleet.Record, at time.Time) error {
	b, _ := json.Marshal(r)
	return c.putAt(ctx, r.Key, b, at)
}

// putAt writes b at key as written at the simulated time at, uncounted.
func (c *billed) putAt(ctx context.Context, key string, b []byte, at time.Time) error {
	c.mu.Lock()
	c.written[key] = at
	c.mu.Unlock()
	return c.Store.PutBytes(ctx, key, b)
}

func (c *billed) total() int64 {
	return c.lists.Load() + c.gets.Load() + c.puts.Load() + c.deletes.Load()
}

func (c *billed) reset() { c.lists.Store(0); c.gets.Store(0); c.puts.Store(0); c.deletes.Store(0) }

// TestFleetYear: a year of a fleet's event records (365 days of 2,800:
// over a million). What one daemon's feed asks of the store in a day, in an
// in-memory store that counts requests: before (every record kept beside
// its day's rollup, as the compaction left them, and every estimate
// listing every key) and after (the rollups replacing the records, the
// feed reading only the days and records it needs), over one simulated
// day of polls at the default advice.fleet_poll (1 m) while the day's
// records arrive; and `preemptd report` over the compacted year in a local
// MinIO, as a user runs it.
func TestFleetYear(t *testing.T) {
	requireBench(t)
	ctx := context.Background()
	today := time.Now().UTC().Truncate(24 * time.Hour)
	const days = 365
	total := days * yearPerDay

	// Before: every record kept, rollups beside them.
	mem := &billed{Store: fakes.NewMemStore(), written: map[string]time.Time{}}
	start := time.Now()
	for d := days - 1; d >= 0; d-- {
		day := today.AddDate(0, 0, -d)
		for i := range yearPerDay {
			r := yearRecord(day, i)
			if err := mem.writeAt(ctx, r, r.NoticedAt); err != nil {
				t.Fatal(err)
			}
		}
		if d >= 2 { // compacted two days later
			mem.putAt(ctx, fleet.RollupKey(day.Format(time.DateOnly)), rollupOf(day), day.AddDate(0, 0, 2))
		}
	}
	t.Logf("a year in memory, before: %d records and their rollups in %v", total, time.Since(start))
	mem.reset()
	l, err := fleet.Read(ctx, mem, time.Time{}) // what each estimate of the feed before read
	if err != nil || len(l.Records) != total {
		t.Fatalf("before: read %d records, %v; want %d", len(l.Records), err, total)
	}
	oneRead, oneLists, oneGets := mem.total(), mem.lists.Load(), mem.gets.Load()
	t.Logf("before: one estimate's read: %d LIST pages, %d GETs", oneLists, oneGets)
	// Before, every poll also listed today's records and read each new one:
	// a listing page per 1,000 of today's records (half a day's on
	// average), and a GET of every record the fleet wrote that day.
	beforeLists := 144*oneLists + 1440*int64(max(1, (yearPerDay/2+999)/1000))
	beforeGets := 144*oneGets + yearPerDay
	beforePerDay := float64(beforeLists + beforeGets)

	// After: each past day's records replaced by its rollup (as the
	// daemons' hourly compaction leaves them).
	start = time.Now()
	for d := 2; d < days; d++ {
		day := today.AddDate(0, 0, -d).Format(time.DateOnly)
		objs, _ := mem.Store.List(ctx, fleet.EventsPrefix+"/day="+day)
		keys := make([]string, 0, len(objs))
		for _, o := range objs {
			keys = append(keys, o.Key)
		}
		mem.Store.Delete(ctx, keys...)
	}
	// Today's records arrive through the simulated day: empty at its start.
	objs, _ := mem.Store.List(ctx, fleet.EventsPrefix+"/day="+today.Format(time.DateOnly))
	for _, o := range objs {
		mem.Store.Delete(ctx, o.Key)
	}
	t.Logf("compacted in %v", time.Since(start))
	me := agent.Instance{ID: "i-me", Type: "p5.48xlarge", Region: "us-east-1", Zone: "us-east-1a"}
	adv := advice.New(advice.Config{}, today, advice.Rate{})
	now := today
	f := &fleet.Feed{Store: mem, Advisor: adv, Instance: func() agent.Instance { return me }, Job: "run-7", Poll: time.Minute,
		Now: func() time.Time { return now }}
	mem.reset()
	next := 0
	var first int64
	for i := range 1440 {
		now = today.Add(time.Duration(i) * time.Minute)
		for ; next < yearPerDay && yearRecord(today, next).NoticedAt.Before(now); next++ {
			r := yearRecord(today, next)
			if err := mem.writeAt(ctx, r, r.NoticedAt); err != nil {
				t.Fatal(err)
			}
		}
		f.Step(ctx, i)
		if i == 0 {
			first = mem.total()
		}
	}
	after := mem.total()
	afterLists, afterGets := mem.lists.Load(), mem.gets.Load()
	a := adv.Advice(now)
	t.Logf("after: one day of a daemon's feed: %d LIST pages, %d GETs, %d PUTs (the first poll %d); M %.1f h over %d interruptions",
		afterLists, afterGets, mem.puts.Load(), first, a.Inputs.MTBIHours, a.Inputs.Interruptions)
	if a.Inputs.Interruptions != (fleet.RateWindow)*yearPerDay/4 {
		t.Errorf("the estimate holds %d interruptions; want %d (the window's days, this type's)", a.Inputs.Interruptions, fleet.RateWindow*yearPerDay/4)
	}

	// The compacted year in MinIO, and `preemptd report` over it.
	s3 := peers.StartMinIO(t)
	s3.SetEnv(t)
	st, err := storage.Open(fmt.Sprintf("s3://%s/fleet", s3.Bucket), storage.Options{Endpoint: s3.Endpoint, Region: "us-east-1"})
	if err != nil {
		t.Fatal(err)
	}
	start = time.Now()
	work := make(chan func() error)
	var wg sync.WaitGroup
	for range 16 {
		wg.Go(func() {
			for w := range work {
				if err := w(); err != nil {
					t.Error(err)
				}
			}
		})
	}
	for d := range days {
		day := today.AddDate(0, 0, -d)
		if d >= 2 {
			work <- func() error { return st.PutBytes(ctx, fleet.RollupKey(day.Format(time.DateOnly)), rollupOf(day)) }
			continue
		}
		for i := range yearPerDay {
			r := yearRecord(day, i)
			work <- func() error { b, _ := json.Marshal(r); return st.PutBytes(ctx, r.Key, b) }
		}
	}
	close(work)
	wg.Wait()
	wrote := time.Since(start)
	bin, _ := binaries(t)
	dir := t.TempDir()
	cfg := filepath.Join(dir, "c.yaml")
	os.WriteFile(cfg, []byte(fmt.Sprintf("state_dir: %s\nrun_dir: %s\nstorage: {url: \"s3://%s/fleet\", endpoint: %q, region: us-east-1}\n", dir, dir, s3.Bucket, s3.Endpoint)), 0o644)
	var took []time.Duration
	var rep fleet.Report
	for range 3 {
		cmd := exec.Command(bin, "report", "--config", cfg, "--json")
		cmd.Env = append(cleanEnv(), s3.Env()...)
		began := time.Now()
		out, err := cmd.Output()
		took = append(took, time.Since(began))
		if err != nil || json.Unmarshal(out, &rep) != nil {
			t.Fatalf("report: %v\n%.2000s", err, out)
		}
		if rep.Records != total {
			t.Fatalf("report: %d records; want %d", rep.Records, total)
		}
	}
	med := median(took)
	t.Logf("report over the year: %v (runs %v)", med, took)

	var b strings.Builder
	fmt.Fprintf(&b, "### Fleet records: a year of them, per daemon and in a report (%s)\n\n", time.Now().UTC().Format("2006-01-02"))
	fmt.Fprintf(&b, "Machine: %s. A simulated fleet writing %d records a day for 365 days (%d records: 4 instance types in 4 zones). "+
		"Requests are counted in an in-memory store as a service bills them (a LIST page per 1,000 keys); the report runs against a local MinIO holding the year.\n\n",
		machine(), yearPerDay, total)
	fmt.Fprintf(&b, "| one daemon's feed, a day (advice.fleet_poll 1 m) | LIST pages | GETs | requests a day | at S3 prices |\n|---|---|---|---|---|\n")
	fmt.Fprintf(&b, "| before: every record kept beside its rollup; each estimate (every 10th poll) lists every key and reads the rollups and the uncompacted records; every poll lists today's records and reads each new one | %d | %d | %.0f | $%.2f |\n",
		beforeLists, beforeGets, beforePerDay, s3Cost(beforeLists, beforeGets))
	fmt.Fprintf(&b, "| after: rollups replace the records; the estimate reads the last %d days' rollups (once each, the late week's again every 6 h), the late week is listed hourly for compaction, every poll lists today's records and reads only those of its zone and type or its run | %d | %d | %d | $%.4f |\n\n",
		fleet.RateWindow, afterLists, afterGets, after, s3Cost(afterLists, afterGets))
	fmt.Fprintf(&b, "Before, one estimate's read of the year was %d requests (%d of them LIST pages), %d a day at 144 estimates; the polls' share (1,440 listings of half a day's records, %d GETs) is from the code's rule, not counted. "+
		"After, the day was counted: its first poll (a daemon's start: the window's rollups) asked %d of the %d. Per daemon and day, after ÷ before: %.4f; after, the requests do not depend on how many days the store holds "+
		"(they grow with the records a day: a listing page per 1,000 of today's).\n\n",
		oneRead, oneLists, 144*oneRead, yearPerDay, first, after, float64(after)/beforePerDay)
	fmt.Fprintf(&b, "`preemptd report --json` over the whole year (363 rollups and two days of %d records read on their own; written in %v): **%v** (median of 3: %v). Goal ≤ 10 s: %.2f× the goal. %d records written, %d reported.\n",
		yearPerDay, wrote.Round(time.Second), med.Round(10*time.Millisecond), took, med.Seconds()/10, total, rep.Records)
	appendResults(t, b.String())
	if med > 10*time.Second {
		t.Errorf("report over a year: %v; the goal is 10 s", med)
	}
}

// s3Cost is what lists LIST pages and gets GETs cost at S3 Standard's
// prices (us-east-1: $0.005 per 1,000 LIST and PUT, $0.0004 per 1,000 GET).
func s3Cost(lists, gets int64) float64 { return float64(lists)*5e-6 + float64(gets)*0.4e-6 }
