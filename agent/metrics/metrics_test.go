package metrics

import (
	"context"
	"io"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/preemptd/preemptd/agent"
)

type oneGPU struct{}

func (oneGPU) Snapshot(context.Context) agent.GPUSnapshot {
	return agent.GPUSnapshot{Available: true, Devices: []agent.GPUDevice{{Index: 0, UUID: "GPU-1", MemoryUsed: 5, MemoryTotal: 10,
		UtilGPU: 50, Processes: []agent.GPUProcess{{PID: 1}}}}}
}
func (oneGPU) WatchXID(ctx context.Context, _ chan<- agent.XIDEvent) error { <-ctx.Done(); return nil }

func scrape(t *testing.T, m *Metrics, ready bool) string {
	t.Helper()
	srv := httptest.NewServer(m.Handler(func() bool { return ready }))
	defer srv.Close()
	resp, err := srv.Client().Get(srv.URL + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	r, _ := srv.Client().Get(srv.URL + "/readyz")
	if (r.StatusCode == 200) != ready {
		t.Fatalf("/readyz = %d with ready %v", r.StatusCode, ready)
	}
	return string(b)
}

func TestMetrics(t *testing.T) {
	m := New("v1.2.3", oneGPU{})
	now := time.Now()
	n := agent.Notice{Provider: "aws", Kind: agent.KindTerminate, NoticedAt: now}
	m.Report(context.Background(), agent.Event{Phase: agent.PhaseNotice, Notice: n, Class: agent.ClassFatal,
		Emergency: &agent.EmergencyReport{Signal: &agent.SignalReport{At: now.Add(3 * time.Millisecond), PIDs: []int{1}}}})
	m.Report(context.Background(), agent.Event{Phase: agent.PhaseOutcome, Notice: n, Class: agent.ClassFatal,
		Emergency: &agent.EmergencyReport{Outcome: "completed", Checkpoint: &agent.CheckpointResult{CommittedAt: now.Add(20 * time.Second)}}})
	m.MetadataError("aws")
	m.Committed(1<<20, 2*time.Second, now)
	out := scrape(t, m, true)
	for _, want := range []string{
		`preemptd_notices_total{class="fatal",kind="terminate",provider="aws"} 1`,
		`preemptd_metadata_errors_total{provider="aws"} 1`,
		`preemptd_notice_to_signal_seconds_count 1`,
		`preemptd_checkpoint_upload_bytes_total 1.048576e+06`,
		`preemptd_checkpoint_upload_seconds_count 1`,
		`preemptd_time_to_durable_seconds_sum 20`,
		`preemptd_emergency_paths_total{checkpoint="true",outcome="completed"} 1`,
		`preemptd_build_info{goversion=`,
		`preemptd_gpu_memory_used_bytes{gpu="0",uuid="GPU-1"} 5`,
		`preemptd_gpu_utilization_ratio{gpu="0",uuid="GPU-1"} 0.5`,
		`preemptd_gpu_processes{gpu="0",uuid="GPU-1"} 1`,
		`preemptd_last_checkpoint_age_seconds`,
	} {
		if !strings.Contains(out, want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}
	scrape(t, New("v", nil), false)
}

// TestLastRestore: the last `preemptd restore` (a process of its own) is
// read from state_dir at each scrape: nothing before one, then its figures.
func TestLastRestore(t *testing.T) {
	dir := t.TempDir()
	m := New("v", nil)
	m.WatchRestores(dir)
	if out := scrape(t, m, true); strings.Contains(out, "preemptd_restore_last") {
		t.Fatalf("restore metrics before any restore:\n%s", out)
	}
	at := time.Unix(1700000000, 0)
	if err := WriteLastRestore(dir, LastRestore{Run: "r1", Outcome: "restored", StartedAt: at, Seconds: 12.5,
		FetchedBytes: 1 << 30, KeptBytes: 512}); err != nil {
		t.Fatal(err)
	}
	out := scrape(t, m, true)
	for _, want := range []string{
		`preemptd_restore_last_seconds{outcome="restored",run="r1"} 12.5`,
		`preemptd_restore_last_fetched_bytes{outcome="restored",run="r1"} 1.073741824e+09`,
		`preemptd_restore_last_kept_bytes{outcome="restored",run="r1"} 512`,
		`preemptd_restore_last_timestamp_seconds{outcome="restored",run="r1"} 1.7e+09`,
	} {
		if !strings.Contains(out, want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}
}
