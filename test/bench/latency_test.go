package bench

import (
	"bufio"
	"fmt"
	"math/rand/v2"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/preemptd/preemptd/test/peers"
)

func pct(ds []time.Duration, p float64) time.Duration {
	s := slices.Clone(ds)
	slices.Sort(s)
	i := int(float64(len(s))*p+0.999999) - 1
	return s[max(i, 0)]
}

// fakemeta starts the GCP or Azure fake as a process of its own.
func fakemeta(t *testing.T, cloud string) string {
	t.Helper()
	bin := t.TempDir() + "/fakemeta"
	if out, err := exec.Command("go", "build", "-o", bin, "../fakes/fakemeta").CombinedOutput(); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	cmd := exec.Command(bin, "--cloud", cloud)
	stdout, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	sc := bufio.NewScanner(stdout)
	sc.Scan()
	return strings.TrimSpace(sc.Text())
}

// TestNoticeToSignalLatency: ≥ 20 notices per cloud at the default poll
// interval (1 s), each to a fresh daemon and trainer, the metadata service
// in a process of its own: AWS's amazon-ec2-metadata-mock, the GCP and Azure
// fakes (test/fakes/fakemeta).
func TestNoticeToSignalLatency(t *testing.T) {
	requireBench(t)
	rounds := 20
	results := map[string][]time.Duration{}

	// AWS: AEMM serves the notice from a given second; the daemon starts at
	// a random moment of the second before, so that polls are not aligned.
	aemm := peers.Require(t, "ec2-metadata-mock", peers.AEMMVersion)
	for r := range rounds {
		dir := t.TempDir()
		trigger := time.Now().Add(2 * time.Second).Truncate(time.Second)
		port := peers.FreePort(t)
		a := start(t, []string{"HOME=" + dir}, aemm, "-n", "127.0.0.1", "-p", fmt.Sprint(port), "-I",
			"--mock-trigger-time", trigger.UTC().Format(time.RFC3339), "spot")
		peers.WaitListening(t, fmt.Sprintf("127.0.0.1:%d", port), 10*time.Second)
		time.Sleep(time.Duration(rand.IntN(900)) * time.Millisecond)
		pid, log, tr := trainer(t, dir)
		d := daemon(t, dir, fmt.Sprintf("provider: aws\naws: {endpoint: \"http://127.0.0.1:%d\"}\ntrainer: {pid_file: %q}\n", port, pid))
		at := signalAt(t, log, 10*time.Second)
		results["aws"] = append(results["aws"], at.Sub(trigger))
		d.stop()
		tr.stop()
		a.stop()
		_ = r
	}

	// GCP: preempted flips to TRUE while the daemon's hanging GET waits.
	gcp := fakemeta(t, "gcp")
	for range rounds {
		dir := t.TempDir()
		post(t, "http://"+gcp+"/control/gcp?path=instance/preempted&value=FALSE", "")
		pid, log, tr := trainer(t, dir)
		d := daemon(t, dir, fmt.Sprintf("provider: gcp\ngcp: {endpoint: %q}\ntrainer: {pid_file: %q}\n", gcp, pid))
		time.Sleep(300 * time.Millisecond) // the subscriptions are hanging by now
		flipped := time.Now()
		post(t, "http://"+gcp+"/control/gcp?path=instance/preempted&value=TRUE", "")
		results["gcp"] = append(results["gcp"], signalAt(t, log, 10*time.Second).Sub(flipped))
		d.stop()
		tr.stop()
	}

	// Azure: this VM's Preempt event appears at a random moment.
	az := fakemeta(t, "azure")
	for r := range rounds {
		dir := t.TempDir()
		post(t, "http://"+az+"/control/azure", "[]")
		pid, log, tr := trainer(t, dir)
		d := daemon(t, dir, fmt.Sprintf("provider: azure\nazure: {endpoint: \"http://%s\", ack: false}\ntrainer: {pid_file: %q}\n", az, pid))
		time.Sleep(time.Duration(1000+rand.IntN(1000)) * time.Millisecond)
		nb := time.Now().Add(30 * time.Second).UTC().Format(time.RFC1123)
		posted := time.Now()
		post(t, "http://"+az+"/control/azure", fmt.Sprintf(`[{"EventId":"ev-%d","EventType":"Preempt","ResourceType":"VirtualMachine","Resources":["vm-bench"],"EventStatus":"Scheduled","NotBefore":%q}]`, r, nb))
		results["azure"] = append(results["azure"], signalAt(t, log, 10*time.Second).Sub(posted))
		d.stop()
		tr.stop()
	}

	var b strings.Builder
	fmt.Fprintf(&b, "### Notice → signal latency (%s)\n\n", time.Now().UTC().Format("2006-01-02"))
	fmt.Fprintf(&b, "Machine: %s. %d notices per cloud, each to a fresh preemptd and trainer process; the metadata service in a process of its own (AWS: amazon-ec2-metadata-mock %s, IMDSv2 only; GCP and Azure: test/fakes/fakemeta). Measured from the moment the notice became visible to the moment the trainer's signal handler ran. poll_interval 1 s (the default).\n\n", machine(), rounds, peers.AEMMVersion)
	fmt.Fprintf(&b, "| cloud | mechanism | p50 | p95 | max | mean | theoretical mean |\n|---|---|---|---|---|---|---|\n")
	for _, c := range []struct{ name, how, bound string }{
		{"aws", "poll every 1 s", "≈ 500 ms (half the poll interval)"},
		{"gcp", "hanging GET (wait_for_change)", "one long-poll round trip (≈ 1 ms on loopback)"},
		{"azure", "poll every 1 s", "≈ 500 ms (half the poll interval)"},
	} {
		ds := results[c.name]
		var sum time.Duration
		for _, d := range ds {
			sum += d
		}
		fmt.Fprintf(&b, "| %s | %s | %v | %v | %v | %v | %s |\n", c.name, c.how, pct(ds, .5).Round(time.Millisecond/10),
			pct(ds, .95).Round(time.Millisecond/10), pct(ds, 1).Round(time.Millisecond/10), (sum / time.Duration(len(ds))).Round(time.Millisecond/10), c.bound)
	}
	appendResults(t, b.String())

}
