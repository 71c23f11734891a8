// Package logship keeps the trainer's log files (logs.paths: files and
// globs) in the object store as they grow: each sync sends only the bytes
// appended since the last one, as a new chunk object; the emergency path
// flushes once more before the machine goes. A file's chunks, in name
// order, are the file.
package logship

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"time"

	"github.com/preemptd/preemptd/agent"
	"github.com/preemptd/preemptd/checkpoint/storage"
)

// maxChunk bounds one object.
const maxChunk = 64 << 20

// Shipper syncs log files to <Prefix>/<file>/<generation>-<offset>.log.
type Shipper struct {
	Paths    []string
	Store    storage.Store
	Prefix   string // e.g. <run>/logs/<instance>
	Interval time.Duration
	Log      *slog.Logger

	mu    sync.Mutex
	files map[string]*tail
}

type tail struct {
	offset int64
	gen    int
	ino    uint64
}

var unsafe = regexp.MustCompile(`[^A-Za-z0-9._-]+`)

// objectDir names a file's folder in the store: its path, flattened.
func objectDir(path string) string {
	return strings.Trim(unsafe.ReplaceAllString(filepath.Clean(path), "_"), "_")
}

// Run syncs every Interval until ctx ends.
func (s *Shipper) Run(ctx context.Context) error {
	every := s.Interval
	if every <= 0 {
		every = 30 * time.Second
	}
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		if err := s.Flush(ctx); err != nil && ctx.Err() == nil {
			s.log().Warn("log sync", "err", err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
	}
}

func (s *Shipper) log() *slog.Logger {
	if s.Log == nil {
		return slog.New(slog.DiscardHandler)
	}
	return s.Log
}

// Flush sends what every matching file gained since the last flush.
func (s *Shipper) Flush(ctx context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.files == nil {
		s.files = map[string]*tail{}
	}
	var errs []error
	for _, pattern := range s.Paths {
		matches, err := filepath.Glob(pattern)
		if err != nil {
			errs = append(errs, fmt.Errorf("logs.paths %q: %w", pattern, err))
			continue
		}
		for _, p := range matches {
			if err := s.flushFile(ctx, p); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

func (s *Shipper) flushFile(ctx context.Context, p string) error {
	f, err := os.Open(p)
	if err != nil {
		return nil // gone since the glob
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil || !st.Mode().IsRegular() {
		return nil
	}
	t := s.files[p]
	if t == nil {
		t = &tail{}
		s.files[p] = t
	}
	ino := inode(st)
	if st.Size() < t.offset || (t.ino != 0 && ino != t.ino) {
		t.gen++ // truncated or rotated: a new generation from its start
		t.offset = 0
	}
	t.ino = ino
	for t.offset < st.Size() {
		n := min(st.Size()-t.offset, maxChunk)
		buf := make([]byte, n)
		if _, err := f.ReadAt(buf, t.offset); err != nil && !errors.Is(err, io.EOF) {
			return fmt.Errorf("log %s: %w", p, err)
		}
		key := fmt.Sprintf("%s/%s/%04d-%016d.log", s.Prefix, objectDir(p), t.gen, t.offset)
		if err := s.Store.PutBytes(ctx, key, buf); err != nil {
			return fmt.Errorf("log %s: %w", p, err)
		}
		t.offset += n
	}
	return nil
}

// Step is the emergency path's final log flush.
func (s *Shipper) Step() agent.Step { return step{s} }

type step struct{ s *Shipper }

func (step) Name() string                                     { return "logs" }
func (st step) Run(ctx context.Context, _ agent.Notice) error { return st.s.Flush(ctx) }
