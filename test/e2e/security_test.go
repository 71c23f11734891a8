package e2e

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// asNobody runs preemptd as uid/gid 65534.
func asNobody(t *testing.T, args ...string) (string, error) {
	t.Helper()
	cmd := exec.Command(bin, args...)
	cmd.Env = cleanEnv()
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// TestLocalAPIReadsOpenChangesGuarded: a non-root trainer user can read the
// status and long-poll its notice over the socket; only root (or the
// daemon's user, or api.simulate_group) may simulate a notice.
func TestLocalAPIReadsOpenChangesGuarded(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root to act as another user")
	}
	dir := shortDir(t)
	os.Chmod(dir, 0o755) // the trainer's user must reach run_dir
	d := startDaemonIn(t, dir, "provider: local\n")
	if st, err := os.Stat(filepath.Join(d.runDir, "preemptd.sock")); err != nil || st.Mode().Perm() != 0o666 {
		t.Fatalf("socket: %v %v", st, err)
	}
	if st, _ := os.Stat(d.runDir); st.Mode().Perm() != 0o755 {
		t.Fatalf("run_dir mode %04o, want 0755", st.Mode().Perm())
	}
	os.Chmod(d.config, 0o644)
	if out, err := asNobody(t, "status", "--config", d.config); err != nil {
		t.Fatalf("status as nobody: %v\n%s", err, out)
	}
	out, err := asNobody(t, "simulate", "--config", d.config, "--kind", "terminate", "--in", "30s")
	if err == nil || !strings.Contains(out, "may not simulate") {
		t.Fatalf("simulate as nobody: %v\n%s", err, out)
	}
	if st := d.status(); st.Emergency != nil || len(st.Notices) != 0 {
		t.Fatalf("a refused simulation acted: %+v", st)
	}
	if out, code := runCLI(t, "simulate", "--config", d.config, "--kind", "rebalance"); code != 0 {
		t.Fatalf("simulate as root: %d %s", code, out)
	}
}

// TestRunDirMustNotBeWritableByOthers: a world-writable run_dir (anyone
// could replace notice.json or the socket) is refused at start, naming the
// fix.
func TestRunDirMustNotBeWritableByOthers(t *testing.T) {
	dir := shortDir(t)
	run := filepath.Join(dir, "run")
	os.MkdirAll(run, 0o755)
	os.Chmod(run, 0o777)
	cfg := filepath.Join(dir, "preemptd.yaml")
	writeFile(t, cfg, "provider: local\nrun_dir: "+run+"\nstate_dir: "+filepath.Join(dir, "state")+"\nmetrics: {listen: \"\"}\n")
	out, code := runCLI(t, "run", "--config", cfg)
	if code == 0 || !strings.Contains(out, "world-writable") || !strings.Contains(out, "chmod 755") {
		t.Fatalf("run with a world-writable run_dir: exit %d\n%s", code, out)
	}
}

// TestWebhookSecretNowhere: a webhook URL's path (its secret) reaches
// neither the log, nor the status, nor the event record in the store, when
// the webhook fails and when it succeeds.
func TestWebhookSecretNowhere(t *testing.T) {
	const token = "T0/B0/webhook-secret-path"
	dir := shortDir(t)
	d := startDaemonIn(t, dir, "provider: local\nnotify: {webhooks: [{url: \"http://127.0.0.1:1/services/"+token+"\", format: slack}]}\n")
	if out, code := runCLI(t, "simulate", "--config", d.config, "--kind", "terminate", "--in", "8s", "--wait"); code != 0 {
		t.Fatal(out)
	}
	waitFor(t, 20*time.Second, "the webhook's failure to be logged", func() bool {
		b, _ := os.ReadFile(d.logf)
		return strings.Count(string(b), "webhook not delivered") >= 2 // notice and outcome
	})
	status, _ := runCLI(t, "status", "--config", d.config, "--json")
	log, _ := os.ReadFile(d.logf)
	if strings.Contains(status, "webhook-secret") || strings.Contains(string(log), "webhook-secret") {
		t.Fatal("the webhook's secret path is in the status or the log")
	}
	records := 0
	filepath.WalkDir(filepath.Join(dir, "state"), func(p string, e os.DirEntry, err error) error {
		if err == nil && !e.IsDir() {
			b, _ := os.ReadFile(p)
			if strings.Contains(string(b), "webhook-secret") {
				t.Errorf("the webhook's secret path is in %s", p)
			}
			if strings.Contains(p, "_events") {
				records++
			}
		}
		return nil
	})
	if records == 0 {
		t.Fatal("no event record written: nothing was checked")
	}
	if !strings.Contains(string(log), "webhook not delivered") {
		t.Fatal("the webhook failure was not exercised")
	}
}
