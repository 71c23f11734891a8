// Package termtime is the watch loop of the clouds whose spot notice is one
// metadata document holding the time the instance goes (Alibaba Cloud's
// instance/spot/termination-time, Tencent Cloud's spot/termination-time):
// not found means no notice; a time is a notice with that deadline; a
// failed read or a document that does not parse changes nothing (no false
// alarm, no withdrawal), logged without flooding.
package termtime

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"time"

	"github.com/preemptd/preemptd/agent"
	"github.com/preemptd/preemptd/providers/internal/emit"
	"github.com/preemptd/preemptd/providers/internal/outage"
)

// ErrNotFound is Get's answer when the document does not exist: no notice.
var ErrNotFound = errors.New("not found")

// Watcher polls one termination-time document.
type Watcher struct {
	Path string // the document, for the log
	// Get reads the document; ErrNotFound when there is none.
	Get func(ctx context.Context) ([]byte, error)
	// Parse turns the document into a notice (its ID and deadline).
	Parse func(b []byte, now time.Time) (agent.Notice, error)
	Poll  time.Duration
	Log   *slog.Logger
	// OnError is called on every failed read (a metrics counter).
	OnError func()
	Now     func() time.Time

	out    *outage.Tracker
	active *agent.Notice
}

// Watch implements agent.Watcher.
func (w *Watcher) Watch(ctx context.Context, out chan<- agent.Notice) error {
	if w.Poll <= 0 {
		w.Poll = time.Second
	}
	w.Log.Info("watching instance metadata", "path", w.Path, "poll_interval", w.Poll.String())
	t := time.NewTicker(w.Poll)
	defer t.Stop()
	for {
		w.Step(ctx, out)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
	}
}

// Step reads the document once and sends what changed: a new notice, an
// earlier deadline (a later one is never trusted over the first), or the
// withdrawal of the notice when the document is gone.
func (w *Watcher) Step(ctx context.Context, out chan<- agent.Notice) {
	if w.out == nil {
		w.out = outage.New(w.Log, time.Minute, w.OnError)
	}
	now := time.Now
	if w.Now != nil {
		now = w.Now
	}
	rctx, cancel := context.WithTimeout(ctx, min(max(2*w.Poll, 2*time.Second), 5*time.Second))
	b, err := w.Get(rctx)
	cancel()
	if ctx.Err() != nil {
		return
	}
	if errors.Is(err, ErrNotFound) {
		w.out.OK()
		if w.active != nil {
			n := *w.active
			n.Withdrawn, n.NoticedAt = true, now()
			w.active = nil
			emit.Send(ctx, out, n)
		}
		return
	}
	var n agent.Notice
	if err == nil {
		n, err = w.Parse(b, now())
	}
	if err != nil {
		w.out.Fail(w.Path, err)
		return
	}
	w.out.OK()
	if w.active != nil && !n.Deadline.Before(w.active.Deadline) {
		return // nothing new, or a later time, never trusted over the first
	}
	w.active = &n
	emit.Send(ctx, out, n)
}

// Get fetches url with hdr through hc: the body of a 200, ErrNotFound for a
// 404, else an error with the status (status is 0 when nothing answered).
func Get(ctx context.Context, hc *http.Client, method, url string, hdr http.Header) (body []byte, status int, err error) {
	req, err := http.NewRequestWithContext(ctx, method, url, nil)
	if err != nil {
		return nil, 0, err
	}
	for k, v := range hdr {
		req.Header[k] = v
	}
	resp, err := hc.Do(req)
	if err != nil {
		return nil, 0, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	switch {
	case err != nil:
		return nil, resp.StatusCode, fmt.Errorf("%s: %w", url, err)
	case resp.StatusCode == http.StatusNotFound:
		return nil, resp.StatusCode, ErrNotFound
	case resp.StatusCode != http.StatusOK:
		return nil, resp.StatusCode, fmt.Errorf("%s: HTTP %d: %s", url, resp.StatusCode, emit.Truncate(strings.TrimSpace(string(b)), 200))
	}
	return b, resp.StatusCode, nil
}

// Paths name the metadata documents of an instance's identity.
type Paths struct{ ID, Type, Zone, Region string }

// Identity reads the instance's identity through get (a path under
// /latest/meta-data/).
func Identity(ctx context.Context, provider string, get func(context.Context, string) ([]byte, error), p Paths) (agent.Instance, error) {
	inst := agent.Instance{Provider: provider}
	for _, f := range []struct {
		path string
		dst  *string
	}{{p.ID, &inst.ID}, {p.Type, &inst.Type}, {p.Zone, &inst.Zone}, {p.Region, &inst.Region}} {
		b, err := get(ctx, f.path)
		if err != nil {
			return inst, fmt.Errorf("%s: %w", f.path, err)
		}
		*f.dst = strings.TrimSpace(string(b))
	}
	return inst, nil
}
