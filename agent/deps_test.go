package agent_test

import (
	"os/exec"
	"strings"
	"testing"
)

// TestAgentImportsNoAdapter keeps the core small and testable: agent
// imports no cloud SDK, NVML, object store or file watcher, and none of
// preemptd's adapters (they import agent, and cmd/preemptd wires them).
func TestAgentImportsNoAdapter(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", "github.com/preemptd/preemptd/agent").CombinedOutput()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, out)
	}
	forbidden := []string{"github.com/aws/", "cloud.google.com/", "github.com/NVIDIA/", "github.com/minio/",
		"github.com/fsnotify/", "github.com/prometheus/", "github.com/preemptd/preemptd/"}
	for _, dep := range strings.Fields(string(out)) {
		if dep == "github.com/preemptd/preemptd/agent" {
			continue
		}
		for _, f := range forbidden {
			if strings.HasPrefix(dep, f) {
				t.Errorf("agent depends on %s", dep)
			}
		}
	}
}
