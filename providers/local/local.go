// Package local is the provider for machines that are no cloud VM (laptops,
// demos, tests): a notice is a trigger file, watched with fsnotify. Removing
// the file withdraws the notice. `preemptd simulate` uses the local API
// instead and works with every provider.
package local

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/fsnotify/fsnotify"

	"github.com/preemptd/preemptd/agent"
	"github.com/preemptd/preemptd/providers/internal/emit"
)

const settleDelay = 50 * time.Millisecond

// Provider watches a trigger file.
type Provider struct {
	path string
	log  *slog.Logger
	now  func() time.Time

	active  *agent.Notice
	content string
}

// New returns a provider watching path.
func New(path string, log *slog.Logger) *Provider {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Provider{path: path, log: log.With("provider", "local"), now: time.Now}
}

// ParseTrigger reads a trigger file: empty (a terminate notice two minutes
// out), "KIND [IN]" such as "preempt 30s", or a JSON object
// {"kind":"preempt","in":"30s","id":"x"}.
func ParseTrigger(b []byte, now time.Time) (agent.Notice, error) {
	var req agent.SimulateRequest
	s := strings.TrimSpace(string(b))
	switch {
	case strings.HasPrefix(s, "{"):
		dec := json.NewDecoder(bytes.NewReader([]byte(s)))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&req); err != nil {
			return agent.Notice{}, fmt.Errorf("trigger file: %w", err)
		}
	case s != "":
		f := strings.Fields(s)
		if len(f) > 2 {
			return agent.Notice{}, fmt.Errorf("trigger file: want \"KIND [IN]\", got %q", s)
		}
		req.Kind = f[0]
		if len(f) == 2 {
			req.In = f[1]
		}
	}
	if req.ID == "" {
		req.ID = "trigger"
	}
	n, err := agent.SimulatedNotice(req, now)
	if err != nil {
		return n, fmt.Errorf("trigger file: %w", err)
	}
	n.Provider = "local"
	n.Raw = agent.RawString(s)
	return n, nil
}

// Watch implements agent.Watcher.
func (p *Provider) Watch(ctx context.Context, out chan<- agent.Notice) error {
	dir := filepath.Dir(p.path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("local: trigger dir: %w", err)
	}
	w, err := fsnotify.NewWatcher()
	if err != nil {
		return fmt.Errorf("local: %w", err)
	}
	defer w.Close()
	if err := w.Add(dir); err != nil {
		return fmt.Errorf("local: watch %s: %w", dir, err)
	}
	p.log.Info("watching trigger file", "path", p.path)
	p.check(ctx, out)
	// A writer's create and its writes come as several events: read the
	// file once they have settled, never half-written.
	settle := time.NewTimer(time.Hour)
	settle.Stop()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-settle.C:
			p.check(ctx, out)
		case ev, ok := <-w.Events:
			if !ok {
				return errors.New("local: watcher closed")
			}
			if filepath.Clean(ev.Name) == filepath.Clean(p.path) {
				settle.Reset(settleDelay)
			}
		case err, ok := <-w.Errors:
			if !ok {
				return errors.New("local: watcher closed")
			}
			p.log.Warn("trigger watch error", "err", err)
		}
	}
}

// check reads the trigger file and sends what changed.
func (p *Provider) check(ctx context.Context, out chan<- agent.Notice) {
	b, err := os.ReadFile(p.path)
	if errors.Is(err, fs.ErrNotExist) {
		p.withdraw(ctx, out)
		return
	}
	if err != nil {
		p.log.Warn("read trigger file", "err", err)
		return
	}
	if p.active != nil && string(b) == p.content {
		return
	}
	n, err := ParseTrigger(b, p.now())
	if err != nil {
		p.log.Error("ignoring trigger file", "err", err)
		return
	}
	p.withdraw(ctx, out)
	p.active, p.content = &n, string(b)
	emit.Send(ctx, out, n)
}

func (p *Provider) withdraw(ctx context.Context, out chan<- agent.Notice) {
	if p.active == nil {
		return
	}
	n := *p.active
	n.Withdrawn, n.NoticedAt = true, p.now()
	p.active, p.content = nil, ""
	emit.Send(ctx, out, n)
}
