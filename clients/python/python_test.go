// Package python holds preemptd's trainer-side helper (the preemptd
// package, standard library only, typed, built as a wheel by
// scripts/wheel.sh); this test runs its unittest suite with the interpreter
// that has Debian's python3-torch and with the frameworks' venv (torch 2.x),
// so that `make test` covers both; restore()
// and latest() run the preemptd binary built here.
package python

import (
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/preemptd/preemptd/test/peers"
)

const interpreter = "/usr/bin/python3"

func TestHelper(t *testing.T) {
	if _, err := os.Stat(interpreter); err != nil {
		t.Skipf("%s not found", interpreter)
	}
	// restore() and latest() run the real preemptd command.
	bin := filepath.Join(t.TempDir(), "preemptd")
	build := exec.Command("go", "build", "-o", bin, "../../cmd/preemptd")
	build.Env = append(os.Environ(), "CGO_ENABLED=1", "CGO_CFLAGS=-Wno-deprecated-declarations")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	// Debian's torch 1.13 for /usr/bin/python3, and the frameworks' venv
	// (torch 2.x from PyPI, with Lightning and Transformers).
	t.Run("debian", func(t *testing.T) { unittest(t, interpreter, bin) })
	t.Run("frameworks", func(t *testing.T) { unittest(t, peers.Frameworks(t), bin) })
}

func unittest(t *testing.T, python, bin string) {
	cmd := exec.Command(python, "-m", "unittest", "-v", "test_preemptd")
	cmd.Env = append(os.Environ(), "PYTHONDONTWRITEBYTECODE=1", "PREEMPTD_BIN="+bin, "PREEMPTD_CONFIG=/nonexistent-test-config")
	if os.Getenv("CI") != "" {
		// CI has torch (scripts/tools.sh installs it): the agreement across
		// ranks must run, not skip.
		cmd.Env = append(cmd.Env, "PREEMPTD_REQUIRE_TORCH=1")
	}
	out, err := cmd.CombinedOutput()
	t.Logf("%s", out)
	if err != nil {
		t.Fatalf("python helper tests with %s: %v", python, err)
	}
}

// TestTyped: the package passes mypy --strict with Lightning and
// Transformers installed (the frameworks' venv), so that preemptd.lightning
// and preemptd.hf are checked against the classes they extend.
func TestTyped(t *testing.T) {
	python := peers.Frameworks(t)
	cmd := exec.Command(python, "-m", "mypy", "--strict", "--cache-dir", t.TempDir(), "preemptd")
	out, err := cmd.CombinedOutput()
	t.Logf("%s", out)
	if err != nil {
		t.Fatalf("mypy --strict: %v", err)
	}
}
