package python

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestWheelInstallsOffline: scripts/wheel.sh builds the helper's wheel with
// no network (the cached flit_core), and a fresh venv takes it with
// `pip install --no-index`: the installed package imports, is typed
// (py.typed), and reads a notice. The source folder installs offline too,
// from the same cache.
func TestWheelInstallsOffline(t *testing.T) {
	if _, err := os.Stat(interpreter); err != nil {
		t.Skipf("%s not found", interpreter)
	}
	cache := os.Getenv("PREEMPTD_TOOLS")
	if cache == "" {
		home, _ := os.UserHomeDir()
		cache = filepath.Join(home, ".cache", "preemptd", "tools")
	}
	flit, _ := filepath.Glob(filepath.Join(cache, "flit_core-*", "flit_core-*.whl"))
	if len(flit) == 0 {
		if os.Getenv("CI") != "" {
			t.Fatalf("flit_core is not cached in %s; `make tools` downloads it", cache)
		}
		t.Skip("flit_core not cached; run `make tools`")
	}
	dir := t.TempDir()
	src, _ := filepath.Abs(".")
	run := func(name string, args ...string) string {
		t.Helper()
		cmd := exec.Command(name, args...)
		cmd.Dir = dir // not this folder: python would import the source package from it
		cmd.Env = append(os.Environ(), "PREEMPTD_TOOLS="+cache, "PIP_NO_INDEX=1", "PIP_DISABLE_PIP_VERSION_CHECK=1")
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
		}
		return string(out)
	}
	out := run(filepath.Join(src, "..", "..", "scripts", "wheel.sh"), filepath.Join(dir, "dist"))
	lines := strings.Fields(out)
	wheel := lines[len(lines)-1]
	if !strings.HasSuffix(wheel, "-py3-none-any.whl") {
		t.Fatalf("wheel.sh printed %q", out)
	}
	check := `import os, sys, tempfile, preemptd
here = os.path.dirname(preemptd.__file__)
assert here.startswith(sys.prefix), here
assert os.path.exists(os.path.join(here, "py.typed"))
# the trainers' modules ship too (they import their framework only when imported)
assert all(os.path.exists(os.path.join(here, m)) for m in ("lightning.py", "hf.py"))
d = tempfile.mkdtemp()
open(os.path.join(d, "notice.json"), "w").write('{"class": "fatal", "kind": "preempt"}')
assert preemptd.Preemption(d, install=False).requested()
print("ok", here)`
	for i, from := range []string{wheel, src} {
		venv := filepath.Join(dir, "venv"+string(rune('0'+i)))
		run(interpreter, "-m", "venv", venv)
		args := []string{"install", "--no-index", from}
		if from == src {
			args = append(args, "--find-links", filepath.Dir(flit[0])) // the build backend, offline
		}
		run(filepath.Join(venv, "bin", "pip"), args...)
		if got := run(filepath.Join(venv, "bin", "python"), "-c", check); !strings.HasPrefix(got, "ok ") {
			t.Fatalf("installed from %s: %s", from, got)
		}
	}
}
