package e2e

import (
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"github.com/preemptd/preemptd/agent"
)

// TestAWSSpotInterruption: AEMM (IMDSv2 only) starts serving a terminate
// notice at a set second; the trainer gets SIGTERM, and notice.json carries
// AEMM's action time as the deadline.
func TestAWSSpotInterruption(t *testing.T) {
	requireAEMM(t)
	trigger := time.Now().Add(3 * time.Second).Truncate(time.Second)
	action := trigger.Add(2 * time.Minute)
	url := startAEMM(t, "-I", "--mock-trigger-time", trigger.UTC().Format(time.RFC3339),
		"spot", "-a", "terminate", "-t", action.UTC().Format(time.RFC3339))
	dir := shortDir(t)
	tr := startTrainer(t, filepath.Join(dir, "run", agent.NoticeFileName))
	d := startDaemonIn(t, dir, fmt.Sprintf("provider: aws\naws: {endpoint: %q}\npoll_interval: 1s\ntrainer: {pid_file: %q}\n", url, tr.pidFile))

	r := tr.waitSignal(15 * time.Second)
	latency := r.At.Sub(trigger)
	t.Logf("AWS notice→signal latency: %v (poll_interval 1s)", latency)
	if r.Signal != "SIGTERM" {
		t.Fatalf("trainer got %s, want SIGTERM", r.Signal)
	}
	if r.At.Before(trigger) {
		t.Fatalf("signal at %v, before the notice appeared at %v", r.At, trigger)
	}
	if r.Notice.Deadline == nil || !r.Notice.Deadline.Equal(action) || r.Notice.Kind != agent.KindTerminate || r.Notice.Provider != "aws" {
		t.Fatalf("notice.json the trainer read = %+v, want a terminate with deadline %v", r.Notice, action)
	}
	if !tr.exitedWithin(5 * time.Second) {
		t.Fatal("trainer did not exit on SIGTERM")
	}
	st := d.waitEmergencyDone()
	if st.Emergency.Outcome != "completed" || st.Emergency.Trainer == nil || len(st.Emergency.Trainer.Exited) != 1 {
		t.Fatalf("emergency = %+v", st.Emergency)
	}
	// The instance identity comes from AEMM's metadata.
	if in := st.Instance; in.ID == "" || in.Type == "" || in.Region == "" || in.Zone == "" || in.Lifecycle == "" {
		t.Fatalf("instance identity = %+v", in)
	}
}

// TestAWSRebalance: a rebalance recommendation is advisory: the trainer gets
// rebalance_signal, not the fatal one, and notice.json says advisory with no
// deadline.
func TestAWSRebalance(t *testing.T) {
	url, trigger := startRebalanceAEMM(t)
	dir := shortDir(t)
	tr := startTrainer(t, filepath.Join(dir, "run", agent.NoticeFileName))
	d := startDaemonIn(t, dir, fmt.Sprintf("provider: aws\naws: {endpoint: %q}\ntrainer: {pid_file: %q, rebalance_signal: SIGUSR1}\n", url, tr.pidFile))

	r := tr.waitSignal(15 * time.Second)
	t.Logf("AWS rebalance→signal latency: %v", r.At.Sub(trigger))
	if r.Signal != "SIGUSR1" || r.Notice.Kind != agent.KindRebalance || r.Notice.Class != agent.ClassAdvisory || r.Notice.Deadline != nil {
		t.Fatalf("record = %+v", r)
	}
	time.Sleep(2 * time.Second)
	if rs := tr.records(); len(rs) != 1 {
		t.Fatalf("trainer got %d signals, want only the rebalance one: %+v", len(rs), rs)
	}
	if st := d.status(); st.State != "advisory" || st.Emergency != nil {
		t.Fatalf("status = %+v", st)
	}
}

// startRebalanceAEMM starts AEMM (IMDSv2 only) serving a rebalance
// recommendation from a whole second about 3 s away (returned), and no
// interruption for an hour.
func startRebalanceAEMM(t *testing.T) (string, time.Time) {
	t.Helper()
	requireAEMM(t)
	trigger := time.Now().Add(3 * time.Second).Truncate(time.Second)
	url := startAEMM(t, "-I", "--rebalance-trigger-time", trigger.UTC().Format(time.RFC3339),
		"--mock-trigger-time", trigger.Add(time.Hour).UTC().Format(time.RFC3339), "spot")
	return url, trigger
}

// TestAWSSpotStop: `spot -a stop` arrives as a fatal stop notice.
func TestAWSSpotStop(t *testing.T) {
	requireAEMM(t)
	url := startAEMM(t, "-I", "spot", "-a", "stop")
	dir := shortDir(t)
	tr := startTrainer(t, filepath.Join(dir, "run", agent.NoticeFileName))
	d := startDaemonIn(t, dir, fmt.Sprintf("provider: aws\naws: {endpoint: %q}\ntrainer: {pid_file: %q}\n", url, tr.pidFile))
	r := tr.waitSignal(15 * time.Second)
	if r.Signal != "SIGTERM" || r.Notice.Kind != agent.KindStop {
		t.Fatalf("record = %+v", r)
	}
	d.waitEmergencyDone()
}

// TestAWSQuietIMDS: IMDSv2-only AEMM with no notice due: nothing happens.
func TestAWSQuietIMDS(t *testing.T) {
	requireAEMM(t)
	far := time.Now().Add(time.Hour).UTC().Format(time.RFC3339)
	url := startAEMM(t, "-I", "--mock-trigger-time", far, "--rebalance-trigger-time", far, "spot")
	dir := shortDir(t)
	tr := startTrainer(t, filepath.Join(dir, "run", agent.NoticeFileName))
	d := startDaemonIn(t, dir, fmt.Sprintf("provider: aws\npoll_interval: 200ms\naws: {endpoint: %q}\ntrainer: {pid_file: %q}\n", url, tr.pidFile))
	time.Sleep(3 * time.Second)
	if rs := tr.records(); len(rs) != 0 {
		t.Fatalf("trainer signalled with no notice: %+v", rs)
	}
	if st := d.status(); st.State != "watching" || len(st.Notices) != 0 {
		t.Fatalf("status = %+v", st)
	}
	for _, l := range d.logLines() {
		if l["level"] == "WARN" || l["level"] == "ERROR" {
			t.Fatalf("warning against a healthy IMDSv2: %v", l)
		}
	}
}
