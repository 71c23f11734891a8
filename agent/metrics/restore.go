package metrics

import (
	"encoding/json"
	"os"
	"path/filepath"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// LastRestoreName is the file in state_dir where `preemptd restore` leaves
// what its last run did, for the daemon's metrics.
const LastRestoreName = "last-restore.json"

// LastRestore is what the last `preemptd restore` on this machine did.
type LastRestore struct {
	Run        string    `json:"run"`
	Checkpoint string    `json:"checkpoint,omitempty"`
	Outcome    string    `json:"outcome"` // restored, nothing (no checkpoint yet) or failed
	StartedAt  time.Time `json:"started_at"`
	Seconds    float64   `json:"seconds"`
	// FetchedBytes came from the store; KeptBytes were in place already.
	FetchedBytes int64  `json:"fetched_bytes"`
	KeptBytes    int64  `json:"kept_bytes"`
	Files        int    `json:"files"`
	FilesKept    int    `json:"files_kept"`
	Error        string `json:"error,omitempty"`
}

// WriteLastRestore records r in stateDir (replacing the file whole).
func WriteLastRestore(stateDir string, r LastRestore) error {
	b, _ := json.MarshalIndent(r, "", "  ")
	tmp := filepath.Join(stateDir, LastRestoreName+".tmp")
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, filepath.Join(stateDir, LastRestoreName))
}

// ReadLastRestore reads what WriteLastRestore left in stateDir.
func ReadLastRestore(stateDir string) (LastRestore, error) {
	var r LastRestore
	b, err := os.ReadFile(filepath.Join(stateDir, LastRestoreName))
	if err == nil {
		err = json.Unmarshal(b, &r)
	}
	return r, err
}

// restoreCollector exposes the last restore, read from state_dir at each
// scrape (the restore runs as its own process, before or beside the
// daemon).
type restoreCollector struct {
	dir                        string
	at, seconds, fetched, kept *prometheus.Desc
}

// WatchRestores exposes the last `preemptd restore` of stateDir.
func (m *Metrics) WatchRestores(stateDir string) {
	m.Registry.MustRegister(&restoreCollector{dir: stateDir,
		at: prometheus.NewDesc("preemptd_restore_last_timestamp_seconds",
			"When the last `preemptd restore` on this machine started (Unix time).", []string{"run", "outcome"}, nil),
		seconds: prometheus.NewDesc("preemptd_restore_last_seconds",
			"How long the last restore took: the time a new machine waited for its checkpoint.", []string{"run", "outcome"}, nil),
		fetched: prometheus.NewDesc("preemptd_restore_last_fetched_bytes",
			"Bytes the last restore fetched from the store.", []string{"run", "outcome"}, nil),
		kept: prometheus.NewDesc("preemptd_restore_last_kept_bytes",
			"Bytes the last restore found in place already (same size and SHA-256) and kept.", []string{"run", "outcome"}, nil),
	})
}

func (c *restoreCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.at
	ch <- c.seconds
	ch <- c.fetched
	ch <- c.kept
}

func (c *restoreCollector) Collect(ch chan<- prometheus.Metric) {
	r, err := ReadLastRestore(c.dir)
	if err != nil {
		return // none yet
	}
	for d, v := range map[*prometheus.Desc]float64{c.at: float64(r.StartedAt.UnixNano()) / 1e9, c.seconds: r.Seconds,
		c.fetched: float64(r.FetchedBytes), c.kept: float64(r.KeptBytes)} {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, r.Run, r.Outcome)
	}
}
