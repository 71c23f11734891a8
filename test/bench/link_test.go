package bench

import (
	"context"
	"crypto/rand"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"

	"github.com/preemptd/preemptd/checkpoint/storage"
	"github.com/preemptd/preemptd/test/peers"
)

// linkCase is one row of the capped-link bench.
type linkCase struct {
	rate    string
	size    int64
	changed int // shards of 8 the trainer changes from the step before
	sync    bool
}

// TestTimeToDurableOnALink: the trainer's save complete → committed, for an
// 8-shard DCP checkpoint of which some shards are unchanged from the step
// before, with MinIO across a real capped link (a network namespace over a
// veth pair whose upload direction a tbf qdisc shapes), with continuous
// sync (the step before already committed: the unchanged shards are copied
// inside the store) and without; against the time to send only the changed
// bytes over the same link (the floor for any tool).
func TestTimeToDurableOnALink(t *testing.T) {
	requireBench(t)
	link := peers.NewLink(t, "400mbit")
	s3 := peers.StartMinIOBehind(t, link)
	s3.SetEnv(t)
	rounds := 3
	commit := map[linkCase][]time.Duration{}
	sent := map[linkCase]int64{}
	floor := map[linkCase][]time.Duration{} // keyed with sync false
	rates := []string{"400mbit", "1gbit"}
	sizes := []int64{256 << 20, 1 << 30}
	changes := []int{2, 4}
	if os.Getenv("BENCH_QUICK") != "" { // the goal's row only
		rates, sizes, changes = rates[:1], sizes[:1], changes[:1]
	}
	for _, rate := range rates {
		link.SetRate(t, rate)
		for _, size := range sizes {
			for _, changed := range changes {
				fk := linkCase{rate, size, changed, false}
				for r := range rounds {
					// The floor: the changed shards' bytes, sent in parallel
					// through preemptd's store over the same link.
					floor[fk] = append(floor[fk], sendOnly(t, s3, size/8, changed))
					for _, sync := range []bool{true, false} {
						c := linkCase{rate, size, changed, sync}
						took, n := durableOnLink(t, s3, c, r)
						commit[c] = append(commit[c], took)
						sent[c] = n
					}
				}
			}
		}
	}
	med := func(ds []time.Duration) time.Duration { return pct(ds, .5) }
	var b strings.Builder
	fmt.Fprintf(&b, "### Time to durable over a capped link (%s)\n\n", time.Now().UTC().Format("2006-01-02"))
	fmt.Fprintf(&b, "Machine: %s. MinIO in a network namespace, reached over a veth pair whose upload direction is shaped by `tc qdisc … tbf` (one cap for every connection, as a NIC's or a provider's is; toxiproxy caps each connection instead). The trainer writes an 8-shard DCP checkpoint on SIGTERM, the other shards unchanged from the step before. Measured from the trainer's save complete (its newest file's time) to the commit (manifest and latest written); medians of %d rounds. \"Changed bytes only\" is the changed shards sent in parallel through preemptd's store over the same link: the floor for any tool.\n\n", machine(), rounds)
	fmt.Fprintf(&b, "| link | checkpoint | changed | changed bytes only | with continuous sync | ÷ changed only | without sync (all sent at the notice) | ÷ changed only |\n|---|---|---|---|---|---|---|---|\n")
	for _, rate := range rates {
		for _, size := range sizes {
			for _, changed := range changes {
				f := med(floor[linkCase{rate, size, changed, false}])
				on, off := linkCase{rate, size, changed, true}, linkCase{rate, size, changed, false}
				fmt.Fprintf(&b, "| %s | %d MiB | %d %% | %v | %v (sent %d MiB) | %.2f | %v (sent %d MiB) | %.2f |\n", rate, size>>20, changed*100/8,
					f.Round(time.Millisecond), med(commit[on]).Round(time.Millisecond), sent[on]>>20, med(commit[on]).Seconds()/f.Seconds(),
					med(commit[off]).Round(time.Millisecond), sent[off]>>20, med(commit[off]).Seconds()/f.Seconds())
			}
		}
	}
	goal := linkCase{"400mbit", 256 << 20, 2, true}
	fmt.Fprintf(&b, "\nGoal (400 Mbit/s, 256 MiB, 25 %% changed, with sync): ≤ 1.2× the changed bytes alone; measured %.2f×.\n",
		med(commit[goal]).Seconds()/med(floor[linkCase{"400mbit", 256 << 20, 2, false}]).Seconds())
	appendResults(t, b.String())
}

// durableOnLink runs a daemon and the stand-in trainer for c, drills a
// notice, and returns the trainer's checkpoint complete → committed and the
// bytes sent.
func durableOnLink(t *testing.T, s3 *peers.S3, c linkCase, round int) (time.Duration, int64) {
	t.Helper()
	bin, _ := binaries(t)
	dir := t.TempDir()
	ckpt := filepath.Join(dir, "ckpt")
	pid, _, tr := trainer(t, dir, "--ckpt-dir", ckpt, "--ckpt-bytes", fmt.Sprint(c.size), "--ckpt-shards", "8", "--ckpt-unchanged", fmt.Sprint(8-c.changed))
	defer tr.stop()
	cfg := filepath.Join(dir, "preemptd.yaml")
	run := fmt.Sprintf("link-%s-%d-%d-%v-%d", c.rate, c.size>>20, c.changed, c.sync, round)
	d := daemon(t, dir, fmt.Sprintf("provider: local\nrun_id: %s\ntrainer: {pid_file: %q}\ncheckpoint: {dir: %q, layout: dcp, sync: %v}\nstorage: {url: \"s3://%s/bench\", endpoint: %q, region: us-east-1}\nadvice: {fleet_poll: 0}\n",
		run, pid, ckpt, c.sync, s3.Bucket, s3.Endpoint), s3.Env()...)
	defer d.stop()
	defer removePrefix(t, s3, "bench/"+run+"/") // 48 runs of up to 2 GiB would fill the disk
	defer os.RemoveAll(ckpt)
	// The trainer's step at start is complete before the notice (else
	// preemptd commits it as the trainer's new checkpoint first).
	waitFor(t, time.Minute, func() bool {
		_, err := os.Stat(filepath.Join(ckpt, "step-1", ".metadata"))
		return err == nil
	})
	if c.sync {
		waitFor(t, 5*time.Minute, func() bool {
			cmd := exec.Command(bin, "ls", "--config", cfg)
			cmd.Env = append(cleanEnv(), s3.Env()...)
			out, _ := cmd.CombinedOutput()
			return strings.Contains(string(out), "latest")
		})
	}
	if out, err := exec.Command(bin, "simulate", "--config", cfg, "--kind", "preempt", "--in", "10m", "--wait").CombinedOutput(); err != nil {
		t.Fatalf("simulate: %v\n%s", err, out)
	}
	st := status(t, dir)
	if st.Emergency == nil || st.Emergency.Checkpoint == nil {
		t.Fatalf("no checkpoint committed: %+v", st.Emergency)
	}
	ck := st.Emergency.Checkpoint
	took := ck.CommittedAt.Sub(ck.CompleteAt)
	t.Logf("%s %d MiB %d/8 changed, sync %v: complete → committed %v, sent %d MiB", c.rate, c.size>>20, c.changed, c.sync,
		took.Round(time.Millisecond), ck.SentBytes>>20)
	return took, ck.SentBytes
}

// removePrefix deletes the objects under prefix.
func removePrefix(t *testing.T, s3 *peers.S3, prefix string) {
	t.Helper()
	ctx := context.Background()
	objs := s3.Client.ListObjects(ctx, s3.Bucket, minio.ListObjectsOptions{Prefix: prefix, Recursive: true})
	for e := range s3.Client.RemoveObjects(ctx, s3.Bucket, objs, minio.RemoveObjectsOptions{}) {
		t.Logf("remove %s: %v", e.ObjectName, e.Err)
	}
}

// sendOnly sends n files of size bytes in parallel through preemptd's S3
// store and returns how long it took.
func sendOnly(t *testing.T, s3 *peers.S3, size int64, n int) time.Duration {
	t.Helper()
	st, err := storage.Open(fmt.Sprintf("s3://%s/floor", s3.Bucket), storage.Options{Endpoint: s3.Endpoint, Region: "us-east-1"})
	if err != nil {
		t.Fatal(err)
	}
	var files []*os.File
	for i := range n {
		p := filepath.Join(t.TempDir(), fmt.Sprint(i))
		b := make([]byte, size)
		rand.Read(b)
		os.WriteFile(p, b, 0o644)
		f, _ := os.Open(p)
		defer f.Close()
		files = append(files, f)
	}
	start := time.Now()
	var wg sync.WaitGroup
	for i, f := range files {
		wg.Go(func() {
			if err := st.PutFile(context.Background(), fmt.Sprintf("shard-%d", i), f, size); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	return time.Since(start)
}
