package e2e

import (
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// TestUsageListsEveryFlag: every command's usage line names every flag it
// takes (the line is made from the flags themselves), `version --help`
// answers, and every command takes --run-dir and --state-dir.
func TestUsageListsEveryFlag(t *testing.T) {
	flagLine := regexp.MustCompile(`(?m)^  -([a-z-]+)`)
	for _, cmd := range []string{"run", "status", "simulate", "detect", "gpu", "ls", "restore", "upload", "report", "doctor", "keygen", "version"} {
		out, _ := runCLI(t, cmd, "--help")
		usage, _, _ := strings.Cut(out, "\n")
		if !strings.HasPrefix(usage, "Usage: preemptd "+cmd) {
			t.Errorf("%s --help: %q", cmd, usage)
			continue
		}
		for _, m := range flagLine.FindAllStringSubmatch(out, -1) {
			if !strings.Contains(usage, "--"+m[1]) {
				t.Errorf("%s: usage line lacks --%s: %s", cmd, m[1], usage)
			}
		}
		if cmd != "keygen" && cmd != "version" && (!strings.Contains(usage, "--state-dir") || !strings.Contains(usage, "--run-dir")) {
			t.Errorf("%s takes no --state-dir/--run-dir: %s", cmd, usage)
		}
	}
}

// TestDoctorCreatesNothing: doctor on a fresh machine reports what `run`
// will create instead of creating system paths itself.
func TestDoctorCreatesNothing(t *testing.T) {
	dir := t.TempDir()
	run, state := filepath.Join(dir, "run"), filepath.Join(dir, "state")
	out, _ := runCLI(t, "doctor", "--provider", "local", "--run-dir", run, "--state-dir", state)
	if _, err := os.Stat(run); err == nil {
		t.Errorf("doctor created %s", run)
	}
	if _, err := os.Stat(state); err == nil {
		t.Errorf("doctor created %s", state)
	}
	if !strings.Contains(out, "does not exist yet") {
		t.Fatalf("doctor:\n%s", out)
	}
}

// TestStoreCommandsFindTheDaemonsStore: `make run` keeps its state under
// ./.preemptd; ls, upload and restore find the same store with --state-dir.
func TestStoreCommandsFindTheDaemonsStore(t *testing.T) {
	dir := shortDir(t)
	state := filepath.Join(dir, "state")
	ckpt := filepath.Join(dir, "ckpt", "step-7")
	os.MkdirAll(ckpt, 0o755)
	os.WriteFile(filepath.Join(ckpt, "weights.bin"), []byte("weights"), 0o644)
	env := []string{"PREEMPTD_RUN_ID=first-hour"}
	if out, code := runCLIEnv(t, env, "upload", "--state-dir", state, ckpt); code != 0 {
		t.Fatalf("upload --state-dir: %d\n%s", code, out)
	}
	out, code := runCLIEnv(t, env, "ls", "--state-dir", state)
	if code != 0 || !strings.Contains(out, "step-7") {
		t.Fatalf("ls --state-dir: %d\n%s", code, out)
	}
	if _, err := os.Stat(filepath.Join(state, "store", "first-hour", "step-7", "weights.bin")); err != nil {
		t.Fatalf("not in the daemon's store under state_dir: %v", err)
	}
	to := filepath.Join(dir, "restored")
	if out, code := runCLIEnv(t, env, "restore", "--state-dir", state, "--to", to); code != 0 {
		t.Fatalf("restore --state-dir: %d\n%s", code, out)
	}
	if b, _ := os.ReadFile(filepath.Join(to, "step-7", "weights.bin")); string(b) != "weights" {
		t.Fatalf("restored %q", b)
	}
}

// TestStatusLineReadsAsASentence: the last signal that found no process is
// said in a sentence.
func TestStatusLineReadsAsASentence(t *testing.T) {
	d := startDaemon(t, "provider: local\n")
	if out, code := runCLI(t, "simulate", "--config", d.config, "--kind", "terminate", "--in", "5s", "--wait"); code != 0 {
		t.Fatal(out)
	}
	out, _ := runCLI(t, "status", "--config", d.config)
	if strings.Contains(out, "reached no process no") || !strings.Contains(out, "reached no process: ") {
		t.Fatalf("status:\n%s", out)
	}
}
