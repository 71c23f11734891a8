package bench

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/preemptd/preemptd/agent"
	"github.com/preemptd/preemptd/checkpoint/storage"
	"github.com/preemptd/preemptd/fleet"
	"github.com/preemptd/preemptd/test/peers"
)

// TestFleetRecords: `preemptd report` over 100,000 event records (100 days
// of 1,000) in a local MinIO, record by record (the peer: how records were
// read before rollups) and with the past days compacted; late records after
// compaction are counted too.
func TestFleetRecords(t *testing.T) {
	requireBench(t)
	n, days := 100_000, 100
	if v, err := strconv.Atoi(os.Getenv("BENCH_RECORDS")); err == nil && v > 0 {
		n = v
	}
	s3 := peers.StartMinIO(t)
	s3.SetEnv(t)
	ctx := context.Background()
	st, err := storage.Open(fmt.Sprintf("s3://%s/fleet", s3.Bucket), storage.Options{Endpoint: s3.Endpoint, Region: "us-east-1"})
	if err != nil {
		t.Fatal(err)
	}
	first := time.Now().UTC().Truncate(24*time.Hour).AddDate(0, 0, -days)
	types := []string{"p5.48xlarge", "p4d.24xlarge", "p3.2xlarge", "g5.xlarge"}
	rec := func(i int) fleet.Record {
		day := first.AddDate(0, 0, i%days)
		noticed := day.Add(time.Duration(i%86000) * time.Second)
		r := fleet.Record{Version: fleet.RecordVersion, Run: fmt.Sprintf("run-%d", i%500), Provider: "aws",
			Instance: agent.Instance{Provider: "aws", ID: fmt.Sprintf("i-%08x", i), Type: types[i%len(types)], Region: "us-east-1",
				Zone: "us-east-1a", Lifecycle: "spot", StartedAt: noticed.Add(-time.Duration(1+i%40) * time.Hour)},
			Kind: agent.KindTerminate, Class: agent.ClassFatal, NoticeID: "spot-itn", NoticedAt: noticed, Deadline: noticed.Add(2 * time.Minute),
			Watched: true, Outcome: "completed", Checkpoint: "step-100", Bytes: 8 << 30, SaveSeconds: 20, UploadSeconds: 40, UpdatedAt: noticed}
		if i%10 != 0 {
			r.CommittedAt = noticed.Add(50 * time.Second)
		}
		return r
	}
	put := func(from, to int) time.Duration {
		start := time.Now()
		work := make(chan int)
		var wg sync.WaitGroup
		for range 64 {
			wg.Go(func() {
				for i := range work {
					r := rec(i)
					b, _ := json.MarshalIndent(r, "", "  ")
					if err := st.PutBytes(ctx, fleet.Key(r), b); err != nil {
						t.Error(err)
					}
				}
			})
		}
		for i := from; i < to; i++ {
			work <- i
		}
		close(work)
		wg.Wait()
		return time.Since(start)
	}
	wrote := put(0, n)
	t.Logf("wrote %d records in %v", n, wrote)

	bin, _ := binaries(t)
	dir := t.TempDir()
	cfg := filepath.Join(dir, "c.yaml")
	os.WriteFile(cfg, []byte(fmt.Sprintf("state_dir: %s\nrun_dir: %s\nstorage: {url: \"s3://%s/fleet\", endpoint: %q, region: us-east-1}\n", dir, dir, s3.Bucket, s3.Endpoint)), 0o644)
	report := func(args ...string) (time.Duration, fleet.Report) {
		t.Helper()
		cmd := exec.Command(bin, append([]string{"report", "--config", cfg, "--json"}, args...)...)
		cmd.Env = append(cleanEnv(), s3.Env()...)
		start := time.Now()
		out, err := cmd.Output()
		took := time.Since(start)
		var rep fleet.Report
		if err != nil || json.Unmarshal(out, &rep) != nil {
			t.Fatalf("report: %v\n%s", err, out)
		}
		return took, rep
	}
	single, rep := report()
	if rep.Records != n {
		t.Fatalf("record by record: %d records, want %d", rep.Records, n)
	}
	compact, _ := report("--compact")
	late := 50
	put(n, n+late) // records arriving after their day was compacted
	rolled, rep := report()
	if rep.Records != n+late {
		t.Fatalf("with rollups: %d records, want %d (late ones lost?)", rep.Records, n+late)
	}
	lt, _ := fleet.Read(ctx, st, time.Time{})
	start := time.Now()
	var adv fleet.TypeAdvice
	for _, a := range fleet.Build(lt.Records, time.Time{}, nil, false).Advice {
		if a.Type == "p5.48xlarge" {
			adv = a
		}
	}
	build := time.Since(start)

	var b strings.Builder
	fmt.Fprintf(&b, "### Fleet records: report and advice over %d records (%s)\n\n", n, time.Now().UTC().Format("2006-01-02"))
	fmt.Fprintf(&b, "Machine: %s. One local MinIO; %d records over %d days (Hive-style `_events/day=YYYY-MM-DD/` keys), written by 64 writers in %v. `preemptd report --json` as a user runs it, wall clock.\n\n", machine(), n, days, wrote.Round(time.Second))
	fmt.Fprintf(&b, "| how the records are read | report | ratio |\n|---|---|---|\n")
	fmt.Fprintf(&b, "| record by record (one GET each, 32 at once; before any rollup) | %v | 1.00 |\n", single.Round(10*time.Millisecond))
	fmt.Fprintf(&b, "| `report --compact`: the same read, then one rollup written per past day | %v | %.2f |\n", compact.Round(10*time.Millisecond), compact.Seconds()/single.Seconds())
	fmt.Fprintf(&b, "| rollups (one LIST of every key, one GET per day) + %d late records read on their own | %v | %.3f |\n", late, rolled.Round(10*time.Millisecond), rolled.Seconds()/single.Seconds())
	fmt.Fprintf(&b, "\nGoal: report and advice over 100,000 records ≤ 10 s: %.1f s with rollups (%.2f× the goal). The per-type advice over all of them in memory took %v (p5.48xlarge: M %.1f h over %d interruptions, every %s). No record lost: %d written, %d reported.\n",
		rolled.Seconds(), rolled.Seconds()/10, build.Round(time.Millisecond), adv.MTBIHours, adv.Interruptions,
		time.Duration(adv.IntervalSeconds)*time.Second, n+late, rep.Records)
	appendResults(t, b.String())
}
