package job

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/preemptd/preemptd/agent"
	"github.com/preemptd/preemptd/checkpoint/storage"
)

// The failures of the job's notices, each as it was reproduced: an id
// raised again after a withdrawal, a withdrawal that the publication
// outlives, an object without a deadline, a push replayed to a daemon that
// has restarted.

// lastState drains n's notices for d and says whether the last one left a
// job notice active (and how many raises it saw).
func lastState(n *node, d time.Duration) (active bool, raised int) {
	end := time.After(d)
	for {
		select {
		case got := <-n.notices:
			active = !got.Withdrawn
			if active {
				raised++
			}
		case <-end:
			return active, raised
		}
	}
}

// A notice id raised again after its withdrawal (the local trigger
// rewritten, GCP's preempted, AWS's instance-action, simulate --id) stops
// the job again, through the store alone.
func TestNoticeIDRaisedAgainAfterWithdrawal(t *testing.T) {
	nodes := startNodes(t, newDir(t), "run", []string{"n0", "n1"}, "")
	n := fatal("preempted", time.Minute)
	nodes[1].Fatal(n)
	if got, ok := next(t, nodes[0], 5*time.Second); !ok || got.Withdrawn {
		t.Fatalf("first raise: %+v %v", got, ok)
	}
	nodes[1].Withdrawn(n)
	if got, ok := next(t, nodes[0], 5*time.Second); !ok || !got.Withdrawn {
		t.Fatalf("withdrawal: %+v %v", got, ok)
	}
	again := fatal("preempted", time.Minute)
	nodes[1].Fatal(again)
	if got, ok := next(t, nodes[0], 5*time.Second); !ok || got.Withdrawn {
		t.Fatalf("raised again with the same id: %+v, %v; want a job notice", got, ok)
	}
}

// Withdrawn and raised again at once (a trigger file rewritten), with
// pushes: every peer ends with the job notice active.
func TestNoticeWithdrawnAndRaisedAtOnce(t *testing.T) {
	nodes := startNodes(t, newDir(t), "run", []string{"n0", "n1", "n2"}, "a-shared-job-token-0123")
	n := fatal("local-trigger", time.Minute)
	nodes[2].Fatal(n)
	for _, i := range []int{0, 1} {
		if got, ok := next(t, nodes[i], 5*time.Second); !ok || got.Withdrawn {
			t.Fatalf("n%d: %+v %v", i, got, ok)
		}
	}
	nodes[2].Withdrawn(n)
	nodes[2].Fatal(fatal("local-trigger", time.Minute))
	for _, i := range []int{0, 1} {
		if active, _ := lastState(nodes[i], 2*time.Second); !active {
			t.Fatalf("n%d: the notice raised again is withdrawn on the peer", i)
		}
	}
}

// gatedStore holds every notice Create until released — then it lands,
// even when its caller has given up (a request already on the wire) — and
// fails every Delete while deletes are down.
type gatedStore struct {
	storage.Store
	release     chan struct{}
	holding     atomic.Bool
	deletesDown atomic.Bool
}

func (g *gatedStore) Create(ctx context.Context, key string, b []byte) error {
	if strings.Contains(key, "/_job/notices/") {
		g.holding.Store(true)
		<-g.release
		return g.Store.Create(context.WithoutCancel(ctx), key, b)
	}
	return g.Store.Create(ctx, key, b)
}

func (g *gatedStore) Delete(ctx context.Context, keys ...string) error {
	if g.deletesDown.Load() {
		return errors.New("503 Slow Down")
	}
	return g.Store.Delete(ctx, keys...)
}

// A notice withdrawn while its publication is still on its way: the
// publication lands after the withdrawal, and the store refuses deletes
// for a while. No peer is stopped by it, and the object does not stay.
func TestWithdrawnNoticeLandingLateStopsNobody(t *testing.T) {
	st := &gatedStore{Store: newDir(t), release: make(chan struct{})}
	nodes := startNodes(t, st, "run", []string{"n0", "n1"}, "")
	n := fatal("i-late", time.Minute)
	nodes[1].Fatal(n)
	for end := time.Now().Add(5 * time.Second); !st.holding.Load(); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(end) {
			t.Fatal("the publication never reached the store")
		}
	}
	st.deletesDown.Store(true)
	nodes[1].Withdrawn(n)
	time.Sleep(100 * time.Millisecond)
	close(st.release) // the create lands now, after the withdrawal
	if active, raised := lastState(nodes[0], 1500*time.Millisecond); active || raised > 0 {
		t.Fatalf("a peer was stopped by a notice withdrawn before it landed (raised %d)", raised)
	}
	st.deletesDown.Store(false)
	waitNoNotice(t, st, 5*time.Second)
	if active, raised := lastState(nodes[0], 300*time.Millisecond); active || raised > 0 {
		t.Fatalf("a peer was stopped after the store recovered (raised %d)", raised)
	}
}

// waitNoNotice waits until the store holds no notice object (tombstones
// aside).
func waitNoNotice(t *testing.T, st storage.Store, d time.Duration) {
	t.Helper()
	var left []string
	for end := time.Now().Add(d); time.Now().Before(end); time.Sleep(20 * time.Millisecond) {
		objs, err := st.List(context.Background(), "run/_job/notices")
		if err != nil {
			continue
		}
		left = nil
		for _, o := range objs {
			if strings.HasSuffix(o.Key, ".json") {
				left = append(left, o.Key)
			}
		}
		if len(left) == 0 {
			return
		}
	}
	t.Fatalf("notice objects left in the store: %v", left)
}

// A notice object without a deadline (or malformed) stops nobody and is
// removed.
func TestNoticeWithoutDeadlineIgnoredAndRemoved(t *testing.T) {
	st := newDir(t)
	nodes := startNodes(t, st, "run", []string{"n0", "n1"}, "")
	p := Published{Run: "run", ID: "n1--aws-x", Node: "n1", Provider: "aws", Kind: agent.KindTerminate, NoticeID: "x",
		NoticedAt: time.Now()}
	b, _ := json.Marshal(p)
	st.PutBytes(context.Background(), "run/_job/notices/n1--aws-x.json", b)
	st.PutBytes(context.Background(), "run/_job/notices/n1--garbage.json", []byte("{not json"))
	if active, raised := lastState(nodes[0], time.Second); active || raised > 0 {
		t.Fatalf("a notice without a deadline stopped the job (raised %d)", raised)
	}
	waitNoNotice(t, st, 5*time.Second)
}

// A push captured on the wire and replayed, within its minute, to the
// daemon after a restart is refused and stops nothing.
func TestPushReplayedToRestartedDaemonRefused(t *testing.T) {
	const token = "a-shared-job-token-0123"
	st := newDir(t)
	nodes := startNodes(t, st, "run", []string{"n0", "n1"}, token)
	// Capture the pushes n1 sends to n0.
	var mu sync.Mutex
	type capture struct {
		body []byte
		auth string
	}
	var got []capture
	tap := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		mu.Lock()
		got = append(got, capture{b, r.Header.Get("Authorization")})
		mu.Unlock()
		r.Body = io.NopCloser(bytes.NewReader(b))
		nodes[0].Handler().ServeHTTP(w, r)
	}))
	defer tap.Close()
	nodes[0].cfg.Advertise = strings.TrimPrefix(tap.URL, "http://")
	if err := nodes[0].Register(context.Background()); err != nil {
		t.Fatal(err)
	}
	// A daemon's registration is the same for its whole life, so a peer
	// reads it once; the test changed n0's address by hand.
	nodes[1].registrations = nil
	if _, err := nodes[1].refreshMembers(context.Background()); err != nil {
		t.Fatal(err)
	}
	nodes[1].Fatal(fatal("i-1", time.Minute))
	if n, ok := next(t, nodes[0], 5*time.Second); !ok || n.Withdrawn {
		t.Fatalf("no job notice on n0: %+v", n)
	}
	nodes[1].Wait()
	mu.Lock()
	if len(got) == 0 {
		t.Fatal("no push captured")
	}
	replay := got[0]
	mu.Unlock()
	// n0's daemon restarts: a new life of the node, registered anew.
	restarted := New(Config{Run: "run", Node: "n0", Nodes: 2, Poll: 20 * time.Millisecond, Token: token}, st, nil)
	if err := restarted.Register(context.Background()); err != nil {
		t.Fatal(err)
	}
	req := httptest.NewRequest(http.MethodPost, pushPath, bytes.NewReader(replay.body))
	req.Header.Set("Authorization", replay.auth)
	rec := httptest.NewRecorder()
	restarted.Handler().ServeHTTP(rec, req)
	if rec.Code < 400 {
		t.Fatalf("the replayed push was taken by the restarted daemon: %d", rec.Code)
	}
	select {
	case p := <-restarted.pushed:
		t.Fatalf("the replayed push reached the watcher: %+v", p)
	default:
	}
}

// More live nodes than job.nodes: status says so, naming them (no
// checkpoint of the job commits then).
func TestStatusSaysMoreLiveNodesThanJobNodes(t *testing.T) {
	st := newDir(t)
	var jobs []*Job
	for _, name := range []string{"n0", "n1", "n2"} {
		j := New(Config{Run: "run", Node: name, Nodes: 2}, st, nil)
		if err := j.Register(context.Background()); err != nil {
			t.Fatal(err)
		}
		jobs = append(jobs, j)
	}
	if _, err := jobs[0].refreshMembers(context.Background()); err != nil {
		t.Fatal(err)
	}
	if p := jobs[0].Status().Problem; !strings.Contains(p, "3 live nodes (n0, n1, n2) for job.nodes 2") {
		t.Fatalf("status problem %q", p)
	}
	three := New(Config{Run: "run", Node: "n1", Nodes: 3}, st, nil)
	if _, err := three.refreshMembers(context.Background()); err != nil {
		t.Fatal(err)
	}
	if p := three.Status().Problem; p != "" {
		t.Fatalf("a job with as many live nodes as job.nodes has a problem: %q", p)
	}
}
