package bench

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/preemptd/preemptd/test/peers"
)

// TestTimeToDurable: notice → checkpoint committed for a 2 GiB, 8-shard DCP
// checkpoint written on the signal, of which 6 shards are unchanged from the
// step before (frozen weights) — with continuous sync having already
// committed that step, and without (sync off: everything goes at the notice).
func TestTimeToDurable(t *testing.T) {
	requireBench(t)
	s3 := peers.StartMinIO(t)
	rounds := 3
	res := map[bool][]time.Duration{}
	save := map[bool][]time.Duration{}   // notice → the trainer's checkpoint complete
	commit := map[bool][]time.Duration{} // complete → committed (preemptd's part)
	sent := map[bool]int64{}
	for r := range rounds {
		for _, sync := range []bool{true, false} {
			dir := t.TempDir()
			ckpt := filepath.Join(dir, "ckpt")
			pid, _, tr := trainer(t, dir, "--ckpt-dir", ckpt, "--ckpt-bytes", fmt.Sprint(2<<30), "--ckpt-shards", "8", "--ckpt-unchanged", "6")
			run := fmt.Sprintf("durable-%v-%d", sync, r)
			d := daemon(t, dir, fmt.Sprintf("provider: local\nrun_id: %s\ntrainer: {pid_file: %q}\ncheckpoint: {dir: %q, layout: dcp, sync: %v}\nstorage: {url: \"s3://%s/bench\", endpoint: %q, region: us-east-1}\n",
				run, pid, ckpt, sync, s3.Bucket, s3.Endpoint), s3.Env()...)
			waitFor(t, time.Minute, func() bool { // step-1, written at start, complete before the notice
				_, err := os.Stat(filepath.Join(ckpt, "step-1", ".metadata"))
				return err == nil
			})
			if sync {
				bin, _ := binaries(t)
				waitFor(t, 5*time.Minute, func() bool {
					cmd := exec.Command(bin, "ls", "--config", filepath.Join(dir, "preemptd.yaml"))
					cmd.Env = append(cleanEnv(), s3.Env()...)
					out, _ := cmd.CombinedOutput()
					return strings.Contains(string(out), "latest")
				})
			}
			bin, _ := binaries(t)
			if out, err := exec.Command(bin, "simulate", "--config", filepath.Join(dir, "preemptd.yaml"), "--kind", "preempt", "--in", "10m", "--wait").CombinedOutput(); err != nil {
				t.Fatalf("simulate: %v\n%s", err, out)
			}
			st := status(t, dir)
			if st.Emergency == nil || st.Emergency.Checkpoint == nil {
				t.Fatalf("no checkpoint committed: %+v", st.Emergency)
			}
			c := st.Emergency.Checkpoint
			took := c.CommittedAt.Sub(st.Emergency.Notice.NoticedAt)
			t.Logf("sync %v: notice → durable %v (trainer's save %v, preemptd's commit %v; sent %d of %d bytes)", sync, took,
				c.CompleteAt.Sub(st.Emergency.Notice.NoticedAt), c.CommittedAt.Sub(c.CompleteAt), c.SentBytes, c.Bytes)
			res[sync] = append(res[sync], took)
			save[sync] = append(save[sync], c.CompleteAt.Sub(st.Emergency.Notice.NoticedAt))
			commit[sync] = append(commit[sync], c.CommittedAt.Sub(c.CompleteAt))
			sent[sync] = c.SentBytes
			d.stop()
			tr.stop()
			exec.Command("rm", "-rf", ckpt).Run()
		}
	}
	med := func(ds []time.Duration) time.Duration { return pct(ds, .5) }
	var b strings.Builder
	fmt.Fprintf(&b, "### Time to durable (%s)\n\n", time.Now().UTC().Format("2006-01-02"))
	fmt.Fprintf(&b, "Machine: %s. MinIO on 127.0.0.1. The trainer writes a 2 GiB DCP checkpoint (8 shards, 6 of them unchanged from the step before) when it gets SIGTERM; measured from the notice to the checkpoint's commit (manifest and latest written), %d rounds each, medians.\n\n", machine(), rounds)
	fmt.Fprintf(&b, "| continuous sync | notice → durable | of which the trainer's save | of which preemptd's commit (hash, upload/copy, manifest) | bytes sent at the notice |\n|---|---|---|---|---|\n")
	for _, on := range []bool{true, false} {
		label := "off (the whole checkpoint sent at the notice)"
		if on {
			label = "on (the step before already committed: 6 unchanged shards copied inside the store)"
		}
		fmt.Fprintf(&b, "| %s | %v | %v | %v | %d MiB |\n", label, med(res[on]).Round(time.Millisecond),
			med(save[on]).Round(time.Millisecond), med(commit[on]).Round(time.Millisecond), sent[on]>>20)
	}
	fmt.Fprintf(&b, "\nWith sync, preemptd's part (complete → committed) takes %.2f× the time it takes without; notice → durable, which also holds the trainer's own save (the same program writing the same bytes in both rows, its time varying with this 2-core machine's load), is %.2f×. On loopback a server-side copy costs MinIO about what an upload does (one disk reads and writes the same bytes); against S3 over a network the copy stays inside the store while an upload is bound by the link.\n",
		med(commit[true]).Seconds()/med(commit[false]).Seconds(), med(res[true]).Seconds()/med(res[false]).Seconds())
	appendResults(t, b.String())
}
