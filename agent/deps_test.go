package agent_test

import (
	"os/exec"
	"strings"
	"testing"
)

// TestAgentImportsNoAdapter keeps the core small and testable: agent
// imports no cloud SDK, NVML, object store or file watcher, and none of
// preemptd's adapters (they import agent, and cmd/preemptd wires them);
// of preemptd's own packages only advice, the estimator it publishes, which
// is itself standard library only (TestAdviceIsPure).
func TestAgentImportsNoAdapter(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", "github.com/preemptd/preemptd/agent").CombinedOutput()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, out)
	}
	forbidden := []string{"github.com/aws/", "cloud.google.com/", "github.com/NVIDIA/", "github.com/minio/",
		"github.com/fsnotify/", "github.com/prometheus/", "github.com/preemptd/preemptd/"}
	for _, dep := range strings.Fields(string(out)) {
		// redact is text only (the standard library): step errors and
		// status pass through it before they leave the agent.
		if dep == "github.com/preemptd/preemptd/agent" || dep == "github.com/preemptd/preemptd/advice" ||
			dep == "github.com/preemptd/preemptd/internal/redact" {
			continue
		}
		for _, f := range forbidden {
			if strings.HasPrefix(dep, f) {
				t.Errorf("agent depends on %s", dep)
			}
		}
	}
}

// TestAdviceIsPure: the estimator does no I/O beyond the standard library's
// types: it imports nothing outside it.
func TestAdviceIsPure(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", "-f", "{{if not .Standard}}{{.ImportPath}}{{end}}", "github.com/preemptd/preemptd/advice").CombinedOutput()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, out)
	}
	for _, dep := range strings.Fields(string(out)) {
		if dep != "github.com/preemptd/preemptd/advice" {
			t.Errorf("advice depends on %s", dep)
		}
	}
}
