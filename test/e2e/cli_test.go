package e2e

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/preemptd/preemptd/agent"
)

func runCLI(t *testing.T, args ...string) (string, int) {
	t.Helper()
	cmd := exec.Command(bin, args...)
	cmd.Env = cleanEnv()
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return out.String(), ee.ExitCode()
	}
	if err != nil {
		t.Fatal(err)
	}
	return out.String(), 0
}

func writeFile(t *testing.T, path, s string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(s), 0o644); err != nil {
		t.Fatal(err)
	}
}

func TestExitCodes(t *testing.T) {
	dir := shortDir(t)
	bad := filepath.Join(dir, "bad.yaml")
	writeFile(t, bad, "trainer: {signal: SIGFOO}\npoll_interval: 1ms\n")
	serverURL := filepath.Join(dir, "server.yaml")
	writeFile(t, serverURL, "storage: {url: \"http://127.0.0.1:9000/bkt/runs\"}\n")
	tests := []struct {
		name string
		args []string
		code int
		want []string
	}{
		{"version", []string{"version"}, 0, []string{"preemptd"}},
		{"help", []string{"--help"}, 0, []string{"simulate"}},
		{"subcommand help", []string{"simulate", "--help"}, 0, []string{"--kind"}},
		{"no command", nil, 2, []string{"no command"}},
		{"unknown command", []string{"explode"}, 2, []string{"unknown command"}},
		{"bad flag", []string{"run", "--bogus"}, 2, []string{"bogus"}},
		{"invalid config names keys", []string{"run", "--config", bad}, 2,
			[]string{"trainer.signal: unknown signal \"SIGFOO\"", "poll_interval: 1ms is out of range"}},
		{"missing config", []string{"status", "--config", filepath.Join(dir, "none.yaml")}, 2, []string{"config file not found"}},
		{"status with no daemon", []string{"status", "--run-dir", dir}, 3,
			[]string{"not running", filepath.Join(dir, "preemptd.sock"), "pass the same --config"}},
		{"simulate in the past", []string{"simulate", "--run-dir", dir, "--in", "-5s"}, 2, []string{"--in: -5s is in the past"}},
		{"storage.url a server's address", []string{"ls", "--run-dir", dir, "--config", serverURL}, 2,
			[]string{"storage.url: s3://bkt/runs", "storage.endpoint: http://127.0.0.1:9000"}},
		{"upload a missing folder", []string{"upload", "--state-dir", filepath.Join(dir, "state"), filepath.Join(dir, "no-such-step")}, 1,
			[]string{"no-such-step does not exist: give the path of one checkpoint"}},
		{"simulate bad kind", []string{"simulate", "--run-dir", dir, "--kind", "explode"}, 2, []string{"unknown notice kind"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out, code := runCLI(t, tt.args...)
			if code != tt.code {
				t.Fatalf("exit %d, want %d\n%s", code, tt.code, out)
			}
			for _, w := range tt.want {
				if !strings.Contains(out, w) {
					t.Errorf("output lacks %q:\n%s", w, out)
				}
			}
		})
	}
}

func TestDetectCommand(t *testing.T) {
	dmi := t.TempDir()
	writeFile(t, filepath.Join(dmi, "sys_vendor"), "Google\n")
	writeFile(t, filepath.Join(dmi, "product_name"), "Google Compute Engine\n")
	cmd := exec.Command(bin, "detect", "--run-dir", shortDir(t))
	cmd.Env = append(cleanEnv(), "PREEMPTD_DMI_ROOT="+dmi)
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.HasPrefix(string(out), "gcp\n") || !strings.Contains(string(out), "DMI") {
		t.Fatalf("detect: %v\n%s", err, out)
	}
}

// TestSIGTERMAtShutdown: with on_sigterm: shutdown (what `auto` decides when
// systemd is stopping the machine), SIGTERM is a shutdown notice: the trainer
// is signalled, the emergency path runs, then preemptd exits 0.
func TestSIGTERMAtShutdown(t *testing.T) {
	dir := shortDir(t)
	tr := startTrainer(t, filepath.Join(dir, "run", agent.NoticeFileName))
	d := startDaemonIn(t, dir, fmt.Sprintf("provider: local\non_sigterm: shutdown\nshutdown_grace: 20s\ntrainer: {pid_file: %q}\n", tr.pidFile))
	d.cmd.Process.Signal(syscall.SIGTERM)
	r := tr.waitSignal(5 * time.Second)
	if r.Signal != "SIGTERM" || r.Notice.Kind != agent.KindShutdown || r.Notice.Provider != "systemd" {
		t.Fatalf("record = %+v", r)
	}
	select {
	case <-d.exited:
	case <-time.After(15 * time.Second):
		t.Fatal("preemptd did not exit after the shutdown emergency path")
	}
	if d.err != nil {
		t.Fatalf("exit: %v", d.err)
	}
	var finished bool
	for _, l := range d.logLines() {
		if l["msg"] == "emergency path finished" && l["outcome"] == "completed" {
			finished = true
		}
	}
	if !finished {
		t.Fatal("no completed emergency path in the log")
	}
}

// TestSIGTERMPlainStop: with on_sigterm: exit (a `systemctl stop` outside
// shutdown), preemptd leaves the trainer alone and exits 0.
func TestSIGTERMPlainStop(t *testing.T) {
	dir := shortDir(t)
	tr := startTrainer(t, filepath.Join(dir, "run", agent.NoticeFileName))
	d := startDaemonIn(t, dir, fmt.Sprintf("provider: local\non_sigterm: exit\ntrainer: {pid_file: %q}\n", tr.pidFile))
	d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.exited:
	case <-time.After(10 * time.Second):
		t.Fatal("preemptd did not exit on SIGTERM")
	}
	if d.err != nil {
		t.Fatalf("exit: %v", d.err)
	}
	if rs := tr.records(); len(rs) != 0 {
		t.Fatalf("trainer signalled on a plain stop: %+v", rs)
	}
	if _, err := os.Stat(filepath.Join(d.runDir, agent.SocketName)); !os.IsNotExist(err) {
		t.Fatalf("socket left behind: %v", err)
	}
}

// TestEscalationAndHooks: a trainer that ignores SIGTERM is SIGKILLed at
// kill_after; the hook sees the notice in its environment.
func TestEscalationAndHooks(t *testing.T) {
	dir := shortDir(t)
	hookOut := filepath.Join(dir, "hook.env")
	tr := startTrainer(t, filepath.Join(dir, "run", agent.NoticeFileName), "--ignore")
	d := startDaemonIn(t, dir, fmt.Sprintf(`provider: local
trainer: {pid_file: %q, kill_after: 1s}
hooks: {on_notice: ["env | grep ^PREEMPTD_ > %s"]}
`, tr.pidFile, hookOut))
	out, code := runCLI(t, "simulate", "--config", d.config, "--kind", "terminate", "--in", "30s", "--wait")
	if code != 0 {
		t.Fatalf("simulate: %d\n%s", code, out)
	}
	if !tr.exitedWithin(5 * time.Second) {
		t.Fatal("trainer still alive after kill_after")
	}
	st := d.status()
	if st.Emergency.Trainer == nil || len(st.Emergency.Trainer.Killed) != 1 {
		t.Fatalf("trainer report = %+v", st.Emergency.Trainer)
	}
	b, err := os.ReadFile(hookOut)
	if err != nil || !strings.Contains(string(b), "PREEMPTD_KIND=terminate") || !strings.Contains(string(b), "PREEMPTD_SECONDS_LEFT=") {
		t.Fatalf("hook output: %v\n%s", err, b)
	}
	chaos(t, "process: the trainer ignores SIGTERM", "SIGKILL at kill_after (1 s), well before the deadline")
}

// TestChaosNoticeWithdrawn: a maintenance notice that appears and is
// withdrawn before it turns fatal signals nothing and leaves no notice.json.
func TestChaosNoticeWithdrawn(t *testing.T) {
	dir := shortDir(t)
	tr := startTrainer(t, filepath.Join(dir, "run", agent.NoticeFileName))
	d := startDaemonIn(t, dir, fmt.Sprintf("provider: local\ntrainer: {pid_file: %q}\n", tr.pidFile))
	trigger := filepath.Join(d.runDir, "trigger")
	writeFile(t, trigger, "maintenance 10m\n")
	waitFor(t, 5*time.Second, "notice.json", func() bool { _, ok := d.noticeFile(); return ok })
	os.Remove(trigger)
	waitFor(t, 5*time.Second, "notice.json to go", func() bool { _, ok := d.noticeFile(); return !ok })
	time.Sleep(500 * time.Millisecond)
	if st := d.status(); st.State != "watching" || st.Emergency != nil || len(tr.records()) != 0 {
		t.Fatalf("after withdrawal: state %s, emergency %v, trainer got %v", st.State, st.Emergency, tr.records())
	}
	chaos(t, "metadata: a notice appears and is withdrawn", "no signal, no emergency path, notice.json removed, state watching")
}

// TestGPUCommand: `preemptd gpu --json` on a machine without an NVIDIA
// driver says so and exits 0.
func TestGPUCommand(t *testing.T) {
	out, code := runCLI(t, "gpu", "--json")
	if code != 0 {
		t.Fatalf("exit %d\n%s", code, out)
	}
	var s agent.GPUSnapshot
	if err := json.Unmarshal([]byte(out), &s); err != nil {
		t.Fatalf("not JSON: %v\n%s", err, out)
	}
	if s.Available {
		t.Skipf("this machine has %d GPUs; the no-driver statement cannot be checked here", len(s.Devices))
	}
	if !strings.Contains(s.Reason, "no NVIDIA driver") {
		t.Fatalf("reason = %q", s.Reason)
	}
	out, code = runCLI(t, "gpu")
	if code != 0 || !strings.HasPrefix(out, "no GPU information: no NVIDIA driver") {
		t.Fatalf("exit %d\n%s", code, out)
	}
}
