package agent

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"
)

func TestClassify(t *testing.T) {
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	tests := []struct {
		name      string
		kind      Kind
		deadline  time.Time
		scheduled bool
		want      Class
	}{
		{"terminate is fatal", KindTerminate, now.Add(time.Hour), false, ClassFatal},
		{"stop is fatal", KindStop, now.Add(2 * time.Minute), false, ClassFatal},
		{"hibernate is fatal", KindHibernate, now, false, ClassFatal},
		{"preempt is fatal", KindPreempt, now.Add(30 * time.Second), false, ClassFatal},
		{"shutdown is fatal", KindShutdown, time.Time{}, false, ClassFatal},
		{"rebalance without deadline is advisory", KindRebalance, time.Time{}, false, ClassAdvisory},
		{"maintenance an hour out is advisory", KindMaintenance, now.Add(time.Hour), false, ClassAdvisory},
		{"maintenance inside fatal_within is fatal", KindMaintenance, now.Add(90 * time.Second), false, ClassFatal},
		{"maintenance exactly at fatal_within is fatal", KindMaintenance, now.Add(2 * time.Minute), false, ClassFatal},
		{"maintenance in the past is fatal", KindMaintenance, now.Add(-time.Minute), false, ClassFatal},
		{"scheduled stop a week out is advisory", KindStop, now.Add(7 * 24 * time.Hour), true, ClassAdvisory},
		{"scheduled stop inside fatal_within is fatal", KindStop, now.Add(time.Minute), true, ClassFatal},
		{"scheduled terminate a day out is advisory", KindTerminate, now.Add(24 * time.Hour), true, ClassAdvisory},
		{"reboot a day out is advisory", KindReboot, now.Add(24 * time.Hour), true, ClassAdvisory},
		{"reboot inside fatal_within is fatal", KindReboot, now.Add(time.Minute), true, ClassFatal},
		{"disruption is advisory", KindDisruption, now.Add(time.Hour), true, ClassAdvisory},
		{"disruption is never fatal", KindDisruption, now.Add(-time.Minute), true, ClassAdvisory},
		{"freeze only informs", KindFreeze, now.Add(10 * time.Second), false, ClassInfo},
		{"migrate only informs", KindMigrate, now, false, ClassInfo},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			n := Notice{Kind: tt.kind, Deadline: tt.deadline, Scheduled: tt.scheduled}
			if got := Classify(n, now, 2*time.Minute); got != tt.want {
				t.Fatalf("Classify(%s) = %s, want %s", tt.kind, got, tt.want)
			}
		})
	}
}

func TestParseKind(t *testing.T) {
	for _, s := range []string{"terminate", "PREEMPT", "Rebalance"} {
		if _, err := ParseKind(s); err != nil {
			t.Errorf("ParseKind(%q): %v", s, err)
		}
	}
	if _, err := ParseKind("explode"); err == nil || !strings.Contains(err.Error(), "terminate") {
		t.Fatalf("ParseKind(explode) = %v, want an error listing the kinds", err)
	}
}

// chanWatcher sends what the test puts on its channel.
type chanWatcher chan Notice

func (c chanWatcher) Watch(ctx context.Context, out chan<- Notice) error {
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case n := <-c:
			out <- n
		}
	}
}

// fakeTrainer records the signals it is asked to send.
type fakeTrainer struct {
	mu      sync.Mutex
	signals []string
	waited  bool
}

func (f *fakeTrainer) Signal(_ context.Context, sig string) (SignalReport, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.signals = append(f.signals, sig)
	return SignalReport{Signal: sig, At: time.Now(), PIDs: []int{42}}, nil
}

func (f *fakeTrainer) WaitExit(context.Context, SignalReport, time.Time) (ExitReport, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.waited = true
	return ExitReport{Exited: []int{42}, At: time.Now()}, nil
}

func (f *fakeTrainer) got() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.signals)
}

// recorder is a Step and an Acker that records the order of events.
type recorder struct {
	mu     sync.Mutex
	events []string
}

func (r *recorder) add(s string) {
	r.mu.Lock()
	r.events = append(r.events, s)
	r.mu.Unlock()
}
func (r *recorder) Name() string { return "record" }
func (r *recorder) Run(_ context.Context, n Notice) error {
	r.add("step:" + n.ID)
	return nil
}
func (r *recorder) Ack(_ context.Context, n Notice) error {
	r.add("ack:" + n.ID)
	return nil
}
func (r *recorder) list() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.events)
}

func readNotice(t *testing.T, dir string) (NoticeFile, bool) {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, NoticeFileName))
	if os.IsNotExist(err) {
		return NoticeFile{}, false
	}
	if err != nil {
		t.Fatal(err)
	}
	var f NoticeFile
	if err := json.Unmarshal(b, &f); err != nil {
		t.Fatalf("notice.json is not JSON: %v\n%s", err, b)
	}
	return f, true
}

// TestAdvisoryTurnsFatal: a maintenance notice ten minutes out is advisory
// (rebalance_signal, notice.json), and becomes fatal — the emergency path
// with the fatal signal — exactly fatal_within before its deadline.
func TestAdvisoryTurnsFatal(t *testing.T) {
	dir := t.TempDir()
	synctest.Test(t, func(t *testing.T) {
		w := make(chanWatcher, 1)
		tr := &fakeTrainer{}
		rec := &recorder{}
		a := New(Config{FatalWithin: 2 * time.Minute, RunDir: dir, Signal: "SIGTERM", RebalanceSignal: "SIGUSR1"},
			Deps{Watchers: []Watcher{w}, Trainer: tr, Acker: rec, Steps: []Step{rec}})
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan struct{})
		go func() { a.Run(ctx); close(done) }()

		start := time.Now()
		w <- Notice{Provider: "gcp", Kind: KindMaintenance, ID: "m1", NoticedAt: start, Deadline: start.Add(10 * time.Minute)}
		synctest.Wait()
		if got := tr.got(); !slices.Equal(got, []string{"SIGUSR1"}) {
			t.Fatalf("after advisory notice, signals = %v, want [SIGUSR1]", got)
		}
		f, ok := readNotice(t, dir)
		if !ok || f.Class != ClassAdvisory || f.ID != "m1" {
			t.Fatalf("notice.json = %+v (exists %v), want advisory m1", f, ok)
		}
		if a.EmergencyStarted() {
			t.Fatal("emergency path started for an advisory notice")
		}

		time.Sleep(8*time.Minute - time.Second)
		synctest.Wait()
		if a.EmergencyStarted() {
			t.Fatal("emergency path started before the deadline came within fatal_within")
		}
		time.Sleep(2 * time.Second)
		synctest.Wait()
		<-a.EmergencyDone()
		if got := tr.got(); !slices.Equal(got, []string{"SIGUSR1", "SIGTERM"}) {
			t.Fatalf("signals = %v, want [SIGUSR1 SIGTERM]", got)
		}
		if got := rec.list(); !slices.Equal(got, []string{"step:m1", "ack:m1"}) {
			t.Fatalf("events = %v, want the step, then the ack", got)
		}
		st := a.Status()
		if st.State != "done" || st.Emergency.Outcome != "completed" || st.Emergency.Trainer == nil {
			t.Fatalf("status = %+v", st)
		}
		f, _ = readNotice(t, dir)
		if f.Class != ClassFatal {
			t.Fatalf("notice.json class = %s after escalation, want fatal", f.Class)
		}
		cancel()
		<-done
	})
}

// TestWithdrawnAdvisoryNeverFires: a maintenance notice withdrawn before it
// turns fatal never starts the emergency path, and notice.json goes away.
func TestWithdrawnAdvisoryNeverFires(t *testing.T) {
	dir := t.TempDir()
	synctest.Test(t, func(t *testing.T) {
		w := make(chanWatcher, 1)
		tr := &fakeTrainer{}
		a := New(Config{FatalWithin: 2 * time.Minute, RunDir: dir, Signal: "SIGTERM"}, Deps{Watchers: []Watcher{w}, Trainer: tr})
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan struct{})
		go func() { a.Run(ctx); close(done) }()
		n := Notice{Provider: "aws", Kind: KindMaintenance, ID: "e1", NoticedAt: time.Now(), Deadline: time.Now().Add(5 * time.Minute)}
		w <- n
		synctest.Wait()
		if _, ok := readNotice(t, dir); !ok {
			t.Fatal("no notice.json for an advisory notice")
		}
		n.Withdrawn = true
		w <- n
		synctest.Wait()
		if _, ok := readNotice(t, dir); ok {
			t.Fatal("notice.json still there after the only notice was withdrawn")
		}
		time.Sleep(10 * time.Minute)
		synctest.Wait()
		if a.EmergencyStarted() || len(tr.got()) != 0 {
			t.Fatalf("withdrawn notice acted on: emergency %v, signals %v", a.EmergencyStarted(), tr.got())
		}
		if st := a.Status(); st.State != "watching" || len(st.Notices) != 0 || st.Last == nil || !st.Last.Withdrawn {
			t.Fatalf("status = %+v", st)
		}
		cancel()
		<-done
	})
}

// TestFatalOnceAndDeadline: the emergency path runs once, with the notice's
// deadline on its context, even when notices repeat.
func TestFatalOnceAndDeadline(t *testing.T) {
	dir := t.TempDir()
	synctest.Test(t, func(t *testing.T) {
		w := make(chanWatcher, 4)
		tr := &fakeTrainer{}
		var stepDeadline time.Time
		step := stepFunc(func(ctx context.Context, n Notice) error {
			stepDeadline, _ = ctx.Deadline()
			return nil
		})
		a := New(Config{FatalWithin: 2 * time.Minute, RunDir: dir, Signal: "SIGUSR2"},
			Deps{Watchers: []Watcher{w}, Trainer: tr, Steps: []Step{step}})
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan struct{})
		go func() { a.Run(ctx); close(done) }()
		dl := time.Now().Add(2 * time.Minute)
		n := Notice{Provider: "aws", Kind: KindTerminate, ID: "spot", NoticedAt: time.Now(), Deadline: dl}
		w <- n
		w <- n
		w <- Notice{Provider: "aws", Kind: KindStop, ID: "other", NoticedAt: time.Now(), Deadline: dl}
		<-a.EmergencyDone()
		synctest.Wait()
		if got := tr.got(); !slices.Equal(got, []string{"SIGUSR2"}) {
			t.Fatalf("signals = %v, want one SIGUSR2", got)
		}
		if !stepDeadline.Equal(dl) {
			t.Fatalf("step deadline = %v, want the notice's %v", stepDeadline, dl)
		}
		f, _ := readNotice(t, dir)
		if f.ID != "spot" || f.Deadline == nil || !f.Deadline.Equal(dl) {
			t.Fatalf("notice.json = %+v, want spot with deadline %v", f, dl)
		}
		cancel()
		<-done
	})
}

// TestPastDeadlineGetsMinimumBudget: a notice whose time already passed
// still gets MinBudget to act in.
func TestPastDeadlineGetsMinimumBudget(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var got time.Time
		step := stepFunc(func(ctx context.Context, n Notice) error { got, _ = ctx.Deadline(); return nil })
		a := New(Config{RunDir: t.TempDir(), MinBudget: 7 * time.Second}, Deps{Steps: []Step{step}})
		ctx, cancel := context.WithCancel(t.Context())
		go a.Run(ctx)
		now := time.Now()
		a.Inject(Notice{Provider: "x", Kind: KindTerminate, ID: "late", Deadline: now.Add(-time.Minute)})
		<-a.EmergencyDone()
		if want := now.Add(7 * time.Second); !got.Equal(want) {
			t.Fatalf("deadline = %v, want %v", got, want)
		}
		cancel()
	})
}

type stepFunc func(ctx context.Context, n Notice) error

func (f stepFunc) Name() string                            { return "func" }
func (f stepFunc) Run(ctx context.Context, n Notice) error { return f(ctx, n) }

func TestHookEnvironment(t *testing.T) {
	dir := t.TempDir()
	out := filepath.Join(dir, "hook.out")
	a := New(Config{RunDir: dir, Hooks: []string{`env | grep ^PREEMPTD_ | sort > "$HOOK_OUT"`}}, Deps{})
	t.Setenv("HOOK_OUT", out)
	now := time.Now()
	n := Notice{Provider: "azure", Kind: KindPreempt, ID: "ev-1; rm -rf /", Action: "Preempt", Deadline: now.Add(30 * time.Second)}
	reps := a.runHooks(t.Context(), n, n.Deadline)
	if len(reps) != 1 || reps[0].Error != "" {
		t.Fatalf("hook reports = %+v", reps)
	}
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	env := string(b)
	for _, want := range []string{"PREEMPTD_PROVIDER=azure", "PREEMPTD_KIND=preempt", "PREEMPTD_NOTICE_ID=ev-1; rm -rf /",
		"PREEMPTD_DEADLINE=" + n.Deadline.UTC().Format(time.RFC3339Nano), "PREEMPTD_SECONDS_LEFT=29",
		"PREEMPTD_NOTICE_FILE=" + filepath.Join(dir, NoticeFileName)} {
		if !strings.Contains(env, want+"\n") {
			t.Errorf("hook environment lacks %q:\n%s", want, env)
		}
	}
}

func TestHookBoundedByDeadline(t *testing.T) {
	a := New(Config{RunDir: t.TempDir(), Hooks: []string{"sleep 30", "echo never"}}, Deps{})
	n := Notice{Provider: "local", Kind: KindTerminate, ID: "x"}
	reps := a.runHooks(t.Context(), n, time.Now().Add(200*time.Millisecond))
	if len(reps) != 1 || reps[0].Error == "" {
		t.Fatalf("reports = %+v, want the first hook cut by the deadline and the second not run", reps)
	}
}

// fakeGPUs reports one GPU held by PID 77 and emits one XID event.
type fakeGPUs struct{}

func (fakeGPUs) Snapshot(context.Context) GPUSnapshot {
	return GPUSnapshot{Available: true, Driver: "550", Devices: []GPUDevice{{Index: 0, Name: "H100",
		Processes: []GPUProcess{{PID: 77}}}}, TakenAt: time.Now()}
}

func (fakeGPUs) WatchXID(ctx context.Context, out chan<- XIDEvent) error {
	out <- XIDEvent{Device: 0, XID: 79, Hardware: true, At: time.Now()}
	<-ctx.Done()
	return ctx.Err()
}

// TestGPUSnapshotInNoticeAndStatus: the snapshot taken after the signal is
// in notice.json and the emergency report; XID events reach the status.
func TestGPUSnapshotInNoticeAndStatus(t *testing.T) {
	dir := t.TempDir()
	a := New(Config{RunDir: dir, Signal: "SIGTERM"}, Deps{Trainer: &fakeTrainer{}, GPUs: fakeGPUs{}})
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	go a.Run(ctx)
	a.Inject(Notice{Provider: "local", Kind: KindTerminate, ID: "g", Deadline: time.Now().Add(time.Minute)})
	<-a.EmergencyDone()
	f, ok := readNotice(t, dir)
	if !ok || f.GPUs == nil || len(f.GPUs.Devices) != 1 || f.GPUs.GPUPIDs()[0] != 77 {
		t.Fatalf("notice.json gpus = %+v", f.GPUs)
	}
	st := a.Status()
	if st.Emergency.GPUs == nil || len(st.XIDs) != 1 || st.XIDs[0].XID != 79 {
		t.Fatalf("status: gpus %+v, xids %+v", st.Emergency.GPUs, st.XIDs)
	}
}

// TestHookEnvironmentScrubbed: a hook inherits no secret of preemptd's
// environment — cloud keys, tokens, webhook URLs, preemptd's own settings —
// only the ordinary variables and the notice's PREEMPTD_* ones.
func TestHookEnvironmentScrubbed(t *testing.T) {
	dir := t.TempDir()
	out := filepath.Join(dir, "hook.out")
	for k, v := range map[string]string{
		"AWS_SECRET_ACCESS_KEY": "aws-secret", "AWS_SESSION_TOKEN": "aws-token", "AZURE_STORAGE_KEY": "azure-key",
		"GITHUB_TOKEN": "gh-token", "SLACK_URL": "https://hooks.slack.com/services/T0/B0/slack-secret",
		"PREEMPTD_STORAGE_URL": "s3://bucket/prefix", "DB_PASSWORD": "db-pass", "HOOK_OUT": out, "KEEP_ME": "kept",
		"HTTPS_PROXY": "http://proxy.internal:3128",
	} {
		t.Setenv(k, v)
	}
	a := New(Config{RunDir: dir, Hooks: []string{`env > "$HOOK_OUT"`}}, Deps{})
	reps := a.runHooks(t.Context(), Notice{Provider: "aws", Kind: KindTerminate, ID: "i"}, time.Now().Add(10*time.Second))
	if len(reps) != 1 || reps[0].Error != "" {
		t.Fatalf("hook: %+v", reps)
	}
	b, _ := os.ReadFile(out)
	env := string(b)
	for _, leak := range []string{"aws-secret", "aws-token", "azure-key", "gh-token", "slack-secret", "s3://bucket", "db-pass"} {
		if strings.Contains(env, leak) {
			t.Errorf("hook environment holds %q", leak)
		}
	}
	for _, want := range []string{"KEEP_ME=kept", "HTTPS_PROXY=http://proxy.internal:3128", "PREEMPTD_KIND=terminate", "PATH="} {
		if !strings.Contains(env, want) {
			t.Errorf("hook environment lacks %q", want)
		}
	}
}
