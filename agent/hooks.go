package agent

import (
	"context"
	"fmt"
	"net/url"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/preemptd/preemptd/internal/redact"
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
		cmd.Env = append(ScrubEnv(os.Environ()), HookEnv(n, a.cfg.RunDir, start)...)
		cmd.WaitDelay = time.Second
		out, err := cmd.CombinedOutput()
		if len(out) > hookOutputMax {
			out = out[:hookOutputMax]
		}
		rep := HookReport{Command: command, Duration: a.now().Sub(start)}
		if err != nil {
			rep.Error = redact.String(err.Error())
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

// secretWords mark an environment variable a hook must not inherit: cloud
// keys, tokens, passwords, webhook URLs (the path is the secret).
var secretWords = []string{"SECRET", "TOKEN", "PASSWORD", "PASSWD", "CREDENTIAL", "_KEY", "WEBHOOK", "SAS", "AUTH"}

// ScrubEnv returns env without preemptd's own configuration (PREEMPTD_*:
// the hook gets the notice's PREEMPTD_* variables instead) and without any
// variable whose name says it holds a secret (AWS_SECRET_ACCESS_KEY,
// AWS_SESSION_TOKEN, AZURE_STORAGE_KEY, …) or whose value is a URL with
// credentials or a path (a webhook).
func ScrubEnv(env []string) []string {
	out := make([]string, 0, len(env))
	for _, kv := range env {
		name, value, _ := strings.Cut(kv, "=")
		upper := strings.ToUpper(name)
		if strings.HasPrefix(upper, "PREEMPTD_") || secretValue(value) ||
			slices.ContainsFunc(secretWords, func(w string) bool { return strings.Contains(upper, w) }) {
			continue
		}
		out = append(out, kv)
	}
	return out
}

// secretValue reports a value that is a URL carrying user info or a path
// beyond "/" (a webhook or a signed URL), proxies and plain hosts aside.
func secretValue(v string) bool {
	u, err := url.Parse(v)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") {
		return false
	}
	return u.User != nil || (u.Path != "" && u.Path != "/") || u.RawQuery != ""
}
