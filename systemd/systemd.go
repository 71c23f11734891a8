// Package systemd holds preemptd's unit files and the glue to the service
// manager: whether the machine is shutting down (so that systemd's SIGTERM
// becomes a shutdown notice rather than an exit).
package systemd

import (
	"context"
	"os/exec"
	"strings"
	"time"
)

// ShuttingDown reports whether systemd says the system is stopping
// (`systemctl is-system-running` prints "stopping" during shutdown).
func ShuttingDown(ctx context.Context) bool {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	out, _ := exec.CommandContext(ctx, "systemctl", "is-system-running").Output()
	return strings.TrimSpace(string(out)) == "stopping"
}
