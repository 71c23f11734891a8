// Package metrics exposes preemptd's Prometheus metrics (client_golang, on a
// registry of its own) with /healthz and /readyz. It is a Reporter of the
// agent's events and is fed by the providers (metadata errors) and the
// checkpoint committer (uploads).
package metrics

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"runtime"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/preemptd/preemptd/advice"
	"github.com/preemptd/preemptd/agent"
)

// Metrics holds the collectors.
type Metrics struct {
	Registry       *prometheus.Registry
	notices        *prometheus.CounterVec
	metadataErrors *prometheus.CounterVec
	noticeToSignal prometheus.Histogram
	uploadBytes    prometheus.Counter
	uploadSeconds  prometheus.Histogram
	timeToDurable  prometheus.Histogram
	lastCommit     prometheus.Gauge
	lastCommitNs   atomic.Int64
	emergencies    *prometheus.CounterVec
	jobFanOut      *prometheus.HistogramVec
	advice         *prometheus.GaugeVec
	saveSeconds    prometheus.Histogram
}

var latencyBuckets = []float64{.001, .005, .01, .05, .1, .25, .5, 1, 2, 5, 10}
var durationBuckets = []float64{.5, 1, 2, 5, 10, 20, 30, 60, 90, 120, 300, 600}

// New builds the collectors; gpus may be nil.
func New(version string, gpus agent.GPUs) *Metrics {
	r := prometheus.NewRegistry()
	m := &Metrics{
		Registry: r,
		notices: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "preemptd_notices_total",
			Help: "Notices received, by provider, kind and class."}, []string{"provider", "kind", "class"}),
		metadataErrors: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "preemptd_metadata_errors_total",
			Help: "Failed metadata requests (outages never produce a notice)."}, []string{"provider"}),
		noticeToSignal: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "preemptd_notice_to_signal_seconds",
			Help: "From a fatal notice to the trainer's signal.", Buckets: latencyBuckets}),
		uploadBytes: prometheus.NewCounter(prometheus.CounterOpts{Name: "preemptd_checkpoint_upload_bytes_total",
			Help: "Checkpoint bytes sent to the store (reused files not counted)."}),
		uploadSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "preemptd_checkpoint_upload_seconds",
			Help: "Time to commit one checkpoint (hash, upload, manifest, latest).", Buckets: durationBuckets}),
		timeToDurable: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "preemptd_time_to_durable_seconds",
			Help: "From a fatal notice to its checkpoint committed.", Buckets: durationBuckets}),
		lastCommit: prometheus.NewGauge(prometheus.GaugeOpts{Name: "preemptd_last_checkpoint_commit_timestamp_seconds",
			Help: "When the newest checkpoint was committed (Unix time); 0 before any."}),
		emergencies: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "preemptd_emergency_paths_total",
			Help: "Emergency paths finished, by outcome and whether a checkpoint was committed."}, []string{"outcome", "checkpoint"}),
		jobFanOut: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "preemptd_job_fanout_seconds",
			Help:    "From another node's fatal notice to its job notice here, by the way it came (store or push).",
			Buckets: latencyBuckets}, []string{"via"}),
		advice: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "preemptd_advice",
			Help: "Checkpoint advice and its inputs: interval_seconds, checkpoint_now (0/1), save_seconds, upload_seconds, " +
				"mtbi_seconds, committed_fraction, interruptions (measured), risks (active)."}, []string{"value"}),
		saveSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "preemptd_checkpoint_save_seconds",
			Help: "The trainer's save time: first write of a checkpoint to its completion.", Buckets: durationBuckets}),
	}
	age := prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "preemptd_last_checkpoint_age_seconds",
		Help: "Seconds since the newest checkpoint was committed; -1 before any."}, m.age)
	build := prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "preemptd_build_info",
		Help: "preemptd's version; always 1."}, []string{"version", "goversion"})
	build.WithLabelValues(version, runtime.Version()).Set(1)
	r.MustRegister(m.notices, m.metadataErrors, m.noticeToSignal, m.uploadBytes, m.uploadSeconds, m.timeToDurable,
		m.lastCommit, m.emergencies, m.jobFanOut, m.advice, m.saveSeconds, age, build, collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	if gpus != nil {
		r.MustRegister(&gpuCollector{gpus: gpus})
	}
	return m
}

func (m *Metrics) age() float64 {
	ns := m.lastCommitNs.Load()
	if ns == 0 {
		return -1
	}
	return time.Since(time.Unix(0, ns)).Seconds()
}

// Provider makes the per-provider series exist (at zero) before anything
// happens, so that dashboards and alerts see them.
func (m *Metrics) Provider(name string) { m.metadataErrors.WithLabelValues(name) }

// JobFanOut records a job notice's latency from its node's notice.
func (m *Metrics) JobFanOut(d time.Duration, via string) {
	m.jobFanOut.WithLabelValues(via).Observe(max(d, 0).Seconds())
}

// Advice publishes the checkpoint advice.
func (m *Metrics) Advice(a advice.Advice) {
	now := 0.0
	if a.CheckpointNow {
		now = 1
	}
	in := a.Inputs
	for k, v := range map[string]float64{"interval_seconds": a.CheckpointEvery, "checkpoint_now": now,
		"save_seconds": in.SaveSeconds, "upload_seconds": in.UploadSeconds, "mtbi_seconds": in.MTBIHours * 3600,
		"committed_fraction": in.Committed, "interruptions": float64(in.Interruptions), "risks": float64(len(in.Risks))} {
		m.advice.WithLabelValues(k).Set(v)
	}
}

// Saved observes a measured save time.
func (m *Metrics) Saved(d time.Duration) { m.saveSeconds.Observe(d.Seconds()) }

// MetadataError counts one failed metadata request of provider.
func (m *Metrics) MetadataError(provider string) { m.metadataErrors.WithLabelValues(provider).Inc() }

// Committed records one committed checkpoint.
func (m *Metrics) Committed(sent int64, took time.Duration, at time.Time) {
	m.uploadBytes.Add(float64(sent))
	m.uploadSeconds.Observe(took.Seconds())
	m.lastCommit.Set(float64(at.UnixNano()) / 1e9)
	m.lastCommitNs.Store(at.UnixNano())
}

// Report implements agent.Reporter.
func (m *Metrics) Report(_ context.Context, ev agent.Event) {
	switch ev.Phase {
	case agent.PhaseNotice:
		m.notices.WithLabelValues(ev.Notice.Provider, string(ev.Notice.Kind), string(ev.Class)).Inc()
		if e := ev.Emergency; e != nil && e.Signal != nil && len(e.Signal.PIDs) > 0 {
			m.noticeToSignal.Observe(e.Signal.At.Sub(ev.Notice.NoticedAt).Seconds())
		}
	case agent.PhaseOutcome:
		e := ev.Emergency
		if e == nil {
			return
		}
		committed := "false"
		if e.Checkpoint != nil {
			committed = "true"
			m.timeToDurable.Observe(e.Checkpoint.CommittedAt.Sub(ev.Notice.NoticedAt).Seconds())
		}
		m.emergencies.WithLabelValues(e.Outcome, committed).Inc()
	}
}

// Handler serves /metrics, /healthz (the process answers) and /readyz (the
// agent watches with every provider alive).
func (m *Metrics) Handler(ready func() bool) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(m.Registry, promhttp.HandlerOpts{}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		if ready != nil && !ready() {
			http.Error(w, "not ready: the agent is not watching, or a provider stopped", http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ready")
	})
	return mux
}

// Serve listens on addr until ctx ends.
func Serve(ctx context.Context, addr string, h http.Handler) error {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("metrics.listen %s: %w", addr, err)
	}
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		srv.Shutdown(sctx)
	}()
	if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// gpuCollector reads an NVML snapshot at each scrape.
type gpuCollector struct{ gpus agent.GPUs }

var (
	gpuMemUsed  = prometheus.NewDesc("preemptd_gpu_memory_used_bytes", "GPU memory in use.", []string{"gpu", "uuid"}, nil)
	gpuMemTotal = prometheus.NewDesc("preemptd_gpu_memory_total_bytes", "GPU memory.", []string{"gpu", "uuid"}, nil)
	gpuUtil     = prometheus.NewDesc("preemptd_gpu_utilization_ratio", "GPU utilisation (0–1).", []string{"gpu", "uuid"}, nil)
	gpuTemp     = prometheus.NewDesc("preemptd_gpu_temperature_celsius", "GPU temperature.", []string{"gpu", "uuid"}, nil)
	gpuPower    = prometheus.NewDesc("preemptd_gpu_power_watts", "GPU power draw.", []string{"gpu", "uuid"}, nil)
	gpuECC      = prometheus.NewDesc("preemptd_gpu_ecc_uncorrected_errors", "Uncorrected ECC errors since the driver loaded.", []string{"gpu", "uuid"}, nil)
	gpuProcs    = prometheus.NewDesc("preemptd_gpu_processes", "Compute processes on the GPU.", []string{"gpu", "uuid"}, nil)
)

func (c *gpuCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{gpuMemUsed, gpuMemTotal, gpuUtil, gpuTemp, gpuPower, gpuECC, gpuProcs} {
		ch <- d
	}
}

func (c *gpuCollector) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	s := c.gpus.Snapshot(ctx)
	for _, d := range s.Devices {
		l := []string{strconv.Itoa(d.Index), d.UUID}
		ch <- prometheus.MustNewConstMetric(gpuMemUsed, prometheus.GaugeValue, float64(d.MemoryUsed), l...)
		ch <- prometheus.MustNewConstMetric(gpuMemTotal, prometheus.GaugeValue, float64(d.MemoryTotal), l...)
		ch <- prometheus.MustNewConstMetric(gpuUtil, prometheus.GaugeValue, float64(d.UtilGPU)/100, l...)
		ch <- prometheus.MustNewConstMetric(gpuTemp, prometheus.GaugeValue, float64(d.TemperatureC), l...)
		ch <- prometheus.MustNewConstMetric(gpuPower, prometheus.GaugeValue, d.PowerW, l...)
		ch <- prometheus.MustNewConstMetric(gpuECC, prometheus.CounterValue, float64(d.ECCUncorrected), l...)
		ch <- prometheus.MustNewConstMetric(gpuProcs, prometheus.GaugeValue, float64(len(d.Processes)), l...)
	}
}
