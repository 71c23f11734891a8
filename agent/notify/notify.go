// Package notify sends webhooks about notices and their outcomes: JSON with
// the whole event, or Slack-compatible incoming-webhook messages. Each is
// sent concurrently, retried with backoff within the notice's deadline, and
// never holds up the emergency path.
package notify

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/preemptd/preemptd/agent"
)

// Formats.
const (
	FormatJSON  = "json"
	FormatSlack = "slack"
)

// Webhook is one destination.
type Webhook struct {
	URL    string
	Format string
}

// Sender implements agent.Reporter.
type Sender struct {
	Hooks  []Webhook
	Client *http.Client
	Log    *slog.Logger
	// Attempts bounds the tries per webhook (default 5).
	Attempts int
}

// Report sends ev to every webhook and returns when all are done or ctx ends.
func (s *Sender) Report(ctx context.Context, ev agent.Event) {
	var wg sync.WaitGroup
	for _, h := range s.Hooks {
		wg.Go(func() {
			if err := s.send(ctx, h, ev); err != nil {
				s.log().Warn("webhook not delivered", "url", redact(h.URL), "event", ev.Phase, "err", err)
			} else {
				s.log().Info("webhook delivered", "url", redact(h.URL), "event", ev.Phase)
			}
		})
	}
	wg.Wait()
}

func (s *Sender) log() *slog.Logger {
	if s.Log == nil {
		return slog.New(slog.DiscardHandler)
	}
	return s.Log
}

// redact keeps a webhook URL's host: its path is often the secret.
func redact(u string) string {
	if i := strings.Index(u, "://"); i >= 0 {
		rest := u[i+3:]
		if j := strings.IndexByte(rest, '/'); j >= 0 {
			return u[:i+3+j] + "/…"
		}
	}
	return u
}

// Body renders ev in format.
func Body(format string, ev agent.Event) ([]byte, error) {
	switch format {
	case FormatJSON, "":
		return json.Marshal(ev)
	case FormatSlack:
		return json.Marshal(map[string]string{"text": SlackText(ev)})
	}
	return nil, fmt.Errorf("unknown webhook format %q", format)
}

// slackEscape escapes what Slack reads as markup, so notice contents cannot
// mention channels or forge links.
func slackEscape(s string) string {
	return strings.NewReplacer("&", "&amp;", "<", "&lt;", ">", "&gt;").Replace(s)
}

// SlackText is the one-message summary of ev.
func SlackText(ev agent.Event) string {
	n, in := ev.Notice, ev.Instance
	where := strings.TrimSpace(strings.Join([]string{in.ID, in.Type, in.Zone}, " "))
	if where == "" {
		where = in.Hostname
	}
	var b strings.Builder
	switch ev.Phase {
	case agent.PhaseNotice:
		fmt.Fprintf(&b, ":warning: %s %s notice on %s", n.Provider, n.Kind, where)
		if !n.Deadline.IsZero() {
			fmt.Fprintf(&b, ", deadline %s (%.0f s left)", n.Deadline.UTC().Format(time.RFC3339), n.Deadline.Sub(ev.At).Seconds())
		}
		fmt.Fprintf(&b, " [%s]", ev.Class)
	case agent.PhaseOutcome:
		e := ev.Emergency
		fmt.Fprintf(&b, ":white_check_mark: %s %s on %s: emergency path %s", n.Provider, n.Kind, where, e.Outcome)
		if e.Checkpoint != nil {
			fmt.Fprintf(&b, ", checkpoint %s committed %.1f s after the notice", e.Checkpoint.Name,
				e.Checkpoint.CommittedAt.Sub(n.NoticedAt).Seconds())
		} else {
			b.WriteString(", no new checkpoint committed")
		}
		fmt.Fprintf(&b, " (took %.1f s)", e.FinishedAt.Sub(n.NoticedAt).Seconds())
	}
	if ev.Run != "" {
		fmt.Fprintf(&b, ", run %s", ev.Run)
	}
	return slackEscape(b.String())
}

func (s *Sender) send(ctx context.Context, h Webhook, ev agent.Event) error {
	body, err := Body(h.Format, ev)
	if err != nil {
		return err
	}
	client := s.Client
	if client == nil {
		client = &http.Client{Timeout: 10 * time.Second}
	}
	attempts := s.Attempts
	if attempts <= 0 {
		attempts = 5
	}
	wait := 250 * time.Millisecond
	for i := 1; ; i++ {
		req, err := http.NewRequestWithContext(ctx, http.MethodPost, h.URL, bytes.NewReader(body))
		if err != nil {
			return fmt.Errorf("webhook %s: not a valid URL", redact(h.URL))
		}
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("User-Agent", "preemptd")
		resp, err := client.Do(req)
		var ue *url.Error
		if errors.As(err, &ue) {
			// *url.Error prints the whole URL, and its path is the secret.
			err = fmt.Errorf("%s %s: %w", ue.Op, redact(h.URL), ue.Err)
		}
		if err == nil {
			io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
			resp.Body.Close()
			if resp.StatusCode/100 == 2 {
				return nil
			}
			err = fmt.Errorf("HTTP %d", resp.StatusCode)
			if resp.StatusCode/100 == 4 && resp.StatusCode != http.StatusTooManyRequests && resp.StatusCode != http.StatusRequestTimeout {
				return err // a client error will not get better
			}
		}
		if i >= attempts {
			return fmt.Errorf("%d attempts: %w", i, err)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("deadline after %d attempts: %w", i, err)
		case <-time.After(wait):
		}
		wait = min(wait*2, 4*time.Second)
	}
}
