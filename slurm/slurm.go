// Package slurm is the scheduler adapter for machines that are Slurm nodes:
// at a fatal notice it drains the node (so that Slurm starts nothing new on
// a machine about to vanish) and signals the jobs running on it the Slurm
// way (scancel --signal); once the checkpoint is durable it requeues them
// (scontrol requeue), so that they start again elsewhere from it; when a
// notice is withdrawn it resumes the node it drained. It shells out to
// Slurm's own commands (squeue, scancel, scontrol), found on PATH and
// configured as they are for any user of the node (SLURM_CONF, munge).
package slurm

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/preemptd/preemptd/agent"
)

// The scancel targets: which of a job's processes get the signal.
const (
	// TargetSteps signals every job step (those srun started) but not the
	// batch script: scancel's default, and --signal=SIG@secs's.
	TargetSteps = "steps"
	// TargetBatch signals the batch script's shell alone (scancel --batch),
	// for a script that traps the signal: --signal=B:SIG@secs.
	TargetBatch = "batch"
	// TargetFull signals the batch script, its children and every step
	// (scancel --full): a trainer started by the script itself gets it.
	TargetFull = "full"
)

// ReasonPrefix starts the reason of every drain preemptd makes: a drain
// with another reason (an administrator's) is never undone.
const ReasonPrefix = "preemptd:"

// Config configures the adapter.
type Config struct {
	// Node is this machine's Slurm NodeName (default: the short hostname).
	Node string
	// Target is steps, batch or full.
	Target string
	// Requeue the jobs once the checkpoint is durable; Drain the node at a
	// fatal notice.
	Requeue, Drain bool
	// Run runs a command and returns its combined output (default: exec
	// with the daemon's environment).
	Run func(ctx context.Context, name string, args ...string) ([]byte, error)
}

// Slurm acts on this node's jobs.
type Slurm struct {
	cfg Config
	log *slog.Logger

	mu        sync.Mutex
	signalled []string // the jobs the last signal reached, for the requeue
	drained   string   // the key of the notice whose drain this node carries
}

// New returns the adapter.
func New(cfg Config, log *slog.Logger) *Slurm {
	if cfg.Target == "" {
		cfg.Target = TargetFull
	}
	if cfg.Node == "" {
		h, _ := os.Hostname()
		cfg.Node, _, _ = strings.Cut(h, ".")
	}
	if cfg.Run == nil {
		cfg.Run = func(ctx context.Context, name string, args ...string) ([]byte, error) {
			var stdout, stderr bytes.Buffer
			cmd := exec.CommandContext(ctx, name, args...)
			cmd.Stdout, cmd.Stderr = &stdout, &stderr
			if err := cmd.Run(); err != nil {
				return stdout.Bytes(), fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
			}
			return stdout.Bytes(), nil
		}
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Slurm{cfg: cfg, log: log.With("part", "slurm")}
}

// Node is the Slurm NodeName acted on.
func (s *Slurm) Node() string { return s.cfg.Node }

// Jobs lists the IDs of the jobs running on this node (squeue -w).
func (s *Slurm) Jobs(ctx context.Context) ([]string, error) {
	out, err := s.cfg.Run(ctx, "squeue", "--noheader", "--nodelist="+s.cfg.Node, "--states=RUNNING,CONFIGURING,COMPLETING", "--format=%i")
	if err != nil {
		return nil, err
	}
	return ParseJobIDs(out), nil
}

// ParseJobIDs reads squeue --format=%i's lines (array tasks as 123_4).
func ParseJobIDs(out []byte) []string {
	var ids []string
	for _, l := range strings.Split(string(out), "\n") {
		if id := strings.TrimSpace(l); id != "" && !slices.Contains(ids, id) {
			ids = append(ids, id)
		}
	}
	return ids
}

// signalName is sig as scancel takes it (TERM, USR1).
func signalName(sig string) string {
	return strings.TrimPrefix(strings.ToUpper(strings.TrimSpace(sig)), "SIG")
}

// drainReason is the reason a drain for n carries.
func drainReason(n agent.Notice) string {
	r := fmt.Sprintf("%s %s %s notice", ReasonPrefix, n.Provider, n.Kind)
	if !n.Deadline.IsZero() {
		r += ", machine goes at " + n.Deadline.UTC().Format(time.RFC3339)
	}
	return r
}

func (s *Slurm) drain(ctx context.Context, n agent.Notice) error {
	if _, err := s.cfg.Run(ctx, "scontrol", "update", "nodename="+s.cfg.Node, "state=drain", "reason="+drainReason(n)); err != nil {
		return err
	}
	s.mu.Lock()
	s.drained = n.Key()
	s.mu.Unlock()
	s.log.Warn("slurm node drained", "node", s.cfg.Node, "reason", drainReason(n))
	return nil
}

// Requeue requeues the jobs the last signal reached (scontrol requeue):
// run once their checkpoint is durable.
func (s *Slurm) Requeue(ctx context.Context) error {
	s.mu.Lock()
	jobs := s.signalled
	s.signalled = nil
	s.mu.Unlock()
	if !s.cfg.Requeue || len(jobs) == 0 {
		return nil
	}
	var errs []error
	for _, id := range jobs {
		if _, err := s.cfg.Run(ctx, "scontrol", "requeue", id); err != nil {
			errs = append(errs, err)
			continue
		}
		s.log.Warn("slurm job requeued", "job", id)
	}
	return errors.Join(errs...)
}

// Resume undoes the drain made for n (a withdrawn notice, a drill that
// ended), unless someone else has drained the node since: its reason no
// longer starts with ReasonPrefix.
func (s *Slurm) Resume(ctx context.Context, n agent.Notice) error {
	s.mu.Lock()
	mine := s.drained == n.Key()
	if mine {
		s.drained = ""
	}
	s.mu.Unlock()
	if !mine {
		return nil
	}
	r, _, err := s.NodeState(ctx)
	if err != nil {
		return err
	}
	if !strings.HasPrefix(r, ReasonPrefix) {
		s.log.Info("slurm node drained by someone else since; left drained", "node", s.cfg.Node, "reason", r)
		return nil
	}
	if _, err := s.cfg.Run(ctx, "scontrol", "update", "nodename="+s.cfg.Node, "state=resume"); err != nil {
		return err
	}
	s.log.Warn("slurm node resumed: the notice was withdrawn", "node", s.cfg.Node)
	return nil
}

// NodeState is the node's State= and Reason= (scontrol show node).
func (s *Slurm) NodeState(ctx context.Context) (reason, state string, err error) {
	out, err := s.cfg.Run(ctx, "scontrol", "show", "node", s.cfg.Node, "--oneliner")
	if err != nil {
		return "", "", err
	}
	for _, f := range strings.Fields(string(out)) {
		if v, ok := strings.CutPrefix(f, "State="); ok {
			state = v
		}
	}
	return NodeReason(out), state, nil
}

// NodeReason is the Reason= of `scontrol show node --oneliner` ("" when
// none): the rest of the line after it, as the reason may hold spaces and
// is followed only by its own [user@time].
func NodeReason(out []byte) string {
	_, r, ok := bytes.Cut(out, []byte(" Reason="))
	if !ok {
		return ""
	}
	reason := strings.TrimSpace(string(r))
	if i := strings.LastIndex(reason, " ["); i >= 0 && strings.HasSuffix(reason, "]") {
		reason = reason[:i]
	}
	if reason == "(null)" {
		return ""
	}
	return reason
}
