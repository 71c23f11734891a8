package alibaba

import (
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/preemptd/preemptd/agent"
	"github.com/preemptd/preemptd/test/fakes"
)

func TestParseTerminationTime(t *testing.T) {
	now := time.Date(2015, 1, 5, 17, 57, 0, 0, time.UTC)
	for _, tc := range []struct {
		name, in string
		want     time.Time
		bad      bool
	}{
		{"documented form", "2015-01-05T18:02:00Z", time.Date(2015, 1, 5, 18, 2, 0, 0, time.UTC), false},
		{"with a newline", "2015-01-05T18:02:00Z\n", time.Date(2015, 1, 5, 18, 2, 0, 0, time.UTC), false},
		{"no zone", "2015-01-05 18:02:00", time.Time{}, true},
		{"html", "<html>portal</html>", time.Time{}, true},
		{"empty", "", time.Time{}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n, err := ParseTerminationTime([]byte(tc.in), now)
			if tc.bad {
				if err == nil {
					t.Fatalf("parsed %q as %+v", tc.in, n)
				}
				return
			}
			if err != nil || !n.Deadline.Equal(tc.want) || n.Kind != agent.KindTerminate || n.Provider != "alibaba" {
				t.Fatalf("%+v, %v", n, err)
			}
		})
	}
}

// steps runs one poll and returns what it sent.
func steps(t *testing.T, p *Provider) []agent.Notice {
	t.Helper()
	out := make(chan agent.Notice, 4)
	p.Step(t.Context(), out)
	close(out)
	var got []agent.Notice
	for n := range out {
		got = append(got, n)
	}
	return got
}

// TestHardenedModeNoticeAndWithdrawal: against the hardened-mode service
// every read carries a token (fetched again after the service forgets it);
// 404 is quiet; the release time is a notice with that deadline, sent once;
// an outage neither alarms nor withdraws; the document gone withdraws it.
func TestHardenedModeNoticeAndWithdrawal(t *testing.T) {
	s := fakes.NewAlibaba()
	s.Hardened = true
	srv := httptest.NewServer(s)
	defer srv.Close()
	p := New(Config{Endpoint: srv.URL, PollInterval: 100 * time.Millisecond})
	if got := steps(t, p); len(got) != 0 {
		t.Fatalf("no notice yet: sent %+v", got)
	}
	inst, err := p.Identity(t.Context())
	if err != nil || inst.ID != "i-bp1fakefakefake0001" || inst.Region != "cn-hangzhou" || inst.Zone != "cn-hangzhou-i" || inst.Type == "" {
		t.Fatalf("identity %+v, %v", inst, err)
	}
	release := time.Now().Add(5 * time.Minute).UTC().Truncate(time.Second)
	s.SetRelease(release.Format(time.RFC3339))
	got := steps(t, p)
	if len(got) != 1 || !got[0].Deadline.Equal(release) || got[0].Withdrawn {
		t.Fatalf("release set: sent %+v", got)
	}
	if got := steps(t, p); len(got) != 0 {
		t.Fatalf("the same notice sent again: %+v", got)
	}
	s.ForgetTokens() // a restarted service: the cached token is refused once
	if got := steps(t, p); len(got) != 0 {
		t.Fatalf("after the token was forgotten: %+v", got)
	}
	s.SetFault(func(w http.ResponseWriter, r *http.Request) bool { http.Error(w, "", 500); return true })
	if got := steps(t, p); len(got) != 0 {
		t.Fatalf("an outage changed the notice: %+v", got)
	}
	s.SetFault(nil)
	s.SetRelease("")
	got = steps(t, p)
	if len(got) != 1 || !got[0].Withdrawn {
		t.Fatalf("release withdrawn: sent %+v", got)
	}
	if s.Gets() < 5 {
		t.Fatalf("%d reads of the spot document reached the service past the token check", s.Gets())
	}
}

// TestNormalModeWithoutTokens: a service with no token endpoint is read
// without one.
func TestNormalModeWithoutTokens(t *testing.T) {
	s := fakes.NewAlibaba()
	s.NoTokens = true
	srv := httptest.NewServer(s)
	defer srv.Close()
	p := New(Config{Endpoint: srv.URL})
	s.SetRelease("2030-01-01T00:00:00Z")
	if got := steps(t, p); len(got) != 1 {
		t.Fatalf("sent %+v", got)
	}
}
