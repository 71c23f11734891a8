package e2e

import (
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
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
	for _, m := range doc.Checkpoints {
		names = append(names, m.Name)
	}
	return doc.Latest, names
}

// TestCheckpointCommittedOnNotice: with MinIO and a trainer writing a DCP
// checkpoint on SIGTERM, a simulated notice ends with that checkpoint
// committed (manifest + latest) and `preemptd restore` reproduces every byte.
func TestCheckpointCommittedOnNotice(t *testing.T) {
	s3 := peers.StartMinIO(t)
	dir := shortDir(t)
	ckpt := filepath.Join(dir, "ckpt")
	tr := startTrainer(t, filepath.Join(dir, "run", agent.NoticeFileName), "--ckpt-dir", ckpt, "--ckpt-bytes", fmt.Sprint(32<<20))
	d := startDaemonIn(t, dir, fmt.Sprintf("provider: local\ntrainer: {pid_file: %q}\n", tr.pidFile)+s3Config(s3, ckpt, "run-e2e"), s3.Env()...)

	// Continuous sync commits step-1 before any notice.
	waitFor(t, 30*time.Second, "step-1 committed by continuous sync", func() bool {
		latest, _ := lsJSON(t, d.config, s3.Env())
		return latest == "step-1"
	})
	out, code := runCLI(t, "simulate", "--config", d.config, "--kind", "preempt", "--in", "60s", "--wait")
	if code != 0 {
		t.Fatalf("simulate: %d\n%s", code, out)
	}
	st := d.status()
	for _, s := range st.Emergency.Steps {
		if s.Name == "checkpoint" && s.Error != "" {
			t.Fatalf("checkpoint step: %s", s.Error)
		}
	}
	latest, names := lsJSON(t, d.config, s3.Env())
	if latest != "step-2" || len(names) != 2 {
		t.Fatalf("latest %q, committed %v; want step-2 of [step-1 step-2]", latest, names)
	}
	restoreDir := filepath.Join(dir, "restored")
	cmd := exec.Command(bin, "restore", "--config", d.config, "--to", restoreDir)
	cmd.Env = append(cleanEnv(), s3.Env()...)
	pathOut, err := cmd.Output()
	if err != nil {
		t.Fatalf("restore: %v", err)
	}
	got, want := treeSums(t, strings.TrimSpace(string(pathOut))), treeSums(t, filepath.Join(ckpt, "step-2"))
	if len(want) != 5 || len(got) != len(want) {
		t.Fatalf("restored %d files, want %d", len(got), len(want))
	}
	for k, v := range want {
		if got[k] != v {
			t.Fatalf("%s: restored bytes differ", k)
		}
	}
	if n := s3.IncompleteUploads(t); n != 0 {
		t.Fatalf("%d multipart uploads left behind", n)
	}
}

// TestTrainerKilledMidSave: the trainer dies half-way through writing its
// checkpoint; nothing new is committed and latest still names step-1.
func TestTrainerKilledMidSave(t *testing.T) {
	s3 := peers.StartMinIO(t)
	dir := shortDir(t)
	ckpt := filepath.Join(dir, "ckpt")
	tr := startTrainer(t, filepath.Join(dir, "run", agent.NoticeFileName), "--ckpt-dir", ckpt, "--die-mid-save")
	d := startDaemonIn(t, dir, fmt.Sprintf("provider: local\ntrainer: {pid_file: %q}\n", tr.pidFile)+s3Config(s3, ckpt, "run-torn"), s3.Env()...)
	waitFor(t, 30*time.Second, "step-1 committed", func() bool {
		latest, _ := lsJSON(t, d.config, s3.Env())
		return latest == "step-1"
	})
	out, code := runCLI(t, "simulate", "--config", d.config, "--kind", "terminate", "--in", "15s", "--wait")
	if code != 0 {
		t.Fatalf("simulate: %d\n%s", code, out)
	}
	if _, err := os.Stat(filepath.Join(ckpt, "step-2", "__0_0.distcp")); err != nil {
		t.Fatalf("the trainer did not start saving step-2: %v", err)
	}
	st := d.status()
	var stepErr string
	for _, s := range st.Emergency.Steps {
		if s.Name == "checkpoint" {
			stepErr = s.Error
		}
	}
	if !strings.Contains(stepErr, "no new complete checkpoint") || !strings.Contains(stepErr, "stays latest") {
		t.Fatalf("checkpoint step error = %q; the record must say why", stepErr)
	}
	latest, names := lsJSON(t, d.config, s3.Env())
	if latest != "step-1" || len(names) != 1 {
		t.Fatalf("latest %q, committed %v; want only step-1", latest, names)
	}
	chaos(t, "process: the trainer dies in the middle of its save", "nothing committed; step-1 stays latest; the record says why")
}

// TestDaemonKilledMidUpload: preemptd is SIGKILLed while it uploads a large
// checkpoint and started again: the run ends with that checkpoint committed
// intact, and no multipart upload is left behind.
func TestDaemonKilledMidUpload(t *testing.T) {
	s3 := peers.StartMinIO(t)
	dir := shortDir(t)
	ckpt := filepath.Join(dir, "ckpt")
	tr := startTrainer(t, filepath.Join(dir, "run", agent.NoticeFileName), "--ckpt-dir", ckpt, "--ckpt-bytes", fmt.Sprint(512<<20))
	// Two upload threads keep parts in flight long enough to be caught.
	cfg := fmt.Sprintf("provider: local\ntrainer: {pid_file: %q}\n", tr.pidFile) +
		strings.Replace(s3Config(s3, ckpt, "run-kill"), "storage: {", "storage: {threads: 2, ", 1)
	d := startDaemonIn(t, dir, cfg, s3.Env()...)
	killed := false
	waitFor(t, 60*time.Second, "an upload in flight", func() bool {
		if s3.IncompleteUploads(t) > 0 {
			d.cmd.Process.Signal(syscall.SIGKILL)
			killed = true
			return true
		}
		latest, _ := lsJSON(t, d.config, s3.Env())
		return latest == "step-1" // finished before we caught it in flight
	})
	<-d.exited
	left := s3.IncompleteUploads(t)
	t.Logf("killed mid-upload: %v; multipart uploads left by the killed daemon: %d", killed, left)
	chaos(t, "process: preemptd SIGKILLed mid-upload (512 MiB), restarted",
		fmt.Sprintf("%d orphaned multipart upload(s) aborted at restart; checkpoint committed and restored byte for byte", left))

	d2 := startDaemonIn(t, dir, cfg, s3.Env()...)
	waitFor(t, 90*time.Second, "step-1 committed after restart", func() bool {
		latest, _ := lsJSON(t, d2.config, s3.Env())
		return latest == "step-1"
	})
	if n := s3.IncompleteUploads(t); n != 0 {
		t.Fatalf("%d multipart uploads orphaned after restart", n)
	}
	restoreDir := filepath.Join(dir, "restored")
	cmd := exec.Command(bin, "restore", "--config", d2.config, "--to", restoreDir)
	cmd.Env = append(cleanEnv(), s3.Env()...)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("restore: %v\n%s", err, out)
	}
	got, want := treeSums(t, filepath.Join(restoreDir, "step-1")), treeSums(t, filepath.Join(ckpt, "step-1"))
	for k, v := range want {
		if got[k] != v {
			t.Fatalf("%s differs after restore", k)
		}
	}
}
