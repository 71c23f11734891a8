// Package e2e runs the real preemptd binary against real peers: AWS's
// amazon-ec2-metadata-mock, metadata servers written from GCP's and Azure's
// documented behaviour, and a trainer process that records the signals it
// receives.
package e2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/preemptd/preemptd/agent"
	"github.com/preemptd/preemptd/test/peers"
)

var (
	bin        string // the preemptd binary under test
	trainerBin string
	aemmBin    string // amazon-ec2-metadata-mock, or "" when not installed
)

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "preemptd-e2e-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	os.Chmod(dir, 0o755) // tests run the binaries as other users too
	bin = filepath.Join(dir, "preemptd")
	trainerBin = filepath.Join(dir, "trainer")
	for out, pkg := range map[string]string{bin: "../../cmd/preemptd", trainerBin: "../trainer"} {
		cmd := exec.Command("go", "build", "-o", out, pkg)
		cmd.Stderr = os.Stderr
		if err := cmd.Run(); err != nil {
			fmt.Fprintln(os.Stderr, "build", pkg, err)
			os.Exit(1)
		}
	}
	aemmBin = findAEMM()
	code := m.Run()
	if f := os.Getenv("PREEMPTD_FRAMEWORK_TABLE"); f != "" && len(fwResults) > 0 {
		if err := writeFrameworkTable(f); err != nil {
			fmt.Fprintln(os.Stderr, "frameworks table:", err)
			code = 1
		}
	}
	os.RemoveAll(dir)
	os.Exit(code)
}

func findAEMM() string { return peers.Tool("ec2-metadata-mock", peers.AEMMVersion) }

func requireAEMM(t *testing.T) {
	t.Helper()
	peers.Require(t, "ec2-metadata-mock", peers.AEMMVersion)
}

// shortDir is a temporary directory with a path short enough for a socket.
func shortDir(t *testing.T) string {
	t.Helper()
	d, err := os.MkdirTemp("", "pd")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// startAEMM runs amazon-ec2-metadata-mock with args and waits for it.
func startAEMM(t *testing.T, args ...string) string {
	t.Helper()
	requireAEMM(t)
	port := peers.FreePort(t)
	home := t.TempDir()
	cmd := exec.Command(aemmBin, append([]string{"-n", "127.0.0.1", "-p", fmt.Sprint(port)}, args...)...)
	cmd.Env = append(os.Environ(), "HOME="+home)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	url := fmt.Sprintf("http://127.0.0.1:%d", port)
	waitFor(t, 10*time.Second, "AEMM to listen", func() bool {
		c, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port))
		if err == nil {
			c.Close()
		}
		return err == nil
	})
	return url
}

func waitFor(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// daemon is a running preemptd.
type daemon struct {
	t      *testing.T
	cmd    *exec.Cmd
	dir    string
	runDir string
	logf   string
	config string
	exited chan struct{}
	err    error
}

// startDaemon writes cfg (YAML, with run_dir and state_dir added) and runs
// `preemptd run --config` with it.
func startDaemon(t *testing.T, cfg string, env ...string) *daemon {
	t.Helper()
	return startDaemonIn(t, shortDir(t), cfg, env...)
}

// startDaemonIn is startDaemon with run_dir at dir/run.
func startDaemonIn(t *testing.T, dir, cfg string, env ...string) *daemon {
	t.Helper()
	d := &daemon{t: t, dir: dir, runDir: filepath.Join(dir, "run"), logf: filepath.Join(dir, "preemptd.log"),
		config: filepath.Join(dir, "preemptd.yaml"), exited: make(chan struct{})}
	full := fmt.Sprintf("run_dir: %s\nstate_dir: %s\n%s", d.runDir, filepath.Join(dir, "state"), cfg)
	if err := os.WriteFile(d.config, []byte(full), 0o644); err != nil {
		t.Fatal(err)
	}
	logFile, err := os.Create(d.logf)
	if err != nil {
		t.Fatal(err)
	}
	d.cmd = exec.Command(bin, "run", "--config", d.config)
	d.cmd.Stdout, d.cmd.Stderr = logFile, logFile
	d.cmd.Env = append(cleanEnv(), env...)
	if err := d.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { d.err = d.cmd.Wait(); logFile.Close(); close(d.exited) }()
	t.Cleanup(func() {
		d.cmd.Process.Signal(syscall.SIGINT)
		select {
		case <-d.exited:
		case <-time.After(10 * time.Second):
			d.cmd.Process.Kill()
			<-d.exited
		}
		if t.Failed() {
			b, _ := os.ReadFile(d.logf)
			t.Logf("preemptd log:\n%s", b)
		}
	})
	waitFor(t, 10*time.Second, "the daemon's socket", func() bool {
		select {
		case <-d.exited:
			b, _ := os.ReadFile(d.logf)
			t.Fatalf("preemptd exited at start: %v\n%s", d.err, b)
		default:
		}
		_, err := os.Stat(filepath.Join(d.runDir, agent.SocketName))
		return err == nil
	})
	return d
}

// cleanEnv drops the variables that would steer preemptd away from the
// test's endpoints and credentials.
func cleanEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if strings.HasPrefix(kv, "PREEMPTD_") || strings.HasPrefix(kv, "AWS_") || strings.HasPrefix(kv, "GCE_METADATA") ||
			strings.HasPrefix(kv, "AZURE_") || strings.HasPrefix(kv, "GOOGLE_APPLICATION_CREDENTIALS=") {
			continue
		}
		env = append(env, kv)
	}
	return env
}

// stepError is the error of the emergency path's step name ("" if it
// succeeded or never ran).
func stepError(st agent.Status, name string) string {
	for _, s := range st.Emergency.Steps {
		if s.Name == name {
			return s.Error
		}
	}
	return ""
}

func (d *daemon) client() *agent.Client {
	return agent.NewClient(filepath.Join(d.runDir, agent.SocketName))
}

func (d *daemon) status() agent.Status {
	d.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	st, err := d.client().Status(ctx)
	if err != nil {
		d.t.Fatalf("status: %v", err)
	}
	return st
}

func (d *daemon) waitEmergencyDone() agent.Status {
	d.t.Helper()
	var st agent.Status
	waitFor(d.t, 60*time.Second, "the emergency path to finish", func() bool {
		st = d.status()
		return st.Emergency != nil && !st.Emergency.FinishedAt.IsZero()
	})
	return st
}

// drill simulates a notice and waits until its own emergency path has
// finished (an earlier drill's path may be in the status); it returns the
// status then and when the notice was sent.
func (d *daemon) drill(req agent.SimulateRequest) (agent.Status, time.Time) {
	d.t.Helper()
	noticed := time.Now()
	n, err := d.client().Simulate(d.t.Context(), req)
	if err != nil {
		d.t.Fatal(err)
	}
	var st agent.Status
	waitFor(d.t, 100*time.Second, "the emergency path to finish", func() bool {
		st = d.status()
		return st.Emergency != nil && st.Emergency.Notice.ID == n.ID && !st.Emergency.FinishedAt.IsZero()
	})
	return st, noticed
}

// logLines parses the daemon's log: every line must be a JSON object.
func (d *daemon) logLines() []map[string]any {
	d.t.Helper()
	b, err := os.ReadFile(d.logf)
	if err != nil {
		d.t.Fatal(err)
	}
	var out []map[string]any
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		var m map[string]any
		if err := json.Unmarshal(sc.Bytes(), &m); err != nil {
			d.t.Fatalf("log line is not JSON: %q", sc.Text())
		}
		out = append(out, m)
	}
	return out
}

func (d *daemon) noticeFile() (agent.NoticeFile, bool) {
	b, err := os.ReadFile(filepath.Join(d.runDir, agent.NoticeFileName))
	if err != nil {
		return agent.NoticeFile{}, false
	}
	var f agent.NoticeFile
	if err := json.Unmarshal(b, &f); err != nil {
		d.t.Fatalf("notice.json: %v", err)
	}
	return f, true
}

// trainer is a running stand-in trainer.
type trainer struct {
	t       *testing.T
	cmd     *exec.Cmd
	pidFile string
	log     string
	exited  chan struct{}
}

type record struct {
	Signal string           `json:"signal"`
	At     time.Time        `json:"at"`
	PID    int              `json:"pid"`
	Notice agent.NoticeFile `json:"notice"`
}

func startTrainer(t *testing.T, noticePath string, args ...string) *trainer {
	t.Helper()
	dir := shortDir(t)
	tr := &trainer{t: t, pidFile: filepath.Join(dir, "trainer.pid"), log: filepath.Join(dir, "signals.jsonl"), exited: make(chan struct{})}
	tr.cmd = exec.Command(trainerBin, append([]string{"--pid-file", tr.pidFile, "--log", tr.log, "--notice", noticePath}, args...)...)
	if err := tr.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { tr.cmd.Wait(); close(tr.exited) }()
	t.Cleanup(func() {
		tr.cmd.Process.Kill()
		<-tr.exited
	})
	waitFor(t, 5*time.Second, "the trainer's pid file", func() bool {
		_, err := os.Stat(tr.pidFile)
		return err == nil
	})
	return tr
}

func (tr *trainer) records() []record {
	b, _ := os.ReadFile(tr.log)
	var out []record
	for _, l := range bytes.Split(bytes.TrimSpace(b), []byte("\n")) {
		if len(l) == 0 {
			continue
		}
		var r record
		if err := json.Unmarshal(l, &r); err != nil {
			tr.t.Fatalf("trainer log: %v: %s", err, l)
		}
		out = append(out, r)
	}
	return out
}

func (tr *trainer) waitSignal(d time.Duration) record {
	tr.t.Helper()
	var r record
	waitFor(tr.t, d, "the trainer's signal", func() bool {
		rs := tr.records()
		if len(rs) > 0 {
			r = rs[0]
		}
		return len(rs) > 0
	})
	return r
}

func (tr *trainer) exitedWithin(d time.Duration) bool {
	select {
	case <-tr.exited:
		return true
	case <-time.After(d):
		return false
	}
}

// processGone reports whether pid has exited (gone, or a zombie not yet reaped).
func processGone(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return true
	}
	// The state follows the parenthesised command name.
	s := string(b)
	if i := strings.LastIndexByte(s, ')'); i >= 0 && i+2 < len(s) {
		return s[i+2] == 'Z' || s[i+2] == 'X'
	}
	return false
}
