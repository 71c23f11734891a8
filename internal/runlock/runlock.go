// Package runlock keeps one daemon per run_dir: an exclusive flock(2) on
// run_dir/preemptd.lock, taken before the daemon touches anything else there
// and held for its whole life. The file holds the owner's PID so that a
// second daemon can say who holds it. The kernel drops the lock when the
// owner exits however it exits, so a crash never leaves a stale lock; the
// file itself is never removed (removing it would let a third daemon lock a
// new file while the second still holds the old one).
package runlock

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Name is the lock file's name in run_dir.
const Name = "preemptd.lock"

// HeldError says that another process holds the lock.
type HeldError struct {
	Path string
	PID  int // 0 when the holder has not written it yet
}

func (e *HeldError) Error() string {
	who := "another preemptd"
	if e.PID > 0 {
		who = fmt.Sprintf("another preemptd (pid %d)", e.PID)
	}
	return fmt.Sprintf("%s already runs with this run_dir (it holds %s): stop it first, or give this daemon a run_dir of its own (--run-dir or run_dir in its --config)", who, e.Path)
}

// Lock is a held run_dir lock.
type Lock struct{ f *os.File }

// Acquire takes the lock in dir without waiting; a *HeldError when another
// process has it.
func Acquire(dir string) (*Lock, error) {
	p := filepath.Join(dir, Name)
	f, err := os.OpenFile(p, os.O_RDWR|os.O_CREATE|unix.O_NOFOLLOW, 0o644)
	if err != nil {
		return nil, fmt.Errorf("lock %s: %w", p, err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		defer f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, &HeldError{Path: p, PID: readPID(f)}
		}
		return nil, fmt.Errorf("lock %s: %w", p, err)
	}
	if err := f.Truncate(0); err != nil {
		f.Close()
		return nil, fmt.Errorf("lock %s: %w", p, err)
	}
	if _, err := f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0); err != nil {
		f.Close()
		return nil, fmt.Errorf("lock %s: %w", p, err)
	}
	return &Lock{f: f}, nil
}

// Holder is the PID written in dir's lock file while some process holds the
// lock; 0 when none does (or the file is missing).
func Holder(dir string) int {
	f, err := os.Open(filepath.Join(dir, Name))
	if err != nil {
		return 0
	}
	defer f.Close()
	if err := unix.Flock(int(f.Fd()), unix.LOCK_SH|unix.LOCK_NB); err == nil {
		unix.Flock(int(f.Fd()), unix.LOCK_UN)
		return 0 // nobody holds it
	}
	return readPID(f)
}

func readPID(f *os.File) int {
	b := make([]byte, 32)
	n, _ := f.ReadAt(b, 0)
	pid, _ := strconv.Atoi(strings.TrimSpace(string(b[:n])))
	return pid
}

// Release drops the lock (the file stays).
func (l *Lock) Release() {
	if l == nil || l.f == nil {
		return
	}
	l.f.Close() // closing the last descriptor drops the flock
	l.f = nil
}
