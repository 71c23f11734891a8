// Package trainer finds the training process(es) preemptd must tell about a
// notice — by pid file, command-line match, systemd unit cgroup, and
// optionally their whole process group — signals them through pidfds (so a
// recycled PID is never hit), and escalates to SIGKILL.
package trainer

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/preemptd/preemptd/agent"
)

// Config says how to find the trainer.
type Config struct {
	// PIDFile holds the trainer's PID.
	PIDFile string
	// Match is a regular expression tested against each process's command
	// line (arguments joined by spaces).
	Match string
	// Unit is a systemd unit whose cgroup holds the trainer, or a cgroup path
	// (containing "/") relative to the cgroup root.
	Unit string
	// Group signals each target's whole process group.
	Group bool
	// ProcRoot and CgroupRoot default to /proc and /sys/fs/cgroup.
	ProcRoot   string
	CgroupRoot string
}

// Extra finds more targets (the GPU processes NVML reports).
type Extra interface {
	PIDs(ctx context.Context) ([]int, error)
}

// Trainer implements agent.Trainer.
type Trainer struct {
	cfg   Config
	match *regexp.Regexp
	extra Extra
	self  int
	log   *slog.Logger
}

// New checks cfg and returns a Trainer. extra may be nil.
func New(cfg Config, extra Extra, log *slog.Logger) (*Trainer, error) {
	if cfg.ProcRoot == "" {
		cfg.ProcRoot = "/proc"
	}
	if cfg.CgroupRoot == "" {
		cfg.CgroupRoot = "/sys/fs/cgroup"
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	t := &Trainer{cfg: cfg, extra: extra, self: os.Getpid(), log: log}
	if cfg.Match != "" {
		re, err := regexp.Compile(cfg.Match)
		if err != nil {
			return nil, fmt.Errorf("trainer.match: %w", err)
		}
		t.match = re
	}
	return t, nil
}

// Configured reports whether any way of finding the trainer is set.
func (t *Trainer) Configured() bool {
	return t.cfg.PIDFile != "" || t.match != nil || t.cfg.Unit != "" || t.extra != nil
}

// ParseSignal accepts "SIGTERM", "TERM", "sigterm" or a number.
func ParseSignal(s string) (unix.Signal, error) {
	s = strings.TrimSpace(s)
	if n, err := strconv.Atoi(s); err == nil {
		if n <= 0 || n > 64 {
			return 0, fmt.Errorf("signal %d is out of range", n)
		}
		return unix.Signal(n), nil
	}
	name := strings.ToUpper(s)
	if !strings.HasPrefix(name, "SIG") {
		name = "SIG" + name
	}
	sig := unix.SignalNum(name)
	if sig == 0 {
		return 0, fmt.Errorf("unknown signal %q (use a name like SIGTERM, SIGUSR1, SIGINT)", s)
	}
	return sig, nil
}

// Find returns the target PIDs, how each set was found, and any problems.
func (t *Trainer) Find(ctx context.Context) (pids []int, sources, problems []string) {
	add := func(src string, found []int, err error) {
		if err != nil {
			problems = append(problems, fmt.Sprintf("%s: %v", src, err))
		}
		n := 0
		for _, p := range found {
			if p > 0 && p != t.self && !slices.Contains(pids, p) {
				pids = append(pids, p)
				n++
			}
		}
		if n > 0 {
			sources = append(sources, src)
		}
	}
	if t.cfg.PIDFile != "" {
		p, err := readPIDFile(t.cfg.PIDFile, t.cfg.ProcRoot)
		add("pid_file", p, err)
	}
	if t.match != nil {
		p, err := t.matchProcs()
		if err == nil && len(p) == 0 {
			err = fmt.Errorf("no process matches %q", t.match)
		}
		add("match", p, err)
	}
	if t.cfg.Unit != "" {
		p, err := t.unitProcs()
		add("unit", p, err)
	}
	if t.extra != nil {
		p, err := t.extra.PIDs(ctx)
		add("gpu_processes", p, err)
	}
	return pids, sources, problems
}

// readPIDFile reads the PID in path. It is honoured only when the file's
// owner may signal that process itself (root, or the process's own user):
// preemptd runs as root and must not signal, on anyone's say-so, a process
// its pid file's writer could not.
func readPIDFile(path, procRoot string) ([]int, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	b, err := io.ReadAll(io.LimitReader(f, 64))
	if err != nil {
		return nil, err
	}
	s := strings.TrimSpace(string(b))
	pid, err := strconv.Atoi(s)
	if err != nil || pid <= 0 {
		return nil, fmt.Errorf("%s does not hold a PID (got %q)", path, truncate(s, 40))
	}
	if err := unix.Kill(pid, 0); errors.Is(err, unix.ESRCH) {
		return nil, fmt.Errorf("%s names PID %d, which is not running", path, pid)
	}
	owner := st.Sys().(*syscall.Stat_t).Uid
	if owner != 0 {
		uids, err := procUIDs(procRoot, pid)
		if err != nil {
			return nil, fmt.Errorf("%s names PID %d: %w", path, pid, err)
		}
		if !slices.Contains(uids, owner) {
			return nil, fmt.Errorf("%s is owned by uid %d, which may not signal PID %d (uids %v); ignored — "+
				"write the pid file as the trainer's user or root", path, owner, pid, uids)
		}
	}
	return []int{pid}, nil
}

// procUIDs returns a process's real and effective uids.
func procUIDs(procRoot string, pid int) ([]uint32, error) {
	b, err := os.ReadFile(filepath.Join(procRoot, strconv.Itoa(pid), "status"))
	if err != nil {
		return nil, err
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "Uid:"); ok {
			var out []uint32
			for _, f := range strings.Fields(v)[:2] {
				u, err := strconv.ParseUint(f, 10, 32)
				if err != nil {
					return nil, fmt.Errorf("status: %q", l)
				}
				out = append(out, uint32(u))
			}
			return out, nil
		}
	}
	return nil, fmt.Errorf("no Uid line in its status")
}

func truncate(s string, n int) string {
	if len(s) > n {
		return s[:n] + "…"
	}
	return s
}

// Cmdline is a process's command line with its arguments joined by
// spaces, as trainer.match sees it ("" for a kernel thread).
func Cmdline(procRoot string, pid int) (string, error) {
	b, err := os.ReadFile(filepath.Join(procRoot, strconv.Itoa(pid), "cmdline"))
	if err != nil {
		return "", err
	}
	return string(bytes.ReplaceAll(bytes.TrimRight(b, "\x00"), []byte{0}, []byte{' '})), nil
}

func (t *Trainer) matchProcs() ([]int, error) {
	ents, err := os.ReadDir(t.cfg.ProcRoot)
	if err != nil {
		return nil, err
	}
	var pids []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == t.self {
			continue
		}
		cmdline, err := Cmdline(t.cfg.ProcRoot, pid)
		if err != nil || cmdline == "" {
			continue // gone, or a kernel thread
		}
		if t.match.MatchString(cmdline) {
			pids = append(pids, pid)
		}
	}
	return pids, nil
}

// unitProcs reads the PIDs in the unit's cgroup and every cgroup below it.
func (t *Trainer) unitProcs() ([]int, error) {
	dir, err := t.unitCgroup()
	if err != nil {
		return nil, err
	}
	var pids []int
	err = filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return nil
		}
		if d.IsDir() {
			p, err := readProcs(filepath.Join(path, "cgroup.procs"))
			if err == nil {
				pids = append(pids, p...)
			}
		}
		return nil
	})
	if err == nil && len(pids) == 0 {
		err = fmt.Errorf("cgroup %s holds no process", dir)
	}
	return pids, err
}

func (t *Trainer) unitCgroup() (string, error) {
	if strings.Contains(t.cfg.Unit, "/") {
		return filepath.Join(t.cfg.CgroupRoot, filepath.Clean("/"+t.cfg.Unit)), nil
	}
	for _, slice := range []string{"system.slice", "user.slice", ""} {
		p := filepath.Join(t.cfg.CgroupRoot, slice, t.cfg.Unit)
		if st, err := os.Stat(p); err == nil && st.IsDir() {
			return p, nil
		}
	}
	// User units live deeper (user.slice/user-1000.slice/user@1000.service/app.slice/…).
	var found string
	stop := errors.New("found")
	_ = filepath.WalkDir(t.cfg.CgroupRoot, func(path string, d fs.DirEntry, err error) error {
		if err != nil || !d.IsDir() {
			return nil
		}
		if strings.Count(strings.TrimPrefix(path, t.cfg.CgroupRoot), "/") > 6 {
			return fs.SkipDir
		}
		if d.Name() == t.cfg.Unit {
			found = path
			return stop
		}
		return nil
	})
	if found == "" {
		return "", fmt.Errorf("no cgroup for unit %q under %s (is the unit running?)", t.cfg.Unit, t.cfg.CgroupRoot)
	}
	return found, nil
}

func readProcs(path string) ([]int, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var pids []int
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if p, err := strconv.Atoi(strings.TrimSpace(sc.Text())); err == nil {
			pids = append(pids, p)
		}
	}
	return pids, sc.Err()
}

// target is one signalled process, held by pidfd where the kernel has them.
type target struct {
	pid int
	fd  int // -1 without a pidfd
}

type handle struct {
	targets []target
	groups  []int
}

// Signal implements agent.Trainer.
func (t *Trainer) Signal(ctx context.Context, signal string) (agent.SignalReport, error) {
	rep := agent.SignalReport{Signal: signal, PIDs: []int{}}
	sig, err := ParseSignal(signal)
	if err != nil {
		return rep, err
	}
	pids, sources, problems := t.Find(ctx)
	rep.Sources, rep.Problems = sources, problems
	if !t.Configured() {
		rep.Problems = append(rep.Problems, "no trainer target configured (set trainer.pid_file, trainer.match or trainer.unit)")
	}
	h := &handle{}
	if t.cfg.Group {
		ownGroup := unix.Getpgrp()
		for _, p := range pids {
			g, err := unix.Getpgid(p)
			if err != nil || slices.Contains(h.groups, g) {
				continue
			}
			if g == ownGroup {
				// Signalling it would signal preemptd itself: only the
				// process is signalled, not its group.
				msg := fmt.Sprintf("trainer.group: process %d is in preemptd's own process group %d; signalling the process alone (start the trainer in its own group, e.g. with setsid)", p, g)
				t.log.Warn(msg)
				rep.Problems = append(rep.Problems, msg)
				continue
			}
			h.groups = append(h.groups, g)
		}
		pids = t.withGroupMembers(pids, h.groups)
	}
	// Open every pidfd first so that the set is fixed before anything dies.
	for _, p := range pids {
		fd, err := unix.PidfdOpen(p, 0)
		if err != nil {
			if errors.Is(err, unix.ESRCH) {
				continue
			}
			fd = -1
		}
		h.targets = append(h.targets, target{pid: p, fd: fd})
	}
	rep.At = time.Now()
	for _, g := range h.groups {
		if err := unix.Kill(-g, sig); err != nil && !errors.Is(err, unix.ESRCH) {
			rep.Problems = append(rep.Problems, fmt.Sprintf("signal group %d: %v", g, err))
		} else {
			rep.Groups = append(rep.Groups, g)
		}
	}
	for _, tg := range h.targets {
		inGroup := t.cfg.Group && slices.Contains(rep.Groups, pgid(tg.pid))
		if !inGroup {
			if err := sendSignal(tg, sig); err != nil {
				if !errors.Is(err, unix.ESRCH) {
					rep.Problems = append(rep.Problems, fmt.Sprintf("signal %d: %v", tg.pid, err))
				}
				continue
			}
		}
		rep.PIDs = append(rep.PIDs, tg.pid)
	}
	rep.Handle = h
	return rep, nil
}

func pgid(pid int) int {
	g, err := unix.Getpgid(pid)
	if err != nil {
		return -1
	}
	return g
}

func (t *Trainer) withGroupMembers(pids, groups []int) []int {
	if len(groups) == 0 {
		return pids
	}
	ents, err := os.ReadDir(t.cfg.ProcRoot)
	if err != nil {
		return pids
	}
	for _, e := range ents {
		p, err := strconv.Atoi(e.Name())
		if err != nil || p == t.self || slices.Contains(pids, p) {
			continue
		}
		if g, err := unix.Getpgid(p); err == nil && slices.Contains(groups, g) {
			pids = append(pids, p)
		}
	}
	return pids
}

func sendSignal(tg target, sig unix.Signal) error {
	if tg.fd >= 0 {
		return unix.PidfdSendSignal(tg.fd, sig, nil, 0)
	}
	return unix.Kill(tg.pid, sig)
}

func alive(tg target) bool {
	if tg.fd >= 0 {
		// A pidfd turns readable when its process exits.
		fds := []unix.PollFd{{Fd: int32(tg.fd), Events: unix.POLLIN}}
		for {
			n, err := unix.Poll(fds, 0)
			if errors.Is(err, unix.EINTR) {
				continue
			}
			if err == nil {
				return n == 0
			}
			break // fall back to kill(0)
		}
	}
	return unix.Kill(tg.pid, 0) == nil
}

const pollEvery = 50 * time.Millisecond

// WaitExit implements agent.Trainer.
func (t *Trainer) WaitExit(ctx context.Context, sig agent.SignalReport, killAt time.Time) (agent.ExitReport, error) {
	h, _ := sig.Handle.(*handle)
	rep := agent.ExitReport{Exited: []int{}}
	if h == nil {
		rep.At = time.Now()
		return rep, nil
	}
	defer func() {
		for _, tg := range h.targets {
			if tg.fd >= 0 {
				unix.Close(tg.fd)
			}
		}
	}()
	pending := slices.Clone(h.targets)
	killed := false
	tick := time.NewTicker(pollEvery)
	defer tick.Stop()
	for {
		pending = slices.DeleteFunc(pending, func(tg target) bool {
			if !alive(tg) {
				rep.Exited = append(rep.Exited, tg.pid)
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
			t.kill(h, pending, &rep)
		}
		select {
		case <-ctx.Done():
			// The deadline is the latest a SIGKILL may come.
			if !killed && !killAt.IsZero() {
				t.kill(h, pending, &rep)
			}
			for _, tg := range pending {
				rep.Running = append(rep.Running, tg.pid)
			}
			rep.At = time.Now()
			return rep, ctx.Err()
		case <-tick.C:
		}
	}
}

func (t *Trainer) kill(h *handle, pending []target, rep *agent.ExitReport) {
	for _, g := range h.groups {
		_ = unix.Kill(-g, unix.SIGKILL)
	}
	for _, tg := range pending {
		if err := sendSignal(tg, unix.SIGKILL); err == nil {
			rep.Killed = append(rep.Killed, tg.pid)
		}
	}
	t.log.Warn("trainer did not exit in time; sent SIGKILL", "pids", rep.Killed)
}
