package notify

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/preemptd/preemptd/agent"
)

func event() agent.Event {
	now := time.Now()
	return agent.Event{Phase: agent.PhaseNotice, Class: agent.ClassFatal, At: now, Run: "r1",
		Notice:   agent.Notice{Provider: "aws", Kind: agent.KindTerminate, ID: "<!channel> spot", NoticedAt: now, Deadline: now.Add(2 * time.Minute)},
		Instance: agent.Instance{ID: "i-1", Type: "p5.48xlarge", Zone: "us-east-1a"}}
}

func TestJSONAndRetries(t *testing.T) {
	var calls atomic.Int32
	var got agent.Event
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if calls.Add(1) < 3 {
			http.Error(w, "busy", http.StatusServiceUnavailable)
			return
		}
		b, _ := io.ReadAll(r.Body)
		json.Unmarshal(b, &got)
	}))
	defer srv.Close()
	s := &Sender{Hooks: []Webhook{{URL: srv.URL, Format: FormatJSON}}}
	s.Report(context.Background(), event())
	if calls.Load() != 3 || got.Notice.Kind != agent.KindTerminate || got.Instance.Type != "p5.48xlarge" || got.Run != "r1" {
		t.Fatalf("calls %d, body %+v", calls.Load(), got)
	}
}

func TestSlackEscapesNoticeContents(t *testing.T) {
	b, err := Body(FormatSlack, event())
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]string
	json.Unmarshal(b, &m)
	if strings.Contains(m["text"], "<!channel>") || !strings.Contains(m["text"], "aws terminate notice on i-1 p5.48xlarge us-east-1a") {
		t.Fatalf("slack text = %q", m["text"])
	}
}

func TestClientErrorNotRetried(t *testing.T) {
	var calls atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls.Add(1)
		http.Error(w, "no such hook", http.StatusNotFound)
	}))
	defer srv.Close()
	(&Sender{Hooks: []Webhook{{URL: srv.URL}}}).Report(context.Background(), event())
	if calls.Load() != 1 {
		t.Fatalf("a 404 was tried %d times", calls.Load())
	}
}

// TestDownEndpointBoundedByDeadline: an endpoint that refuses connections
// gives up at the deadline, not later.
func TestDownEndpointBoundedByDeadline(t *testing.T) {
	srv := httptest.NewServer(http.NotFoundHandler())
	url := srv.URL
	srv.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 600*time.Millisecond)
	defer cancel()
	start := time.Now()
	(&Sender{Hooks: []Webhook{{URL: url}}, Attempts: 100}).Report(ctx, event())
	if d := time.Since(start); d > 3*time.Second {
		t.Fatalf("Report took %v past a 600ms deadline", d)
	}
}

func TestRedact(t *testing.T) {
	if got := redact("https://hooks.slack.com/services/T0/B0/secret"); got != "https://hooks.slack.com/…" {
		t.Fatalf("redact = %s", got)
	}
}

// TestErrorsNeverCarryTheURLPath: a refused webhook's error names the host
// but not the path (the secret of a Slack-style URL).
func TestErrorsNeverCarryTheURLPath(t *testing.T) {
	s := &Sender{Hooks: []Webhook{{URL: "http://127.0.0.1:1/services/T0/B0/secret-token", Format: "json"}}, Attempts: 1}
	err := s.send(t.Context(), s.Hooks[0], agent.Event{Phase: agent.PhaseNotice})
	if err == nil || strings.Contains(err.Error(), "secret-token") || !strings.Contains(err.Error(), "127.0.0.1:1") {
		t.Fatalf("error = %v; want the host and no path", err)
	}
}
