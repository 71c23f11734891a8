package runlock

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestSecondAcquireNamesTheHolder(t *testing.T) {
	dir := t.TempDir()
	l, err := Acquire(dir)
	if err != nil {
		t.Fatal(err)
	}
	if got := Holder(dir); got != os.Getpid() {
		t.Fatalf("Holder = %d, want %d", got, os.Getpid())
	}
	_, err = Acquire(dir) // a second open file description: flock refuses it as it would another process
	var held *HeldError
	if !errors.As(err, &held) || held.PID != os.Getpid() || !strings.Contains(err.Error(), "pid "+strconv.Itoa(os.Getpid())) {
		t.Fatalf("second Acquire: %v", err)
	}
	l.Release()
	if got := Holder(dir); got != 0 {
		t.Fatalf("Holder after release = %d", got)
	}
	l2, err := Acquire(dir)
	if err != nil {
		t.Fatalf("after release: %v", err)
	}
	l2.Release()
}

// TestHolderKilledFreesTheLock: a holder that dies without releasing (flock
// by a real child process, SIGKILLed) leaves no stale lock.
func TestHolderKilledFreesTheLock(t *testing.T) {
	flock, err := exec.LookPath("flock")
	if err != nil {
		t.Skip("flock(1) not installed")
	}
	dir := t.TempDir()
	p := filepath.Join(dir, Name)
	cmd := exec.Command(flock, "-x", p, "sleep", "60")
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true} // sleep inherits the descriptor: kill both
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		l, err := Acquire(dir)
		var held *HeldError
		if errors.As(err, &held) {
			break
		}
		l.Release() // flock(1) has not taken it yet

		if time.Now().After(deadline) {
			t.Fatalf("the child never held the lock: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	cmd.Wait()
	l, err := Acquire(dir)
	if err != nil {
		t.Fatalf("after the holder was killed: %v", err)
	}
	l.Release()
}
