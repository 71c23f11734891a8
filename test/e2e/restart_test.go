package e2e

import (
	"bytes"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/preemptd/preemptd/agent"
	"github.com/preemptd/preemptd/test/peers"
)

// TestRestartDuringNoticeCommitsAtOnce: AWS's interruption notice is served
// (AEMM) while preemptd uploads the trainer's last checkpoint over a slow
// link, and preemptd is killed (-9) in the middle of it; the trainer is
// gone. The preemptd started next finds the notice still served and the
// checkpoint complete but not committed: it commits it at once — not at the
// deadline less its upload estimate, which on this link misses the
// deadline — and leaves no upload of the first life behind.
func TestRestartDuringNoticeCommitsAtOnce(t *testing.T) {
	requireAEMM(t)
	s3 := peers.StartMinIO(t)
	x := peers.StartToxiproxy(t)
	proxy := x.Front(t, "minio", s3, 512) // KB/s per connection: each 4 MiB shard takes 8 s
	trigger := time.Now().Truncate(time.Second)
	action := trigger.Add(40 * time.Second)
	url := startAEMM(t, "-I", "--mock-trigger-time", trigger.UTC().Format(time.RFC3339),
		"spot", "-a", "terminate", "-t", action.UTC().Format(time.RFC3339))
	dir := shortDir(t)
	ckpt := filepath.Join(dir, "ckpt")
	for i := range 4 {
		writeRandom(t, filepath.Join(ckpt, "step-3", fmt.Sprintf("__%d_0.distcp", i)), 4<<20)
	}
	writeRandom(t, filepath.Join(ckpt, "step-3", ".metadata"), 4096)
	want := treeSums(t, ckpt) // the folder itself is left as it is
	cfg := fmt.Sprintf("provider: aws\naws: {endpoint: %q}\npoll_interval: 1s\nrun_id: run-restart\nmetrics: {listen: \"\"}\n"+
		"trainer: {pid_file: %q}\ncheckpoint: {dir: %q, layout: dcp, keep: 0}\n"+
		"storage: {url: \"s3://%s/runs\", endpoint: \"http://%s\", region: us-east-1}\n",
		url, filepath.Join(dir, "trainer.pid"), ckpt, s3.Bucket, proxy)
	d := startDaemonIn(t, dir, cfg, s3.Env()...)
	journal := filepath.Join(dir, "state", "uploads-in-flight.json")
	waitFor(t, 20*time.Second, "the first life's upload of step-3 in flight", func() bool {
		b, _ := os.ReadFile(journal)
		return bytes.Contains(b, []byte("step-3"))
	})
	d.cmd.Process.Signal(syscall.SIGKILL)
	<-d.exited
	restarted := time.Now()
	d = startDaemonIn(t, dir, cfg, s3.Env()...)
	// At once: the upload takes about 8 s here; waiting for the deadline
	// less the estimate and the margin (the rule this replaces) would start
	// it about 36 s after the restart.
	waitLatest(t, d.config, s3.Env(), "step-3", 20*time.Second)
	took := time.Since(restarted)
	t.Logf("restarted %v before the deadline; step-3 committed %v after the restart, %v before the deadline",
		action.Sub(restarted).Round(time.Millisecond), took.Round(time.Millisecond), time.Until(action).Round(time.Millisecond))
	restoreVerified(t, d.config, s3.Env(), filepath.Join(shortDir(t), "restored"), filepath.Join(ckpt, "step-3"))
	st := d.waitEmergencyDone()
	if st.Emergency.Checkpoint == nil || st.Emergency.Checkpoint.Name != "step-3" || !st.Emergency.Checkpoint.CommittedAt.Before(action) {
		t.Fatalf("the emergency report says %+v; want step-3 committed before %s", st.Emergency.Checkpoint, action)
	}
	if err := stepError(st, "checkpoint"); !strings.Contains(err, "no checkpoint newer than step-3") {
		t.Fatalf("checkpoint step says %q; want it to say no newer checkpoint came and step-3 stays latest", err)
	}
	if n := s3.IncompleteUploads(t); n != 0 {
		t.Fatalf("%d multipart uploads of the killed life left", n)
	}
	restored := treeSums(t, filepath.Join(dir, "ckpt"))
	if !maps.Equal(restored, want) {
		t.Fatal("the checkpoint folder changed")
	}
	chaos(t, "process: preemptd killed (-9) mid-upload during AWS's notice, trainer gone; restarted (512 KB/s a connection)",
		fmt.Sprintf("the complete checkpoint committed %v after the restart, %v before the deadline; no upload left", took.Round(time.Second),
			action.Sub(restarted.Add(took)).Round(time.Second)))
}

func writeRandom(t *testing.T, path string, n int) {
	t.Helper()
	b := make([]byte, n)
	rand.Read(b)
	os.MkdirAll(filepath.Dir(path), 0o755)
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestTorchrunJobNodeReplacedMidSave: a real two-node torchrun job (DCP,
// one rank a node, each node its own folder and preemptd) saving every 5
// steps. Node 1's link to the store is held while step-5 is saved: node 0's
// part of step-5 goes up, node 1's does not, and node 1 dies (its daemon
// and its rank, killed); the job stops. A new machine takes node 1's name
// (an empty folder), the job starts again from the beginning and saves
// step-5 again — node 0's part of the failed save still in the store, and
// node 0's link held until node 1's part of the new save has long been up
// (node 1's part is not written beside node 0's old one meanwhile) — then
// runs on until a job notice. Step-5 in the store is, byte for byte,
// what the new save wrote on both nodes, and the final checkpoint,
// restored on two fresh nodes, loads in DCP to the weights the ranks had.
func TestTorchrunJobNodeReplacedMidSave(t *testing.T) {
	peers.RequireTorch(t)
	s3 := peers.StartMinIO(t)
	x := peers.StartToxiproxy(t)
	proxies := []string{x.Front(t, "minio-node0", s3, 0), x.Front(t, "minio-node1", s3, 0)}
	env := s3.Env()
	newNode := func(i int) *jobNode {
		n := newJobNode(t, fmt.Sprintf("node%d", i))
		n.config, n.env = filepath.Join(n.dir, "preemptd.yaml"), env
		match := `^\S*python[0-9.]* -u \S*train_job\.py --node ` + n.name + `( |$)`
		n.yaml = fmt.Sprintf("provider: local\nrun_id: torch-replaced\ntrainer: {match: %q}\nmetrics: {listen: \"\"}\n"+
			"checkpoint: {dir: %q, layout: dcp, quiet_period: 1s, keep: 0}\n"+
			"storage: {url: \"s3://%s/runs\", endpoint: \"http://%s\", region: us-east-1}\n"+
			"job: {nodes: 2, node: %s, poll: 200ms, listen: \"127.0.0.1:%d\", token: %q}\n",
			match, n.ckpt, s3.Bucket, proxies[i], n.name, peers.FreePort(t), jobToken)
		n.d = startDaemonIn(t, n.dir, n.yaml, n.env...)
		return n
	}
	nodes := []*jobNode{newNode(0), newNode(1)}
	script, _ := filepath.Abs("../torch/train_job.py")
	start := func(i, port int, extra ...string) (*bytes.Buffer, chan struct{}, func()) {
		n := nodes[i]
		cmd, out, done := startTorchrun(t, "torchrun "+n.name, []string{"--nnodes", "2", "--node_rank", fmt.Sprint(i),
			"--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", fmt.Sprint(port),
			"--redirects", "2", "--tee", "2", script, "--node", n.name},
			append([]string{"CKPT_DIR=" + n.ckpt, "PREEMPTD_RUN_DIR=" + n.d.runDir, "ROWS=65536"}, extra...))
		return out, done, func() { syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL); <-done }
	}
	// 1. Step-5 saved with node 1 cut off from the store; node 1 dies.
	x.Toxic(t, "minio-node1", "hold", "timeout", map[string]any{"timeout": 0})
	port := peers.FreePort(t)
	_, _, kill0 := start(0, port, "SAVE_EVERY=5", "STEP_SLEEP=0.2")
	_, _, kill1 := start(1, port, "SAVE_EVERY=5", "STEP_SLEEP=0.2")
	waitFor(t, 120*time.Second, "node0's part of step-5 in the store", func() bool {
		return len(listKeys(t, s3, "runs/torch-replaced/step-5/.preemptd-parts/node0.json")) == 1
	})
	oldPart := partFiles(t, s3, "runs/torch-replaced/step-5", "node0")
	if len(listKeys(t, s3, "runs/torch-replaced/step-5/.preemptd-parts/node1")) != 0 {
		t.Fatal("node1's part of step-5 reached the store through a held link")
	}
	nodes[1].d.cmd.Process.Signal(syscall.SIGKILL)
	<-nodes[1].d.exited
	kill1()
	kill0() // its peer gone, the job stops
	x.Remove(t, "minio-node1", "hold")
	// 2. A new machine as node 1; the job again from the start, past step-5.
	// Node 0's link is held this time: the replacement's part of the new
	// save is up while node 0's part of the failed one is all the store has
	// of node 0 — it must wait for node 0's part of this save, not merge
	// with that one.
	nodes[1] = newNode(1)
	x.Toxic(t, "minio-node0", "hold", "timeout", map[string]any{"timeout": 0})
	port = peers.FreePort(t)
	var outs []*bytes.Buffer
	var dones []chan struct{}
	for i := range nodes {
		out, done, _ := start(i, port, "SAVE_EVERY=5", "STEP_SLEEP=2")
		outs, dones = append(outs, out), append(dones, done)
	}
	waitFor(t, 120*time.Second, "node1's shard of the new step-5 in the store", func() bool {
		return len(listKeys(t, s3, "runs/torch-replaced/step-5/.preemptd-parts/node1/")) > 0
	})
	time.Sleep(3 * time.Second)
	if len(listKeys(t, s3, "runs/torch-replaced/step-5/.preemptd-parts/node1.json")) != 0 {
		t.Fatal("node1's part of the new save of step-5 was written beside node0's part of the failed one")
	}
	x.Remove(t, "minio-node0", "hold")
	waitFor(t, 120*time.Second, "step-5 saved again and committed", func() bool {
		_, names := lsJSON(t, nodes[0].config, env)
		return slices.Contains(names, "step-5")
	})
	if _, err := nodes[0].d.client().Simulate(t.Context(), agent.SimulateRequest{Kind: "terminate", In: "40s", Job: true}); err != nil {
		t.Fatal(err)
	}
	for i, done := range dones {
		select {
		case <-done:
		case <-time.After(60 * time.Second):
			t.Fatalf("node%d's torchrun did not exit", i)
		}
	}
	finals := map[string]string{}
	final := ""
	for i, out := range outs {
		m := jobFinal.FindStringSubmatch(out.String())
		if m == nil {
			t.Fatalf("node%d: no final checkpoint line", i)
		}
		final, finals[m[2]] = m[1], m[3]
	}
	for i, n := range nodes {
		st := n.d.waitEmergencyDone()
		if st.Emergency.Checkpoint == nil || st.Emergency.Checkpoint.Name != final {
			t.Fatalf("node%d committed %+v; want %s", i, st.Emergency.Checkpoint, final)
		}
	}
	// Step-5 is the new save's, on both nodes, byte for byte.
	waitLatest(t, nodes[0].config, env, final, 30*time.Second)
	want := map[string][32]byte{}
	for _, n := range nodes {
		for p, sum := range treeSums(t, n.ckpt) {
			if strings.HasPrefix(p, "step-5/") {
				want[p] = sum
			}
		}
	}
	got := filepath.Join(shortDir(t), "step5")
	if out, code := runCLIEnv(t, env, "restore", "--config", nodes[0].config, "--to", got, "--name", "step-5"); code != 0 {
		t.Fatalf("restore step-5: %s", out)
	}
	if !maps.Equal(treeSums(t, got), want) {
		t.Fatalf("step-5 in the store is not what the save after the restart wrote (node0's part of the failed save mixed in?)")
	}
	if left := listKeys(t, s3, "runs/torch-replaced/step-5/.preemptd-parts/node0/"); len(left) != len(partFiles(t, s3, "runs/torch-replaced/step-5", "node0")) ||
		strings.Contains(strings.Join(left, " "), strings.Split(strings.TrimPrefix(oldPart[0], "runs/torch-replaced/step-5/.preemptd-parts/node0/"), "/")[0]) {
		t.Fatalf("node0's objects of the failed save of step-5 are still in the store: %v", left)
	}
	// The final checkpoint on two fresh nodes: DCP loads the ranks' weights.
	port = peers.FreePort(t)
	var checks []*bytes.Buffer
	for i, n := range nodes {
		fresh := filepath.Join(shortDir(t), "ckpt")
		if out, code := runCLIEnv(t, env, "restore", "--config", n.config, "--to", fresh); code != 0 {
			t.Fatalf("restore on fresh node%d: %s", i, out)
		}
		out, done := torchrunNode(t, i, port, "CKPT_DIR="+fresh, "ROWS=65536", "CHECK_DIR="+filepath.Join(fresh, final))
		checks, dones[i] = append(checks, out), done
	}
	for i := range nodes {
		select {
		case <-dones[i]:
		case <-time.After(60 * time.Second):
			t.Fatalf("node%d's verifying load did not finish", i)
		}
		if want := fmt.Sprintf("check rank %d %s", i, finals[fmt.Sprint(i)]); !bytes.Contains(checks[i].Bytes(), []byte(want)) {
			t.Fatalf("node%d: restored state differs: want %q in\n%s", i, want, checks[i].String())
		}
	}
	var ls struct {
		Checkpoints []struct{ Name, Commit string }
	}
	out, _ := runCLIEnv(t, env, "ls", "--json", "--config", nodes[0].config)
	json.Unmarshal([]byte(out), &ls)
	t.Logf("committed: %+v; the final %s loaded on fresh nodes to %v", ls.Checkpoints, final, finals)
}
