package agent

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"testing/synctest"
	"time"
)

// TestDrillDoesNotDisarm: after a simulated notice's emergency path, a real
// fatal notice runs a new path that signals the trainer again.
func TestDrillDoesNotDisarm(t *testing.T) {
	dir := t.TempDir()
	synctest.Test(t, func(t *testing.T) {
		w := make(chanWatcher, 1)
		tr := &fakeTrainer{}
		rec := &recorder{}
		var done []string
		a := New(Config{FatalWithin: 2 * time.Minute, RunDir: dir, Signal: "SIGTERM"},
			Deps{Watchers: []Watcher{w}, Trainer: tr, Steps: []Step{rec},
				OnEmergencyDone: func(r EmergencyReport) { done = append(done, r.Notice.ID) }})
		ctx, cancel := context.WithCancel(t.Context())
		defer cancel()
		go a.Run(ctx)

		drill, err := SimulatedNotice(SimulateRequest{Kind: "terminate", In: "30s", ID: "drill"}, time.Now())
		if err != nil {
			t.Fatal(err)
		}
		if err := a.Inject(drill); err != nil {
			t.Fatal(err)
		}
		<-a.EmergencyDone()
		synctest.Wait()
		if running, _ := a.EmergencyRunning(); running {
			t.Fatal("the drill's path still runs after EmergencyDone")
		}

		w <- Notice{Provider: "aws", Kind: KindTerminate, ID: "spot", NoticedAt: time.Now(), Deadline: time.Now().Add(2 * time.Minute)}
		synctest.Wait()
		_, ch := a.EmergencyRunning()
		<-ch
		synctest.Wait()
		if got := tr.got(); !slices.Equal(got, []string{"SIGTERM", "SIGTERM"}) {
			t.Fatalf("signals = %v, want one SIGTERM per path", got)
		}
		if got := rec.list(); !slices.Equal(got, []string{"step:drill", "step:spot"}) {
			t.Fatalf("steps = %v, want the drill's and the real notice's", got)
		}
		if !slices.Equal(done, []string{"drill", "spot"}) {
			t.Fatalf("OnEmergencyDone = %v", done)
		}
		st := a.Status()
		if st.Emergency == nil || st.Emergency.Notice.ID != "spot" || st.State != "done" {
			t.Fatalf("status after the real path: state %s, emergency %+v", st.State, st.Emergency)
		}
		if !a.FatalHandled() {
			t.Fatal("FatalHandled = false with the handled spot notice still active")
		}
	})
}

// TestEarlierNoticeShortensPath: a fatal notice with an earlier deadline,
// arriving while a path runs, brings that path's deadline forward.
func TestEarlierNoticeShortensPath(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		w := make(chanWatcher, 1)
		var seen []time.Time
		started := make(chan struct{})
		step := stepFunc(func(ctx context.Context, n Notice) error {
			d, _ := ctx.Deadline()
			seen = append(seen, d)
			close(started)
			<-ctx.Done()
			d, _ = ctx.Deadline()
			seen = append(seen, d)
			return ctx.Err()
		})
		a := New(Config{FatalWithin: 2 * time.Minute, RunDir: t.TempDir()}, Deps{Watchers: []Watcher{w}, Steps: []Step{step}})
		ctx, cancel := context.WithCancel(t.Context())
		ran := make(chan struct{})
		go func() { a.Run(ctx); close(ran) }()
		defer func() { cancel(); <-ran }()
		start := time.Now()
		w <- Notice{Provider: "aws", Kind: KindTerminate, ID: "spot", NoticedAt: start, Deadline: start.Add(2 * time.Minute)}
		<-started
		w <- Notice{Provider: "gcp", Kind: KindPreempt, ID: "preempted", NoticedAt: start, Deadline: start.Add(30 * time.Second)}
		<-a.EmergencyDone()
		if took := time.Since(start); took != 30*time.Second {
			t.Fatalf("path ended after %v, want at the earlier deadline (30s)", took)
		}
		if want := []time.Time{start.Add(2 * time.Minute), start.Add(30 * time.Second)}; !slices.EqualFunc(seen, want, time.Time.Equal) {
			t.Fatalf("step saw deadlines %v, want %v", seen, want)
		}
		st := a.Status()
		if st.Emergency.Outcome != "deadline" || !st.Emergency.Deadline.Equal(start.Add(30*time.Second)) {
			t.Fatalf("emergency = %+v", st.Emergency)
		}
	})
}

// TestSimulatedNoticeExpires: a simulated notice leaves status and
// notice.json at its deadline instead of showing a negative time left.
func TestSimulatedNoticeExpires(t *testing.T) {
	dir := t.TempDir()
	synctest.Test(t, func(t *testing.T) {
		a := New(Config{FatalWithin: 2 * time.Minute, RunDir: dir}, Deps{})
		ctx, cancel := context.WithCancel(t.Context())
		defer cancel()
		go a.Run(ctx)
		n, err := SimulatedNotice(SimulateRequest{Kind: "maintenance", In: "10m"}, time.Now())
		if err != nil {
			t.Fatal(err)
		}
		a.Inject(n)
		synctest.Wait()
		if st := a.Status(); len(st.Notices) != 1 || st.State != "advisory" {
			t.Fatalf("status = %+v, want the advisory notice", st)
		}
		<-a.EmergencyDone() // fatal_within before its deadline it turns fatal
		time.Sleep(10 * time.Minute)
		synctest.Wait()
		st := a.Status()
		if len(st.Notices) != 0 || st.State != "watching" {
			t.Fatalf("after the deadline: state %s, notices %+v, want none", st.State, st.Notices)
		}
		if _, ok := readNotice(t, dir); ok {
			t.Fatal("notice.json still there after the simulated notice expired")
		}
	})
}

func TestSimulatedRebalanceIsAdvisoryWithoutDeadline(t *testing.T) {
	n, err := SimulatedNotice(SimulateRequest{Kind: "rebalance"}, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if !n.Deadline.IsZero() || Classify(n, time.Now(), 2*time.Minute) != ClassAdvisory {
		t.Fatalf("simulated rebalance = %+v (class %s), want advisory without deadline", n, Classify(n, time.Now(), 2*time.Minute))
	}
	if _, err := SimulatedNotice(SimulateRequest{Kind: "rebalance", In: "1m"}, time.Now()); err == nil {
		t.Fatal("a rebalance with --in was accepted")
	}
}

// TestStaleNoticeFileRemovedAtStart: a notice.json left by an earlier life
// of the daemon is gone once the agent runs.
func TestStaleNoticeFileRemovedAtStart(t *testing.T) {
	dir := t.TempDir()
	stale := filepath.Join(dir, NoticeFileName)
	if err := os.WriteFile(stale, []byte(`{"provider":"aws","kind":"terminate","class":"fatal"}`), 0o644); err != nil {
		t.Fatal(err)
	}
	a := New(Config{RunDir: dir}, Deps{})
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan struct{})
	go func() { a.Run(ctx); close(done) }()
	deadline := time.Now().Add(5 * time.Second)
	for {
		if _, err := os.Stat(stale); os.IsNotExist(err) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("stale notice.json still there 5s after start")
		}
		time.Sleep(5 * time.Millisecond)
	}
	cancel()
	<-done
}

// TestRescheduledLater: a scheduled event moved later moves its deadline
// and its escalation later.
func TestRescheduledLater(t *testing.T) {
	dir := t.TempDir()
	synctest.Test(t, func(t *testing.T) {
		w := make(chanWatcher, 1)
		a := New(Config{FatalWithin: 2 * time.Minute, RunDir: dir}, Deps{Watchers: []Watcher{w}})
		ctx, cancel := context.WithCancel(t.Context())
		defer cancel()
		go a.Run(ctx)
		start := time.Now()
		n := Notice{Provider: "aws", Kind: KindStop, ID: "instance-event-1", Scheduled: true, NoticedAt: start,
			Deadline: start.Add(10 * time.Minute), WindowEnd: start.Add(12 * time.Minute)}
		w <- n
		synctest.Wait()
		n.Deadline, n.WindowEnd = start.Add(30*time.Minute), start.Add(32*time.Minute)
		w <- n
		synctest.Wait()
		f, ok := readNotice(t, dir)
		if !ok || f.Deadline == nil || !f.Deadline.Equal(n.Deadline) || f.WindowEnd == nil || !f.WindowEnd.Equal(n.WindowEnd) {
			t.Fatalf("notice.json = %+v, want the new deadline and window", f)
		}
		time.Sleep(9 * time.Minute)
		synctest.Wait()
		if a.EmergencyStarted() {
			t.Fatal("escalated at the old deadline after the event was rescheduled")
		}
		time.Sleep(19*time.Minute + time.Second)
		synctest.Wait()
		if !a.EmergencyStarted() {
			t.Fatal("not escalated fatal_within before the new deadline")
		}
		<-a.EmergencyDone()
	})
}

// TestRescheduledEarlier: an advisory notice whose deadline moves earlier,
// still beyond fatal_within, escalates fatal_within before the new
// deadline, not the old one.
func TestRescheduledEarlier(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		w := make(chanWatcher, 1)
		a := New(Config{FatalWithin: 2 * time.Minute, RunDir: t.TempDir()}, Deps{Watchers: []Watcher{w}})
		ctx, cancel := context.WithCancel(t.Context())
		ran := make(chan struct{})
		go func() { a.Run(ctx); close(ran) }()
		defer func() { cancel(); <-ran }()
		start := time.Now()
		n := Notice{Provider: "aws", Kind: KindReboot, ID: "instance-event-2", Scheduled: true, NoticedAt: start,
			Deadline: start.Add(30 * time.Minute)}
		w <- n
		synctest.Wait()
		n.Deadline = start.Add(10 * time.Minute)
		w <- n
		synctest.Wait()
		time.Sleep(8*time.Minute + time.Second)
		synctest.Wait()
		if !a.EmergencyStarted() {
			t.Fatal("not escalated fatal_within before the earlier deadline")
		}
		<-a.EmergencyDone()
	})
}
