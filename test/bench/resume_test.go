package bench

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/preemptd/preemptd/test/peers"
)

// torchJob starts examples/multinode/train.py under torchrun (2 ranks,
// gloo) in its own process group, with env added; it returns the command
// and its output.
func torchJob(t *testing.T, env ...string) (*exec.Cmd, *bytes.Buffer, chan struct{}) {
	t.Helper()
	script, _ := filepath.Abs("../../examples/multinode/train.py")
	shim, _ := filepath.Abs("../torch/torch2")
	client, _ := filepath.Abs("../../clients/python")
	cmd := exec.Command(peers.Python, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", fmt.Sprint(peers.FreePort(t)),
		"--redirects", "2", "--tee", "2", script)
	cmd.Env = append(os.Environ(), append([]string{"PYTHONPATH=" + shim + ":" + client}, env...)...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	t.Cleanup(func() { syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL); <-done })
	return cmd, &out, done
}

var trainingAgain = regexp.MustCompile(`step [0-9]+ done: training again at ([0-9.]+)`)

// TestResumeOnANewMachine: a real torchrun job (examples/multinode/train.py,
// 2 ranks, torch 1.13 on the CPU) with preemptd commits a checkpoint over a
// capped link; the machine's daemon and trainer are killed; a new machine
// (an empty folder) runs what its units would — `preemptd restore`, the
// daemon, the trainer — and the time from the restore's start to the
// trainer's first step after loading is measured, beside the bytes ÷ the
// link's rate; then the same with the files already in place (a stop/start
// on the same disk: kept, nothing fetched).
func TestResumeOnANewMachine(t *testing.T) {
	requireBench(t)
	peers.RequireTorch(t)
	bin, _ := binaries(t)
	const rate, bps = "400mbit", 400e6 / 8
	link := peers.NewLink(t, "10gbit")
	link.SetDownRate(t, rate)
	s3 := peers.StartMinIOBehind(t, link)
	const width = 3072 // 4 layers of 3072×3072 float32: 151 MB of weights
	dir := t.TempDir()
	cfgFor := func(name, ckpt string) string {
		p := filepath.Join(dir, name+".yaml")
		os.WriteFile(p, []byte(fmt.Sprintf("provider: local\nrun_id: resume\nrun_dir: %s\nstate_dir: %s\nmetrics: {listen: \"\"}\n"+
			"trainer: {match: '^\\S*python[0-9.]* -u \\S*train\\.py( |$)'}\ncheckpoint: {dir: %q, layout: dcp, quiet_period: 1s}\n"+
			"storage: {url: \"s3://%s/resume\", endpoint: %q, region: us-east-1}\nadvice: {fleet_poll: 0}\n",
			filepath.Join(dir, name, "run"), filepath.Join(dir, name, "state"), ckpt, s3.Bucket, s3.Endpoint)), 0o644)
		os.MkdirAll(filepath.Join(dir, name, "state"), 0o755)
		return p
	}
	env := s3.Env()

	// The first machine: trains, saves step-4, its daemon commits it.
	first := filepath.Join(dir, "first-ckpt")
	os.MkdirAll(first, 0o755)
	cfg := cfgFor("first", first)
	d := start(t, env, bin, "run", "--config", cfg)
	job, _, done := torchJob(t, append(env, "CKPT_DIR="+first, "SAVE_EVERY=4", "STEPS=1000000", fmt.Sprintf("WIDTH=%d", width),
		"PREEMPTD_BIN="+bin, "PREEMPTD_CONFIG="+cfg)...)
	var bytesCommitted int64
	waitFor(t, 5*time.Minute, func() bool {
		cmd := exec.Command(bin, "ls", "--json", "--config", cfg)
		cmd.Env = append(cleanEnv(), env...)
		b, _ := cmd.Output()
		var l struct {
			Latest      string
			Checkpoints []struct{ Bytes int64 }
		}
		json.Unmarshal(b, &l)
		if l.Latest != "" && len(l.Checkpoints) > 0 {
			bytesCommitted = l.Checkpoints[len(l.Checkpoints)-1].Bytes
		}
		return l.Latest != ""
	})
	// The machine is gone: its daemon and trainer die at once.
	d.cmd.Process.Signal(syscall.SIGKILL)
	killGroup(t, job, done)

	measure := func(label, ckpt string) (total, restore float64, fetched, kept int64) {
		t.Helper()
		cfg := cfgFor(label, ckpt)
		t0 := time.Now()
		cmd := exec.Command(bin, "restore", "--config", cfg, "--json")
		cmd.Env = append(cleanEnv(), env...)
		b, err := cmd.Output()
		if err != nil {
			t.Fatalf("restore: %v\n%s", err, b)
		}
		var r struct {
			Seconds      float64 `json:"seconds"`
			FetchedBytes int64   `json:"fetched_bytes"`
			KeptBytes    int64   `json:"kept_bytes"`
		}
		json.Unmarshal(b, &r)
		dm := start(t, env, bin, "run", "--config", cfg)
		defer dm.stop()
		job, out, done := torchJob(t, append(env, "CKPT_DIR="+ckpt, "SAVE_EVERY=1000", "STEPS=1000000", fmt.Sprintf("WIDTH=%d", width),
			"PREEMPTD_BIN="+bin, "PREEMPTD_CONFIG="+cfg)...)
		var at float64
		waitFor(t, 5*time.Minute, func() bool {
			m := trainingAgain.FindStringSubmatch(out.String())
			if m != nil {
				at, _ = strconv.ParseFloat(m[1], 64)
			}
			return m != nil
		})
		if !strings.Contains(out.String(), "resumed from "+ckpt) {
			t.Fatalf("%s: the trainer did not resume from the restored checkpoint:\n%s", label, out.String())
		}
		killGroup(t, job, done)
		return at - float64(t0.UnixNano())/1e9, r.Seconds, r.FetchedBytes, r.KeptBytes
	}
	fresh := filepath.Join(dir, "new-ckpt")
	emptyTotal, emptyRestore, fetched, _ := measure("new", fresh)
	sameTotal, sameRestore, fetched2, kept2 := measure("same", fresh)
	floor := float64(bytesCommitted) / bps

	var b strings.Builder
	fmt.Fprintf(&b, "### Resume on a new machine: a real torchrun job (%s)\n\n", time.Now().UTC().Format("2006-01-02"))
	fmt.Fprintf(&b, "Machine: %s. examples/multinode/train.py under torchrun (2 ranks, gloo, Debian's torch 1.13 on the CPU, a %d-wide 4-layer model) with preemptd committing its DCP checkpoint to MinIO across a capped netns link (downloads held to %s); then the daemon and the trainer are killed (SIGKILL) and a new machine runs what its units would: `preemptd restore` (preemptd-restore.service), the daemon, and the trainer, which calls preemptd.restore() (every file already in place: kept) and loads with dcp.load. Measured from the restore's start to the trainer's first step after loading.\n\n",
		machine(), width, rate)
	fmt.Fprintf(&b, "| new machine | restore | fetched | kept | restore start → training again | bytes ÷ link | restore ÷ floor |\n|---|---|---|---|---|---|---|\n")
	fmt.Fprintf(&b, "| empty folder | %.2f s | %d MiB | 0 | %.2f s | %.2f s | %.2f |\n", emptyRestore, fetched>>20, emptyTotal, floor, emptyRestore/floor)
	fmt.Fprintf(&b, "| files already there (same disk) | %.2f s | %d MiB | %d MiB | %.2f s | — | — |\n", sameRestore, fetched2>>20, kept2>>20, sameTotal)
	fmt.Fprintf(&b, "\nThe rest of \"training again\" is torchrun's start, torch's import and the load (on this 2-core machine, several seconds whatever the restore).\n")
	appendResults(t, b.String())
	if fetched2 != 0 || kept2 != bytesCommitted {
		t.Fatalf("with the files in place, fetched %d and kept %d of %d bytes", fetched2, kept2, bytesCommitted)
	}
}

// killGroup kills a torchJob's process group (the machine is gone) and
// waits for it.
func killGroup(t *testing.T, cmd *exec.Cmd, done chan struct{}) {
	t.Helper()
	syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		t.Fatal("the trainer did not die")
	}
}
