package agent

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"testing/synctest"
	"time"

	"github.com/preemptd/preemptd/advice"
)

func readAdvice(t *testing.T, dir string) advice.Advice {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, AdviceFileName))
	if err != nil {
		t.Fatal(err)
	}
	var a advice.Advice
	if err := json.Unmarshal(b, &a); err != nil {
		t.Fatal(err)
	}
	return a
}

// TestCheckpointSignal: advice.json follows the advisor; when the interval
// passes, trainer.checkpoint_signal goes out once, and not again sooner than
// a save and its upload; a rebalance recommendation asks at once.
func TestCheckpointSignal(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		dir := t.TempDir()
		tr := &fakeTrainer{}
		w := make(chanWatcher)
		start := time.Now()
		adv := advice.New(advice.Config{}, start, advice.Rate{MTBI: 25 * time.Hour})
		adv.Saved(start, 10*time.Second) // interval √(2·10·90000) = 1342 s
		var published []advice.Advice
		a := New(Config{RunDir: dir, Signal: "SIGTERM", FatalWithin: 2 * time.Minute, CheckpointSignal: "SIGUSR1"},
			Deps{Watchers: []Watcher{w}, Trainer: tr, Advisor: adv, OnAdvice: func(x advice.Advice) { published = append(published, x) }})
		ctx, cancel := context.WithCancel(t.Context())
		defer cancel()
		go a.Run(ctx)
		synctest.Wait()
		if got := readAdvice(t, dir); got.CheckpointEvery != 1342 || got.CheckpointNow {
			t.Fatalf("advice.json = %+v", got)
		}
		time.Sleep(1342*time.Second + adviceTick)
		synctest.Wait()
		got := readAdvice(t, dir)
		if !got.CheckpointNow || got.Request != 1 || !slices.Equal(tr.got(), []string{"SIGUSR1"}) {
			t.Fatalf("interval passed: advice %+v, signals %v", got, tr.got())
		}
		// The trainer saves (5 s) and the advisor hears of it: cleared.
		time.Sleep(5 * time.Second)
		adv.Saved(time.Now(), 5*time.Second)
		synctest.Wait()
		if got := readAdvice(t, dir); got.CheckpointNow {
			t.Fatalf("still asking after the save: %+v", got)
		}
		// A rebalance recommendation at once after: checkpoint_now, but the
		// signal waits out the minimum gap (save 7.5 s mean, no upload).
		w <- Notice{Provider: "aws", Kind: KindRebalance, ID: "rebalance-1", NoticedAt: time.Now()}
		synctest.Wait()
		if got := readAdvice(t, dir); !got.CheckpointNow || got.Request != 2 || len(got.Inputs.Risks) != 1 {
			t.Fatalf("rebalance: %+v", got)
		}
		if n := len(tr.got()); n != 1 {
			t.Fatalf("signalled again within the gap: %v", tr.got())
		}
		time.Sleep(10 * time.Second)
		synctest.Wait()
		if !slices.Equal(tr.got(), []string{"SIGUSR1", "SIGUSR1"}) {
			t.Fatalf("after the gap: %v", tr.got())
		}
		// Withdrawn, the risk stops shortening the interval.
		w <- Notice{Provider: "aws", Kind: KindRebalance, ID: "rebalance-1", Withdrawn: true}
		synctest.Wait()
		if got := readAdvice(t, dir); len(got.Inputs.Risks) != 0 {
			t.Fatalf("withdrawn risk still listed: %+v", got.Inputs.Risks)
		}
		if len(published) < 4 {
			t.Fatalf("OnAdvice told %d times", len(published))
		}
	})
}

// TestAdviceLongPoll: GET /v1/advice?wait= answers as soon as a checkpoint
// is asked for; without an advisor it says advice is off.
func TestAdviceLongPoll(t *testing.T) {
	dir := t.TempDir()
	w := make(chanWatcher)
	adv := advice.New(advice.Config{}, time.Now(), advice.Rate{MTBI: 25 * time.Hour})
	adv.Saved(time.Now(), time.Second)
	a := New(Config{RunDir: dir, Signal: "SIGTERM", FatalWithin: 2 * time.Minute}, Deps{Watchers: []Watcher{w}, Advisor: adv})
	ctx, cancel := context.WithCancel(t.Context())
	run := func(a *Agent) { // stopped, and done writing advice.json, before the temporary folders go
		done := make(chan struct{})
		go func() { a.Run(ctx); close(done) }()
		t.Cleanup(func() { cancel(); <-done })
	}
	run(a)
	c := startAPI(t, a)
	got, err := c.Advice(t.Context(), 0)
	if err != nil || got.CheckpointNow || got.CheckpointEvery <= 0 {
		t.Fatalf("advice = %+v, %v", got, err)
	}
	done := make(chan advice.Advice, 1)
	go func() {
		a, _ := c.Advice(context.Background(), 30*time.Second)
		done <- a
	}()
	time.Sleep(100 * time.Millisecond)
	start := time.Now()
	w <- Notice{Provider: "aws", Kind: KindRebalance, ID: "r", NoticedAt: time.Now()}
	select {
	case got := <-done:
		if !got.CheckpointNow || got.Inputs.Risks[0].Kind != "rebalance" {
			t.Fatalf("long-poll answer = %+v", got)
		}
		t.Logf("long-poll answered %s after the rebalance", time.Since(start))
	case <-time.After(10 * time.Second):
		t.Fatal("long-poll not answered by the rebalance")
	}
	st := a.Status()
	if st.Advice == nil || !st.Advice.CheckpointNow {
		t.Fatalf("status advice = %+v", st.Advice)
	}

	off := New(Config{RunDir: t.TempDir()}, Deps{})
	run(off)
	if _, err := startAPI(t, off).Advice(t.Context(), 0); err == nil {
		t.Fatal("advice served with advice off")
	}
}
