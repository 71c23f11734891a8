package e2e

import (
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/preemptd/preemptd/agent"
	"github.com/preemptd/preemptd/checkpoint"
	"github.com/preemptd/preemptd/test/peers"
)

func s3Config(s3 *peers.S3, ckptDir, run string) string {
	return fmt.Sprintf("run_id: %s\ncheckpoint: {dir: %q, layout: dcp, keep: 3}\nstorage: {url: \"s3://%s/runs\", endpoint: %q, region: us-east-1}\n",
		run, ckptDir, s3.Bucket, s3.Endpoint)
}

func treeSums(t *testing.T, dir string) map[string][32]byte {
	t.Helper()
	out := map[string][32]byte{}
	err := filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		out[rel] = sha256.Sum256(b)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func lsJSON(t *testing.T, config string, env []string) (latest string, names []string) {
	t.Helper()
	latest, ms := manifests(t, config, env)
	for _, m := range ms {
		names = append(names, m.Name)
	}
	return latest, names
}

// waitLatest waits up to within for the run's latest to name want.
func waitLatest(t *testing.T, config string, env []string, want string, within time.Duration) {
	t.Helper()
	waitFor(t, within, "latest = "+want, func() bool {
		latest, _ := lsJSON(t, config, env)
		return latest == want
	})
}

// manifests is `preemptd ls --json`: the run's latest and its committed
// checkpoints' manifests.
func manifests(t *testing.T, config string, env []string) (latest string, ms []checkpoint.Manifest) {
	t.Helper()
	cmd := exec.Command(bin, "ls", "--json", "--config", config)
	cmd.Env = append(cleanEnv(), env...)
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("ls: %v", err)
	}
	var doc struct {
		Latest      string
		Checkpoints []checkpoint.Manifest
	}
	if err := json.Unmarshal(out, &doc); err != nil {
		t.Fatalf("ls --json: %v\n%s", err, out)
	}
	return doc.Latest, doc.Checkpoints
}

// ckptConfig is the daemon's config for a trainer writing DCP checkpoints
// into ckpt, with sp's store.
func ckptConfig(tr *trainer, ckpt string, sp storePeer, run string, threads int) string {
	return fmt.Sprintf("provider: local\ntrainer: {pid_file: %q}\ncheckpoint: {dir: %q, layout: dcp, keep: 3}\n", tr.pidFile, ckpt) +
		sp.config(run, threads)
}

// restoreVerified restores the run's latest with `preemptd restore` and
// checks every byte against the trainer's folder want.
func restoreVerified(t *testing.T, config string, env []string, to, want string) {
	t.Helper()
	cmd := exec.Command(bin, "restore", "--config", config, "--to", to)
	cmd.Env = append(cleanEnv(), env...)
	pathOut, err := cmd.Output()
	if err != nil {
		t.Fatalf("restore: %v", err)
	}
	got, exp := treeSums(t, strings.TrimSpace(string(pathOut))), treeSums(t, want)
	if len(exp) == 0 || len(got) != len(exp) {
		t.Fatalf("restored %d files, want %d", len(got), len(exp))
	}
	for k, v := range exp {
		if got[k] != v {
			t.Fatalf("%s: restored bytes differ", k)
		}
	}
}

// TestCheckpointCommittedOnNotice: with each store and a trainer writing a
// DCP checkpoint on SIGTERM (two of its four shards unchanged since the
// last one, as with frozen weights), a simulated notice ends with that
// checkpoint committed (manifest + latest), the unchanged shards copied
// inside the store rather than sent, and `preemptd restore` reproduces
// every byte, the copied shards included.
func TestCheckpointCommittedOnNotice(t *testing.T) {
	forEachStore(t, func(t *testing.T, sp storePeer) {
		dir := shortDir(t)
		ckpt := filepath.Join(dir, "ckpt")
		tr := startTrainer(t, filepath.Join(dir, "run", agent.NoticeFileName), "--ckpt-dir", ckpt, "--ckpt-bytes", fmt.Sprint(32<<20),
			"--ckpt-shards", "4", "--ckpt-unchanged", "2")
		d := startDaemonIn(t, dir, ckptConfig(tr, ckpt, sp, "run-e2e", 8), sp.env...)

		// Continuous sync commits step-1 before any notice.
		waitLatest(t, d.config, sp.env, "step-1", 30*time.Second)
		out, code := runCLI(t, "simulate", "--config", d.config, "--kind", "preempt", "--in", "60s", "--wait")
		if code != 0 {
			t.Fatalf("simulate: %d\n%s", code, out)
		}
		if e := stepError(d.status(), "checkpoint"); e != "" {
			t.Fatalf("checkpoint step: %s", e)
		}
		latest, ms := manifests(t, d.config, sp.env)
		if latest != "step-2" || len(ms) != 2 {
			t.Fatalf("latest %q, committed %d checkpoints; want step-2 of [step-1 step-2]", latest, len(ms))
		}
		m := ms[slices.IndexFunc(ms, func(m checkpoint.Manifest) bool { return m.Name == "step-2" })]
		var reused []string
		var kept int64
		for _, f := range m.Files {
			if f.Reused {
				reused, kept = append(reused, f.Path), kept+f.Size
			}
		}
		if len(reused) != 2 || kept != 16<<20 || m.SentBytes != m.Bytes-kept {
			t.Fatalf("step-2 reused %v (%d bytes) and sent %d of %d bytes; want the 2 unchanged shards (16 MiB) copied in the store, the rest sent", reused, kept, m.SentBytes, m.Bytes)
		}
		t.Logf("step-2: %v copied in the store, %d of %d bytes sent", reused, m.SentBytes, m.Bytes)
		restoreVerified(t, d.config, sp.env, filepath.Join(dir, "restored"), filepath.Join(ckpt, "step-2"))
		if n := sp.inFlight(t); n != 0 {
			t.Fatalf("%d uploads left behind", n)
		}
	})
}

// TestTrainerKilledMidSave: the trainer dies half-way through writing its
// checkpoint; nothing new is committed and latest still names step-1.
func TestTrainerKilledMidSave(t *testing.T) {
	forEachStore(t, func(t *testing.T, sp storePeer) {
		dir := shortDir(t)
		ckpt := filepath.Join(dir, "ckpt")
		tr := startTrainer(t, filepath.Join(dir, "run", agent.NoticeFileName), "--ckpt-dir", ckpt, "--die-mid-save")
		d := startDaemonIn(t, dir, ckptConfig(tr, ckpt, sp, "run-torn", 8), sp.env...)
		waitLatest(t, d.config, sp.env, "step-1", 30*time.Second)
		out, code := runCLI(t, "simulate", "--config", d.config, "--kind", "terminate", "--in", "15s", "--wait")
		if code != 0 {
			t.Fatalf("simulate: %d\n%s", code, out)
		}
		if _, err := os.Stat(filepath.Join(ckpt, "step-2", "__0_0.distcp")); err != nil {
			t.Fatalf("the trainer did not start saving step-2: %v", err)
		}
		st := d.status()
		stepErr := stepError(st, "checkpoint")
		if !strings.Contains(stepErr, "without a checkpoint newer than step-1") || !strings.Contains(stepErr, "step-1 is committed and stays latest") {
			t.Fatalf("checkpoint step error = %q; the record must say why", stepErr)
		}
		latest, names := lsJSON(t, d.config, sp.env)
		if latest != "step-1" || len(names) != 1 {
			t.Fatalf("latest %q, committed %v; want only step-1", latest, names)
		}
		chaos(t, "process: the trainer dies in the middle of its save ("+sp.name+")", "nothing committed; step-1 stays latest; the record says why")
	})
}

// TestDaemonKilledMidUpload: preemptd is SIGKILLed while it uploads a large
// checkpoint and started again: the run ends with that checkpoint committed
// intact, and nothing of the interrupted upload is left behind.
func TestDaemonKilledMidUpload(t *testing.T) {
	forEachStore(t, func(t *testing.T, sp storePeer) {
		dir := shortDir(t)
		ckpt := filepath.Join(dir, "ckpt")
		tr := startTrainer(t, filepath.Join(dir, "run", agent.NoticeFileName), "--ckpt-dir", ckpt, "--ckpt-bytes", fmt.Sprint(512<<20))
		// Two upload threads keep parts in flight long enough to be caught.
		cfg := ckptConfig(tr, ckpt, sp, "run-kill", 2)
		d := startDaemonIn(t, dir, cfg, sp.env...)
		killed := false
		waitFor(t, 60*time.Second, "an upload in flight", func() bool {
			if sp.inFlight(t) > 0 {
				d.cmd.Process.Signal(syscall.SIGKILL)
				killed = true
				return true
			}
			latest, _ := lsJSON(t, d.config, sp.env)
			return latest == "step-1" // finished before we caught it in flight
		})
		<-d.exited
		left := sp.inFlight(t)
		t.Logf("killed mid-upload: %v; uploads left by the killed daemon: %d", killed, left)
		if !killed {
			t.Fatal("the upload finished before it could be caught in flight: the test proved nothing")
		}
		chaos(t, "process: preemptd SIGKILLed mid-upload (512 MiB, "+sp.name+"), restarted",
			fmt.Sprintf("%d unfinished upload(s) cleaned at restart; checkpoint committed and restored byte for byte", left))

		d2 := startDaemonIn(t, dir, cfg, sp.env...)
		waitLatest(t, d2.config, sp.env, "step-1", 90*time.Second) // committed after the restart
		if n := sp.inFlight(t); n != 0 {
			t.Fatalf("%d unfinished uploads after restart", n)
		}
		restoreVerified(t, d2.config, sp.env, filepath.Join(dir, "restored"), filepath.Join(ckpt, "step-1"))
	})
}

// TestStoreOutage: the store goes down after step-1 is committed and a
// notice comes: the checkpoint step fails saying why, step-1 stays latest,
// the daemon keeps answering; with the store back, the next start commits
// the trainer's step-2 and it restores byte for byte.
func TestStoreOutage(t *testing.T) {
	forEachStore(t, func(t *testing.T, sp storePeer) {
		dir := shortDir(t)
		ckpt := filepath.Join(dir, "ckpt")
		tr := startTrainer(t, filepath.Join(dir, "run", agent.NoticeFileName), "--ckpt-dir", ckpt, "--ckpt-bytes", fmt.Sprint(16<<20))
		cfg := ckptConfig(tr, ckpt, sp, "run-outage", 8)
		d := startDaemonIn(t, dir, cfg, sp.env...)
		waitLatest(t, d.config, sp.env, "step-1", 30*time.Second)
		sp.down(t, true)
		runCLI(t, "simulate", "--config", d.config, "--kind", "preempt", "--in", "10s", "--wait")
		st := d.status() // still answering
		stepErr := stepError(st, "checkpoint")
		if stepErr == "" {
			t.Fatalf("the checkpoint step succeeded with the store down: %+v", st.Emergency.Steps)
		}
		t.Logf("checkpoint step with the store down: %s", stepErr)
		d.cmd.Process.Signal(syscall.SIGINT)
		<-d.exited
		sp.down(t, false)
		if latest, names := lsJSON(t, d.config, sp.env); latest != "step-1" || len(names) != 1 {
			t.Fatalf("after the outage: latest %q, committed %v; want step-1 alone", latest, names)
		}
		d2 := startDaemonIn(t, dir, cfg, sp.env...)
		waitLatest(t, d2.config, sp.env, "step-2", 60*time.Second) // committed once the store is back
		restoreVerified(t, d2.config, sp.env, filepath.Join(dir, "restored"), filepath.Join(ckpt, "step-2"))
		if n := sp.inFlight(t); n != 0 {
			t.Fatalf("%d unfinished uploads left", n)
		}
		chaos(t, "storage: the store ("+sp.name+") down during the notice, back before the next start",
			"checkpoint step fails with the reason; step-1 stays latest; step-2 committed at the next start and restored")
	})
}
