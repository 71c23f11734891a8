package e2e

import (
	"fmt"
	"math/rand/v2"
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

// chaos logs one row of the chaos summary.
func chaos(t *testing.T, fault, outcome string) { peers.Chaos(t, fault, outcome) }

// TestChaosKillDuringEmergency: preemptd is SIGKILLed at a random point of
// the emergency path (the trainer writes a 96 MiB checkpoint on SIGTERM) and
// started again; every round ends with the new checkpoint committed intact
// or the previous one still latest, and no multipart upload left.
func TestChaosKillDuringEmergency(t *testing.T) {
	rounds := 6
	if testing.Short() {
		rounds = 2
	}
	s3 := peers.StartMinIO(t)
	outcomes := map[string]int{}
	for r := range rounds {
		dir := shortDir(t)
		ckpt := filepath.Join(dir, "ckpt")
		tr := startTrainer(t, filepath.Join(dir, "run", agent.NoticeFileName), "--ckpt-dir", ckpt, "--ckpt-bytes", fmt.Sprint(96<<20))
		run := fmt.Sprintf("kill-%d", r)
		cfg := fmt.Sprintf("provider: local\ntrainer: {pid_file: %q}\n", tr.pidFile) +
			strings.Replace(s3Config(s3, ckpt, run), "storage: {", "storage: {threads: 2, ", 1)
		d := startDaemonIn(t, dir, cfg, s3.Env()...)
		waitLatest(t, d.config, s3.Env(), "step-1", 30*time.Second)
		runCLI(t, "simulate", "--config", d.config, "--kind", "preempt", "--in", "60s")
		delay := time.Duration(rand.IntN(1500)) * time.Millisecond
		time.Sleep(delay)
		d.cmd.Process.Signal(syscall.SIGKILL)
		<-d.exited

		d2 := startDaemonIn(t, dir, cfg, s3.Env()...)
		if !tr.exitedWithin(30 * time.Second) {
			t.Fatalf("round %d: the trainer did not finish its save", r)
		}
		want := "step-2" // the trainer saved it: the restarted daemon must commit it
		var latest string
		waitFor(t, 60*time.Second, "the store to settle", func() bool {
			latest, _ = lsJSON(t, d2.config, s3.Env())
			return latest == want
		})
		if n := s3.IncompleteUploads(t); n != 0 {
			t.Fatalf("round %d: %d multipart uploads orphaned", r, n)
		}
		restoreDir := filepath.Join(dir, "restored")
		cmd := exec.Command(bin, "restore", "--config", d2.config, "--to", restoreDir)
		cmd.Env = append(cleanEnv(), s3.Env()...)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("round %d: restore of %s: %v\n%s", r, latest, err, out)
		}
		outcomes[latest]++
		t.Logf("round %d: killed %v after the notice; latest after restart: %s", r, delay, latest)
		d2.cmd.Process.Signal(syscall.SIGINT)
		<-d2.exited
	}
	chaos(t, fmt.Sprintf("process: preemptd SIGKILLed 0–1.5 s into the emergency path, restarted (%d rounds)", rounds),
		fmt.Sprintf("latest after restart: %v; every restore verified; 0 multipart uploads left", outcomes))
}

// TestChaosDoctorStoreErrors: a missing bucket and wrong credentials are
// clear errors from `preemptd doctor` at start.
func TestChaosDoctorStoreErrors(t *testing.T) {
	s3 := peers.StartMinIO(t)
	dir := shortDir(t)
	cases := []struct {
		name, bucket string
		env          []string
		want         string
	}{
		{"missing bucket", "no-such-bucket", s3.Env(), "bucket does not exist"},
		{"wrong credentials", s3.Bucket, []string{"AWS_ACCESS_KEY_ID=wrong", "AWS_SECRET_ACCESS_KEY=wrong-secret"}, "Access Key Id you provided does not exist"},
	}
	for _, c := range cases {
		cfg := filepath.Join(dir, c.name+".yaml")
		writeFile(t, cfg, fmt.Sprintf("provider: local\nrun_dir: %s\nstate_dir: %s\nstorage: {url: \"s3://%s/p\", endpoint: %q, region: us-east-1}\n",
			filepath.Join(dir, "run"), dir, c.bucket, s3.Endpoint))
		cmd := exec.Command(bin, "doctor", "--config", cfg)
		cmd.Env = append(cleanEnv(), c.env...)
		out, err := cmd.CombinedOutput()
		ee, _ := err.(*exec.ExitError)
		if ee == nil || ee.ExitCode() != 1 || !strings.Contains(string(out), "FAIL  store") || !strings.Contains(string(out), c.want) {
			t.Fatalf("%s: doctor exit %v\n%s", c.name, err, out)
		}
	}
	chaos(t, "storage: missing bucket; wrong credentials", "preemptd doctor: FAIL store with the cause, exit 1")
}

// TestChaosSecretsNeverLogged: the store's secret key and a webhook's
// secret path never appear in preemptd's log or status, even when both fail.
func TestChaosSecretsNeverLogged(t *testing.T) {
	const secret = "s3cr3t-AKIA-never-log-me"
	const hookToken = "T000/B000/hook-token-never-log-me"
	dir := shortDir(t)
	ckpt := filepath.Join(dir, "ckpt")
	tr := startTrainer(t, filepath.Join(dir, "run", agent.NoticeFileName), "--ckpt-dir", ckpt)
	d := startDaemonIn(t, dir, fmt.Sprintf(`provider: local
log_level: debug
trainer: {pid_file: %q}
checkpoint: {dir: %q, layout: dcp}
storage: {url: "s3://bucket/p", endpoint: "http://127.0.0.1:1"}
notify: {webhooks: [{url: "http://127.0.0.1:1/services/%s", format: slack}]}
`, tr.pidFile, ckpt, hookToken), "AWS_ACCESS_KEY_ID=AKIA-test", "AWS_SECRET_ACCESS_KEY="+secret)
	runCLI(t, "simulate", "--config", d.config, "--kind", "terminate", "--in", "20s", "--wait")
	out, _ := runCLI(t, "status", "--config", d.config, "--json")
	time.Sleep(500 * time.Millisecond)
	log, _ := os.ReadFile(d.logf)
	for _, s := range []string{secret, hookToken} {
		if strings.Contains(string(log), s) || strings.Contains(out, s) {
			t.Fatalf("%q leaked into the log or status", s)
		}
	}
	if !strings.Contains(string(log), "webhook not delivered") && !strings.Contains(string(log), "checkpoint not committed") {
		t.Fatalf("the failures were not exercised:\n%s", log)
	}
	chaos(t, "security: secret key and webhook token with a failing store and webhook", "neither appears in the log or status")
}
