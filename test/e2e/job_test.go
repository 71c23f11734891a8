package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"

	"github.com/preemptd/preemptd/agent"
	"github.com/preemptd/preemptd/checkpoint"
	"github.com/preemptd/preemptd/test/peers"
)

// jobNode is one node of a multi-node job on this machine: its own
// run_dir, state_dir, checkpoint folder and trainer, one daemon.
type jobNode struct {
	name, dir, ckpt, pidFile, notice, config, yaml string
	d                                              *daemon
	env                                            []string
}

const jobToken = "e2e-job-token-0123456789abcdef"

// jobConfig is node i's configuration: run_id run, three-way job, pushes
// on its own port, the store at endpoint.
func jobConfig(n *jobNode, run string, nodes int, endpoint, bucket, token string, port int) string {
	return fmt.Sprintf("provider: local\nrun_id: %s\ntrainer: {pid_file: %q}\nmetrics: {listen: \"\"}\n"+
		"checkpoint: {dir: %q, layout: auto, quiet_period: 500ms, keep: 0}\n"+
		"storage: {url: \"s3://%s/runs\", endpoint: %q, region: us-east-1}\n"+
		"job: {nodes: %d, node: %s, poll: 200ms, listen: \"127.0.0.1:%d\", token: %q}\n",
		run, n.pidFile, n.ckpt, bucket, endpoint, nodes, n.name, port, token)
}

func newJobNode(t *testing.T, name string) *jobNode {
	dir := shortDir(t)
	n := &jobNode{name: name, dir: dir, ckpt: filepath.Join(dir, "ckpt"), pidFile: filepath.Join(dir, "trainer.pid"),
		notice: filepath.Join(dir, "run", agent.NoticeFileName)}
	os.MkdirAll(n.ckpt, 0o755)
	return n
}

// startJobTrainer starts node i's stand-in trainer: rank i's shards, rank
// 0 writing .metadata once every peer has saved the step, as a DCP save.
func startJobTrainer(t *testing.T, nodes []*jobNode, i, step int, log string) *exec.Cmd {
	t.Helper()
	n := nodes[i]
	os.Remove(n.pidFile)
	args := []string{"--pid-file", n.pidFile, "--notice", n.notice, "--log", filepath.Join(n.dir, log), "--ckpt-dir", n.ckpt,
		"--ckpt-bytes", fmt.Sprint(4 << 20), "--ckpt-shards", "2", "--rank", fmt.Sprint(i), "--start-step", fmt.Sprint(step)}
	if i == 0 {
		var peerDirs []string
		for _, p := range nodes[1:] {
			peerDirs = append(peerDirs, p.ckpt)
		}
		args = append(args, "--peers", strings.Join(peerDirs, ","))
	}
	cmd := exec.Command(trainerBin, args...)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	waitFor(t, 10*time.Second, n.name+"'s trainer", func() bool { _, err := os.Stat(n.pidFile); return err == nil })
	return cmd
}

func signals(t *testing.T, path string) int {
	b, _ := os.ReadFile(path)
	return bytes.Count(b, []byte(`"signal"`))
}

// logCount counts the daemon's log lines with msg whose fields all match.
func logCount(d *daemon, msg string, fields map[string]string) int {
	n := 0
	for _, l := range d.logLines() {
		if l["msg"] != msg {
			continue
		}
		ok := true
		for k, v := range fields {
			if fmt.Sprint(l[k]) != v {
				ok = false
			}
		}
		if ok {
			n++
		}
	}
	return n
}

func jobManifest(t *testing.T, n *jobNode, name string) checkpoint.Manifest {
	t.Helper()
	out, code := runCLIEnv(t, n.env, "ls", "--json", "--config", n.config)
	if code != 0 {
		t.Fatalf("ls: %s", out)
	}
	var doc struct{ Checkpoints []checkpoint.Manifest }
	json.Unmarshal([]byte(out), &doc)
	for _, m := range doc.Checkpoints {
		if m.Name == name {
			return m
		}
	}
	t.Fatalf("%s not committed", name)
	return checkpoint.Manifest{}
}

// TestJobStopsEveryNodeAndCommitsOnce: three daemons on this machine as the
// three nodes of one job (own run_dir, state_dir and node name), one MinIO,
// three stand-in trainers each saving its rank's part of a DCP checkpoint
// (.metadata on node 0's, after every rank has saved). Node 1's job.token
// is wrong: pushes to and from it are refused, the store carries its
// notices. A fourth daemon runs another run in the same bucket.
//  1. A job drill on node 2 → every trainer signalled, the job's checkpoint
//     committed once with every node's part, restored --part on three fresh
//     nodes byte for byte; the other run's daemon and trainer untouched.
//  2. Two nodes noticed at once → one job notice (one path, one signal) on
//     the third.
//  3. Node 1's daemon SIGKILLed in the middle of its upload (its link capped)
//     → the others' parts stay, no commit, the previous checkpoint latest,
//     the outcome naming node 1's part as missing; node 1 restarted
//     completes the set from its part on disk, aborting only its own
//     interrupted uploads.
func TestJobStopsEveryNodeAndCommitsOnce(t *testing.T) {
	s3 := peers.StartMinIO(t)
	x := peers.StartToxiproxy(t)
	proxy := x.Front(t, "minio-node1", s3, 0) // node 1's link, capped in part 3
	var nodes []*jobNode
	for i := range 3 {
		n := newJobNode(t, fmt.Sprintf("node%d", i))
		endpoint, token := s3.Endpoint, jobToken
		if i == 1 {
			endpoint, token = "http://"+proxy, "not-the-job-token-0123456789"
		}
		n.config = filepath.Join(n.dir, "preemptd.yaml")
		n.env = s3.Env()
		nodes = append(nodes, n)
		n.yaml = jobConfig(n, "job-e2e", 3, endpoint, s3.Bucket, token, peers.FreePort(t))
		n.d = startDaemonIn(t, n.dir, n.yaml, n.env...)
	}
	other := newJobNode(t, "x0")
	otherTrainer := startTrainer(t, other.notice)
	other.pidFile = otherTrainer.pidFile
	other.d = startDaemonIn(t, other.dir, jobConfig(other, "other-run", 2, s3.Endpoint, s3.Bucket, jobToken, peers.FreePort(t)), s3.Env()...)

	round := func(start int, log string) []*exec.Cmd {
		var cmds []*exec.Cmd
		for i := range nodes {
			cmds = append(cmds, startJobTrainer(t, nodes, i, start, log))
		}
		waitLatest(t, nodes[0].config, nodes[0].env, fmt.Sprintf("step-%d", start), 60*time.Second) // continuous sync commits the job's checkpoint
		return cmds
	}
	// Node 0 started first: it reads the registry again until all three are there.
	waitFor(t, 15*time.Second, "node0's status to show the job's three nodes", func() bool {
		st := nodes[0].d.status()
		return st.Job != nil && st.Job.Node == "node0" && st.Job.Nodes == 3 && len(st.Job.Members) == 3
	})

	// 1. A job drill on node 2.
	cmds := round(1, "signals-1.jsonl")
	noticed := time.Now()
	if _, err := nodes[2].d.client().Simulate(t.Context(), agent.SimulateRequest{Kind: "terminate", In: "60s", Job: true}); err != nil {
		t.Fatal(err)
	}
	for i, n := range nodes {
		waitFor(t, 10*time.Second, n.name+"'s trainer signalled", func() bool { return signals(t, filepath.Join(n.dir, "signals-1.jsonl")) == 1 })
		cmds[i].Wait()
	}
	t.Logf("every trainer signalled and exited %v after the notice on node2", time.Since(noticed).Round(time.Millisecond))
	for i, n := range nodes {
		st := n.d.waitEmergencyDone()
		e := st.Emergency
		if e.Checkpoint == nil || e.Checkpoint.Name != "step-2" || e.Outcome != "completed" {
			t.Fatalf("%s: outcome %s, checkpoint %+v; want step-2", n.name, e.Outcome, e.Checkpoint)
		}
		var origin struct{ Node string }
		json.Unmarshal(e.Notice.Raw, &origin)
		if i != 2 && (e.Notice.Provider != "job" || e.Notice.Kind != agent.KindJob || origin.Node != "node2") {
			t.Fatalf("%s: notice %+v; want a job notice started by node2", n.name, e.Notice)
		}
	}
	waitLatest(t, nodes[0].config, nodes[0].env, "step-2", 10*time.Second)
	m := jobManifest(t, nodes[0], "step-2")
	if len(m.Parts) != 3 || len(m.Files) != 7 {
		t.Fatalf("step-2: %d parts, %d files; want 3 and 7 (two shards a node and .metadata)", len(m.Parts), len(m.Files))
	}
	commits := 0
	for _, n := range nodes {
		commits += logCount(n.d, "checkpoint committed", map[string]string{"name": "step-2"})
	}
	if commits != 1 {
		t.Fatalf("step-2 committed %d times; want once", commits)
	}
	// Node 1 refuses pushes signed with the job's token, and got its notice from the store.
	if logCount(nodes[1].d, "job push refused", nil) == 0 || logCount(nodes[1].d, "job notice from another node", map[string]string{"via": "store"}) != 1 {
		t.Fatal("node1 (wrong token) should refuse the push and take the notice from the store")
	}
	if logCount(nodes[0].d, "job notice from another node", map[string]string{"via": "push"}) != 1 {
		t.Fatal("node0 should have the notice pushed")
	}
	// Restored on three fresh nodes, each its own part, byte for byte.
	for i, n := range nodes {
		fresh := filepath.Join(shortDir(t), "ckpt")
		if out, code := runCLIEnv(t, n.env, "restore", "--config", n.config, "--to", fresh, "--part", n.name); code != 0 {
			t.Fatalf("restore --part %s: %s", n.name, out)
		}
		want := treeSums(t, filepath.Join(n.ckpt, "step-2"))
		if i != 0 {
			want[".metadata"] = treeSums(t, filepath.Join(nodes[0].ckpt, "step-2"))[".metadata"]
		}
		got := treeSums(t, filepath.Join(fresh, "step-2"))
		if len(got) != 3 || len(got) != len(want) {
			t.Fatalf("%s: restored %d files, want %d", n.name, len(got), len(want))
		}
		for k, v := range want {
			if got[k] != v {
				t.Fatalf("%s: %s restored differs", n.name, k)
			}
		}
	}
	if len(otherTrainer.records()) != 0 || len(other.d.status().Notices) != 0 {
		t.Fatal("the daemon of another run was stopped")
	}

	// 2. Two nodes noticed at once (a new stop: past the first's join window).
	time.Sleep(time.Until(noticed.Add(11 * time.Second)))
	cmds = round(3, "signals-2.jsonl")
	paths := logCount(nodes[1].d, "emergency path started", nil)
	noticed = time.Now()
	var wg sync.WaitGroup
	for _, i := range []int{0, 2} {
		wg.Go(func() {
			if _, err := nodes[i].d.client().Simulate(context.Background(), agent.SimulateRequest{Kind: "terminate", In: "60s", Job: true}); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	for _, c := range cmds {
		c.Wait()
	}
	waitLatest(t, nodes[0].config, nodes[0].env, "step-4", 30*time.Second)
	time.Sleep(time.Second) // a second job notice would have arrived by now
	if n := logCount(nodes[1].d, "emergency path started", nil) - paths; n != 1 {
		t.Fatalf("node1 ran %d emergency paths for two nodes' notices; want 1", n)
	}
	if n := signals(t, filepath.Join(nodes[1].dir, "signals-2.jsonl")); n != 1 {
		t.Fatalf("node1's trainer got %d signals; want 1", n)
	}

	// 3. Node 1 killed in the middle of its upload.
	time.Sleep(time.Until(noticed.Add(11 * time.Second)))
	cmds = round(5, "signals-3.jsonl")
	x.Toxic(t, "minio-node1", "slow", "bandwidth", map[string]any{"rate": 256}) // KB/s per connection: 2 MiB shards take 8 s
	if _, err := nodes[0].d.client().Simulate(t.Context(), agent.SimulateRequest{Kind: "terminate", In: "15s", Job: true}); err != nil {
		t.Fatal(err)
	}
	for _, c := range cmds {
		c.Wait()
	}
	// Its part is found after the quiet period, then takes 8 s to send.
	time.Sleep(3 * time.Second)
	if logCount(nodes[1].d, "trainer wait over", nil) != 3 || logCount(nodes[1].d, "checkpoint part uploaded", map[string]string{"name": "step-6"}) != 0 ||
		len(listKeys(t, s3, "runs/job-e2e/step-6/.preemptd-parts/node1/")) != 0 {
		t.Fatal("node1 is not in the middle of uploading its part of step-6")
	}
	nodes[1].d.cmd.Process.Signal(syscall.SIGKILL)
	<-nodes[1].d.exited
	for _, i := range []int{0, 2} {
		st := nodes[i].d.waitEmergencyDone()
		stepErr := stepError(st, "checkpoint")
		if st.Emergency.Checkpoint != nil && st.Emergency.Checkpoint.Name == "step-6" || !strings.Contains(stepErr, "missing the part of node1") {
			t.Fatalf("node%d: checkpoint %+v, step error %q; want step-6 not committed, node1's part missing", i, st.Emergency.Checkpoint, stepErr)
		}
	}
	if l, _ := lsJSON(t, nodes[0].config, nodes[0].env); l != "step-5" {
		t.Fatalf("latest %s; the previous checkpoint must stay latest", l)
	}
	for _, n := range []string{"node0", "node2"} { // their parts stay whole: shards (and .metadata), then the part manifest
		if files := partFiles(t, s3, "runs/job-e2e/step-6", n); len(files) != 2+boolInt(n == "node0") {
			t.Fatalf("%s's current part of step-6 in the store: %v", n, files)
		}
	}
	// Node 1 back (its link too): its part on disk completes the set.
	x.Remove(t, "minio-node1", "slow")
	startDaemonIn(t, nodes[1].dir, nodes[1].yaml, nodes[1].env...)
	waitLatest(t, nodes[0].config, nodes[0].env, "step-6", 60*time.Second)
	if n := s3.IncompleteUploads(t); n != 0 {
		t.Fatalf("%d multipart uploads left behind", n)
	}
	// Once step-6 is committed, a node keeps only the objects of its part
	// the manifest points at (an attempt cut short by the notice is gone).
	for _, n := range []string{"node0", "node2"} {
		waitFor(t, 10*time.Second, n+"'s superseded objects of step-6 deleted", func() bool {
			return len(listKeys(t, s3, "runs/job-e2e/step-6/.preemptd-parts/"+n+"/")) == 2+boolInt(n == "node0")
		})
	}
}

// partFiles lists the objects of node's current part of the checkpoint at
// prefix: below the attempt its part manifest names, once every file it
// lists is there.
func partFiles(t *testing.T, s3 *peers.S3, prefix, node string) []string {
	t.Helper()
	obj, err := s3.Client.GetObject(context.Background(), s3.Bucket, prefix+"/.preemptd-parts/"+node+".json", minio.GetObjectOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer obj.Close()
	var part checkpoint.Manifest
	if err := json.NewDecoder(obj).Decode(&part); err != nil {
		t.Fatalf("%s's part manifest: %v", node, err)
	}
	files := listKeys(t, s3, prefix+"/.preemptd-parts/"+node+"/"+part.Attempt+"/")
	if len(files) != len(part.Files) {
		t.Fatalf("%s's part lists %d files, attempt %s holds %v", node, len(part.Files), part.Attempt, files)
	}
	return files
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}

func listKeys(t *testing.T, s3 *peers.S3, prefix string) []string {
	var out []string
	for o := range s3.Client.ListObjects(context.Background(), s3.Bucket, minio.ListObjectsOptions{Prefix: prefix, Recursive: true}) {
		if o.Err == nil {
			out = append(out, o.Key)
		}
	}
	return out
}
