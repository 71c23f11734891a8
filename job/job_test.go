package job

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/preemptd/preemptd/agent"
	"github.com/preemptd/preemptd/checkpoint/storage"
)

// flaky is a store that fails every call while down is set: an outage.
type flaky struct {
	storage.Store
	down atomic.Bool
}

var errDown = errors.New("store unreachable")

func (f *flaky) List(ctx context.Context, prefix string) ([]storage.Object, error) {
	if f.down.Load() {
		return nil, errDown
	}
	return f.Store.List(ctx, prefix)
}

func (f *flaky) Create(ctx context.Context, key string, b []byte) error {
	if f.down.Load() {
		return errDown
	}
	return f.Store.Create(ctx, key, b)
}

// node is one Job watching, its notices collected.
type node struct {
	*Job
	notices chan agent.Notice
	srv     *httptest.Server
	ahead   atomic.Int64 // how far this node's clock runs ahead
}

func startNodes(t *testing.T, st storage.Store, run string, names []string, token string) []*node {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	var nodes []*node
	for _, name := range names {
		j := New(Config{Run: run, Node: name, Nodes: len(names), Poll: 20 * time.Millisecond, Token: token}, st, nil)
		n := &node{Job: j, notices: make(chan agent.Notice, 16)}
		j.now = func() time.Time { return time.Now().Add(time.Duration(n.ahead.Load())) }
		if token != "" {
			n.srv = httptest.NewServer(j.Handler())
			t.Cleanup(n.srv.Close)
			j.cfg.Advertise = strings.TrimPrefix(n.srv.URL, "http://")
		}
		if err := j.Register(ctx); err != nil {
			t.Fatal(err)
		}
		nodes = append(nodes, n)
	}
	for _, n := range nodes {
		if _, err := n.refreshMembers(ctx); err != nil {
			t.Fatal(err)
		}
		go n.Watch(ctx, n.notices)
	}
	return nodes
}

func next(t *testing.T, n *node, within time.Duration) (agent.Notice, bool) {
	t.Helper()
	select {
	case got := <-n.notices:
		return got, true
	case <-time.After(within):
		return agent.Notice{}, false
	}
}

func fatal(id string, in time.Duration) agent.Notice {
	now := time.Now()
	return agent.Notice{Provider: "aws", Kind: agent.KindTerminate, ID: id, NoticedAt: now, Deadline: now.Add(in)}
}

func newDir(t *testing.T) storage.Store {
	st, err := storage.NewDir(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	return st
}

func TestFanOutThroughStore(t *testing.T) {
	nodes := startNodes(t, newDir(t), "run", []string{"n0", "n1", "n2"}, "")
	n := fatal("i-abc", 2*time.Minute)
	nodes[2].Fatal(n)
	for _, i := range []int{0, 1} {
		got, ok := next(t, nodes[i], 5*time.Second)
		if !ok {
			t.Fatalf("n%d: no job notice", i)
		}
		if got.Provider != "job" || got.Kind != agent.KindJob || agent.Classify(got, time.Now(), 0) != agent.ClassFatal {
			t.Fatalf("n%d: %+v; want a fatal job notice", i, got)
		}
		if !got.Deadline.Equal(n.Deadline.UTC()) {
			t.Fatalf("n%d: deadline %s, want the origin's %s", i, got.Deadline, n.Deadline)
		}
		if !bytes.Contains(got.Raw, []byte(`"node":"n2"`)) || !bytes.Contains(got.Raw, []byte(`"notice_id":"i-abc"`)) {
			t.Fatalf("n%d: raw %s does not name the origin", i, got.Raw)
		}
	}
	if got, ok := next(t, nodes[2], 300*time.Millisecond); ok {
		t.Fatalf("the noticed node got its own notice back: %+v", got)
	}
	// Withdrawn at the origin → withdrawn everywhere.
	nodes[2].Withdrawn(n)
	for _, i := range []int{0, 1} {
		got, ok := next(t, nodes[i], 5*time.Second)
		if !ok || !got.Withdrawn {
			t.Fatalf("n%d: %+v, %v; want the job notice withdrawn", i, got, ok)
		}
	}
}

func TestTwoNodesNoticedAtOnceOneJobNotice(t *testing.T) {
	nodes := startNodes(t, newDir(t), "run", []string{"n0", "n1", "n2"}, "")
	a, b := fatal("i-1", 2*time.Minute), fatal("i-2", 90*time.Second)
	nodes[1].Fatal(a)
	nodes[2].Fatal(b)
	got, ok := next(t, nodes[0], 5*time.Second)
	if !ok {
		t.Fatal("no job notice")
	}
	// Maybe a second send with the earlier deadline, but the same notice.
	deadline := got.Deadline
	for {
		more, ok := next(t, nodes[0], 500*time.Millisecond)
		if !ok {
			break
		}
		if more.Key() != got.Key() {
			t.Fatalf("two job notices: %s and %s", got.Key(), more.Key())
		}
		deadline = more.Deadline
	}
	if !deadline.Equal(b.Deadline.UTC()) {
		t.Fatalf("deadline %s; want the earliest, %s", deadline, b.Deadline)
	}
}

// A notice more than the join window after a stop is a new stop: its own
// job notice (the agent, armed again, acts on it), while the first stays.
func TestLaterNoticeIsANewStop(t *testing.T) {
	nodes := startNodes(t, newDir(t), "run", []string{"n0", "n1", "n2"}, "")
	nodes[1].Fatal(fatal("i-1", 2*time.Minute))
	first, ok := next(t, nodes[0], 5*time.Second)
	if !ok {
		t.Fatal("no job notice")
	}
	nodes[0].ahead.Store(int64(join + time.Second))
	nodes[2].Fatal(fatal("i-2", 2*time.Minute))
	second, ok := next(t, nodes[0], 5*time.Second)
	if !ok || second.Key() == first.Key() || second.Withdrawn {
		t.Fatalf("%+v, %v; want a second job notice", second, ok)
	}
}

func TestSimulatedNoticeFansOutOnlyWithJob(t *testing.T) {
	nodes := startNodes(t, newDir(t), "run", []string{"n0", "n1"}, "")
	drill := fatal("sim-1", time.Minute)
	drill.Provider = agent.ProviderSimulate
	nodes[1].Fatal(drill)
	if got, ok := next(t, nodes[0], 300*time.Millisecond); ok {
		t.Fatalf("a one-node drill stopped the job: %+v", got)
	}
	drill.ID, drill.Job = "sim-2", true
	nodes[1].Fatal(drill)
	if _, ok := next(t, nodes[0], 5*time.Second); !ok {
		t.Fatal("simulate --job did not reach the other node")
	}
	// A job notice is never relayed again.
	nodes[0].Fatal(agent.Notice{Provider: "job", Kind: agent.KindJob, ID: "x", Deadline: time.Now().Add(time.Minute)})
	if got, ok := next(t, nodes[1], 300*time.Millisecond); ok {
		t.Fatalf("a job notice was relayed back: %+v", got)
	}
}

func TestOtherRunAndStaleNoticesIgnored(t *testing.T) {
	st := newDir(t)
	ours := startNodes(t, st, "run-a", []string{"n0", "n1"}, "")
	theirs := startNodes(t, st, "run-b", []string{"m0"}, "")
	ours[1].Fatal(fatal("i-1", time.Minute))
	if _, ok := next(t, ours[0], 5*time.Second); !ok {
		t.Fatal("no job notice in run-a")
	}
	if got, ok := next(t, theirs[0], 300*time.Millisecond); ok {
		t.Fatalf("a daemon of another run got run-a's notice: %+v", got)
	}
	// A notice whose deadline passed (its node died before deleting it)
	// must not stop a job started after.
	old := fatal("i-old", -time.Minute)
	old.NoticedAt = time.Now().Add(-3 * time.Minute)
	ours[1].Fatal(old)
	fresh := startNodes(t, st, "run-a", []string{"n5"}, "")
	for {
		got, ok := next(t, fresh[0], 500*time.Millisecond)
		if !ok {
			break
		}
		if strings.Contains(string(got.Raw), "i-old") {
			t.Fatalf("a notice past its deadline stopped a new node: %+v", got)
		}
	}
}

func TestStoreOutageNoFalseAlarmNoWithdrawal(t *testing.T) {
	st := &flaky{Store: newDir(t)}
	nodes := startNodes(t, st, "run", []string{"n0", "n1"}, "")
	st.down.Store(true)
	time.Sleep(200 * time.Millisecond)
	if got, ok := next(t, nodes[0], 200*time.Millisecond); ok {
		t.Fatalf("an outage made a notice: %+v", got)
	}
	st.down.Store(false)
	nodes[1].Fatal(fatal("i-1", time.Minute))
	if _, ok := next(t, nodes[0], 5*time.Second); !ok {
		t.Fatal("no job notice")
	}
	st.down.Store(true) // the listing fails: the notice must stay
	if got, ok := next(t, nodes[0], 300*time.Millisecond); ok {
		t.Fatalf("an outage changed the job notice: %+v", got)
	}
}

func TestPushWhenStoreUnreachable(t *testing.T) {
	st := &flaky{Store: newDir(t)}
	nodes := startNodes(t, st, "run", []string{"n0", "n1", "n2"}, "a-shared-job-token-0123")
	st.down.Store(true) // nobody reaches the store: only the push can carry it
	nodes[2].Fatal(fatal("i-9", time.Minute))
	for _, i := range []int{0, 1} {
		got, ok := next(t, nodes[i], 2*time.Second)
		if !ok || got.Kind != agent.KindJob {
			t.Fatalf("n%d: %+v, %v; want the pushed job notice", i, got, ok)
		}
	}
}

func TestPushRefusedWithoutTheToken(t *testing.T) {
	nodes := startNodes(t, newDir(t), "run", []string{"n0", "n1"}, "a-shared-job-token-0123")
	body := []byte(`{"run":"run","id":"n1--aws-x","node":"n1","provider":"aws","kind":"terminate","notice_id":"x"}`)
	for name, auth := range map[string]string{
		"none":      "",
		"bad token": Authorization("not-the-job-token-at-all", time.Now(), body),
		"stale":     Authorization("a-shared-job-token-0123", time.Now().Add(-5*time.Minute), body),
		"malformed": "PREEMPTD-HMAC t=1",
	} {
		req, _ := http.NewRequest(http.MethodPost, nodes[0].srv.URL+pushPath, bytes.NewReader(body))
		if auth != "" {
			req.Header.Set("Authorization", auth)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusUnauthorized {
			t.Fatalf("%s: %s; want 401", name, resp.Status)
		}
	}
	// Signed right but for another run: refused too.
	other := []byte(`{"run":"other","id":"n1--aws-x","node":"n1","provider":"aws","kind":"terminate","notice_id":"x"}`)
	req, _ := http.NewRequest(http.MethodPost, nodes[0].srv.URL+pushPath, bytes.NewReader(other))
	req.Header.Set("Authorization", Authorization("a-shared-job-token-0123", time.Now(), other))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusForbidden {
		t.Fatalf("another run's push: %s; want 403", resp.Status)
	}
	if got, ok := next(t, nodes[0], 300*time.Millisecond); ok {
		t.Fatalf("a refused push made a notice: %+v", got)
	}
	// A node with the wrong token: its push is refused, the store delivers.
	nodes[1].cfg.Token = "not-the-job-token-at-all"
	nodes[1].Fatal(fatal("i-7", time.Minute))
	got, ok := next(t, nodes[0], 5*time.Second)
	if !ok || got.Kind != agent.KindJob {
		t.Fatalf("%+v, %v; the store path must deliver when the push is refused", got, ok)
	}
}

func TestMembersLiveOnly(t *testing.T) {
	root := t.TempDir()
	st, err := storage.NewDir(root)
	if err != nil {
		t.Fatal(err)
	}
	nodes := startNodes(t, st, "run", []string{"n0", "n1"}, "")
	old := New(Config{Run: "run", Node: "gone", Refresh: 30 * time.Second}, st, nil)
	if err := old.Register(context.Background()); err != nil {
		t.Fatal(err)
	}
	// Its registration was last rewritten an hour ago, as the store says.
	hourAgo := time.Now().Add(-time.Hour)
	if err := os.Chtimes(filepath.Join(root, filepath.FromSlash(old.memberKey())), hourAgo, hourAgo); err != nil {
		t.Fatal(err)
	}
	nodes[0].membersAt = time.Time{} // read again
	m, err := nodes[0].Members(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if !m["n0"] || !m["n1"] || m["gone"] {
		t.Fatalf("members %v; want n0 and n1, not the node unrefreshed for an hour", m)
	}
	if s := nodes[0].Status(); len(s.Members) != 3 || s.Nodes != 2 {
		t.Fatalf("status %+v", s)
	}
}

// slowCreate delays every Create: a store far away.
type slowCreate struct{ storage.Store }

func (s slowCreate) Create(ctx context.Context, key string, b []byte) error {
	time.Sleep(200 * time.Millisecond)
	return s.Store.Create(ctx, key, b)
}

// A notice withdrawn while its object is still being created must not be
// left in the store (the delete waits for the create).
func TestWithdrawnBeforeCreateLands(t *testing.T) {
	st := slowCreate{newDir(t)}
	j := New(Config{Run: "run", Node: "n1", Nodes: 2}, st, nil)
	n := fatal("i-1", time.Minute)
	j.Fatal(n)
	j.Withdrawn(n)
	j.Wait()
	objs, err := st.List(context.Background(), "run/_job/notices")
	for _, o := range objs {
		if !strings.HasSuffix(o.Key, ".withdrawn") { // its tombstone stays until the notice is long over
			t.Fatalf("notices left in the store: %v", objs)
		}
	}
	if err != nil || len(objs) != 1 {
		t.Fatalf("want the tombstone alone: %v %v", objs, err)
	}
}

// A listing read before its node deleted a withdrawn notice (the push of
// the withdrawal outran the delete) must not bring the notice back: that
// would stop the job again for a notice already taken back.
func TestWithdrawnNoticeNotBroughtBack(t *testing.T) {
	j := New(Config{Run: "run", Node: "n0", Nodes: 2}, newDir(t), nil)
	st := &watchState{entries: map[string]*entry{}, gone: map[string]time.Time{}}
	now := time.Now()
	p := Published{Run: "run", ID: "n1--aws-x", Node: "n1", Provider: "aws", Kind: agent.KindTerminate, NoticeID: "x",
		NoticedAt: now, Deadline: now.Add(time.Minute)}
	out := make(chan agent.Notice, 8)
	j.apply(st, p, "push")
	j.emit(context.Background(), st, out)
	if n := <-out; n.Withdrawn || n.Kind != agent.KindJob {
		t.Fatalf("first: %+v", n)
	}
	w := p
	w.Withdrawn = true
	j.apply(st, w, "push")
	j.emit(context.Background(), st, out)
	if n := <-out; !n.Withdrawn {
		t.Fatalf("after the withdrawal: %+v", n)
	}
	j.applyListing(st, listing{notices: map[string]Published{p.ID: p}}) // listed before the delete
	j.emit(context.Background(), st, out)
	select {
	case n := <-out:
		t.Fatalf("a stale listing brought the withdrawn notice back: %+v", n)
	default:
	}
}

// countStore counts the requests asked of a store.
type countStore struct {
	storage.Store
	lists, gets, puts atomic.Int64
}

func (c *countStore) List(ctx context.Context, prefix string) ([]storage.Object, error) {
	c.lists.Add(1)
	return c.Store.List(ctx, prefix)
}

func (c *countStore) Get(ctx context.Context, key string, w io.Writer) error {
	c.gets.Add(1)
	return c.Store.Get(ctx, key, w)
}

func (c *countStore) PutBytes(ctx context.Context, key string, b []byte) error {
	c.puts.Add(1)
	return c.Store.PutBytes(ctx, key, b)
}

func (c *countStore) reset() { c.lists.Store(0); c.gets.Store(0); c.puts.Store(0) }

// The registry in steady state: a node's refresh is one PUT, and reading
// the members one listing; a registration is read once per life of its
// daemon, and a restarted node's earlier registration is removed.
func TestRegistryReadsEachLifeOnce(t *testing.T) {
	ctx := context.Background()
	st := &countStore{Store: newDir(t)}
	var nodes []*Job
	for i := range 8 {
		j := New(Config{Run: "run", Node: fmt.Sprintf("n%d", i), Nodes: 8}, st, nil)
		if err := j.Register(ctx); err != nil {
			t.Fatal(err)
		}
		nodes = append(nodes, j)
	}
	var before, after bytes.Buffer // a refresh rewrites the same body
	st.Store.Get(ctx, nodes[1].memberKey(), &before)
	time.Sleep(10 * time.Millisecond)
	if err := nodes[1].Register(ctx); err != nil {
		t.Fatal(err)
	}
	st.Store.Get(ctx, nodes[1].memberKey(), &after)
	if before.Len() == 0 || !bytes.Equal(before.Bytes(), after.Bytes()) {
		t.Fatalf("a refresh changed the registration's body:\n%s\n%s", before.Bytes(), after.Bytes())
	}
	if _, err := nodes[0].refreshMembers(ctx); err != nil {
		t.Fatal(err)
	}
	if g := st.gets.Load(); g != 8 {
		t.Fatalf("first read: %d GETs; want 8 (one a registration)", g)
	}
	for round := range 3 {
		for _, j := range nodes {
			if err := j.Register(ctx); err != nil {
				t.Fatal(err)
			}
		}
		st.reset()
		nodes[0].mu.Lock()
		nodes[0].membersAt = time.Time{} // stale: the notice path reads again
		nodes[0].mu.Unlock()
		m, err := nodes[0].Members(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if len(m) != 8 || st.lists.Load() != 1 || st.gets.Load() != 0 {
			t.Fatalf("round %d: %d members with %d LISTs and %d GETs; want 8 members, 1 LIST, no GET", round, len(m), st.lists.Load(), st.gets.Load())
		}
	}
	// n3's daemon restarts: its new life is read once, its old one is gone.
	restarted := New(Config{Run: "run", Node: "n3", Nodes: 8}, st, nil)
	if err := restarted.Register(ctx); err != nil {
		t.Fatal(err)
	}
	st.reset()
	ms, err := nodes[0].refreshMembers(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if st.gets.Load() != 1 || len(ms) != 8 {
		t.Fatalf("after a restart: %d GETs, %d members; want 1 GET (the new life), 8 members", st.gets.Load(), len(ms))
	}
	for _, m := range ms {
		if m.Node == "n3" && m.Incarnation != restarted.incarnation {
			t.Fatalf("n3 is its old life %s; want %s", m.Incarnation, restarted.incarnation)
		}
	}
	objs, err := st.List(ctx, "run/_job/nodes/n3")
	if err != nil || len(objs) != 1 {
		t.Fatalf("n3's registrations after the restart: %v %v; want only the new life's", objs, err)
	}
}

// skewed is a store whose clock is hours behind this machine's.
type skewed struct{ storage.Store }

func (s skewed) List(ctx context.Context, prefix string) ([]storage.Object, error) {
	objs, err := s.Store.List(ctx, prefix)
	for i := range objs {
		objs[i].ModTime = objs[i].ModTime.Add(-3 * time.Hour)
	}
	return objs, err
}

// Liveness is read in the store's own clock: a store whose times are
// hours off this machine's leaves every refreshed node live, and a node
// not refreshed for longer than the TTL still goes.
func TestMembersLiveInTheStoresClock(t *testing.T) {
	root := t.TempDir()
	dir, err := storage.NewDir(root)
	if err != nil {
		t.Fatal(err)
	}
	st := skewed{dir}
	nodes := startNodes(t, st, "run", []string{"n0", "n1", "n2"}, "")
	gone := New(Config{Run: "run", Node: "gone", Refresh: 30 * time.Second}, st, nil)
	if err := gone.Register(context.Background()); err != nil {
		t.Fatal(err)
	}
	hourAgo := time.Now().Add(-time.Hour)
	if err := os.Chtimes(filepath.Join(root, filepath.FromSlash(gone.memberKey())), hourAgo, hourAgo); err != nil {
		t.Fatal(err)
	}
	if err := nodes[0].Register(context.Background()); err != nil {
		t.Fatal(err)
	}
	if _, err := nodes[0].refreshMembers(context.Background()); err != nil {
		t.Fatal(err)
	}
	m, err := nodes[0].Members(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(m) != 3 || !m["n1"] || !m["n2"] || m["gone"] {
		t.Fatalf("members %v; want n0, n1 and n2 live, not the node unrefreshed for an hour", m)
	}
}

// A watching node reads the notices' change stamp every poll (a GET) and
// lists the notices only when it changed, or every listEvery polls: a
// notice arrives at the next poll after its stamp, and one whose node died
// before writing the stamp within listEvery polls.
func TestWatchListsWhenTheStampChanges(t *testing.T) {
	st := &countStore{Store: newDir(t)}
	nodes := startNodes(t, st, "run", []string{"n0", "n1"}, "")
	time.Sleep(100 * time.Millisecond) // both have listed once
	st.reset()
	const polls = 60
	time.Sleep(polls * 20 * time.Millisecond)
	lists, gets := st.lists.Load(), st.gets.Load()
	t.Logf("2 nodes, %d polls each: %d LISTs, %d GETs", polls, lists, gets)
	if lists > 2*(polls/listEvery+1) || gets < polls {
		t.Fatalf("%d LISTs and %d GETs in %d polls of 2 nodes; want at most %d LISTs (one per node every %d polls) and a GET a poll",
			lists, gets, polls, 2*(polls/listEvery+1), listEvery)
	}
	// A notice: the stamp changes, the other node lists at its next poll.
	begin := time.Now()
	nodes[1].Fatal(fatal("i-1", time.Minute))
	if got, ok := next(t, nodes[0], 5*time.Second); !ok || got.Kind != agent.KindJob {
		t.Fatal("no job notice")
	}
	if d := time.Since(begin); d > listEvery*20*time.Millisecond/2 {
		t.Errorf("the notice took %v: not the stamp's change (a listing comes every %v)", d, listEvery*20*time.Millisecond)
	}
	nodes[1].Withdrawn(fatal("i-1", time.Minute))
	if got, ok := next(t, nodes[0], 5*time.Second); !ok || !got.Withdrawn {
		t.Fatalf("withdrawal not seen: %+v", got)
	}
	// A node that died between its notice's create and the stamp: heard by
	// the listing every listEvery polls.
	p := Published{Run: "run", ID: "n1--aws-i-2--dead", Node: "n1", Provider: "aws", Kind: agent.KindTerminate, NoticeID: "i-2",
		NoticedAt: time.Now().UTC(), Deadline: time.Now().UTC().Add(time.Minute)}
	b, _ := json.Marshal(p)
	if err := st.Create(context.Background(), nodes[1].noticeKey(p.ID), b); err != nil {
		t.Fatal(err)
	}
	if got, ok := next(t, nodes[0], 5*time.Second); !ok || got.Kind != agent.KindJob {
		t.Fatal("a notice without its stamp was never heard")
	}
}
