package slurm

import (
	"context"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/preemptd/preemptd/agent"
)

// Trainer is agent.Trainer for a Slurm node: the trainer is whatever the
// node's jobs run. Signal sends the signal through scancel to every job on
// the node (as configured: steps, batch or full) and reports the jobs'
// processes here (scontrol listpids), so that the agent waits for them to
// exit; WaitExit escalates with scancel --signal=KILL --full.
type Trainer struct{ S *Slurm }

type handle struct {
	jobs []string
	pids []int
}

// Signal implements agent.Trainer.
func (t Trainer) Signal(ctx context.Context, signal string) (agent.SignalReport, error) {
	s := t.S
	rep := agent.SignalReport{Signal: signal, PIDs: []int{}}
	jobs, err := s.Jobs(ctx)
	if err != nil {
		rep.Problems = append(rep.Problems, err.Error())
		rep.At = time.Now()
		return rep, nil
	}
	s.mu.Lock()
	s.signalled = jobs // for the requeue, once the checkpoint is durable
	s.mu.Unlock()
	if len(jobs) == 0 {
		rep.Problems = append(rep.Problems, "no Slurm job is running on node "+s.cfg.Node)
	}
	h := &handle{}
	for _, id := range jobs {
		// The processes first, so that the set is fixed before they end.
		pids, err := s.pids(ctx, id)
		if err != nil {
			rep.Problems = append(rep.Problems, err.Error())
		}
		args := []string{"--signal=" + signalName(signal)}
		switch s.cfg.Target {
		case TargetBatch:
			args = append(args, "--batch")
		case TargetFull:
			args = append(args, "--full")
		}
		if _, err := s.cfg.Run(ctx, "scancel", append(args, id)...); err != nil {
			rep.Problems = append(rep.Problems, err.Error())
			continue
		}
		s.log.Info("slurm job signalled", "job", id, "signal", signal, "target", s.cfg.Target, "pids", pids)
		h.jobs = append(h.jobs, id)
		rep.Sources = append(rep.Sources, fmt.Sprintf("slurm job %s (scancel --signal=%s, %s)", id, signalName(signal), s.cfg.Target))
		for _, p := range pids {
			if !slices.Contains(h.pids, p) {
				h.pids = append(h.pids, p)
			}
		}
	}
	rep.PIDs = append(rep.PIDs, h.pids...)
	rep.At = time.Now()
	rep.Handle = h
	return rep, nil
}

// pids lists the job's processes on this node (scontrol listpids).
func (s *Slurm) pids(ctx context.Context, job string) ([]int, error) {
	out, err := s.cfg.Run(ctx, "scontrol", "listpids", job)
	if err != nil {
		return nil, err
	}
	return ParseListPIDs(out), nil
}

// ParseListPIDs reads `scontrol listpids`: a header, then a line per
// process whose first field is its PID.
func ParseListPIDs(out []byte) []int {
	var pids []int
	for _, l := range strings.Split(string(out), "\n") {
		f := strings.Fields(l)
		if len(f) == 0 {
			continue
		}
		if p, err := strconv.Atoi(f[0]); err == nil && p > 0 {
			pids = append(pids, p)
		}
	}
	return pids
}

// WaitExit implements agent.Trainer: until the signalled jobs' processes
// here are gone; at killAt the jobs get SIGKILL through scancel.
func (t Trainer) WaitExit(ctx context.Context, sig agent.SignalReport, killAt time.Time) (agent.ExitReport, error) {
	rep := agent.ExitReport{Exited: []int{}}
	h, _ := sig.Handle.(*handle)
	if h == nil {
		rep.At = time.Now()
		return rep, nil
	}
	pending := slices.Clone(h.pids)
	killed := false
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		pending = slices.DeleteFunc(pending, func(p int) bool {
			if unix.Kill(p, 0) == unix.ESRCH {
				rep.Exited = append(rep.Exited, p)
				return true
			}
			return false
		})
		if len(pending) == 0 {
			rep.At = time.Now()
			return rep, nil
		}
		if !killed && !killAt.IsZero() && !time.Now().Before(killAt) {
			killed = true
			t.kill(context.WithoutCancel(ctx), h, pending, &rep)
		}
		select {
		case <-ctx.Done():
			if !killed && !killAt.IsZero() {
				t.kill(context.WithoutCancel(ctx), h, pending, &rep)
			}
			rep.Running = append(rep.Running, pending...)
			rep.At = time.Now()
			return rep, ctx.Err()
		case <-tick.C:
		}
	}
}

func (t Trainer) kill(ctx context.Context, h *handle, pending []int, rep *agent.ExitReport) {
	kctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	for _, id := range h.jobs {
		if _, err := t.S.cfg.Run(kctx, "scancel", "--signal=KILL", "--full", id); err != nil {
			t.S.log.Error("slurm job not killed", "job", id, "err", err)
		}
	}
	rep.Killed = append(rep.Killed, pending...)
	t.S.log.Warn("slurm job processes did not exit in time; sent SIGKILL", "jobs", h.jobs, "pids", pending)
}

// Fatal implements agent.Relay: the node is drained at once, in the
// background (a relay must not block the agent).
func (s *Slurm) Fatal(n agent.Notice) {
	if !s.cfg.Drain {
		return
	}
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		defer cancel()
		if err := s.drain(ctx, n); err != nil {
			s.log.Error("slurm node not drained", "node", s.cfg.Node, "err", err)
		}
	}()
}

// Withdrawn implements agent.Relay: the drain made for n is undone.
func (s *Slurm) Withdrawn(n agent.Notice) {
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		defer cancel()
		if err := s.Resume(ctx, n); err != nil {
			s.log.Error("slurm node not resumed", "node", s.cfg.Node, "err", err)
		}
	}()
}

// Step is the emergency step after the checkpoint's: the jobs signalled on
// this path are requeued, now that their checkpoint is durable (or the
// checkpoint step is over without one: they start again from the last).
type Step struct{ S *Slurm }

// Name implements agent.Step.
func (Step) Name() string { return "slurm requeue" }

// Run implements agent.Step.
func (st Step) Run(ctx context.Context, n agent.Notice) error {
	return st.S.Requeue(ctx)
}
