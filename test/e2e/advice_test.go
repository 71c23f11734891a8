package e2e

import (
	"bufio"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/preemptd/preemptd/advice"
	"github.com/preemptd/preemptd/agent"
	"github.com/preemptd/preemptd/fleet"
	"github.com/preemptd/preemptd/test/peers"
)

type savedLine struct {
	Step  int     `json:"step"`
	Start float64 `json:"start"`
	End   float64 `json:"end"`
	SaveS float64 `json:"save_s"`
	Why   string  `json:"why"`
}

func readSaves(t *testing.T, path string) []savedLine {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		return nil
	}
	defer f.Close()
	var out []savedLine
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		var l savedLine
		if json.Unmarshal(sc.Bytes(), &l) == nil {
			out = append(out, l)
		}
	}
	return out
}

func readAdviceFile(t *testing.T, runDir string) advice.Advice {
	t.Helper()
	var a advice.Advice
	b, err := os.ReadFile(filepath.Join(runDir, agent.AdviceFileName))
	if err == nil {
		err = json.Unmarshal(b, &a)
	}
	if err != nil {
		t.Fatalf("advice.json: %v", err)
	}
	return a
}

// checkFormula: the published interval is √(2·C·M/(1−p)) of the published
// inputs (when no floor or cap applies).
func checkFormula(t *testing.T, a advice.Advice) {
	t.Helper()
	in := a.Inputs
	want := math.Sqrt(2 * in.SaveSeconds * in.MTBIHours * 3600 / (1 - in.Committed))
	if math.Abs(a.CheckpointEvery-want) > 1 {
		t.Fatalf("interval %.0fs, but √(2·%.2f·%.0f/(1−%.2f)) = %.1fs", a.CheckpointEvery, in.SaveSeconds, in.MTBIHours*3600, in.Committed, want)
	}
}

// TestAdviceFollowsSaveTime: a real trainer process (Python, the helper's
// should_checkpoint() and SIGUSR1 as trainer.checkpoint_signal) saves when
// preemptd says; preemptd measures each save from its first write to its
// .metadata. When the saves get four times slower, the advised interval
// follows (√4 = 2× longer) and so do the trainer's checkpoints. The drill
// that ends it leaves an event record carrying the measured save time, read
// back by `preemptd report` and `preemptd advise`.
func TestAdviceFollowsSaveTime(t *testing.T) {
	dir := shortDir(t)
	ckpt := filepath.Join(dir, "ckpt")
	control := filepath.Join(dir, "save_s")
	saves := filepath.Join(dir, "saves.jsonl")
	pidFile := filepath.Join(dir, "trainer.pid")
	os.MkdirAll(ckpt, 0o755)
	writeFile(t, control, "0.2")
	// 60 interruptions an hour: M = 60 s, so that the intervals are seconds.
	d := startDaemonIn(t, dir, fmt.Sprintf(`provider: local
checkpoint: {dir: %q, layout: dcp}
trainer: {pid_file: %q, checkpoint_signal: SIGUSR1}
advice: {interruptions_per_hour: 60, fleet_poll: 0}
`, ckpt, pidFile))
	wd, _ := os.Getwd()
	py := exec.Command(peers.Python, "-u", "testdata/advised_trainer.py", ckpt, pidFile, saves, control)
	py.Env = append(cleanEnv(), "PYTHONPATH="+filepath.Join(wd, "..", "..", "clients", "python"), "PREEMPTD_RUN_DIR="+d.runDir)
	out, _ := os.Create(filepath.Join(dir, "trainer.log"))
	py.Stdout, py.Stderr = out, out
	if err := py.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { py.Wait(); close(exited) }()
	t.Cleanup(func() {
		py.Process.Kill()
		<-exited
		if t.Failed() {
			b, _ := os.ReadFile(filepath.Join(dir, "trainer.log"))
			t.Logf("trainer:\n%s", b)
		}
	})

	advised := func(n int) []savedLine {
		var got []savedLine
		waitFor(t, 2*time.Minute, fmt.Sprintf("%d advised checkpoints", n), func() bool {
			got = nil
			for _, l := range readSaves(t, saves) {
				if l.Why == "advised" {
					got = append(got, l)
				}
			}
			return len(got) >= n
		})
		return got
	}
	// preemptd measures a save from when it sees its first write, which on
	// a busy machine comes a little after the write: a save of 0.2 s can
	// measure 0.199 s. The bounds below allow for that.
	fast := advised(3)
	a1 := readAdviceFile(t, d.runDir)
	if a1.Inputs.SaveMeasured < 3 || a1.Inputs.SaveSeconds < 0.15 || a1.Inputs.SaveSeconds > 2 || math.Abs(a1.Inputs.MTBIHours*3600-60) > 0.01 {
		t.Fatalf("advice after fast saves: %+v", a1.Inputs)
	}
	checkFormula(t, a1)

	writeFile(t, control, "0.8")
	slow := advised(len(fast) + 4)[len(fast)+1:] // the first after the change was asked for at the fast interval
	a2 := readAdviceFile(t, d.runDir)
	if a2.Inputs.SaveSeconds < 0.7 || a2.CheckpointEvery < 1.6*a1.CheckpointEvery {
		t.Fatalf("saves 4× slower: interval %.1fs (C %.2fs) after %.1fs (C %.2fs); want about twice as long",
			a2.CheckpointEvery, a2.Inputs.SaveSeconds, a1.CheckpointEvery, a1.Inputs.SaveSeconds)
	}
	checkFormula(t, a2)
	gap := func(ls []savedLine) float64 { return (ls[len(ls)-1].Start - ls[0].Start) / float64(len(ls)-1) }
	t.Logf("C %.2fs → every %.1fs, trainer saved every %.1fs; C %.2fs → every %.1fs, saved every %.1fs",
		a1.Inputs.SaveSeconds, a1.CheckpointEvery, gap(fast), a2.Inputs.SaveSeconds, a2.CheckpointEvery, gap(slow))
	if gap(slow) < 1.5*gap(fast) {
		t.Fatalf("the trainer's checkpoints did not follow the interval: every %.1fs, then %.1fs", gap(fast), gap(slow))
	}
	signals := 0
	for _, l := range d.logLines() {
		if l["msg"] == "trainer signalled" && l["signal"] == "SIGUSR1" {
			signals++
		}
	}
	if signals < len(fast)+3 {
		t.Fatalf("%d SIGUSR1 sent for %d advised checkpoints", signals, len(fast)+3)
	}

	// A drill ends the run; its record carries the measured save time.
	d.drill(agent.SimulateRequest{Kind: "terminate", In: "20s"})
	select {
	case <-exited:
	case <-time.After(20 * time.Second):
		t.Fatal("trainer did not stop on SIGTERM")
	}
	d.waitEmergencyDone()
	var rep fleet.Report
	var last string
	for end := time.Now().Add(10 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		out, code := runCLI(t, "report", "--config", d.config, "--all", "--json")
		last = out
		if code == 0 && json.Unmarshal([]byte(out), &rep) == nil && rep.Records == 1 && len(rep.Advice) == 1 &&
			rep.Advice[0].SaveSeconds >= 0.7 {
			break
		}
		if time.Now().After(end) {
			t.Fatalf("no record of the drill carrying the measured save time (≥ 0.7 s) in the report:\n%s", last)
		}
	}
	adv, code := runCLI(t, "advise", "--config", d.config)
	if code != 0 || !strings.Contains(adv, "checkpoint every:") || !strings.Contains(adv, "measured") {
		t.Fatalf("advise: %d\n%s", code, adv)
	}
}

// TestAdviceRebalanceWithinOnePoll: AEMM serves a rebalance recommendation;
// within one poll preemptd asks for a checkpoint (advice.json, the long-poll
// and the checkpoint signal) and names the risk.
func TestAdviceRebalanceWithinOnePoll(t *testing.T) {
	url, trigger := startRebalanceAEMM(t)
	dir := shortDir(t)
	tr := startTrainer(t, filepath.Join(dir, "run", agent.NoticeFileName))
	d := startDaemonIn(t, dir, fmt.Sprintf("provider: aws\naws: {endpoint: %q}\npoll_interval: 1s\ntrainer: {pid_file: %q, checkpoint_signal: SIGUSR2}\nadvice: {fleet_poll: 0}\n", url, tr.pidFile))
	// advice.json is written just after the socket appears.
	waitFor(t, 10*time.Second, "advice.json", func() bool {
		_, err := os.Stat(filepath.Join(d.runDir, "advice.json"))
		return err == nil
	})
	before := readAdviceFile(t, d.runDir)
	if before.CheckpointNow {
		t.Fatalf("checkpoint asked for at start: %+v", before)
	}
	got, err := d.client().Advice(t.Context(), 30*time.Second)
	if err != nil || !got.CheckpointNow || len(got.Inputs.Risks) != 1 || got.Inputs.Risks[0].Kind != "rebalance" {
		t.Fatalf("long-poll: %+v, %v", got, err)
	}
	late := got.UpdatedAt.Sub(trigger)
	t.Logf("rebalance served at %s → checkpoint_now %s later (poll_interval 1s)", trigger.Format(time.TimeOnly), late)
	if late > 2*time.Second { // one poll, and the second AEMM's trigger time is rounded to
		t.Fatalf("checkpoint_now %s after the rebalance; want within one poll", late)
	}
	if a := readAdviceFile(t, d.runDir); !a.CheckpointNow || a.Request != got.Request {
		t.Fatalf("advice.json = %+v", a)
	}
	r := tr.waitSignal(10 * time.Second)
	if r.Signal != "SIGUSR2" {
		t.Fatalf("trainer got %s, want the checkpoint signal", r.Signal)
	}
}
