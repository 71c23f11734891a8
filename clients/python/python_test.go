// Package python holds preemptd's trainer-side helper (the preemptd
// package, standard library only, typed, built as a wheel by
// scripts/wheel.sh); this test runs its unittest suite with the interpreter
// that has Debian's python3-torch, so that `make test` covers it; restore()
// and latest() run the preemptd binary built here.
package python

import (
	"os"
	"os/exec"
	"path/filepath"
	"testing"
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
	cmd := exec.Command(interpreter, "-m", "unittest", "-v", "test_preemptd")
	cmd.Env = append(os.Environ(), "PYTHONDONTWRITEBYTECODE=1", "PREEMPTD_BIN="+bin, "PREEMPTD_CONFIG=/nonexistent-test-config")
	if os.Getenv("CI") != "" {
		// CI has python3-torch (scripts/tools.sh installs it): the
		// agreement across ranks must run, not skip.
		cmd.Env = append(cmd.Env, "PREEMPTD_REQUIRE_TORCH=1")
	}
	out, err := cmd.CombinedOutput()
	t.Logf("%s", out)
	if err != nil {
		t.Fatalf("python helper tests: %v", err)
	}
}
