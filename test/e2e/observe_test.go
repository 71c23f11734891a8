package e2e

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/preemptd/preemptd/agent"
	"github.com/preemptd/preemptd/fleet"
	"github.com/preemptd/preemptd/test/peers"
)

type hookLog struct {
	mu     sync.Mutex
	events []agent.Event
	at     []time.Time
}

func (h *hookLog) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	var ev agent.Event
	b, _ := io.ReadAll(r.Body)
	if r.URL.Path != "/json" {
		return // the Slack-format copy
	}
	json.Unmarshal(b, &ev)
	h.mu.Lock()
	h.events = append(h.events, ev)
	h.at = append(h.at, time.Now())
	h.mu.Unlock()
}

func (h *hookLog) get() ([]agent.Event, []time.Time) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return slices.Clone(h.events), slices.Clone(h.at)
}

// storedLog concatenates a log file's chunks from a directory store.
func storedLog(t *testing.T, storeDir string) string {
	t.Helper()
	var keys []string
	filepath.WalkDir(storeDir, func(p string, d os.DirEntry, err error) error {
		if err == nil && !d.IsDir() && strings.Contains(p, "/logs/") {
			keys = append(keys, p)
		}
		return nil
	})
	sort.Strings(keys)
	var b strings.Builder
	for _, k := range keys {
		c, _ := os.ReadFile(k)
		b.Write(c)
	}
	return b.String()
}

// TestWebhooksLogsRecordsMetrics: a simulated notice posts the webhook
// before the trainer's checkpoint completes and again with the outcome; the
// trainer's log lines are in the store after the emergency path; the event
// record is written; /metrics has every metric the Grafana dashboard uses.
func TestWebhooksLogsRecordsMetrics(t *testing.T) {
	hooks := &hookLog{}
	srv := httptest.NewServer(hooks)
	t.Cleanup(srv.Close)
	dir := shortDir(t)
	ckpt := filepath.Join(dir, "ckpt")
	tr := startTrainer(t, filepath.Join(dir, "run", agent.NoticeFileName), "--ckpt-dir", ckpt, "--save-delay", "300ms")
	port := peers.FreePort(t)
	d := startDaemonIn(t, dir, fmt.Sprintf(`provider: local
run_id: obs
trainer: {pid_file: %q}
checkpoint: {dir: %q, layout: dcp}
logs: {paths: [%q], interval: 1h}
notify: {webhooks: [{url: %q, format: json}, {url: %q, format: slack}]}
metrics: {listen: "127.0.0.1:%d"}
`, tr.pidFile, ckpt, tr.log, srv.URL+"/json", srv.URL+"/slack", port))
	out, code := runCLI(t, "simulate", "--config", d.config, "--kind", "preempt", "--in", "60s", "--wait")
	if code != 0 {
		t.Fatalf("simulate: %d\n%s", code, out)
	}
	waitFor(t, 10*time.Second, "the outcome webhook", func() bool { evs, _ := hooks.get(); return len(evs) >= 2 })
	evs, at := hooks.get()
	st, err := os.Stat(filepath.Join(ckpt, "step-2", ".metadata"))
	if err != nil {
		t.Fatal(err)
	}
	if evs[0].Phase != agent.PhaseNotice || !at[0].Before(st.ModTime()) {
		t.Fatalf("first webhook %s at %v; checkpoint complete at %v: the notice webhook must come first", evs[0].Phase, at[0], st.ModTime())
	}
	var outcome *agent.Event
	for i := range evs {
		if evs[i].Phase == agent.PhaseOutcome && evs[i].Emergency != nil {
			outcome = &evs[i]
		}
	}
	if outcome == nil || outcome.Emergency.Checkpoint == nil || outcome.Emergency.Checkpoint.Name != "step-2" {
		t.Fatalf("outcome webhook = %+v", outcome)
	}

	// The trainer's log, up to the signal, is in the store.
	want, _ := os.ReadFile(tr.log)
	storeDir := filepath.Join(dir, "state", "store")
	if got := storedLog(t, storeDir); got != string(want) || !strings.Contains(got, "SIGTERM") {
		t.Fatalf("stored log %q, want %q", got, want)
	}

	// The event record, updated with the outcome.
	recs, _ := filepath.Glob(filepath.Join(storeDir, fleet.EventsPrefix, "*", "*.json"))
	if len(recs) != 1 {
		t.Fatalf("%d event records", len(recs))
	}
	var rec fleet.Record
	b, _ := os.ReadFile(recs[0])
	json.Unmarshal(b, &rec)
	if rec.Outcome != "completed" || rec.Checkpoint != "step-2" || rec.SignalledAt.IsZero() || rec.Instance.Hostname == "" || rec.Run != "obs" {
		t.Fatalf("record = %+v", rec)
	}

	// /metrics serves every metric the Grafana dashboard queries.
	resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/metrics", port))
	if err != nil {
		t.Fatal(err)
	}
	metrics, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	dash, err := os.ReadFile("../../deploy/grafana/preemptd.json")
	if err != nil {
		t.Fatal(err)
	}
	used := regexp.MustCompile(`preemptd_[a-z_]+`).FindAllString(string(dash), -1)
	if len(used) < 10 {
		t.Fatalf("the dashboard uses only %d metrics", len(used))
	}
	have := string(metrics)
	for _, m := range used {
		if strings.HasPrefix(m, "preemptd_gpu_") || strings.HasPrefix(m, "preemptd_restore_last_") {
			// GPU gauges exist only where NVML does, the last restore's once
			// `preemptd restore` ran here (both checked in agent/metrics).
			continue
		}
		if !strings.Contains(have, "\n"+m+" ") && !strings.Contains(have, "\n"+m+"{") {
			t.Errorf("the dashboard uses %s, which /metrics does not serve", m)
		}
	}
	for _, path := range []string{"/healthz", "/readyz"} {
		r, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d%s", port, path))
		if err != nil || r.StatusCode != 200 {
			t.Fatalf("%s: %v %v", path, err, r)
		}
	}
}

// TestWebhookDownCostsNothing: with every webhook refusing connections the
// checkpoint is still committed and the emergency path completes.
func TestWebhookDownCostsNothing(t *testing.T) {
	dead := httptest.NewServer(http.NotFoundHandler())
	deadURL := dead.URL
	dead.Close()
	dir := shortDir(t)
	ckpt := filepath.Join(dir, "ckpt")
	tr := startTrainer(t, filepath.Join(dir, "run", agent.NoticeFileName), "--ckpt-dir", ckpt)
	d := startDaemonIn(t, dir, fmt.Sprintf("provider: local\ntrainer: {pid_file: %q}\ncheckpoint: {dir: %q, layout: dcp}\nnotify: {webhooks: [{url: %q}]}\nmetrics: {listen: \"\"}\n",
		tr.pidFile, ckpt, deadURL))
	out, code := runCLI(t, "simulate", "--config", d.config, "--kind", "terminate", "--in", "60s", "--wait")
	if code != 0 {
		t.Fatalf("simulate: %d\n%s", code, out)
	}
	st := d.status()
	if st.Emergency.Outcome != "completed" || st.Emergency.Checkpoint == nil || st.Emergency.Checkpoint.Name != "step-2" {
		t.Fatalf("emergency = %+v", st.Emergency)
	}
	for _, s := range st.Emergency.Steps {
		if s.Error != "" {
			t.Fatalf("step %s: %s", s.Name, s.Error)
		}
	}
}

// TestReportCommand: `preemptd report` over a store of records from several
// instances prints the right counts; with none it says so.
func TestReportCommand(t *testing.T) {
	dir := shortDir(t)
	store := filepath.Join(dir, "store")
	cfg := filepath.Join(dir, "c.yaml")
	writeFile(t, cfg, fmt.Sprintf("run_dir: %s\nstate_dir: %s\nstorage: {url: \"file://%s\"}\n", dir, dir, store))
	out, code := runCLI(t, "report", "--config", cfg)
	if code != 1 || !strings.Contains(out, store+" does not exist") {
		t.Fatalf("no store: %d %s", code, out)
	}
	if _, err := os.Stat(store); err == nil {
		t.Fatal("report created the store")
	}
	os.MkdirAll(store, 0o755)
	out, code = runCLI(t, "report", "--config", cfg)
	if code != 0 || !strings.Contains(out, "no event records") {
		t.Fatalf("empty store: %d %s", code, out)
	}
	start := time.Now().Add(-10 * time.Hour).UTC()
	for i, typ := range []string{"p5.48xlarge", "p5.48xlarge", "g6.xlarge"} {
		r := fleet.Record{Version: 1, Provider: "aws", Kind: agent.KindTerminate, Class: agent.ClassFatal, NoticeID: "spot",
			Instance:  agent.Instance{ID: fmt.Sprintf("i-%d", i), Type: typ, Region: "us-east-1", Zone: "us-east-1a", Lifecycle: "spot", StartedAt: start},
			NoticedAt: start.Add(time.Duration(i+1) * time.Hour), Outcome: "completed"}
		r.CommittedAt = r.NoticedAt.Add(30 * time.Second)
		b, _ := json.Marshal(r)
		p := filepath.Join(store, fleet.Key(r))
		os.MkdirAll(filepath.Dir(p), 0o755)
		writeFile(t, p, string(b))
	}
	prices := filepath.Join(dir, "prices.yaml")
	writeFile(t, prices, "p5.48xlarge: {on_demand: 98, spot: 20}\ng6.xlarge: {on_demand: 1, spot: 0.5}\n")
	out, code = runCLI(t, "report", "--config", cfg, "--prices", prices, "--json")
	if code != 0 {
		t.Fatalf("report: %d %s", code, out)
	}
	var rep fleet.Report
	if err := json.Unmarshal([]byte(out), &rep); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	// p5: 1 h + 2 h at 78 $/h saved; g6: 3 h at 0.5 $/h saved.
	if rep.Interruptions != 3 || rep.ByType[0] != (fleet.Count{Key: "p5.48xlarge", Interruptions: 2}) ||
		rep.CheckpointsLost != 0 || rep.Cost == nil || rep.Cost.Saved < 235.49 || rep.Cost.Saved > 235.51 {
		t.Fatalf("report = %+v cost %+v", rep, rep.Cost)
	}
	out, code = runCLI(t, "report", "--config", cfg)
	if code != 0 || !strings.Contains(out, "interruptions") || !strings.Contains(out, "p5.48xlarge") {
		t.Fatalf("table: %d\n%s", code, out)
	}
}
