package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/preemptd/preemptd/agent"
	"github.com/preemptd/preemptd/agent/config"
	"github.com/preemptd/preemptd/agent/metrics"
	"github.com/preemptd/preemptd/checkpoint"
	"github.com/preemptd/preemptd/checkpoint/storage"
	"github.com/preemptd/preemptd/fleet"
	"github.com/preemptd/preemptd/internal/redact"
)

// restoreOut is restore --json's answer.
type restoreOut struct {
	Run string `json:"run"`
	// Restored is false when the run has nothing committed yet (exit 4).
	Restored     bool     `json:"restored"`
	Checkpoint   string   `json:"checkpoint,omitempty"`
	Step         int64    `json:"step,omitempty"`
	Path         string   `json:"path,omitempty"`
	Files        int      `json:"files"`
	FilesKept    int      `json:"files_kept"`
	FilesResumed int      `json:"files_resumed"`
	Bytes        int64    `json:"bytes"`
	FetchedBytes int64    `json:"fetched_bytes"`
	KeptBytes    int64    `json:"kept_bytes"`
	ResumedBytes int64    `json:"resumed_bytes"`
	Refetched    int      `json:"refetched,omitempty"`
	Stray        []string `json:"stray,omitempty"`
	Seconds      float64  `json:"seconds"`
	Store        string   `json:"store"`
	Error        string   `json:"error,omitempty"`
}

func cmdRestore(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	c := newFlags("restore", "restore [--to DIR] [--name CKPT] [--run RUN] [--part NODE] [--wait DURATION] [--json] [--none-ok] [--config FILE]", stderr, false)
	part := c.fs.String("part", "", "restore only this job node's part of a multi-node checkpoint, and its markers (nodes are listed by ls); enough only where its ranks read no other node's files: DCP writes a replicated tensor (a DDP model) once, into the coordinator's files")
	to := c.fs.String("to", "", "folder to restore into (default: checkpoint.dir)")
	name := c.fs.String("name", "", "checkpoint to restore (default: the run's latest)")
	run := c.fs.String("run", "", "the run to restore from (default: run_id)")
	wait := c.fs.Duration("wait", 0, "keep trying this long while the store cannot be reached or fails (a machine's network may come up after the unit starts); each try continues the last")
	asJSON := c.fs.Bool("json", false, "print what was restored as JSON on stdout (restored: false when the run has no checkpoint yet)")
	noneOK := c.fs.Bool("none-ok", false, "exit 0, not 4, when the run has no checkpoint yet (a fresh start): for an init container or a boot script that must let the trainer start")
	if err := c.parse(args); err != nil {
		return err
	}
	if *wait < 0 {
		return usagef("restore: --wait %s is negative", *wait)
	}
	cfg, cm, err := runCommitter(c, *run, getenv)
	if errors.Is(err, storage.ErrNoStore) {
		// Nothing was ever written there: a fresh start (exit 4), said with
		// where it looked, in case that is the wrong place.
		if *asJSON {
			enc := json.NewEncoder(stdout)
			enc.SetIndent("", "  ")
			enc.Encode(restoreOut{Run: cfg.Run(getenv), Store: cfg.StorageURL(), Error: err.Error()})
		}
		if *noneOK {
			fmt.Fprintf(stderr, "restore: %v\nrestore: nothing to restore, a fresh start\n", err)
			return nil
		}
		return fmt.Errorf("%w; nothing to restore, start from scratch (exit %d)", err, exitNothing)
	}
	if err != nil {
		return err
	}
	dir := *to
	if dir == "" {
		dir = cfg.Checkpoint.Dir
	}
	if dir == "" {
		return usagef("restore: give --to DIR or set checkpoint.dir")
	}
	log := slog.New(redact.Handler(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelWarn})))
	cm.Log = log
	o := checkpoint.RestoreOptions{Name: *name, Node: *part, Threads: cfg.Restore.Threads, PartSize: int64(cfg.Restore.PartSizeMiB) << 20}
	bar := newProgress(stderr)
	o.Progress = bar.update
	start := time.Now()
	deadline := start.Add(*wait)
	var r checkpoint.Restored
	for try := 1; ; try++ {
		r, err = cm.RestoreInto(ctx, dir, o)
		if err == nil || permanent(ctx, err) || time.Now().After(deadline) {
			break
		}
		pause := min(time.Duration(try)*time.Second, 10*time.Second, time.Until(deadline))
		fmt.Fprintf(stderr, "restore: %v; trying again in %s (--wait %s, %s left)\n", err, pause.Round(time.Second), *wait, time.Until(deadline).Round(time.Second))
		select {
		case <-time.After(pause):
		case <-ctx.Done():
		}
	}
	bar.done()
	took := time.Since(start)
	out := restoreOut{Run: cm.Run, Restored: err == nil, Checkpoint: r.Manifest.Name, Step: r.Manifest.Step, Path: r.Path,
		Files: len(r.Manifest.Files), FilesKept: r.Kept, FilesResumed: r.Resumed, Bytes: r.Manifest.Bytes, FetchedBytes: r.FetchedBytes,
		KeptBytes: r.KeptBytes, ResumedBytes: r.ResumedBytes, Refetched: r.Refetched, Stray: r.Stray, Seconds: took.Seconds(), Store: cm.Store.String()}
	outcome := "restored"
	switch {
	case errors.Is(err, checkpoint.ErrNothingCommitted) && *noneOK:
		outcome = "nothing"
		fmt.Fprintf(stderr, "restore: run %s has no committed checkpoint in %s: nothing to restore, a fresh start\n", cm.Run, cm.Store)
		err = nil
	case errors.Is(err, checkpoint.ErrNothingCommitted):
		outcome = "nothing"
		err = fmt.Errorf("%w in %s: nothing to restore, start from scratch (exit %d)", err, cm.Store, exitNothing)
	case err != nil:
		outcome = "failed"
		out.Error = err.Error()
	}
	recordRestore(ctx, cfg, cm, out, outcome, start, took, log)
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		if jerr := enc.Encode(out); jerr != nil {
			return jerr
		}
	}
	if err != nil || outcome == "nothing" {
		return err
	}
	fmt.Fprintf(stderr, "restored %s (step %d) from %s in %s: %d files, %s fetched (%s/s)",
		r.Manifest.Name, r.Manifest.Step, cm.Store, took.Round(time.Millisecond), len(r.Manifest.Files), bytesText(r.FetchedBytes),
		bytesText(int64(float64(r.FetchedBytes)/max(took.Seconds(), 1e-3))))
	if r.Kept > 0 {
		fmt.Fprintf(stderr, ", %d files (%s) already in place and kept", r.Kept, bytesText(r.KeptBytes))
	}
	if r.Resumed > 0 {
		fmt.Fprintf(stderr, ", %d continued from an interrupted restore (%s were there)", r.Resumed, bytesText(r.ResumedBytes))
	}
	fmt.Fprintf(stderr, "; every checksum verified\n")
	if n := len(r.Stray); n > 0 {
		fmt.Fprintf(stderr, "restore: %d file(s) in %s are not part of %s and were left as they are (e.g. %s)\n", n, r.Path, r.Manifest.Name, r.Stray[0])
	}
	if !*asJSON {
		fmt.Fprintln(stdout, r.Path)
	}
	return nil
}

// permanent says whether trying a restore again cannot help.
func permanent(ctx context.Context, err error) bool {
	return ctx.Err() != nil || errors.Is(err, checkpoint.ErrNothingCommitted) || errors.Is(err, checkpoint.ErrUnsigned) ||
		strings.Contains(err.Error(), "fail verification") || strings.Contains(err.Error(), "not committed (no manifest)") ||
		strings.Contains(err.Error(), "has no part of node") || strings.Contains(err.Error(), "checksum mismatch") ||
		strings.Contains(err.Error(), "symbolic link") || strings.Contains(err.Error(), "escapes")
}

// recordRestore leaves what the restore did where the daemon's metrics
// read it (state_dir) and as an event record in the store, for `report`.
func recordRestore(ctx context.Context, cfg config.Config, cm *checkpoint.Committer, out restoreOut, outcome string,
	start time.Time, took time.Duration, log *slog.Logger) {
	last := metrics.LastRestore{Run: out.Run, Checkpoint: out.Checkpoint, Outcome: outcome, StartedAt: start.UTC(), Seconds: took.Seconds(),
		FetchedBytes: out.FetchedBytes, KeptBytes: out.KeptBytes, Files: out.Files, FilesKept: out.FilesKept, Error: out.Error}
	if fi, err := os.Stat(cfg.StateDir); err == nil && fi.IsDir() {
		if err := metrics.WriteLastRestore(cfg.StateDir, last); err != nil {
			log.Warn("the restore's summary for the daemon's metrics was not written", "state_dir", cfg.StateDir, "err", err)
		}
	}
	if outcome == "nothing" {
		return // a fresh start is no resume
	}
	host, _ := os.Hostname()
	rec := fleet.Record{Version: fleet.RecordVersion, Run: out.Run, Provider: "restore", Kind: fleet.KindRestore,
		NoticeID: fmt.Sprintf("restore-%d", start.UnixNano()), Class: agent.ClassInfo, NoticedAt: start.UTC(), Outcome: outcome,
		Checkpoint: out.Checkpoint, Bytes: out.Bytes, Reason: out.Error, UpdatedAt: time.Now().UTC(),
		Restore: &fleet.Restore{Seconds: took.Seconds(), FetchedBytes: out.FetchedBytes, KeptBytes: out.KeptBytes, Files: out.Files, FilesKept: out.FilesKept}}
	rec.Instance.ID, rec.Instance.Hostname = host, host
	b, _ := json.MarshalIndent(rec, "", "  ")
	rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	if err := cm.Store.PutBytes(rctx, fleet.Key(rec), b); err != nil {
		log.Warn("the restore's event record was not written", "key", fleet.Key(rec), "err", err)
	}
}

// progress draws a restore's progress on a terminal (one line, redrawn
// four times a second) or, elsewhere (a unit's journal), a line every
// 10 seconds while it lasts.
type progress struct {
	w        io.Writer
	tty      bool
	start    time.Time
	mu       sync.Mutex
	last     time.Time
	drawn    bool
	doneB    int64
	total    int64
	interval time.Duration
}

func newProgress(w io.Writer) *progress {
	p := &progress{w: w, start: time.Now(), interval: 10 * time.Second}
	if f, ok := w.(*os.File); ok {
		if fi, err := f.Stat(); err == nil && fi.Mode()&os.ModeCharDevice != 0 {
			p.tty, p.interval = true, 250*time.Millisecond
		}
	}
	p.last = p.start
	return p
}

func (p *progress) update(done, total int64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.doneB, p.total = done, total
	if now := time.Now(); now.Sub(p.last) >= p.interval {
		p.last = now
		p.draw(now)
	}
}

func (p *progress) draw(now time.Time) {
	el := now.Sub(p.start).Seconds()
	rate := float64(p.doneB) / max(el, 1e-3)
	eta := "?"
	if rate > 0 && p.total >= p.doneB {
		eta = time.Duration(float64(p.total-p.doneB) / rate * float64(time.Second)).Round(time.Second).String()
	}
	pct := 100.0
	if p.total > 0 {
		pct = float64(p.doneB) * 100 / float64(p.total)
	}
	line := fmt.Sprintf("restore: %s of %s (%.0f%%), %s/s, ETA %s", bytesText(p.doneB), bytesText(p.total), pct, bytesText(int64(rate)), eta)
	if p.tty {
		fmt.Fprintf(p.w, "\r\033[K%s", line)
		p.drawn = true
		return
	}
	fmt.Fprintln(p.w, line)
}

// done ends the terminal's progress line.
func (p *progress) done() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.drawn {
		fmt.Fprint(p.w, "\r\033[K")
	}
}

// bytesText writes n bytes in binary units.
func bytesText(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	f, u := float64(n), 0
	for f >= unit && u < 4 {
		f /= unit
		u++
	}
	return fmt.Sprintf("%.1f %ciB", f, "KMGT"[u-1])
}
