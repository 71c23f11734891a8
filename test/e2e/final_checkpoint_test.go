package e2e

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/preemptd/preemptd/agent"
	"github.com/preemptd/preemptd/test/peers"
)

// newestComplete is the highest step-N under dir with its .metadata.
func newestComplete(dir string) (string, int) {
	ents, _ := os.ReadDir(dir)
	best, bestN := "", -1
	for _, e := range ents {
		n, err := strconv.Atoi(strings.TrimPrefix(e.Name(), "step-"))
		if err != nil || n <= bestN {
			continue
		}
		if _, err := os.Stat(filepath.Join(dir, e.Name(), ".metadata")); err == nil {
			best, bestN = e.Name(), n
		}
	}
	return best, bestN
}

// midSave reports whether a step folder exists without its .metadata.
func midSave(dir string) bool {
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		if _, err := os.Stat(filepath.Join(dir, e.Name(), ".metadata")); err != nil && strings.HasPrefix(e.Name(), "step-") {
			return true
		}
	}
	return false
}

// TestFinalCheckpointOnSlowLink: a trainer saving every 1.5 s (each save
// taking about a second) behind a bandwidth-capped store (toxiproxy, so a
// background upload is always in flight) gets the notice in the middle of a
// save. It finishes that save, writes its final checkpoint and exits. The
// emergency path must commit the final one — the trainer's last — not the
// one that was in progress, and must not wait behind the background upload.
// Then a second drill runs on the same daemon (it re-arms): a new trainer,
// found again through its pid file, is signalled and its checkpoint saved.
func TestFinalCheckpointOnSlowLink(t *testing.T) {
	s3 := peers.StartMinIO(t)
	x := peers.StartToxiproxy(t)
	proxy := x.Front(t, "minio", s3, 2048) // KB/s per connection
	dir := shortDir(t)
	ckpt := filepath.Join(dir, "ckpt")
	pidFile := filepath.Join(dir, "trainer.pid")
	noticePath := filepath.Join(dir, "run", agent.NoticeFileName)
	cfg := fmt.Sprintf("provider: local\ntrainer: {pid_file: %q}\nrun_id: run-final\n"+
		"checkpoint: {dir: %q, layout: dcp, keep: 0}\nstorage: {url: \"s3://%s/runs\", endpoint: \"http://%s\", region: us-east-1}\n",
		pidFile, ckpt, s3.Bucket, proxy)
	d := startDaemonIn(t, dir, cfg, s3.Env()...)

	trainerArgs := []string{"--pid-file", pidFile, "--notice", noticePath, "--ckpt-dir", ckpt,
		"--ckpt-bytes", fmt.Sprint(8 << 20), "--ckpt-shards", "4", "--save-every", "1500ms", "--save-time", "1s"}
	run := func(log string) *exec.Cmd {
		cmd := exec.Command(trainerBin, append(trainerArgs, "--log", filepath.Join(dir, log))...)
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
		return cmd
	}
	drill := func(log string) (agent.Status, string) {
		os.Remove(pidFile)
		cmd := run(log)
		waitFor(t, 10*time.Second, "the trainer's pid file", func() bool { _, err := os.Stat(pidFile); return err == nil })
		// Let it train and save a while, then catch it in the middle of a save.
		time.Sleep(3 * time.Second)
		waitFor(t, 10*time.Second, "a save in progress", func() bool { return midSave(ckpt) })
		st, noticed := d.drill(agent.SimulateRequest{Kind: "terminate", In: "90s"})
		cmd.Wait()
		last, _ := newestComplete(ckpt)
		t.Logf("notice → path done in %v; trainer's last checkpoint %s; committed %+v",
			st.Emergency.FinishedAt.Sub(noticed).Round(time.Millisecond), last, st.Emergency.Checkpoint)
		return st, last
	}

	st, last := drill("signals-1.jsonl")
	if st.Emergency.Outcome != "completed" || st.Emergency.Checkpoint == nil || st.Emergency.Checkpoint.Name != last {
		t.Fatalf("outcome %s, committed %+v; want the trainer's last checkpoint %s", st.Emergency.Outcome, st.Emergency.Checkpoint, last)
	}
	if latest, _ := lsJSON(t, d.config, s3.Env()); latest != last {
		t.Fatalf("latest = %s, want %s", latest, last)
	}
	restoreDir := filepath.Join(dir, "restored")
	cmd := exec.Command(bin, "restore", "--config", d.config, "--to", restoreDir)
	cmd.Env = append(cleanEnv(), s3.Env()...)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("restore: %v\n%s", err, out)
	}
	got, want := treeSums(t, filepath.Join(restoreDir, last)), treeSums(t, filepath.Join(ckpt, last))
	if len(want) != 5 || len(got) != len(want) {
		t.Fatalf("restored %d files, want %d", len(got), len(want))
	}
	for k, v := range want {
		if got[k] != v {
			t.Fatalf("%s: restored bytes differ", k)
		}
	}

	// The drill did not disarm the daemon: once more, with a new trainer.
	st2, last2 := drill("signals-2.jsonl")
	if st2.Emergency.Checkpoint == nil || st2.Emergency.Checkpoint.Name != last2 || last2 == last {
		t.Fatalf("second path committed %+v, want the new trainer's last checkpoint %s", st2.Emergency.Checkpoint, last2)
	}
	if st2.Emergency.Signal == nil || len(st2.Emergency.Signal.PIDs) != 1 {
		t.Fatalf("second path signalled %+v, want the new trainer", st2.Emergency.Signal)
	}
	if n := s3.IncompleteUploads(t); n != 0 {
		t.Fatalf("%d multipart uploads left behind", n)
	}
}
