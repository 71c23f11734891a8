package bench

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/preemptd/preemptd/agent"
)

var (
	buildOnce              sync.Once
	preemptdBin, trainerBn string
	buildDir               string
)

// binaries builds preemptd (as `make build` does) and the stand-in trainer once.
func binaries(t *testing.T) (string, string) {
	t.Helper()
	buildOnce.Do(func() {
		buildDir, _ = os.MkdirTemp("", "preemptd-bench-")
		preemptdBin, trainerBn = filepath.Join(buildDir, "preemptd"), filepath.Join(buildDir, "trainer")
		for out, args := range map[string][]string{
			preemptdBin: {"build", "-trimpath", "-ldflags", "-s -w", "-o", preemptdBin, "../../cmd/preemptd"},
			trainerBn:   {"build", "-o", trainerBn, "../trainer"},
		} {
			cmd := exec.Command("go", args...)
			cmd.Env = append(os.Environ(), "CGO_ENABLED=1", "CGO_CFLAGS=-Wno-deprecated-declarations")
			if b, err := cmd.CombinedOutput(); err != nil {
				panic(fmt.Sprintf("build %s: %v\n%s", out, err, b))
			}
			// On disk, as an installed binary is: pages still dirty from the
			// build would stay resident whatever the process does.
			if f, err := os.Open(out); err == nil {
				f.Sync()
				f.Close()
			}
		}
	})
	return preemptdBin, trainerBn
}

// appendResults adds a section to RESULTS.md (BENCH_OUT) and the test log.
func appendResults(t *testing.T, section string) {
	t.Log("\n" + section)
	if out := os.Getenv("BENCH_OUT"); out != "" {
		f, err := os.OpenFile(out, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		f.WriteString(section + "\n")
	}
}

type proc struct {
	cmd  *exec.Cmd
	done chan struct{}
}

func start(t *testing.T, env []string, name string, args ...string) *proc {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Env = append(cleanEnv(), env...)
	logf, _ := os.Create(filepath.Join(t.TempDir(), filepath.Base(name)+".log"))
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p := &proc{cmd: cmd, done: make(chan struct{})}
	go func() { cmd.Wait(); logf.Close(); close(p.done) }()
	t.Cleanup(p.stop)
	return p
}

func (p *proc) stop() {
	p.cmd.Process.Signal(os.Interrupt)
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		p.cmd.Process.Kill()
		<-p.done
	}
}

func cleanEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "PREEMPTD_") && !strings.HasPrefix(kv, "AWS_EC2_METADATA") && !strings.HasPrefix(kv, "GCE_METADATA") {
			env = append(env, kv)
		}
	}
	return env
}

// daemon starts preemptd with cfg (run_dir/state_dir added) and waits for its socket.
func daemon(t *testing.T, dir, cfg string, env ...string) *proc {
	t.Helper()
	bin, _ := binaries(t)
	path := filepath.Join(dir, "preemptd.yaml")
	os.WriteFile(path, []byte(fmt.Sprintf("run_dir: %s/run\nstate_dir: %s/state\nmetrics: {listen: \"\"}\n%s", dir, dir, cfg)), 0o644)
	p := start(t, env, bin, "run", "--config", path)
	waitFor(t, 10*time.Second, func() bool { _, err := os.Stat(filepath.Join(dir, "run", agent.SocketName)); return err == nil })
	return p
}

func waitFor(t *testing.T, d time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v", d)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// trainer starts the stand-in trainer and returns its pid file and signal log.
func trainer(t *testing.T, dir string, args ...string) (pidFile, log string, p *proc) {
	t.Helper()
	_, tb := binaries(t)
	pidFile, log = filepath.Join(dir, "trainer.pid"), filepath.Join(dir, "signals.jsonl")
	p = start(t, nil, tb, append([]string{"--pid-file", pidFile, "--log", log}, args...)...)
	waitFor(t, 10*time.Second, func() bool { _, err := os.Stat(pidFile); return err == nil })
	return pidFile, log, p
}

// signalAt waits for the trainer's first signal and returns when it came.
func signalAt(t *testing.T, log string, d time.Duration) time.Time {
	t.Helper()
	var at time.Time
	waitFor(t, d, func() bool {
		f, err := os.Open(log)
		if err != nil {
			return false
		}
		defer f.Close()
		sc := bufio.NewScanner(f)
		if sc.Scan() {
			var r struct{ At time.Time }
			if json.Unmarshal(sc.Bytes(), &r) == nil {
				at = r.At
				return true
			}
		}
		return false
	})
	return at
}

func status(t *testing.T, dir string) agent.Status {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	st, err := agent.NewClient(filepath.Join(dir, "run", agent.SocketName)).Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

func post(t *testing.T, url, body string) {
	t.Helper()
	resp, err := http.Post(url, "application/json", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
}
