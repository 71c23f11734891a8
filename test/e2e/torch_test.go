package e2e

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
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
	return startTorchrun(t, "torchrun", []string{"--nproc_per_node", "2", "--master_port", fmt.Sprint(peers.FreePort(t)),
		"--redirects", "2", "--tee", "2", script}, env)
}

// startTorchrun starts `python -m torch.distributed.run args…` in its own
// process group (killed whole at the test's end), its output in a buffer
// (logged as label when the test fails).
func startTorchrun(t *testing.T, label string, args, env []string) (*exec.Cmd, *bytes.Buffer, chan struct{}) {
	t.Helper()
	var out bytes.Buffer
	cmd, done := startGroup(t, label, &out, out.String, peers.Python, append([]string{"-m", "torch.distributed.run"}, args...), env)
	return cmd, &out, done
}

// startGroup starts name args… with env added, in a process group of its
// own that is killed whole at the test's end, its output into out; when the
// test fails, text() is logged as label.
func startGroup(t *testing.T, label string, out io.Writer, text func() string, name string, args, env []string) (*exec.Cmd, chan struct{}) {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Env = append(os.Environ(), env...)
	cmd.Stdout, cmd.Stderr = out, out
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
			t.Logf("%s output:\n%s", label, text())
		}
	})
	return cmd, done
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
// a bandwidth-capped store (toxiproxy, 8 MB/s per connection; MinIO, GCS
// through fake-gcs-server and the VM's token, Azure through Azurite) so that a
// background upload is in flight when the notice comes, and the notice sent
// while a save is in progress. preemptd signals the workers only (the
// documented pattern); they finish that save, agree to stop, save their
// final checkpoint and exit. Both are committed, the final one is latest,
// and restored on a "new machine" it loads to the same weights. Twice in a
// row on the same daemon. (The test logs whether each notice really landed
// mid-save: the save may finish before the signal reaches the ranks.)
func TestTorchrunFinalCheckpoint(t *testing.T) {
	peers.RequireTorch(t)
	forEachStore(t, func(t *testing.T, sp storePeer) { torchrunFinal(t, sp) })
}

func torchrunFinal(t *testing.T, sp storePeer) {
	sp.slow(t, 8192) // KB/s per connection
	dir := shortDir(t)
	ckpt := filepath.Join(dir, "ckpt")
	cfg := fmt.Sprintf("provider: local\ntrainer: {match: %q}\ncheckpoint: {dir: %q, layout: dcp, keep: 0}\n",
		trainerpkg.WorkersPattern("train_dcp.py"), ckpt) + sp.config("torch-final", 8)
	d := startDaemonIn(t, dir, cfg, sp.env...)

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
			if _, names := lsJSON(t, d.config, sp.env); !slices.Contains(names, saving) {
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
		if latest, _ := lsJSON(t, d.config, sp.env); latest != final {
			t.Fatalf("round %d: latest %s, want %s", round, latest, final)
		}
		// A new machine: restore, then load under torchrun.
		restoreDir := filepath.Join(dir, fmt.Sprintf("restored-%d", round))
		cmd := exec.Command(bin, "restore", "--config", d.config, "--to", restoreDir)
		cmd.Env = append(cleanEnv(), sp.env...)
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

// torchrunNode runs one node of a two-node torchrun job on this machine
// (test/torch/train_job.py, --nnodes 2, one rank a node, gloo), with env
// added; its output goes to a buffer.
func torchrunNode(t *testing.T, rank, port int, env ...string) (*bytes.Buffer, chan struct{}) {
	t.Helper()
	script, _ := filepath.Abs("../torch/train_job.py")
	_, out, done := startTorchrun(t, fmt.Sprintf("torchrun node%d", rank), []string{"--nnodes", "2", "--node_rank", fmt.Sprint(rank),
		"--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", fmt.Sprint(port),
		"--redirects", "2", "--tee", "2", script, "--node", fmt.Sprintf("node%d", rank)}, env)
	return out, done
}

var jobFinal = regexp.MustCompile(`final (step-[0-9]+) rank ([0-9]) (model \S+ table \S+)`)

// TestTorchrunJobTwoNodes: a real two-node torchrun job on this machine —
// two "nodes", each its own torchrun (--nnodes 2, gloo), checkpoint folder,
// run_dir and preemptd daemon, one store behind a bandwidth cap (toxiproxy,
// 8 MB/s per connection, so background uploads are in flight): MinIO, GCS
// (fake-gcs-server, the VM's token) and Azure (Azurite). The state is
// a DDP model and a table sharded across the ranks (torch.distributed.
// checkpoint: each node writes its rank's 64 MiB shard to its own folder,
// node 0 the .metadata too), saved every 5 steps; the loop asks the Python
// helper every step whether to stop. Twice on the same daemons, a job drill
// on one node (node 1, then node 0) sent while a save is in progress: the
// noticed node signals its worker, the other node's daemon gets the job
// notice and signals its own; the ranks agree, save the same step and exit;
// that step commits with both parts and is latest, and restored on two fresh
// nodes it loads to the same weights and shards.
func TestTorchrunJobTwoNodes(t *testing.T) {
	peers.RequireTorch(t)
	forEachStore(t, torchrunJob)
}

func torchrunJob(t *testing.T, sp storePeer) {
	sp.slow(t, 8192) // KB/s per connection
	var nodes []*jobNode
	for i := range 2 {
		n := newJobNode(t, fmt.Sprintf("node%d", i))
		n.config, n.env = filepath.Join(n.dir, "preemptd.yaml"), sp.env
		match := `^\S*python[0-9.]* -u \S*train_job\.py --node ` + n.name + `( |$)`
		cfg := fmt.Sprintf("provider: local\ntrainer: {match: %q}\nmetrics: {listen: \"\"}\n"+
			"checkpoint: {dir: %q, layout: dcp, quiet_period: 1s, keep: 0}\n"+
			"job: {nodes: 2, node: %s, listen: \"127.0.0.1:%d\", token: %q}\n",
			match, n.ckpt, n.name, peers.FreePort(t), jobToken) + sp.config("torch-job", 8)
		n.d = startDaemonIn(t, n.dir, cfg, n.env...)
		nodes = append(nodes, n)
	}
	midSaves := 0
	for round, noticed := range []int{1, 0} {
		// A drill's notice stays until its deadline, and a trainer started
		// while it does stops at once (the helper reads notice.json).
		for _, n := range nodes {
			waitFor(t, 60*time.Second, n.name+"'s last drill over", func() bool { return len(n.d.status().Notices) == 0 })
		}
		start := round * 1000
		port := peers.FreePort(t)
		var outs []*bytes.Buffer
		var dones []chan struct{}
		for i, n := range nodes {
			out, done := torchrunNode(t, i, port, "CKPT_DIR="+n.ckpt, "PREEMPTD_RUN_DIR="+n.d.runDir, "SAVE_EVERY=5",
				"ROWS=65536", fmt.Sprintf("START_STEP=%d", start))
			outs, dones = append(outs, out), append(dones, done)
		}
		first := fmt.Sprintf("step-%d", start+5)
		waitFor(t, 120*time.Second, first+" saved on node0", func() bool {
			_, err := os.Stat(filepath.Join(nodes[0].ckpt, first, ".metadata"))
			return err == nil
		})
		var saving string
		waitFor(t, 60*time.Second, "a save in progress", func() bool { saving = inProgress(nodes[0].ckpt); return saving != "" })
		at := time.Now()
		if _, err := nodes[noticed].d.client().Simulate(t.Context(), agent.SimulateRequest{Kind: "terminate", In: "30s", Job: true}); err != nil {
			t.Fatal(err)
		}
		for i, done := range dones {
			select {
			case <-done:
			case <-time.After(40 * time.Second):
				t.Fatalf("round %d: node%d's torchrun did not exit", round, i)
			}
		}
		if fi, err := os.Stat(filepath.Join(nodes[0].ckpt, saving, ".metadata")); err == nil && fi.ModTime().After(at) {
			midSaves++
			t.Logf("round %d: the notice landed while %s was being saved (complete %v after it)", round, saving,
				fi.ModTime().Sub(at).Round(time.Millisecond))
		}
		finals := map[string]string{}
		final := ""
		for i, out := range outs {
			m := jobFinal.FindStringSubmatch(out.String())
			if m == nil {
				t.Fatalf("round %d: node%d: no final checkpoint line", round, i)
			}
			if final != "" && m[1] != final {
				t.Fatalf("round %d: the ranks saved different steps: %s and %s", round, final, m[1])
			}
			final = m[1]
			finals[m[2]] = m[3]
		}
		for i, n := range nodes {
			var e *agent.EmergencyReport
			waitFor(t, 100*time.Second, n.name+"'s emergency path of this round", func() bool {
				st := n.d.status()
				e = st.Emergency
				return e != nil && e.StartedAt.After(at.Add(-time.Second)) && !e.FinishedAt.IsZero()
			})
			t.Logf("round %d node%d: %s notice → path done %v; signalled %v; committed %+v", round, i, e.Notice.Provider,
				e.FinishedAt.Sub(at).Round(time.Millisecond), e.Signal.PIDs, e.Checkpoint)
			if e.Outcome != "completed" || e.Checkpoint == nil || e.Checkpoint.Name != final || len(e.Signal.PIDs) != 1 {
				t.Fatalf("round %d node%d: outcome %s, signalled %v, committed %+v; want its worker signalled and %s",
					round, i, e.Outcome, e.Signal.PIDs, e.Checkpoint, final)
			}
			if want := map[bool]string{true: agent.ProviderSimulate, false: "job"}[i == noticed]; e.Notice.Provider != want {
				t.Fatalf("round %d node%d: notice from %s, want %s", round, i, e.Notice.Provider, want)
			}
		}
		if l, _ := lsJSON(t, nodes[0].config, nodes[0].env); l != final {
			t.Fatalf("round %d: latest %s, want %s", round, l, final)
		}
		if m := jobManifest(t, nodes[0], final); len(m.Parts) != 2 {
			t.Fatalf("round %d: %s has %d parts; want both nodes'", round, final, len(m.Parts))
		}
		// Two fresh nodes restore at once, then load under a two-node
		// torchrun. Each needs the whole checkpoint, not only its part: DCP
		// writes a replicated tensor (the DDP model here) once, into the
		// coordinator's shard, and every rank reads it from there.
		port = peers.FreePort(t)
		var checks []*bytes.Buffer
		fresh := make([]string, len(nodes))
		restored := make([]string, len(nodes))
		var wg sync.WaitGroup
		for i, n := range nodes {
			fresh[i] = filepath.Join(shortDir(t), "ckpt")
			wg.Go(func() {
				cmd := exec.Command(bin, "restore", "--config", n.config, "--to", fresh[i])
				cmd.Env = append(cleanEnv(), n.env...)
				if out, err := cmd.CombinedOutput(); err != nil {
					restored[i] = fmt.Sprintf("%v: %s", err, out)
				}
			})
		}
		wg.Wait()
		for i, n := range nodes {
			if restored[i] != "" {
				t.Fatalf("round %d: restore on fresh %s: %s", round, n.name, restored[i])
			}
			out, done := torchrunNode(t, i, port, "CKPT_DIR="+fresh[i], "ROWS=65536", "CHECK_DIR="+filepath.Join(fresh[i], final))
			checks, dones[i] = append(checks, out), done
		}
		for i := range nodes {
			select {
			case <-dones[i]:
			case <-time.After(60 * time.Second):
				t.Fatalf("round %d: node%d's verifying load did not finish", round, i)
			}
			want := fmt.Sprintf("check rank %d %s", i, finals[fmt.Sprint(i)])
			if !bytes.Contains(checks[i].Bytes(), []byte(want)) {
				t.Fatalf("round %d: node%d: restored state differs: want %q in\n%s", round, i, want, checks[i].String())
			}
		}
		t.Logf("round %d: both ranks saved %s and loaded it back on fresh nodes: %v", round, final, finals)
	}
	t.Logf("%d of 2 notices landed in the middle of a save", midSaves)
}

// TestMultinodeExampleResumes: examples/multinode/train.py itself (written
// for torch 2.2+, run here on torch 1.13 through test/torch/torch2's
// dcp.save/dcp.load) under torchrun: it starts fresh, saves, and once its
// checkpoint is committed, a new machine's empty folder resumes from it
// through preemptd.restore() — the same step and the same weights.
func TestMultinodeExampleResumes(t *testing.T) {
	peers.RequireTorch(t)
	dir := shortDir(t)
	script, _ := filepath.Abs("../../examples/multinode/train.py")
	shim, _ := filepath.Abs("../torch/torch2")
	client, _ := filepath.Abs("../../clients/python")
	cfg := filepath.Join(dir, "preemptd.yaml")
	os.WriteFile(cfg, []byte(fmt.Sprintf("provider: local\nrun_id: example\ncheckpoint: {layout: dcp}\nrun_dir: %s\nstate_dir: %s\n",
		filepath.Join(dir, "run"), filepath.Join(dir, "state"))), 0o644)
	os.MkdirAll(filepath.Join(dir, "state"), 0o755)
	run := func(ckpt string, steps int) string {
		t.Helper()
		_, out, done := startTorchrun(t, "example", []string{"--nproc_per_node", "2", "--master_port", fmt.Sprint(peers.FreePort(t)),
			"--redirects", "2", "--tee", "2", script}, []string{"CKPT_DIR=" + ckpt, "SAVE_EVERY=3", fmt.Sprintf("STEPS=%d", steps), "WIDTH=256",
			"PYTHONPATH=" + shim + ":" + client, "PREEMPTD_BIN=" + bin, "PREEMPTD_CONFIG=" + cfg, "PREEMPTD_RUN_DIR=" + filepath.Join(dir, "run")})
		select {
		case <-done:
		case <-time.After(3 * time.Minute):
			t.Fatal("the example did not finish")
		}
		return out.String()
	}
	first := filepath.Join(dir, "first")
	out := run(first, 6)
	saved := regexp.MustCompile(`saved step-6, checksum (-?[0-9.]+)`).FindStringSubmatch(out)
	if !strings.Contains(out, "no checkpoint committed yet") || saved == nil {
		t.Fatalf("first run:\n%s", out)
	}
	if b, code := runCLIEnv(t, nil, "upload", "--config", cfg, filepath.Join(first, "step-6")); code != 0 {
		t.Fatalf("upload: %s", b)
	}
	second := filepath.Join(dir, "second")
	out = run(second, 7)
	want := fmt.Sprintf("resumed from %s at step 6, checksum %s", filepath.Join(second, "step-6"), saved[1])
	if !strings.Contains(out, want) {
		t.Fatalf("the new machine did not resume: want %q in\n%s", want, out)
	}
}
