package e2e

import (
	"fmt"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/preemptd/preemptd/agent"
	"github.com/preemptd/preemptd/test/fakes"
)

// TestGCPPreempted: `preempted` flipping to TRUE reaches the trainer through
// the hanging GET, well under a poll interval.
func TestGCPPreempted(t *testing.T) {
	s := fakes.NewGCP()
	srv := httptest.NewServer(s)
	t.Cleanup(srv.Close) // after the daemon stops: its hanging GETs end with it
	dir := shortDir(t)
	tr := startTrainer(t, filepath.Join(dir, "run", agent.NoticeFileName))
	d := startDaemonIn(t, dir, fmt.Sprintf("provider: gcp\ngcp: {endpoint: %q}\ntrainer: {pid_file: %q}\n",
		strings.TrimPrefix(srv.URL, "http://"), tr.pidFile))
	waitFor(t, 10*time.Second, "both hanging GETs", func() bool { return s.Waits() >= 2 })
	flipped := time.Now()
	s.Set("instance/preempted", "TRUE")
	r := tr.waitSignal(10 * time.Second)
	t.Logf("GCP preempted→signal latency: %v (long-poll)", r.At.Sub(flipped))
	if r.Signal != "SIGTERM" || r.Notice.Kind != agent.KindPreempt || r.Notice.Deadline == nil {
		t.Fatalf("record = %+v", r)
	}
	if left := r.Notice.Deadline.Sub(r.Notice.NoticedAt); left != 30*time.Second {
		t.Fatalf("deadline %v after the notice, want 30s", left)
	}
	d.waitEmergencyDone()
}

// TestAzurePreempt: another VM's Preempt is ignored; this VM's reaches the
// trainer; the StartRequests ack comes only after the emergency path, i.e.
// after the trainer has exited.
func TestAzurePreempt(t *testing.T) {
	s := fakes.NewAzure("vm-mine")
	srv := httptest.NewServer(s)
	t.Cleanup(srv.Close) // after the daemon stops: its hanging GETs end with it
	dir := shortDir(t)
	tr := startTrainer(t, filepath.Join(dir, "run", agent.NoticeFileName))
	var (
		mu            sync.Mutex
		trainerGoneAt bool
	)
	s.OnAck(func(string) {
		mu.Lock()
		trainerGoneAt = processGone(tr.cmd.Process.Pid)
		mu.Unlock()
	})
	d := startDaemonIn(t, dir, fmt.Sprintf("provider: azure\nazure: {endpoint: %q}\ntrainer: {pid_file: %q}\n", srv.URL, tr.pidFile))
	nb := time.Now().Add(30 * time.Second).UTC().Truncate(time.Second)
	s.SetEvents(fakes.AzureEvent{EventId: "theirs", EventType: "Preempt", ResourceType: "VirtualMachine",
		Resources: []string{"vm-other"}, EventStatus: "Scheduled", NotBefore: nb.Format(time.RFC1123)})
	time.Sleep(2500 * time.Millisecond)
	if rs := tr.records(); len(rs) != 0 {
		t.Fatalf("another VM's event signalled the trainer: %+v", rs)
	}
	posted := time.Now()
	s.SetEvents(fakes.AzureEvent{EventId: "theirs", EventType: "Preempt", ResourceType: "VirtualMachine",
		Resources: []string{"vm-other"}, EventStatus: "Scheduled", NotBefore: nb.Format(time.RFC1123)},
		fakes.AzureEvent{EventId: "mine", EventType: "Preempt", ResourceType: "VirtualMachine",
			Resources: []string{"vm-mine"}, EventStatus: "Scheduled", NotBefore: nb.Format(time.RFC1123)})
	r := tr.waitSignal(10 * time.Second)
	t.Logf("Azure Preempt→signal latency: %v (poll_interval 1s)", r.At.Sub(posted))
	if r.Signal != "SIGTERM" || r.Notice.ID != "mine" || r.Notice.Deadline == nil || !r.Notice.Deadline.Equal(nb) {
		t.Fatalf("record = %+v, want mine with deadline %v", r, nb)
	}
	st := d.waitEmergencyDone()
	if !st.Emergency.Acked {
		t.Fatalf("emergency not acked: %+v", st.Emergency)
	}
	if acks := s.Acks(); !slices.Equal(acks, []string{"mine"}) {
		t.Fatalf("acks = %v, want only mine", acks)
	}
	mu.Lock()
	defer mu.Unlock()
	if !trainerGoneAt {
		t.Fatal("ack posted while the trainer was still running")
	}
}

// TestLocalSimulateCLI: the README's demo path: daemon on the local
// provider, `preemptd simulate`, `preemptd status`.
func TestLocalSimulateCLI(t *testing.T) {
	dir := shortDir(t)
	tr := startTrainer(t, filepath.Join(dir, "run", agent.NoticeFileName))
	d := startDaemonIn(t, dir, fmt.Sprintf("provider: local\ntrainer: {pid_file: %q}\n", tr.pidFile))
	out, code := runCLI(t, "simulate", "--config", d.config, "--kind", "preempt", "--in", "20s", "--wait")
	if code != 0 || !strings.Contains(out, "simulated preempt notice") || !strings.Contains(out, "state:") ||
		!strings.Contains(out, "completed") {
		t.Fatalf("simulate: exit %d\n%s", code, out)
	}
	r := tr.waitSignal(time.Second)
	if r.Signal != "SIGTERM" || r.Notice.Kind != agent.KindPreempt {
		t.Fatalf("record = %+v", r)
	}
	out, code = runCLI(t, "status", "--config", d.config, "--json")
	if code != 0 || !strings.Contains(out, `"state": "done"`) {
		t.Fatalf("status: exit %d\n%s", code, out)
	}
}

// TestLocalTriggerFile: the trigger file is the local provider's notice.
func TestLocalTriggerFile(t *testing.T) {
	dir := shortDir(t)
	tr := startTrainer(t, filepath.Join(dir, "run", agent.NoticeFileName), "--exit-on", "SIGUSR2")
	d := startDaemonIn(t, dir, fmt.Sprintf("provider: local\ntrainer: {pid_file: %q, signal: SIGUSR2}\n", tr.pidFile))
	writeFile(t, filepath.Join(d.runDir, "trigger"), "stop 45s\n")
	r := tr.waitSignal(5 * time.Second)
	if r.Signal != "SIGUSR2" || r.Notice.Kind != agent.KindStop || r.Notice.Provider != "local" {
		t.Fatalf("record = %+v", r)
	}
	// Once the path is over the notice still stands: status says the path
	// is done and that the machine is still to go, not just "done".
	d.waitEmergencyDone()
	out, _ := runCLI(t, "status", "--config", d.config)
	if !strings.Contains(out, "done: the emergency path has finished; the machine goes in ") || !strings.Contains(out, "(stop notice)") {
		t.Fatalf("status:\n%s", out)
	}
}

// spotCloud runs a daemon against a termination-time cloud's fake (cfg
// names the provider and its endpoint), sets the time with set, and checks
// that the trainer is signalled with that deadline, that doctor names the
// instance, and that the event record carries the provider and instance.
func spotCloud(t *testing.T, provider, cfg, instanceID string, set func(time.Time)) {
	t.Helper()
	dir := shortDir(t)
	tr := startTrainer(t, filepath.Join(dir, "run", agent.NoticeFileName))
	d := startDaemonIn(t, dir, fmt.Sprintf("provider: %s\n%strainer: {pid_file: %q}\npoll_interval: 200ms\n", provider, cfg, tr.pidFile))
	if out, code := runCLI(t, "doctor", "--config", d.config); !strings.Contains(out, "provider "+provider+": "+instanceID) {
		t.Fatalf("doctor (exit %d) does not name the instance:\n%s", code, out)
	}
	time.Sleep(500 * time.Millisecond)
	if st := d.status(); len(st.Notices) != 0 {
		t.Fatalf("a notice before any was set: %+v", st.Notices)
	}
	deadline := time.Now().Add(90 * time.Second).Truncate(time.Second)
	set(deadline)
	r := tr.waitSignal(10 * time.Second)
	if r.Signal != "SIGTERM" || r.Notice.Provider != provider || r.Notice.Kind != agent.KindTerminate ||
		r.Notice.Deadline == nil || !r.Notice.Deadline.Equal(deadline) {
		t.Fatalf("record = %+v, want deadline %v", r, deadline)
	}
	d.waitEmergencyDone()
	waitFor(t, 10*time.Second, "the event record", func() bool {
		found := false
		filepath.WalkDir(filepath.Join(dir, "state"), func(p string, e os.DirEntry, err error) error {
			if err == nil && !e.IsDir() && strings.Contains(p, "_events") {
				b, _ := os.ReadFile(p)
				found = found || (strings.Contains(string(b), `"provider": "`+provider+`"`) && strings.Contains(string(b), instanceID))
			}
			return nil
		})
		return found
	})
}

// TestAlibabaSpotRelease: the hardened-mode ECS metadata service's release
// time (UTC) reaches the trainer as the deadline.
func TestAlibabaSpotRelease(t *testing.T) {
	s := fakes.NewAlibaba()
	s.Hardened = true
	srv := httptest.NewServer(s)
	t.Cleanup(srv.Close)
	spotCloud(t, "alibaba", fmt.Sprintf("alibaba: {endpoint: %q}\n", srv.URL), "i-bp1fakefakefake0001", func(at time.Time) {
		s.SetRelease(at.UTC().Format(time.RFC3339))
	})
}

// TestTencentSpotReclaim: the CVM metadata service's reclaim time, in
// UTC+8, reaches the trainer as the right instant (not eight hours late).
func TestTencentSpotReclaim(t *testing.T) {
	s := fakes.NewTencent()
	srv := httptest.NewServer(s)
	t.Cleanup(srv.Close)
	spotCloud(t, "tencent", fmt.Sprintf("tencent: {endpoint: %q}\n", srv.URL), "ins-fake0001", func(at time.Time) {
		s.SetReclaim(at.In(time.FixedZone("CST", 8*3600)).Format(time.DateTime))
	})
}

// TestDetectAlibabaAndTencent: DMI names both clouds.
func TestDetectAlibabaAndTencent(t *testing.T) {
	for vendor, want := range map[string]string{"Alibaba Cloud": "alibaba", "Tencent Cloud": "tencent"} {
		dmi := t.TempDir()
		writeFile(t, filepath.Join(dmi, "sys_vendor"), vendor+"\n")
		out, code := runCLIEnv(t, []string{"PREEMPTD_DMI_ROOT=" + dmi}, "detect", "--run-dir", shortDir(t))
		if code != 0 || !strings.HasPrefix(out, want+"\n") {
			t.Errorf("%s: exit %d\n%s", vendor, code, out)
		}
	}
}
