package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/preemptd/preemptd/test/peers"
)

// TestSlurmJobRequeuedAndNodeDrained runs a batch job on a real one-node
// Slurm cluster (munged, slurmctld and slurmd from Debian, started here):
// the trainer it runs saves step-1, a fatal notice drains the node and
// reaches the trainer through scancel, the trainer's final checkpoint
// (step-2) is committed as latest, and only then is the job requeued; the
// notice withdrawn resumes the node, and the requeued job, started again,
// restores step-2 before training.
func TestSlurmJobRequeuedAndNodeDrained(t *testing.T) {
	cl := peers.StartSlurm(t)
	dir := shortDir(t)
	ckpt := filepath.Join(dir, "ckpt")
	run := filepath.Join(dir, "run")
	cfg := fmt.Sprintf("provider: local\nrun_id: slurm-e2e\ncheckpoint: {dir: %q, layout: dcp, quiet_period: 1s}\nslurm: {enabled: true, node: %q}\n", ckpt, cl.Node)
	d := startDaemonIn(t, dir, cfg, cl.Env()...)
	if out, code := runCLIEnv(t, cl.Env(), "doctor", "--config", d.config); code != 0 || !strings.Contains(out, "OK    slurm      node "+cl.Node+" is IDLE") {
		t.Fatalf("doctor: exit %d\n%s", code, out)
	}
	t.Cleanup(func() {
		if t.Failed() {
			for _, f := range []string{"starts", "restore.out", "job-*.out"} {
				ms, _ := filepath.Glob(filepath.Join(dir, f))
				for _, m := range ms {
					b, _ := os.ReadFile(m)
					t.Logf("%s:\n%s", m, b)
				}
			}
		}
	})

	signals := filepath.Join(dir, "signals.jsonl")
	script := filepath.Join(dir, "job.sh")
	writeFile(t, script, fmt.Sprintf(`#!/bin/sh
echo "${SLURM_RESTART_COUNT:-0}" >> %[1]s/starts
if [ "${SLURM_RESTART_COUNT:-0}" != 0 ]; then
  %[2]s restore --config %[3]s > %[1]s/restore.out 2>&1
  exec %[4]s --pid-file %[1]s/trainer2.pid --log %[1]s/signals2.jsonl --ckpt-dir %[5]s --ckpt-bytes 65536 --start-step 3
fi
exec %[4]s --pid-file %[1]s/trainer.pid --log %[6]s --notice %[7]s --ckpt-dir %[5]s --ckpt-bytes 65536
`, dir, bin, d.config, trainerBin, ckpt, signals, filepath.Join(run, "notice.json")))
	os.Chmod(script, 0o755)
	out := cl.Run(t, "sbatch", "--requeue", "--parsable", "--output="+filepath.Join(dir, "job-%j.out"), script)
	job := strings.TrimSpace(strings.Split(out, ";")[0])
	waitFor(t, 30*time.Second, "the job running", func() bool { return cl.Field(t, "job", job, "JobState") == "RUNNING" })
	waitLatest(t, d.config, cl.Env(), "step-1", 30*time.Second)

	// A real fatal notice (the local provider's trigger file), not a drill.
	writeFile(t, filepath.Join(run, "trigger"), "terminate 60s\n")
	waitFor(t, 15*time.Second, "the trainer's SIGTERM through scancel", func() bool {
		b, _ := os.ReadFile(signals)
		return strings.Contains(string(b), `"SIGTERM"`)
	})
	st := d.waitEmergencyDone()
	if e := stepError(st, "slurm requeue"); e != "" {
		t.Fatalf("slurm requeue: %s", e)
	}
	if st.Emergency.Checkpoint == nil || st.Emergency.Checkpoint.Name != "step-2" {
		t.Fatalf("the trainer's final checkpoint was not committed on the path: %+v", st.Emergency.Checkpoint)
	}
	if s := st.Emergency.Signal; s == nil || len(s.Sources) == 0 || !strings.Contains(s.Sources[0], "slurm job "+job) {
		t.Fatalf("the signal did not go through Slurm: %+v", s)
	}
	latest, _ := lsJSON(t, d.config, cl.Env())
	if latest != "step-2" {
		t.Fatalf("latest = %q, want step-2", latest)
	}
	if r := cl.Field(t, "job", job, "Restarts"); r != "1" {
		t.Fatalf("job %s Restarts=%s, want 1 (requeued)", job, r)
	}
	if s := cl.Field(t, "job", job, "JobState"); s != "PENDING" {
		t.Fatalf("job %s is %s after the requeue, want PENDING", job, s)
	}
	state := cl.Field(t, "node", cl.Node, "State")
	reason := cl.Run(t, "sinfo", "--noheader", "--nodes="+cl.Node, "--format=%E")
	if !strings.Contains(state, "DRAIN") || !strings.HasPrefix(strings.TrimSpace(reason), "preemptd: local terminate notice") {
		t.Fatalf("node %s: State=%s, reason %q; want drained by preemptd", cl.Node, state, reason)
	}

	// The notice withdrawn: the node takes work again.
	os.Remove(filepath.Join(run, "trigger"))
	waitFor(t, 15*time.Second, "the node resumed", func() bool {
		return !strings.Contains(cl.Field(t, "node", cl.Node, "State"), "DRAIN")
	})
	// Slurm holds a requeued job back for a while (BeginTime); start it now.
	cl.Run(t, "scontrol", "update", "jobid="+job, "starttime=now")
	waitFor(t, 60*time.Second, "the requeued job restoring step-2", func() bool {
		b, _ := os.ReadFile(filepath.Join(dir, "restore.out"))
		return strings.Contains(string(b), "restored step-2")
	})
	if b, _ := os.ReadFile(filepath.Join(dir, "starts")); strings.Fields(string(b))[len(strings.Fields(string(b)))-1] != "1" {
		t.Fatalf("starts: %q", b)
	}
}
