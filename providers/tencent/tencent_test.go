package tencent

import (
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/preemptd/preemptd/agent"
	"github.com/preemptd/preemptd/test/fakes"
)

// TestParseTerminationTimeIsBeijingTime: the documented form is UTC+8, so
// 12:05:33 there is 04:05:33 UTC, not eight hours later.
func TestParseTerminationTimeIsBeijingTime(t *testing.T) {
	now := time.Date(2018, 8, 18, 4, 3, 33, 0, time.UTC)
	for _, tc := range []struct {
		name, in string
		want     time.Time
		bad      bool
	}{
		{"documented form, UTC+8", "2018-08-18 12:05:33", time.Date(2018, 8, 18, 4, 5, 33, 0, time.UTC), false},
		{"across midnight", "2018-08-19 02:00:00\n", time.Date(2018, 8, 18, 18, 0, 0, 0, time.UTC), false},
		{"with its own offset", "2018-08-18T04:05:33Z", time.Date(2018, 8, 18, 4, 5, 33, 0, time.UTC), false},
		{"garbage", "soon", time.Time{}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n, err := ParseTerminationTime([]byte(tc.in), now)
			if tc.bad {
				if err == nil {
					t.Fatalf("parsed %q as %+v", tc.in, n)
				}
				return
			}
			if err != nil || !n.Deadline.Equal(tc.want) || n.Deadline.Location() != time.UTC || n.Provider != "tencent" || n.Kind != agent.KindTerminate {
				t.Fatalf("%+v, %v; want %v", n, err, tc.want)
			}
		})
	}
	if n, _ := ParseTerminationTime([]byte("2018-08-18 12:05:33"), now); n.Deadline.Sub(now) != 2*time.Minute {
		t.Fatalf("two minutes' notice read as %v", n.Deadline.Sub(now))
	}
}

func TestNoticeAndWithdrawal(t *testing.T) {
	s := fakes.NewTencent()
	srv := httptest.NewServer(s)
	defer srv.Close()
	p := New(Config{Endpoint: srv.URL})
	step := func() []agent.Notice {
		out := make(chan agent.Notice, 4)
		p.Step(t.Context(), out)
		close(out)
		var got []agent.Notice
		for n := range out {
			got = append(got, n)
		}
		return got
	}
	if got := step(); len(got) != 0 {
		t.Fatalf("no notice: %+v", got)
	}
	inst, err := p.Identity(t.Context())
	if err != nil || inst.ID != "ins-fake0001" || inst.Region != "ap-guangzhou" || inst.Zone != "ap-guangzhou-3" {
		t.Fatalf("identity %+v, %v", inst, err)
	}
	at := time.Now().Add(2 * time.Minute).Truncate(time.Second)
	s.SetReclaim(at.In(time.FixedZone("CST", 8*3600)).Format(time.DateTime))
	got := step()
	if len(got) != 1 || !got[0].Deadline.Equal(at) {
		t.Fatalf("reclaim set for %v: %+v", at.UTC(), got)
	}
	s.SetFault(func(w http.ResponseWriter, r *http.Request) bool { w.Write([]byte("<html>")); return true })
	if got := step(); len(got) != 0 {
		t.Fatalf("a garbled answer changed the notice: %+v", got)
	}
	s.SetFault(nil)
	s.SetReclaim("")
	if got := step(); len(got) != 1 || !got[0].Withdrawn {
		t.Fatalf("withdrawn: %+v", got)
	}
}
