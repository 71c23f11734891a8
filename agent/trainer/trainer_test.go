package trainer

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestMain doubles as the helper trainer: with PREEMPTD_HELPER set it
// records every signal it receives as a line in $SIGNAL_LOG and exits on
// SIGTERM unless told to ignore it.
func TestMain(m *testing.M) {
	if os.Getenv("PREEMPTD_HELPER") == "trainer" {
		helper()
		return
	}
	os.Exit(m.Run())
}

func helper() {
	log, err := os.OpenFile(os.Getenv("SIGNAL_LOG"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		os.Exit(3)
	}
	ignore := os.Getenv("IGNORE_TERM") == "1"
	ch := make(chan os.Signal, 8)
	signal.Notify(ch, syscall.SIGTERM, syscall.SIGUSR1, syscall.SIGUSR2, syscall.SIGINT)
	fmt.Fprintf(log, "ready %d\n", os.Getpid())
	for s := range ch {
		fmt.Fprintf(log, "%d %s\n", os.Getpid(), unix.SignalName(s.(syscall.Signal)))
		log.Sync()
		if s == syscall.SIGTERM && !ignore {
			os.Exit(0)
		}
	}
}

type proc struct {
	cmd *exec.Cmd
	log string
}

// startHelper starts a helper trainer; setpgid puts it in a group of its own.
func startHelper(t *testing.T, ignoreTerm, setpgid bool, args ...string) *proc {
	t.Helper()
	log := filepath.Join(t.TempDir(), "signals.log")
	cmd := exec.Command(os.Args[0], append([]string{"-test.run=^$"}, args...)...)
	cmd.Env = append(os.Environ(), "PREEMPTD_HELPER=trainer", "SIGNAL_LOG="+log)
	if ignoreTerm {
		cmd.Env = append(cmd.Env, "IGNORE_TERM=1")
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: setpgid}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	return watchProc(t, cmd, log)
}

// watchProc reaps cmd in the background (so an exit is seen at once) and
// kills it at cleanup.
func watchProc(t *testing.T, cmd *exec.Cmd, log string) *proc {
	t.Helper()
	p := &proc{cmd: cmd, log: log}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-done
	})
	waitFor(t, func() bool { return len(p.lines()) > 0 })
	return p
}

func (p *proc) lines() []string {
	f, err := os.Open(p.log)
	if err != nil {
		return nil
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		out = append(out, sc.Text())
	}
	return out
}

func (p *proc) signals() []string {
	var out []string
	for _, l := range p.lines() {
		if f := strings.Fields(l); len(f) == 2 && f[0] != "ready" {
			out = append(out, f[1])
		}
	}
	return out
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met within 10s")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestParseSignal(t *testing.T) {
	tests := []struct {
		in   string
		want unix.Signal
		ok   bool
	}{
		{"SIGTERM", unix.SIGTERM, true},
		{"term", unix.SIGTERM, true},
		{"SIGUSR1", unix.SIGUSR1, true},
		{"usr2", unix.SIGUSR2, true},
		{"10", unix.Signal(10), true},
		{"SIGFOO", 0, false},
		{"0", 0, false},
		{"", 0, false},
	}
	for _, tt := range tests {
		got, err := ParseSignal(tt.in)
		if (err == nil) != tt.ok || got != tt.want {
			t.Errorf("ParseSignal(%q) = %v, %v", tt.in, got, err)
		}
	}
}

func TestSignalByPIDFile(t *testing.T) {
	p := startHelper(t, false, false)
	pidFile := filepath.Join(t.TempDir(), "train.pid")
	os.WriteFile(pidFile, []byte(strconv.Itoa(p.cmd.Process.Pid)+"\n"), 0o644)
	tr, err := New(Config{PIDFile: pidFile}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	rep, err := tr.Signal(t.Context(), "SIGUSR1")
	if err != nil || !slices.Equal(rep.PIDs, []int{p.cmd.Process.Pid}) || !slices.Equal(rep.Sources, []string{"pid_file"}) {
		t.Fatalf("Signal = %+v, %v", rep, err)
	}
	waitFor(t, func() bool { return slices.Equal(p.signals(), []string{"SIGUSR1"}) })
}

func TestSignalByMatchAndWaitExit(t *testing.T) {
	marker := fmt.Sprintf("marker-%d", time.Now().UnixNano())
	p := startHelper(t, false, false, marker)
	tr, _ := New(Config{Match: regexpQuote(marker)}, nil, nil)
	rep, err := tr.Signal(t.Context(), "SIGTERM")
	if err != nil || !slices.Equal(rep.PIDs, []int{p.cmd.Process.Pid}) {
		t.Fatalf("Signal = %+v, %v", rep, err)
	}
	ex, err := tr.WaitExit(t.Context(), rep, time.Time{})
	if err != nil || !slices.Equal(ex.Exited, []int{p.cmd.Process.Pid}) || len(ex.Killed) != 0 {
		t.Fatalf("WaitExit = %+v, %v", ex, err)
	}
	if got := p.signals(); !slices.Equal(got, []string{"SIGTERM"}) {
		t.Fatalf("trainer saw %v", got)
	}
}

func regexpQuote(s string) string { return strings.ReplaceAll(s, "-", `\-`) }

// TestEscalation: a trainer that ignores SIGTERM is SIGKILLed at kill time.
func TestEscalation(t *testing.T) {
	marker := fmt.Sprintf("stubborn-%d", time.Now().UnixNano())
	p := startHelper(t, true, false, marker)
	tr, _ := New(Config{Match: marker}, nil, nil)
	rep, err := tr.Signal(t.Context(), "SIGTERM")
	if err != nil || len(rep.PIDs) != 1 {
		t.Fatalf("Signal = %+v, %v", rep, err)
	}
	ex, err := tr.WaitExit(t.Context(), rep, time.Now().Add(300*time.Millisecond))
	if err != nil || !slices.Equal(ex.Killed, []int{p.cmd.Process.Pid}) || !slices.Equal(ex.Exited, []int{p.cmd.Process.Pid}) {
		t.Fatalf("WaitExit = %+v, %v; want killed then exited", ex, err)
	}
	if got := p.signals(); !slices.Equal(got, []string{"SIGTERM"}) {
		t.Fatalf("trainer saw %v, want only the SIGTERM it ignored", got)
	}
}

// TestKillAtDeadline: when the wait's context ends before the kill time,
// SIGKILL still goes out: the deadline is the latest it may come.
func TestKillAtDeadline(t *testing.T) {
	marker := fmt.Sprintf("late-%d", time.Now().UnixNano())
	p := startHelper(t, true, false, marker)
	tr, _ := New(Config{Match: marker}, nil, nil)
	rep, _ := tr.Signal(t.Context(), "SIGTERM")
	ctx, cancel := context.WithTimeout(t.Context(), 200*time.Millisecond)
	defer cancel()
	ex, _ := tr.WaitExit(ctx, rep, time.Now().Add(time.Hour))
	if !slices.Equal(ex.Killed, []int{p.cmd.Process.Pid}) {
		t.Fatalf("WaitExit = %+v, want a SIGKILL at the deadline", ex)
	}
	waitFor(t, func() bool { return unix.Kill(p.cmd.Process.Pid, 0) != nil })
}

func TestGroupSignalsEveryMember(t *testing.T) {
	leader := startHelper(t, false, true)
	// A second process joins the leader's group, as torchrun's workers do.
	member := startHelperInGroup(t, leader.cmd.Process.Pid)
	pidFile := filepath.Join(t.TempDir(), "train.pid")
	os.WriteFile(pidFile, []byte(strconv.Itoa(leader.cmd.Process.Pid)), 0o644)
	tr, _ := New(Config{PIDFile: pidFile, Group: true}, nil, nil)
	rep, err := tr.Signal(t.Context(), "SIGUSR2")
	if err != nil || !slices.Equal(rep.Groups, []int{leader.cmd.Process.Pid}) {
		t.Fatalf("Signal = %+v, %v", rep, err)
	}
	if !slices.Contains(rep.PIDs, member.cmd.Process.Pid) {
		t.Fatalf("PIDs %v lack the group member %d", rep.PIDs, member.cmd.Process.Pid)
	}
	for _, p := range []*proc{leader, member} {
		waitFor(t, func() bool { return slices.Equal(p.signals(), []string{"SIGUSR2"}) })
	}
}

func startHelperInGroup(t *testing.T, pgid int) *proc {
	t.Helper()
	log := filepath.Join(t.TempDir(), "signals.log")
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "PREEMPTD_HELPER=trainer", "SIGNAL_LOG="+log)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pgid: pgid}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	return watchProc(t, cmd, log)
}

func TestNoTargetIsReportedNotFatal(t *testing.T) {
	tr, _ := New(Config{Match: "no-such-process-anywhere-[0-9]{40}"}, nil, nil)
	rep, err := tr.Signal(t.Context(), "SIGTERM")
	if err != nil || len(rep.PIDs) != 0 || len(rep.Problems) == 0 {
		t.Fatalf("Signal = %+v, %v; want no PIDs and a problem", rep, err)
	}
	if _, err := tr.WaitExit(t.Context(), rep, time.Now()); err != nil {
		t.Fatal(err)
	}
	empty, _ := New(Config{}, nil, nil)
	rep, _ = empty.Signal(t.Context(), "SIGTERM")
	if len(rep.Problems) == 0 || !strings.Contains(rep.Problems[0], "trainer.pid_file") {
		t.Fatalf("unconfigured trainer: %+v", rep)
	}
}

func TestPIDFileProblems(t *testing.T) {
	dir := t.TempDir()
	garbage := filepath.Join(dir, "garbage.pid")
	os.WriteFile(garbage, []byte("not a pid"), 0o644)
	stale := filepath.Join(dir, "stale.pid")
	os.WriteFile(stale, []byte("4194303"), 0o644)
	for _, tc := range []struct{ path, want string }{
		{garbage, "does not hold a PID"},
		{stale, "not running"},
		{filepath.Join(dir, "missing.pid"), "no such file"},
	} {
		tr, _ := New(Config{PIDFile: tc.path}, nil, nil)
		pids, _, problems := tr.Find(t.Context())
		if len(pids) != 0 || len(problems) != 1 || !strings.Contains(problems[0], tc.want) {
			t.Errorf("%s: pids %v problems %v, want %q", tc.path, pids, problems, tc.want)
		}
	}
}

func TestUnitCgroup(t *testing.T) {
	root := t.TempDir()
	unitDir := filepath.Join(root, "system.slice", "train.service")
	sub := filepath.Join(unitDir, "payload")
	os.MkdirAll(sub, 0o755)
	os.WriteFile(filepath.Join(unitDir, "cgroup.procs"), []byte("101\n102\n"), 0o644)
	os.WriteFile(filepath.Join(sub, "cgroup.procs"), []byte("103\n"), 0o644)
	userUnit := filepath.Join(root, "user.slice", "user-1000.slice", "user@1000.service", "app.slice", "job.service")
	os.MkdirAll(userUnit, 0o755)
	os.WriteFile(filepath.Join(userUnit, "cgroup.procs"), []byte("201\n"), 0o644)
	for _, tc := range []struct {
		unit string
		want []int
	}{
		{"train.service", []int{101, 102, 103}},
		{"job.service", []int{201}},
		{"system.slice/train.service/payload", []int{103}},
	} {
		tr, _ := New(Config{Unit: tc.unit, CgroupRoot: root}, nil, nil)
		got, err := tr.unitProcs()
		slices.Sort(got)
		if err != nil || !slices.Equal(got, tc.want) {
			t.Errorf("unit %s: %v, %v; want %v", tc.unit, got, err, tc.want)
		}
	}
	tr, _ := New(Config{Unit: "absent.service", CgroupRoot: root}, nil, nil)
	if _, err := tr.unitProcs(); err == nil || !strings.Contains(err.Error(), "is the unit running") {
		t.Fatalf("absent unit: %v", err)
	}
}

// TestGroupOfPreemptdItselfIsSaidNotSkippedSilently: with trainer.group, a
// target in preemptd's own process group is signalled alone (signalling the
// group would signal preemptd) and the report says why.
func TestGroupOfPreemptdItselfIsSaidNotSkippedSilently(t *testing.T) {
	p := startHelper(t, false, false) // same process group as this test
	pidFile := filepath.Join(t.TempDir(), "train.pid")
	os.WriteFile(pidFile, []byte(strconv.Itoa(p.cmd.Process.Pid)+"\n"), 0o644)
	tr, err := New(Config{PIDFile: pidFile, Group: true}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	rep, err := tr.Signal(t.Context(), "SIGUSR1")
	if err != nil || !slices.Equal(rep.PIDs, []int{p.cmd.Process.Pid}) || len(rep.Groups) != 0 {
		t.Fatalf("Signal = %+v, %v", rep, err)
	}
	if !slices.ContainsFunc(rep.Problems, func(s string) bool { return strings.Contains(s, "own process group") }) {
		t.Fatalf("problems = %v, want the skipped group named", rep.Problems)
	}
	waitFor(t, func() bool { return slices.Equal(p.signals(), []string{"SIGUSR1"}) })
}

// TestPIDFileOwnerMustMaySignal: a pid file written by a user who may not
// signal the process it names is ignored (root is no confused deputy); the
// same file owned by root, or by the process's own user, is honoured.
func TestPIDFileOwnerMustMaySignal(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root to own files as another user")
	}
	p := startHelper(t, false, false) // runs as root
	pidFile := filepath.Join(t.TempDir(), "train.pid")
	os.WriteFile(pidFile, []byte(strconv.Itoa(p.cmd.Process.Pid)+"\n"), 0o644)
	os.Chown(pidFile, 65534, 65534) // nobody may not signal a root process
	tr, _ := New(Config{PIDFile: pidFile}, nil, nil)
	pids, _, problems := tr.Find(t.Context())
	if len(pids) != 0 || !slices.ContainsFunc(problems, func(s string) bool { return strings.Contains(s, "may not signal") }) {
		t.Fatalf("a nobody-owned pid file naming a root process: pids %v, problems %v", pids, problems)
	}
	os.Chown(pidFile, 0, 0)
	if pids, _, problems := tr.Find(t.Context()); !slices.Equal(pids, []int{p.cmd.Process.Pid}) {
		t.Fatalf("root-owned pid file: %v %v", pids, problems)
	}
}
