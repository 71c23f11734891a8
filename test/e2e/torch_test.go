package e2e

import (
	"bytes"
	"fmt"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/preemptd/preemptd/agent"
	trainerpkg "github.com/preemptd/preemptd/agent/trainer"
	"github.com/preemptd/preemptd/test/peers"
)

// torchrun runs test/torch/train_dcp.py under torchrun (2 ranks, gloo) in
// its own process group, with env added; its output goes to a buffer.
func torchrun(t *testing.T, env ...string) (*exec.Cmd, *bytes.Buffer, chan struct{}) {
	t.Helper()
	script, _ := filepath.Abs("../torch/train_dcp.py")
	cmd := exec.Command(peers.Python, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", fmt.Sprint(peers.FreePort(t)),
		"--redirects", "2", "--tee", "2", script)
	cmd.Env = append(os.Environ(), env...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		<-done
		if t.Failed() {
			t.Logf("torchrun output:\n%s", out.String())
		}
	})
	return cmd, &out, done
}

// inProgress is a step folder whose save has begun and not ended (no
// .metadata yet), or "".
func inProgress(dir string) string {
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		if _, err := os.Stat(filepath.Join(dir, e.Name(), ".metadata")); err != nil && strings.HasPrefix(e.Name(), "step-") {
			return e.Name()
		}
	}
	return ""
}

var finalLine = regexp.MustCompile(`final (step-[0-9]+) checksum (-?[0-9.]+)`)

// TestTorchrunFinalCheckpoint: a real torchrun job (2 ranks, CPU, DDP)
// saving 64 MiB torch.distributed.checkpoint checkpoints every 5 steps, with
// a bandwidth-capped store (toxiproxy, 8 MB/s per connection) so that a
// background upload is in flight when the notice comes, and the notice sent
// while a save is in progress. preemptd signals the workers only (the
// documented pattern); they finish that save, agree to stop, save their
// final checkpoint and exit. Both are committed, the final one is latest,
// and restored on a "new machine" it loads to the same weights. Twice in a
// row on the same daemon. (The test logs whether each notice really landed
// mid-save: the save may finish before the signal reaches the ranks.)
func TestTorchrunFinalCheckpoint(t *testing.T) {
	peers.RequireTorch(t)
	s3 := peers.StartMinIO(t)
	x := peers.StartToxiproxy(t)
	u, _ := url.Parse(s3.Endpoint)
	proxy := x.Proxy(t, "minio", u.Host)
	x.Toxic(t, "minio", "slow", "bandwidth", map[string]any{"rate": 8192}) // KB/s per connection
	dir := shortDir(t)
	ckpt := filepath.Join(dir, "ckpt")
	cfg := fmt.Sprintf("provider: local\ntrainer: {match: %q}\nrun_id: torch-final\n"+
		"checkpoint: {dir: %q, layout: dcp, keep: 0}\nstorage: {url: \"s3://%s/runs\", endpoint: \"http://%s\", region: us-east-1}\n",
		trainerpkg.WorkersPattern("train_dcp.py"), ckpt, s3.Bucket, proxy)
	d := startDaemonIn(t, dir, cfg, s3.Env()...)

	midSaves := 0
	for round, start := range []int{0, 1000} {
		// 64 MiB checkpoints (WIDTH 2048): a save takes long enough that the
		// notice can land in the middle of one.
		_, out, done := torchrun(t, "CKPT_DIR="+ckpt, "SAVE_EVERY=5", "WIDTH=2048", fmt.Sprintf("START_STEP=%d", start))
		first := fmt.Sprintf("step-%d", start+10)
		waitFor(t, 120*time.Second, first+" saved", func() bool {
			_, err := os.Stat(filepath.Join(ckpt, first, ".metadata"))
			return err == nil
		})
		var saving string
		waitFor(t, 30*time.Second, "a save in progress", func() bool { saving = inProgress(ckpt); return saving != "" })
		st, noticed := d.drill(agent.SimulateRequest{Kind: "terminate", In: "90s"})
		if fi, err := os.Stat(filepath.Join(ckpt, saving, ".metadata")); err == nil && fi.ModTime().After(noticed) {
			midSaves++
			t.Logf("round %d: the notice landed while %s was being saved (complete %v after it)", round, saving,
				fi.ModTime().Sub(noticed).Round(time.Millisecond))
			if _, names := lsJSON(t, d.config, s3.Env()); !slices.Contains(names, saving) {
				t.Errorf("round %d: %s, completed after the notice, was not committed as well: %v", round, saving, names)
			}
		}
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			t.Fatal("torchrun did not exit after its workers were signalled")
		}
		m := finalLine.FindStringSubmatch(out.String())
		if m == nil {
			t.Fatalf("round %d: no final checkpoint line from rank 0", round)
		}
		final, sum := m[1], m[2]
		e := st.Emergency
		t.Logf("round %d: notice → path done %v; final %s; committed %+v; signalled %v",
			round, e.FinishedAt.Sub(noticed).Round(time.Millisecond), final, e.Checkpoint, e.Signal.PIDs)
		if e.Outcome != "completed" || e.Checkpoint == nil || e.Checkpoint.Name != final {
			t.Fatalf("round %d: outcome %s, committed %+v; want the final %s", round, e.Outcome, e.Checkpoint, final)
		}
		if len(e.Signal.PIDs) != 2 {
			t.Fatalf("round %d: signalled %v, want the two workers and not torchrun", round, e.Signal.PIDs)
		}
		if latest, _ := lsJSON(t, d.config, s3.Env()); latest != final {
			t.Fatalf("round %d: latest %s, want %s", round, latest, final)
		}
		// A new machine: restore, then load under torchrun.
		restoreDir := filepath.Join(dir, fmt.Sprintf("restored-%d", round))
		cmd := exec.Command(bin, "restore", "--config", d.config, "--to", restoreDir)
		cmd.Env = append(cleanEnv(), s3.Env()...)
		if b, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("restore: %v\n%s", err, b)
		}
		_, check, checked := torchrun(t, "CKPT_DIR="+restoreDir, "WIDTH=2048", "CHECK_DIR="+filepath.Join(restoreDir, final))
		select {
		case <-checked:
		case <-time.After(60 * time.Second):
			t.Fatal("the verifying load did not finish")
		}
		if want := "checksum " + sum; !bytes.Contains(check.Bytes(), []byte(want)) {
			t.Fatalf("round %d: restored weights differ: want %q in\n%s", round, want, check.String())
		}
	}
	t.Logf("%d of 2 notices landed in the middle of a save", midSaves)
}
