package e2e

import (
	"bytes"
	"fmt"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
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

var finalLine = regexp.MustCompile(`final (step-[0-9]+) checksum (-?[0-9.]+)`)

// TestTorchrunFinalCheckpoint: a real torchrun job (2 ranks, CPU) saving
// torch.distributed.checkpoint every 20 steps, with a bandwidth-capped store
// (toxiproxy) so that a background upload is in flight when the notice
// comes. preemptd signals the workers only (the documented pattern), they
// agree to stop, finish, save their final checkpoint and exit; that final
// checkpoint is the one committed, and restored on a "new machine" it
// loads to the same weights. Twice in a row on the same daemon.
func TestTorchrunFinalCheckpoint(t *testing.T) {
	peers.RequireTorch(t)
	s3 := peers.StartMinIO(t)
	x := peers.StartToxiproxy(t)
	u, _ := url.Parse(s3.Endpoint)
	proxy := x.Proxy(t, "minio", u.Host)
	x.Toxic(t, "minio", "slow", "bandwidth", map[string]any{"rate": 1024}) // KB/s per connection
	dir := shortDir(t)
	ckpt := filepath.Join(dir, "ckpt")
	cfg := fmt.Sprintf("provider: local\ntrainer: {match: %q}\nrun_id: torch-final\n"+
		"checkpoint: {dir: %q, layout: dcp, keep: 0}\nstorage: {url: \"s3://%s/runs\", endpoint: \"http://%s\", region: us-east-1}\n",
		trainerpkg.WorkersPattern("train_dcp.py"), ckpt, s3.Bucket, proxy)
	d := startDaemonIn(t, dir, cfg, s3.Env()...)

	for round, start := range []int{0, 1000} {
		_, out, done := torchrun(t, "CKPT_DIR="+ckpt, "SAVE_EVERY=20", fmt.Sprintf("START_STEP=%d", start))
		first := fmt.Sprintf("step-%d", start+40)
		waitFor(t, 60*time.Second, first+" saved", func() bool {
			_, err := os.Stat(filepath.Join(ckpt, first, ".metadata"))
			return err == nil
		})
		st, noticed := d.drill(agent.SimulateRequest{Kind: "terminate", In: "90s"})
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
		_, check, checked := torchrun(t, "CKPT_DIR="+restoreDir, "CHECK_DIR="+filepath.Join(restoreDir, final))
		select {
		case <-checked:
		case <-time.After(60 * time.Second):
			t.Fatal("the verifying load did not finish")
		}
		if want := "checksum " + sum; !bytes.Contains(check.Bytes(), []byte(want)) {
			t.Fatalf("round %d: restored weights differ: want %q in\n%s", round, want, check.String())
		}
	}
}
