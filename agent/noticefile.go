package agent

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"
)

// NoticeFileName is the file in run_dir that tells the trainer its deadline.
const NoticeFileName = "notice.json"

// NoticeFile is the document written to <run_dir>/notice.json.
type NoticeFile struct {
	Provider  string    `json:"provider"`
	Kind      Kind      `json:"kind"`
	ID        string    `json:"id"`
	Action    string    `json:"action,omitempty"`
	Class     Class     `json:"class"`
	NoticedAt time.Time `json:"noticed_at"`
	// Deadline is null when the notice has none (a rebalance recommendation).
	Deadline *time.Time `json:"deadline"`
	// WindowEnd is when a scheduled event's window closes, if known.
	WindowEnd *time.Time `json:"window_end,omitempty"`
	// SecondsLeft is measured when the file was written; -1 without a deadline.
	SecondsLeft float64   `json:"seconds_left"`
	WrittenAt   time.Time `json:"written_at"`
	// GPUs is the snapshot taken when the trainer was signalled.
	GPUs *GPUSnapshot `json:"gpus,omitempty"`
}

func noticePath(runDir string) string { return filepath.Join(runDir, NoticeFileName) }

// NewNoticeFile builds the notice.json document for n at now.
func NewNoticeFile(n Notice, class Class, now time.Time) NoticeFile {
	f := NoticeFile{
		Provider: n.Provider, Kind: n.Kind, ID: n.ID, Action: n.Action, Class: class,
		NoticedAt: n.NoticedAt.UTC(), SecondsLeft: n.SecondsLeft(now), WrittenAt: now.UTC(),
	}
	if !n.Deadline.IsZero() {
		d := n.Deadline.UTC()
		f.Deadline = &d
	}
	if !n.WindowEnd.IsZero() {
		e := n.WindowEnd.UTC()
		f.WindowEnd = &e
	}
	return f
}

// writeNoticeFile writes notice.json atomically: a temporary file in the same
// folder, synced, then renamed over the old one, so a reader never sees half.
func writeNoticeFile(runDir string, n Notice, class Class, gpus *GPUSnapshot, now time.Time) error {
	f := NewNoticeFile(n, class, now)
	f.GPUs = gpus
	b, err := json.MarshalIndent(f, "", "  ")
	if err != nil {
		return fmt.Errorf("encode notice: %w", err)
	}
	return WriteFileAtomic(noticePath(runDir), append(b, '\n'), 0o644)
}

func removeNoticeFile(runDir string) error {
	err := os.Remove(noticePath(runDir))
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	return err
}

// WriteFileAtomic writes data to path through a synced temporary file and a
// rename.
func WriteFileAtomic(path string, data []byte, perm fs.FileMode) error {
	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".*")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := tmp.Chmod(perm); err != nil {
		tmp.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}
