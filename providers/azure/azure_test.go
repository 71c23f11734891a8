package azure

import (
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/preemptd/preemptd/agent"
	"github.com/preemptd/preemptd/test/fakes"
)

var now = time.Date(2026, 1, 21, 9, 0, 0, 0, time.UTC)

func TestForVM(t *testing.T) {
	doc := `{"DocumentIncarnation": 3, "Events": [
	 {"EventId":"A","EventType":"Preempt","ResourceType":"VirtualMachine","Resources":["vm-mine"],"EventStatus":"Scheduled","NotBefore":"Wed, 21 Jan 2026 09:00:30 GMT","Description":"spot eviction","EventSource":"Platform","DurationInSeconds":-1},
	 {"EventId":"B","EventType":"Preempt","ResourceType":"VirtualMachine","Resources":["vm-other"],"EventStatus":"Scheduled","NotBefore":"Wed, 21 Jan 2026 09:00:30 GMT"},
	 {"EventId":"C","EventType":"Reboot","ResourceType":"VirtualMachine","Resources":["vm-other","VM-MINE"],"EventStatus":"Scheduled","NotBefore":"Wed, 21 Jan 2026 09:15:00 GMT"},
	 {"EventId":"D","EventType":"Freeze","ResourceType":"VirtualMachine","Resources":["vm-mine"],"EventStatus":"Started","NotBefore":""}]}`
	d, err := ParseDocument([]byte(doc))
	if err != nil || d.DocumentIncarnation != 3 {
		t.Fatal(err)
	}
	ns, unknown, err := ForVM(d, "vm-mine", now)
	if err != nil || len(unknown) != 0 {
		t.Fatal(err, unknown)
	}
	got := map[string]agent.Notice{}
	for _, n := range ns {
		got[n.ID] = n
	}
	if len(ns) != 3 || got["B"].ID != "" {
		t.Fatalf("notices %+v; want A, C, D and not the other VM's B", ns)
	}
	if a := got["A"]; a.Kind != agent.KindPreempt || !a.Deadline.Equal(now.Add(30*time.Second)) {
		t.Fatalf("A = %+v", a)
	}
	if c := got["C"]; c.Kind != agent.KindMaintenance || c.Action != "Reboot" {
		t.Fatalf("C = %+v", c)
	}
	if d := got["D"]; d.Kind != agent.KindFreeze || !d.Deadline.Equal(now) {
		t.Fatalf("D (started, no NotBefore) = %+v", d)
	}
	for _, bad := range []string{`{"Events":[{"EventId":"x","EventType":"Preempt","Resources":["vm-mine"],"NotBefore":"soon"}]}`} {
		d, err := ParseDocument([]byte(bad))
		if err == nil {
			_, _, err = ForVM(d, "vm-mine", now)
		}
		if err == nil {
			t.Errorf("accepted %s", bad)
		}
	}
	if _, err := ParseDocument([]byte(`<html>`)); err == nil {
		t.Error("garbage accepted")
	}
}

// TestUnknownTypeKeepsTheRest: an event type Azure added after this
// release is skipped and reported; the Preempt beside it is still acted on.
func TestUnknownTypeKeepsTheRest(t *testing.T) {
	d, err := ParseDocument([]byte(`{"DocumentIncarnation":4,"Events":[
	 {"EventId":"new","EventType":"LiveMigrate","Resources":["vm-mine"],"EventStatus":"Scheduled","NotBefore":"Wed, 21 Jan 2026 09:10:00 GMT"},
	 {"EventId":"A","EventType":"Preempt","Resources":["vm-mine"],"EventStatus":"Scheduled","NotBefore":"Wed, 21 Jan 2026 09:00:30 GMT"}]}`))
	if err != nil {
		t.Fatal(err)
	}
	ns, unknown, err := ForVM(d, "vm-mine", now)
	if err != nil || len(ns) != 1 || ns[0].ID != "A" || len(unknown) != 1 || unknown[0].EventID != "new" {
		t.Fatalf("notices %+v, unknown %+v, err %v; want A acted on and new skipped", ns, unknown, err)
	}

	s := fakes.NewAzure("vm-mine")
	srv := httptest.NewServer(s)
	defer srv.Close()
	p := New(Config{Endpoint: srv.URL, PollInterval: 100 * time.Millisecond})
	nb := time.Now().Add(30 * time.Second).UTC().Format(time.RFC1123)
	s.SetEvents(fakes.AzureEvent{EventId: "new", EventType: "LiveMigrate", Resources: []string{"vm-mine"}, NotBefore: nb},
		fakes.AzureEvent{EventId: "A", EventType: "Preempt", Resources: []string{"vm-mine"}, NotBefore: nb})
	if got := poll(p, t); len(got) != 1 || got[0].ID != "A" || p.out.Failing() {
		t.Fatalf("poll = %+v (failing %v); want the Preempt and no outage", got, p.out.Failing())
	}
}

// TestAckOnlyOwnEvents: an event that names other VMs too is not acked
// (that would release it for all of them) unless azure.ack is all.
func TestAckOnlyOwnEvents(t *testing.T) {
	nb := time.Now().Add(30 * time.Second).UTC().Format(time.RFC1123)
	for _, tc := range []struct {
		mode string
		want []string
	}{{"mine", []string{"own"}}, {"all", []string{"own", "shared"}}, {"off", nil}} {
		t.Run(tc.mode, func(t *testing.T) {
			s := fakes.NewAzure("vm-mine")
			srv := httptest.NewServer(s)
			defer srv.Close()
			p := New(Config{Endpoint: srv.URL, Ack: tc.mode, PollInterval: 100 * time.Millisecond})
			s.SetEvents(fakes.AzureEvent{EventId: "own", EventType: "Preempt", Resources: []string{"vm-mine"}, NotBefore: nb},
				fakes.AzureEvent{EventId: "shared", EventType: "Reboot", Resources: []string{"vm-mine", "vm-2"}, NotBefore: nb})
			ns := poll(p, t)
			if len(ns) != 2 {
				t.Fatalf("notices %+v", ns)
			}
			for _, n := range ns {
				err := p.Ack(t.Context(), n)
				if tc.mode == "mine" && n.ID == "shared" {
					if !errors.Is(err, ErrShared) {
						t.Fatalf("ack of a shared event: %v, want ErrShared", err)
					}
				} else if err != nil {
					t.Fatalf("ack %s: %v", n.ID, err)
				}
			}
			got := s.Acks()
			slices.Sort(got)
			if !slices.Equal(got, tc.want) {
				t.Fatalf("acks = %v, want %v", got, tc.want)
			}
		})
	}
}

// TestFirstRequestMayTakeMinutes: the first Scheduled Events request
// enables the service and may answer slowly; it is given FirstTimeout,
// later ones only a poll's worth.
func TestFirstRequestMayTakeMinutes(t *testing.T) {
	s := fakes.NewAzure("vm-mine")
	srv := httptest.NewServer(s)
	defer srv.Close()
	nb := time.Now().Add(time.Minute).UTC().Format(time.RFC1123)
	s.SetEvents(fakes.AzureEvent{EventId: "e", EventType: "Preempt", Resources: []string{"vm-mine"}, NotBefore: nb})
	var slow atomic.Bool
	slow.Store(true)
	s.SetFault(func(w http.ResponseWriter, r *http.Request) bool {
		if strings.HasPrefix(r.URL.Path, "/metadata/scheduledevents") && slow.Swap(false) {
			time.Sleep(2500 * time.Millisecond) // longer than any ordinary request may take
		}
		return false
	})
	p := New(Config{Endpoint: srv.URL, PollInterval: 100 * time.Millisecond, FirstTimeout: 10 * time.Second})
	if ns := poll(p, t); len(ns) != 1 || p.out.Failing() {
		t.Fatalf("first (slow) request: %+v, failing %v", ns, p.out.Failing())
	}
	slow.Store(true)
	if ns := poll(p, t); len(ns) != 0 || !p.out.Failing() {
		t.Fatalf("a later slow request was waited for: %+v, failing %v", ns, p.out.Failing())
	}
}

func TestStartRequests(t *testing.T) {
	if got := string(StartRequests("e-1")); got != `{"StartRequests":[{"EventId":"e-1"}]}` {
		t.Fatalf("StartRequests = %s", got)
	}
}

func poll(p *Provider, t *testing.T) []agent.Notice {
	out := make(chan agent.Notice, 16)
	p.Poll(t.Context(), out)
	close(out)
	var ns []agent.Notice
	for n := range out {
		ns = append(ns, n)
	}
	return ns
}

func TestPollAckAndWithdraw(t *testing.T) {
	s := fakes.NewAzure("vm-mine")
	srv := httptest.NewServer(s)
	defer srv.Close()
	p := New(Config{Endpoint: srv.URL, Ack: "mine", PollInterval: 100 * time.Millisecond})
	nb := time.Now().Add(30 * time.Second).UTC().Format(time.RFC1123)

	if ns := poll(p, t); len(ns) != 0 {
		t.Fatalf("empty document: %+v", ns)
	}
	s.SetEvents(fakes.AzureEvent{EventId: "other", EventType: "Preempt", Resources: []string{"vm-x"}, NotBefore: nb})
	if ns := poll(p, t); len(ns) != 0 {
		t.Fatalf("another VM's event reached us: %+v", ns)
	}
	mine := fakes.AzureEvent{EventId: "mine", EventType: "Preempt", Resources: []string{"vm-mine"}, EventStatus: "Scheduled", NotBefore: nb}
	s.SetEvents(mine)
	ns := poll(p, t)
	if len(ns) != 1 || ns[0].ID != "mine" || ns[0].Kind != agent.KindPreempt {
		t.Fatalf("own event: %+v", ns)
	}
	first := ns[0]
	if ns := poll(p, t); len(ns) != 0 {
		t.Fatalf("same incarnation re-sent: %+v", ns)
	}
	s.SetEvents(mine) // new incarnation, same event: deduped by EventId
	if ns := poll(p, t); len(ns) != 0 {
		t.Fatalf("same EventId re-sent: %+v", ns)
	}
	if err := p.Ack(t.Context(), first); err != nil {
		t.Fatal(err)
	}
	if err := p.Ack(t.Context(), first); err != nil {
		t.Fatal(err)
	}
	if acks := s.Acks(); len(acks) != 1 || acks[0] != "mine" {
		t.Fatalf("acks = %v, want one StartRequest for mine", acks)
	}
	// The platform starts the acknowledged event: it vanishes, and is withdrawn.
	if ns := poll(p, t); len(ns) != 1 || !ns[0].Withdrawn || ns[0].ID != "mine" {
		t.Fatalf("vanished event not withdrawn: %+v", ns)
	}
}

func TestAckDisabled(t *testing.T) {
	s := fakes.NewAzure("vm")
	srv := httptest.NewServer(s)
	defer srv.Close()
	p := New(Config{Endpoint: srv.URL, Ack: "off"})
	if err := p.Ack(t.Context(), agent.Notice{Provider: "azure", ID: "x"}); err != nil {
		t.Fatal(err)
	}
	if acks := s.Acks(); len(acks) != 0 {
		t.Fatalf("acked with azure.ack false: %v", acks)
	}
}

func TestOutagesNoNotice(t *testing.T) {
	s := fakes.NewAzure("vm-mine")
	srv := httptest.NewServer(s)
	defer srv.Close()
	p := New(Config{Endpoint: srv.URL, PollInterval: 100 * time.Millisecond,
		HTTPClient: &http.Client{Timeout: 300 * time.Millisecond}})
	nb := time.Now().Add(time.Minute).UTC().Format(time.RFC1123)
	s.SetEvents(fakes.AzureEvent{EventId: "e", EventType: "Preempt", Resources: []string{"vm-mine"}, NotBefore: nb})
	if ns := poll(p, t); len(ns) != 1 {
		t.Fatalf("setup: %+v", ns)
	}
	faults := map[string]fakes.Fault{
		"503":     func(w http.ResponseWriter, r *http.Request) bool { http.Error(w, "", 503); return true },
		"garbage": func(w http.ResponseWriter, r *http.Request) bool { fmt.Fprint(w, "{\"Events\": [tru"); return true },
		"slow": func(w http.ResponseWriter, r *http.Request) bool {
			time.Sleep(500 * time.Millisecond)
			return true
		},
		"empty 200": func(w http.ResponseWriter, r *http.Request) bool { return true },
	}
	for name, f := range faults {
		s.SetFault(f)
		if ns := poll(p, t); len(ns) != 0 {
			t.Fatalf("%s: %+v (an outage must not withdraw or announce)", name, ns)
		}
		if !p.out.Failing() {
			t.Fatalf("%s not recorded as an outage", name)
		}
	}
}

func TestVMNameUnavailable(t *testing.T) {
	s := fakes.NewAzure("")
	srv := httptest.NewServer(s)
	defer srv.Close()
	p := New(Config{Endpoint: srv.URL})
	s.SetEvents(fakes.AzureEvent{EventId: "e", EventType: "Preempt", Resources: []string{""}, NotBefore: now.Format(time.RFC1123)})
	if ns := poll(p, t); len(ns) != 0 || p.vm != "" {
		t.Fatalf("without a VM name: %+v", ns)
	}
	if !p.out.Failing() {
		t.Fatal("missing VM name not recorded")
	}
}

func FuzzParseDocument(f *testing.F) {
	f.Add([]byte(`{"DocumentIncarnation":1,"Events":[{"EventId":"A","EventType":"Preempt","Resources":["vm"],"NotBefore":"Wed, 21 Jan 2026 09:00:30 GMT"}]}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		d, err := ParseDocument(b)
		if err != nil {
			return
		}
		ns, _, err := ForVM(d, "vm", now)
		for _, n := range ns {
			if err == nil && (n.ID == "" || n.Kind == "") {
				t.Fatalf("bad notice accepted: %+v", n)
			}
		}
	})
}
