package agent

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"time"
)

// HookReport is one hook command's result.
type HookReport struct {
	Command  string        `json:"command"`
	Duration time.Duration `json:"duration_ns"`
	Error    string        `json:"error,omitempty"`
}

const hookOutputMax = 4 << 10

// runHooks runs every hooks.on_notice command, one after another, through
// /bin/sh, bounded by deadline. Notice contents reach a hook only through its
// environment, never through its command line.
func (a *Agent) runHooks(ctx context.Context, n Notice, deadline time.Time) []HookReport {
	if len(a.cfg.Hooks) == 0 {
		return nil
	}
	ctx, cancel := context.WithDeadline(ctx, deadline)
	defer cancel()
	reports := make([]HookReport, 0, len(a.cfg.Hooks))
	for _, command := range a.cfg.Hooks {
		start := a.now()
		cmd := exec.CommandContext(ctx, "/bin/sh", "-c", command)
		cmd.Env = append(os.Environ(), HookEnv(n, a.cfg.RunDir, start)...)
		cmd.WaitDelay = time.Second
		out, err := cmd.CombinedOutput()
		if len(out) > hookOutputMax {
			out = out[:hookOutputMax]
		}
		rep := HookReport{Command: command, Duration: a.now().Sub(start)}
		if err != nil {
			rep.Error = err.Error()
			a.log.Error("hook failed", "command", command, "err", err, "output", string(out))
		} else {
			a.log.Info("hook ran", "command", command, "took", rep.Duration.Round(time.Millisecond).String(), "output", string(out))
		}
		reports = append(reports, rep)
		if ctx.Err() != nil {
			break
		}
	}
	return reports
}

// HookEnv is the environment a hook sees for notice n.
func HookEnv(n Notice, runDir string, now time.Time) []string {
	deadline := ""
	if !n.Deadline.IsZero() {
		deadline = n.Deadline.UTC().Format(time.RFC3339Nano)
	}
	secs := n.SecondsLeft(now)
	return []string{
		"PREEMPTD_PROVIDER=" + n.Provider,
		"PREEMPTD_KIND=" + string(n.Kind),
		"PREEMPTD_NOTICE_ID=" + n.ID,
		"PREEMPTD_ACTION=" + n.Action,
		"PREEMPTD_DEADLINE=" + deadline,
		"PREEMPTD_SECONDS_LEFT=" + strconv.Itoa(int(secs)),
		fmt.Sprintf("PREEMPTD_NOTICE_FILE=%s", noticePath(runDir)),
	}
}
