package aws

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/preemptd/preemptd/agent"
)

var now = time.Date(2026, 1, 21, 8, 58, 0, 0, time.UTC)

func TestParseInstanceAction(t *testing.T) {
	tests := []struct {
		name, body string
		kind       agent.Kind
		deadline   time.Time
		err        string
	}{
		{"terminate", `{"action":"terminate","time":"2026-01-21T09:00:00Z"}`, agent.KindTerminate, now.Add(2 * time.Minute), ""},
		{"stop", `{"action": "stop", "time": "2026-01-21T09:00:00Z"}`, agent.KindStop, now.Add(2 * time.Minute), ""},
		{"hibernate", `{"action":"hibernate","time":"2026-01-21T09:00:00Z"}`, agent.KindHibernate, now.Add(2 * time.Minute), ""},
		{"unknown action", `{"action":"explode","time":"2026-01-21T09:00:00Z"}`, "", time.Time{}, "unknown action"},
		{"bad time", `{"action":"terminate","time":"soon"}`, "", time.Time{}, "time"},
		{"html error page", `<html>503</html>`, "", time.Time{}, "not JSON"},
		{"empty", ``, "", time.Time{}, "not JSON"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			n, err := ParseInstanceAction([]byte(tt.body), now)
			if tt.err != "" {
				if err == nil || !strings.Contains(err.Error(), tt.err) {
					t.Fatalf("err = %v, want %q", err, tt.err)
				}
				return
			}
			if err != nil || n.Kind != tt.kind || !n.Deadline.Equal(tt.deadline) || n.ID != IDInstanceAction || n.Provider != "aws" {
				t.Fatalf("got %+v, %v", n, err)
			}
		})
	}
}

func TestParseRebalance(t *testing.T) {
	n, err := ParseRebalance([]byte(`{"noticeTime":"2026-01-21T08:50:00Z"}`), now)
	if err != nil || n.Kind != agent.KindRebalance || !n.Deadline.IsZero() || !n.NoticedAt.Equal(now.Add(-8*time.Minute)) {
		t.Fatalf("got %+v, %v", n, err)
	}
	if _, err := ParseRebalance([]byte(`{"noticeTime":""}`), now); err == nil {
		t.Fatal("empty noticeTime accepted")
	}
}

func TestParseScheduled(t *testing.T) {
	body := `[
	 {"Code":"system-reboot","Description":"scheduled reboot","EventId":"instance-event-1","NotBefore":"21 Jan 2026 09:00:00 GMT","NotAfter":"21 Jan 2026 09:17:23 GMT","State":"active"},
	 {"Code":"instance-stop","Description":"[Canceled] stop","EventId":"instance-event-2","NotBefore":"22 Jan 2026 09:00:00 GMT","State":"canceled"},
	 {"Code":"instance-retirement","EventId":"instance-event-3","NotBefore":"23 Jan 2026 09:00:00 GMT","State":"completed"}]`
	ns, err := ParseScheduled([]byte(body), now)
	if err != nil || len(ns) != 3 {
		t.Fatalf("got %d notices, %v", len(ns), err)
	}
	if ns[0].Withdrawn || ns[0].Kind != agent.KindReboot || ns[0].Action != "system-reboot" || !ns[0].Scheduled ||
		!ns[0].Deadline.Equal(time.Date(2026, 1, 21, 9, 0, 0, 0, time.UTC)) ||
		!ns[0].WindowEnd.Equal(time.Date(2026, 1, 21, 9, 17, 23, 0, time.UTC)) {
		t.Fatalf("active event = %+v", ns[0])
	}
	if !ns[1].Withdrawn || !ns[2].Withdrawn {
		t.Fatalf("canceled/completed not withdrawn: %+v %+v", ns[1], ns[2])
	}
	for _, bad := range []string{`{}`, `[{"EventId":"x","NotBefore":"tomorrow"}]`, `[{"NotBefore":"21 Jan 2026 09:00:00 GMT"}]`, `garbage`} {
		if _, err := ParseScheduled([]byte(bad), now); err == nil {
			t.Errorf("ParseScheduled(%s) accepted", bad)
		}
	}
	if ns, err := ParseScheduled([]byte(`[]`), now); err != nil || len(ns) != 0 {
		t.Fatalf("empty list: %v %v", ns, err)
	}
}

func TestLifecycleKind(t *testing.T) {
	for _, tc := range []struct {
		in   string
		kind agent.Kind
		ok   bool
	}{
		{"InService", "", true}, {"Terminated\n", agent.KindTerminate, true}, {"Warmed:Running", "", true},
		{"Warmed:Terminated", agent.KindTerminate, true}, {"Warmed:Stopped", agent.KindStop, true},
		{"Warmed:Hibernated", agent.KindHibernate, true},
		{"Pending:Wait", "", true}, {"", "", false}, {"<html>", "", false},
	} {
		kind, err := LifecycleKind([]byte(tc.in))
		if kind != tc.kind || (err == nil) != tc.ok {
			t.Errorf("LifecycleKind(%q) = %q, %v", tc.in, kind, err)
		}
	}
}

func TestScheduledKind(t *testing.T) {
	for code, want := range map[string]agent.Kind{
		"instance-stop": agent.KindStop, "instance-retirement": agent.KindStop, "instance-reboot": agent.KindReboot,
		"system-reboot": agent.KindReboot, "system-maintenance": agent.KindDisruption, "something-new": agent.KindMaintenance,
	} {
		if got := ScheduledKind(code); got != want {
			t.Errorf("ScheduledKind(%s) = %s, want %s", code, got, want)
		}
	}
	// What each does with a deadline a day away and one a minute away.
	now := time.Now()
	for code, want := range map[string][2]agent.Class{
		"instance-stop":      {agent.ClassAdvisory, agent.ClassFatal},
		"system-reboot":      {agent.ClassAdvisory, agent.ClassFatal},
		"system-maintenance": {agent.ClassAdvisory, agent.ClassAdvisory},
	} {
		n := agent.Notice{Kind: ScheduledKind(code), Scheduled: true}
		n.Deadline = now.Add(24 * time.Hour)
		far := agent.Classify(n, now, 2*time.Minute)
		n.Deadline = now.Add(time.Minute)
		near := agent.Classify(n, now, 2*time.Minute)
		if far != want[0] || near != want[1] {
			t.Errorf("%s: a day out %s, a minute out %s; want %s, %s", code, far, near, want[0], want[1])
		}
	}
}

// imdsServer replays IMDSv2: a token from PUT, required on every GET; tokens
// can be expired server-side to force the client's 401 refresh.
type imdsServer struct {
	mu       sync.Mutex
	docs     map[string]string
	fault    func(w http.ResponseWriter, r *http.Request) bool
	tokens   map[string]bool
	issued   int
	got401   int
	requests int
}

func newIMDS(t *testing.T) (*imdsServer, *httptest.Server) {
	s := &imdsServer{docs: map[string]string{}, tokens: map[string]bool{}}
	srv := httptest.NewServer(s)
	t.Cleanup(srv.Close)
	return s, srv
}

func (s *imdsServer) set(path, body string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if body == "" {
		delete(s.docs, path)
	} else {
		s.docs[path] = body
	}
}

func (s *imdsServer) expireTokens() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.tokens = map[string]bool{}
}

func (s *imdsServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	s.requests++
	fault := s.fault
	s.mu.Unlock()
	if fault != nil && fault(w, r) {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if r.Method == http.MethodPut && r.URL.Path == "/latest/api/token" {
		if r.Header.Get("X-aws-ec2-metadata-token-ttl-seconds") == "" {
			http.Error(w, "missing ttl", http.StatusBadRequest)
			return
		}
		s.issued++
		tok := fmt.Sprintf("token-%d", s.issued)
		s.tokens[tok] = true
		w.Header().Set("X-aws-ec2-metadata-token-ttl-seconds", "21600")
		fmt.Fprint(w, tok)
		return
	}
	if !s.tokens[r.Header.Get("X-aws-ec2-metadata-token")] {
		s.got401++
		http.Error(w, "", http.StatusUnauthorized)
		return
	}
	body, ok := s.docs[strings.TrimPrefix(r.URL.Path, "/latest/meta-data/")]
	if !ok {
		http.NotFound(w, r)
		return
	}
	fmt.Fprint(w, body)
}

func collect(p *Provider, ctx context.Context) []agent.Notice {
	out := make(chan agent.Notice, 16)
	p.Poll(ctx, out)
	close(out)
	var ns []agent.Notice
	for n := range out {
		ns = append(ns, n)
	}
	return ns
}

func TestPollFlow(t *testing.T) {
	s, srv := newIMDS(t)
	p := New(Config{Endpoint: srv.URL, PollInterval: 100 * time.Millisecond, SlowPollInterval: 100 * time.Millisecond,
		LifecycleWindow: time.Minute})
	ctx := t.Context()

	if ns := collect(p, ctx); len(ns) != 0 {
		t.Fatalf("no documents, notices %+v", ns)
	}
	s.set(PathRebalance, `{"noticeTime":"2026-01-21T08:50:00Z"}`)
	if ns := collect(p, ctx); len(ns) != 1 || ns[0].Kind != agent.KindRebalance {
		t.Fatalf("rebalance: %+v", ns)
	}
	if ns := collect(p, ctx); len(ns) != 0 {
		t.Fatalf("rebalance sent twice: %+v", ns)
	}

	// The token expires on the server: the client refreshes it on 401 and
	// the poll still sees the interruption notice.
	s.expireTokens()
	deadline := time.Now().Add(2 * time.Minute).UTC().Truncate(time.Second)
	s.set(PathInstanceAction, fmt.Sprintf(`{"action":"stop","time":"%s"}`, deadline.Format(time.RFC3339)))
	ns := collect(p, ctx)
	if len(ns) != 1 || ns[0].Kind != agent.KindStop || !ns[0].Deadline.Equal(deadline) {
		t.Fatalf("instance-action after token expiry: %+v", ns)
	}
	if s.got401 == 0 || s.issued < 2 {
		t.Fatalf("token refresh not exercised: 401s %d, tokens issued %d", s.got401, s.issued)
	}

	// A later deadline for a spot notice is not trusted over the first.
	s.set(PathInstanceAction, fmt.Sprintf(`{"action":"stop","time":"%s"}`, deadline.Add(time.Second).Format(time.RFC3339)))
	if ns := collect(p, ctx); len(ns) != 0 {
		t.Fatalf("later deadline re-sent: %+v", ns)
	}

	s.set(PathScheduled, `[{"Code":"system-reboot","EventId":"ev-1","NotBefore":"21 Jan 2030 09:00:00 GMT","State":"active"}]`)
	if ns := collect(p, ctx); len(ns) != 1 || ns[0].ID != "ev-1" || ns[0].Withdrawn || ns[0].Kind != agent.KindReboot {
		t.Fatalf("scheduled: %+v", ns)
	}
	if ns := collect(p, ctx); len(ns) != 0 {
		t.Fatalf("unchanged scheduled event sent again: %+v", ns)
	}
	// Rescheduled later: the new deadline and window are news.
	s.set(PathScheduled, `[{"Code":"system-reboot","EventId":"ev-1","NotBefore":"28 Jan 2030 09:00:00 GMT","NotAfter":"28 Jan 2030 11:00:00 GMT","State":"active"}]`)
	ns = collect(p, ctx)
	if len(ns) != 1 || ns[0].ID != "ev-1" || !ns[0].Deadline.Equal(time.Date(2030, 1, 28, 9, 0, 0, 0, time.UTC)) ||
		!ns[0].WindowEnd.Equal(time.Date(2030, 1, 28, 11, 0, 0, 0, time.UTC)) {
		t.Fatalf("rescheduled event: %+v", ns)
	}
	s.set(PathScheduled, `[{"Code":"system-reboot","EventId":"ev-1","NotBefore":"28 Jan 2030 09:00:00 GMT","State":"canceled"}]`)
	if ns := collect(p, ctx); len(ns) != 1 || ns[0].ID != "ev-1" || !ns[0].Withdrawn {
		t.Fatalf("canceled scheduled event not withdrawn: %+v", ns)
	}

	s.set(PathLifecycle, "InService")
	if ns := collect(p, ctx); len(ns) != 0 {
		t.Fatalf("InService: %+v", ns)
	}
	s.set(PathLifecycle, "Terminated")
	ns = collect(p, ctx)
	if len(ns) != 1 || ns[0].Kind != agent.KindTerminate || ns[0].Action != "Terminated" {
		t.Fatalf("Terminated: %+v", ns)
	}
	if again := collect(p, ctx); len(again) != 0 {
		t.Fatalf("Terminated sent again with a new window: %+v", again)
	}
	s.set(PathLifecycle, "InService")
	if ns := collect(p, ctx); len(ns) != 1 || !ns[0].Withdrawn {
		t.Fatalf("lifecycle back in service not withdrawn: %+v", ns)
	}
	// An instance going into a warm pool is stopped, hibernated or terminated.
	for state, kind := range map[string]agent.Kind{"Warmed:Stopped": agent.KindStop, "Warmed:Hibernated": agent.KindHibernate,
		"Warmed:Terminated": agent.KindTerminate} {
		s.set(PathLifecycle, state)
		ns := collect(p, ctx)
		if len(ns) < 1 || ns[0].Kind != kind || ns[0].Action != state || ns[0].Withdrawn {
			t.Fatalf("%s: %+v", state, ns)
		}
	}
	s.set(PathLifecycle, "Warmed:Running")
	if ns := collect(p, ctx); len(ns) != 1 || !ns[0].Withdrawn {
		t.Fatalf("Warmed:Running: %+v", ns)
	}

	s.set(PathInstanceAction, "")
	if ns := collect(p, ctx); len(ns) != 1 || ns[0].ID != IDInstanceAction || !ns[0].Withdrawn {
		t.Fatalf("vanished instance-action not withdrawn: %+v", ns)
	}
}

// TestOutagesNeverNotify: every kind of metadata failure leaves the
// announced set alone — no notice, no withdrawal.
func TestOutagesNeverNotify(t *testing.T) {
	faults := map[string]func(w http.ResponseWriter, r *http.Request) bool{
		"503": func(w http.ResponseWriter, r *http.Request) bool {
			http.Error(w, "busy", http.StatusServiceUnavailable)
			return true
		},
		"500 on token": func(w http.ResponseWriter, r *http.Request) bool {
			if r.Method == http.MethodPut {
				http.Error(w, "", http.StatusInternalServerError)
				return true
			}
			return false
		},
		"401 always": func(w http.ResponseWriter, r *http.Request) bool {
			if r.Method == http.MethodGet {
				http.Error(w, "", http.StatusUnauthorized)
				return true
			}
			return false
		},
		"garbage": func(w http.ResponseWriter, r *http.Request) bool {
			if r.Method == http.MethodGet {
				fmt.Fprint(w, "\x00\x01<html>not json")
				return true
			}
			return false
		},
		"hang": func(w http.ResponseWriter, r *http.Request) bool {
			select {
			case <-r.Context().Done():
			case <-time.After(3 * time.Second):
			}
			return false
		},
	}
	for name, fault := range faults {
		t.Run(name, func(t *testing.T) {
			s, srv := newIMDS(t)
			p := New(Config{Endpoint: srv.URL, PollInterval: 100 * time.Millisecond})
			s.set(PathRebalance, `{"noticeTime":"2026-01-21T08:50:00Z"}`)
			if ns := collect(p, t.Context()); len(ns) != 1 {
				t.Fatalf("setup: %+v", ns)
			}
			s.mu.Lock()
			s.fault = fault
			s.mu.Unlock()
			s.expireTokens() // so that the token path is exercised too
			s.set(PathRebalance, "")
			if name == "hang" {
				ctx, cancel := context.WithTimeout(t.Context(), 1500*time.Millisecond)
				defer cancel()
				if ns := collect(p, ctx); len(ns) != 0 {
					t.Fatalf("during hang: %+v", ns)
				}
			} else if ns := collect(p, t.Context()); len(ns) != 0 {
				t.Fatalf("during %s: %+v", name, ns)
			}
			if !p.out.Failing() && name != "hang" {
				t.Fatalf("outage not recorded")
			}
		})
	}
}

func TestRefusedConnection(t *testing.T) {
	srv := httptest.NewServer(http.NotFoundHandler())
	url := srv.URL
	srv.Close()
	p := New(Config{Endpoint: url, PollInterval: 100 * time.Millisecond})
	if ns := collect(p, t.Context()); len(ns) != 0 {
		t.Fatalf("refused connection produced %+v", ns)
	}
	if !p.out.Failing() {
		t.Fatal("refused connection not recorded as an outage")
	}
}

func FuzzParseInstanceAction(f *testing.F) {
	f.Add([]byte(`{"action":"terminate","time":"2026-01-21T09:00:00Z"}`))
	f.Add([]byte(`{"action":"stop"}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		n, err := ParseInstanceAction(b, now)
		if err == nil && (n.Deadline.IsZero() || n.Kind == "") {
			t.Fatalf("accepted without deadline or kind: %+v", n)
		}
	})
}

func FuzzParseScheduled(f *testing.F) {
	f.Add([]byte(`[{"Code":"system-reboot","EventId":"e","NotBefore":"21 Jan 2026 09:00:00 GMT","State":"active"}]`))
	f.Fuzz(func(t *testing.T, b []byte) {
		ns, err := ParseScheduled(b, now)
		for _, n := range ns {
			if err == nil && (n.ID == "" || n.Deadline.IsZero()) {
				t.Fatalf("accepted event without id or deadline: %+v", n)
			}
		}
	})
}

// TestIMDSv2OnlyByDefault: an IMDS that refuses tokens (IMDSv1 only) is an
// outage by default — never a tokenless request — and works only with
// aws.imdsv1_fallback.
func TestIMDSv2OnlyByDefault(t *testing.T) {
	var tokenless atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodPut {
			http.Error(w, "", http.StatusForbidden)
			return
		}
		if r.Header.Get("X-aws-ec2-metadata-token") == "" {
			tokenless.Add(1)
		}
		if strings.HasSuffix(r.URL.Path, PathRebalance) {
			fmt.Fprint(w, `{"noticeTime":"2026-01-21T08:50:00Z"}`)
			return
		}
		http.NotFound(w, r)
	}))
	defer srv.Close()
	strict := New(Config{Endpoint: srv.URL, PollInterval: 100 * time.Millisecond})
	if ns := collect(strict, t.Context()); len(ns) != 0 || !strict.out.Failing() || tokenless.Load() != 0 {
		t.Fatalf("default: notices %+v, failing %v, tokenless requests %d", ns, strict.out.Failing(), tokenless.Load())
	}
	fallback := New(Config{Endpoint: srv.URL, PollInterval: 100 * time.Millisecond, IMDSv1Fallback: true})
	if ns := collect(fallback, t.Context()); len(ns) != 1 || ns[0].Kind != agent.KindRebalance {
		t.Fatalf("with fallback: %+v", ns)
	}
}
