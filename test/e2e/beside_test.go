package e2e

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/preemptd/preemptd/agent"
)

// TestSecondDaemonRefused: a second `preemptd run` on the same run_dir
// exits non-zero naming the first's PID, and leaves the first's socket, so
// that status, simulate and the trainer's helper still reach it.
func TestSecondDaemonRefused(t *testing.T) {
	d := startDaemon(t, "provider: local\n")
	cmd := exec.Command(bin, "run", "--config", d.config)
	cmd.Env = cleanEnv()
	done := make(chan struct{})
	var out []byte
	var err error
	go func() { out, err = cmd.CombinedOutput(); close(done) }()
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		cmd.Process.Kill()
		<-done
		t.Fatalf("the second daemon kept running:\n%s", out)
	}
	if err == nil {
		t.Fatalf("the second daemon exited 0:\n%s", out)
	}
	if want := fmt.Sprintf("pid %d", d.cmd.Process.Pid); !strings.Contains(string(out), want) {
		t.Fatalf("the refusal does not name %q:\n%s", want, out)
	}
	if _, err := os.Stat(filepath.Join(d.runDir, agent.SocketName)); err != nil {
		t.Fatalf("the first daemon's socket is gone after the second exited: %v", err)
	}
	if out, code := runCLI(t, "status", "--config", d.config); code != 0 || !strings.Contains(out, "state:") {
		t.Fatalf("status after the second daemon exited: %d\n%s", code, out)
	}
	// The first still acts on notices.
	if out, code := runCLI(t, "simulate", "--config", d.config, "--kind", "terminate", "--in", "5s", "--wait"); code != 0 {
		t.Fatalf("simulate on the first daemon: %d\n%s", code, out)
	}
	if out, _ := runCLI(t, "doctor", "--config", d.config); !strings.Contains(out, fmt.Sprintf("preemptd (pid %d) runs with this run_dir", d.cmd.Process.Pid)) {
		t.Errorf("doctor does not say which daemon runs:\n%s", out)
	}
}

// TestReadOnlyCommandsCreateNothing: ls, report, advise and restore against
// a store that does not exist (a typo'd --state-dir) create nothing, say
// where they looked and how to point at the daemon's store; ls and restore
// call it a fresh start (exit 4, as the Python helper's latest() reads it).
func TestReadOnlyCommandsCreateNothing(t *testing.T) {
	dir := shortDir(t)
	state, run := filepath.Join(dir, "stat"), filepath.Join(dir, "run")
	common := []string{"--state-dir", state, "--run-dir", run}
	for _, tc := range []struct {
		args []string
		code int
	}{
		{[]string{"ls"}, 4},
		{[]string{"report"}, 1},
		{[]string{"advise"}, 1},
		{[]string{"restore", "--to", filepath.Join(dir, "to")}, 4},
	} {
		out, code := runCLI(t, append(tc.args, common...)...)
		if code != tc.code {
			t.Errorf("%s: exit %d, want %d\n%s", tc.args[0], code, tc.code, out)
		}
		for _, want := range []string{filepath.Join(state, "store") + " does not exist", "--state-dir DIR", "--config"} {
			if !strings.Contains(out, want) {
				t.Errorf("%s: output lacks %q:\n%s", tc.args[0], want, out)
			}
		}
		for _, p := range []string{state, run} {
			if _, err := os.Stat(p); err == nil {
				t.Fatalf("%s created %s", tc.args[0], p)
			}
		}
	}
	if out, code := runCLI(t, append([]string{"restore", "--none-ok", "--to", filepath.Join(dir, "to")}, common...)...); code != 0 {
		t.Errorf("restore --none-ok with no store: exit %d\n%s", code, out)
	}
}

// TestSmallUsageRefusals: the daemon refuses a job drill when it is no node
// of a job (exit 2, said why); keygen makes its --out folder; doctor names
// an unknown PREEMPTD_* variable and a checkpoint.dir that does not exist.
func TestSmallUsageRefusals(t *testing.T) {
	d := startDaemon(t, "provider: local\n")
	out, code := runCLI(t, "simulate", "--config", d.config, "--job")
	if code != 2 || !strings.Contains(out, "not a node of a multi-node job") {
		t.Fatalf("simulate --job on a single daemon: exit %d\n%s", code, out)
	}
	if st := d.status(); len(st.Notices) != 0 || st.Emergency != nil {
		t.Fatalf("the refused drill left a notice: %+v", st)
	}

	keys := filepath.Join(t.TempDir(), "new", "keys")
	if out, code := runCLI(t, "keygen", "--out", keys); code != 0 {
		t.Fatalf("keygen into a missing folder: %d\n%s", code, out)
	}
	if st, err := os.Stat(filepath.Join(keys, "sign.key")); err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("sign.key: %v", err)
	}

	cfg := filepath.Join(d.dir, "typo.yaml")
	writeFile(t, cfg, fmt.Sprintf("provider: local\nrun_dir: %s\ncheckpoint: {dir: %s}\n", d.runDir, filepath.Join(d.dir, "chekpoints")))
	cmd := exec.Command(bin, "doctor", "--config", cfg)
	cmd.Env = append(cleanEnv(), "PREEMPTD_TRAINER_SIGNL=SIGUSR1")
	b, _ := cmd.CombinedOutput()
	for _, want := range []string{"PREEMPTD_TRAINER_SIGNL (did you mean PREEMPTD_TRAINER_SIGNAL?) is not a preemptd setting",
		"chekpoints does not exist", "nothing will ever upload"} {
		if !strings.Contains(string(b), want) {
			t.Errorf("doctor lacks %q:\n%s", want, b)
		}
	}
}
