// Package job makes the daemons of one multi-node job act as one. Each node
// registers itself in the store (<run>/_job/nodes/<node>/<incarnation>.json,
// refreshed); a fatal notice on any node is published as
// <run>/_job/notices/<id>.json (a conditional create, then the notices'
// change stamp rewritten) and, when job.listen
// is set, pushed to the peers the registry names (signed with job.token);
// every node watches both and turns what it finds into one fatal "job"
// notice for its agent, with the earliest deadline. The checkpoint
// committer learns from the registry which nodes' parts make a checkpoint.
package job

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/preemptd/preemptd/agent"
	"github.com/preemptd/preemptd/checkpoint/storage"
)

// Config is one node's view of its job.
type Config struct {
	Run string
	// Node names this node in the job; Instance and Host are recorded.
	Node, Instance, Host string
	// Nodes is how many nodes the job has.
	Nodes int
	// Poll is how often the notices' change stamp is read (one GET each;
	// the notices are listed when it changed, and every 20 polls).
	Poll time.Duration
	// Refresh is how often this node's registration is rewritten; a node
	// unrefreshed for three of them is no longer live.
	Refresh time.Duration
	// Listen, if set, serves pushed notices; Advertise is the host:port the
	// peers push to. Token signs and checks every push.
	Listen, Advertise, Token string
	Version                  string
}

// Member is a node's registration.
type Member struct {
	Run  string `json:"run"`
	Node string `json:"node"`
	// Incarnation names this life of the node's daemon (new at every
	// start): pushes are addressed to it, so that one captured and
	// replayed to a restarted daemon is refused.
	Incarnation string    `json:"incarnation,omitempty"`
	Instance    string    `json:"instance,omitempty"`
	Host        string    `json:"host,omitempty"`
	Push        string    `json:"push,omitempty"`
	Version     string    `json:"version,omitempty"`
	StartedAt   time.Time `json:"started_at"`
	// RefreshedAt is when the registration was last rewritten, as the
	// store's listing says.
	RefreshedAt time.Time `json:"refreshed_at"`

	listed    storage.Object // the object it was read from
	storeTime bool           // RefreshedAt is the store's listed time
}

// Published is a fatal notice of one node as the job's other nodes see it.
// Each publication is a new one: a notice withdrawn and raised again with
// the same id (a trigger file rewritten, GCP's preempted, AWS's
// instance-action) is a new object, never mistaken for the withdrawn one.
type Published struct {
	Run string `json:"run"`
	// ID names it in the store: <node>--<provider>-<notice id>--<pub>,
	// pub a nonce of this publication.
	ID        string     `json:"id"`
	Node      string     `json:"node"`
	Provider  string     `json:"provider"`
	Kind      agent.Kind `json:"kind"`
	NoticeID  string     `json:"notice_id"`
	NoticedAt time.Time  `json:"noticed_at"`
	Deadline  time.Time  `json:"deadline,omitzero"`
	// Withdrawn travels in pushes only (the store deletes the object).
	Withdrawn bool `json:"withdrawn,omitempty"`
}

// mine is a notice of this node's, published (or being published).
type mine struct {
	p         Published
	cancel    context.CancelFunc // ends the publication (a withdrawal)
	published chan struct{}      // closed once the store's object is created (or given up on)
}

// Job is one node's part in the job: a Watcher, a Relay and the registry.
type Job struct {
	cfg   Config
	store storage.Store
	log   *slog.Logger
	now   func() time.Time
	// OnFanOut, if set, is told how long each job notice took to arrive
	// (from the originating node's notice) and by which way: store or push.
	OnFanOut func(d time.Duration, via string)
	client   *http.Client

	pushed chan Published

	// incarnation names this life of the daemon (see Member); seen holds
	// the nonces of the pushes taken within maxSkew, so that one replayed
	// to this life is refused too.
	incarnation string
	seenMu      sync.Mutex
	seen        map[string]time.Time

	mu            sync.Mutex
	started       time.Time
	members       []Member
	membersAt     time.Time
	registrations Registrations   // read once each (see ReadMembersCached)
	listed        int             // registration objects in the last listing
	cleared       bool            // this node's earlier lives' registrations removed
	putAt         time.Time       // when this node's last registration write ended
	mine          map[string]mine // this node's published notices, by agent key
	wg            sync.WaitGroup
}

// New returns the job of cfg over store.
func New(cfg Config, store storage.Store, log *slog.Logger) *Job {
	if cfg.Poll <= 0 {
		cfg.Poll = 500 * time.Millisecond
	}
	if cfg.Refresh <= 0 {
		cfg.Refresh = 30 * time.Second
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Job{cfg: cfg, store: store, log: log, now: time.Now, client: &http.Client{Timeout: 2 * time.Second},
		pushed: make(chan Published, 64), mine: map[string]mine{}, incarnation: nonce(), seen: map[string]time.Time{}}
}

// nonce is a random id.
func nonce() string {
	b := make([]byte, 8)
	rand.Read(b)
	return hex.EncodeToString(b)
}

func (j *Job) prefix() string             { return j.cfg.Run + "/_job/" }
func (j *Job) nodeKey(node string) string { return j.prefix() + "nodes/" + node }

// memberKey is this life's registration: one object per node and
// incarnation, its body the same at every refresh.
func (j *Job) memberKey() string          { return j.nodeKey(j.cfg.Node) + "/" + j.incarnation + ".json" }
func (j *Job) noticeKey(id string) string { return j.prefix() + "notices/" + id + ".json" }

// stampKey is the notices' change stamp: rewritten (a new nonce) after
// every notice created and every withdrawal, so that the other nodes list
// the notices only when it changed (see pollLoop).
func (j *Job) stampKey() string { return j.prefix() + "notices.changed" }

// touch rewrites the change stamp, retrying until ctx ends.
func (j *Job) touch(ctx context.Context) {
	retry(ctx, func() error { return j.store.PutBytes(ctx, j.stampKey(), []byte(nonce())) })
}

// tombstoneKey marks publication id withdrawn: a listing that holds it
// ignores the notice, even when the notice's create lands after the
// withdrawal's delete (a request already on its way when it was given up).
func (j *Job) tombstoneKey(id string) string { return j.prefix() + "notices/" + id + ".withdrawn" }

// ttl is how long a registration stays live unrefreshed.
func (j *Job) ttl() time.Duration { return 3 * j.cfg.Refresh }

// Register writes this node's registration now.
func (j *Job) Register(ctx context.Context) error {
	j.mu.Lock()
	if j.started.IsZero() {
		j.started = j.now().UTC()
	}
	// The same body at every refresh: the listing's time says when it was
	// rewritten (RefreshedAt here is only for a store listing no times).
	m := Member{Run: j.cfg.Run, Node: j.cfg.Node, Incarnation: j.incarnation, Instance: j.cfg.Instance, Host: j.cfg.Host,
		Push: j.cfg.Advertise, Version: j.cfg.Version, StartedAt: j.started, RefreshedAt: j.started}
	j.mu.Unlock()
	b, _ := json.Marshal(m)
	if err := j.store.PutBytes(ctx, j.memberKey(), b); err != nil {
		return fmt.Errorf("job: register %s: %w", j.cfg.Node, err)
	}
	j.mu.Lock()
	j.putAt = j.now()
	j.mu.Unlock()
	j.clearEarlier(ctx)
	return nil
}

// clearEarlier removes, once, the registrations of this node's earlier
// lives (and of the one-object form older releases wrote): a restarted
// node's listing stays one object.
func (j *Job) clearEarlier(ctx context.Context) {
	j.mu.Lock()
	done := j.cleared
	j.mu.Unlock()
	if done {
		return
	}
	objs, err := j.store.List(ctx, j.nodeKey(j.cfg.Node))
	if err != nil {
		return
	}
	for _, o := range objs {
		if o.Key != j.memberKey() {
			if err := j.store.Delete(ctx, o.Key); err != nil && !errors.Is(err, storage.ErrNotFound) {
				return
			}
		}
	}
	if err := j.store.Delete(ctx, j.nodeKey(j.cfg.Node)+".json"); err != nil && !errors.Is(err, storage.ErrNotFound) {
		return
	}
	j.mu.Lock()
	j.cleared = true
	j.mu.Unlock()
}

// Run keeps this node registered and the member list fresh, and serves
// pushes when job.listen is set, until ctx ends. The registration is left
// in place at exit: a node's part of a checkpoint counts until it expires.
func (j *Job) Run(ctx context.Context) error {
	errc := make(chan error, 1)
	if j.cfg.Listen != "" {
		go func() { errc <- j.serve(ctx) }()
	}
	// Until every node has registered, the members are read every few
	// seconds (the nodes of a job start in any order); then at most one
	// listing page (1,000 registrations) per refresh: a job of more
	// nodes reads its list every few refreshes.
	next := time.Duration(0)
	var sinceRead time.Duration
	complete := false
	for {
		select {
		case <-ctx.Done():
			j.wg.Wait()
			return nil
		case err := <-errc:
			return err
		case <-time.After(next):
		}
		if err := j.Register(ctx); err != nil && ctx.Err() == nil {
			j.log.Warn("job registration not refreshed; retrying", "err", err)
		}
		sinceRead += next
		if !complete || sinceRead >= time.Duration(j.pages())*j.cfg.Refresh {
			ms, err := j.refreshMembers(ctx)
			if err != nil && ctx.Err() == nil {
				j.log.Warn("job members not read; retrying", "err", err)
			}
			sinceRead = 0
			complete = err == nil && j.liveCount(ms) >= j.cfg.Nodes
		}
		next = j.cfg.Refresh
		if !complete {
			next = min(j.cfg.Refresh, 5*time.Second)
		}
	}
}

// ReadMembers lists the registrations of run's nodes in st: one listing,
// and a GET of each registration (ReadMembersCached reads each once).
func ReadMembers(ctx context.Context, st storage.Store, run string) ([]Member, error) {
	ms, _, err := ReadMembersCached(ctx, st, run, nil)
	return ms, err
}

// Registrations are the registration objects already read, by key: a
// registration's object (<node>/<incarnation>.json) is written once per life
// of a daemon with the same body, and refreshed by rewriting it, so a
// listing's time says when it was last refreshed and its body need not be
// read again.
type Registrations map[string]Member

// ReadMembersCached is ReadMembers reading only registrations not in
// cache (and registrations of the older one-object-per-node form whose
// object changed): one listing a call in steady state, a page per 1,000
// registrations. It returns the members (each node's newest registration,
// RefreshedAt the listing's time) and the cache for the next call.
func ReadMembersCached(ctx context.Context, st storage.Store, run string, cache Registrations) ([]Member, Registrations, error) {
	prefix := run + "/_job/nodes/"
	objs, err := st.List(ctx, strings.TrimSuffix(prefix, "/"))
	if err != nil {
		return nil, cache, err
	}
	next := Registrations{}
	newest := map[string]Member{}
	for _, o := range objs {
		rest, ok := strings.CutSuffix(strings.TrimPrefix(o.Key, prefix), ".json")
		if !ok {
			continue
		}
		node, inc, perLife := strings.Cut(rest, "/")
		if strings.Contains(inc, "/") {
			continue
		}
		m, cached := cache[o.Key]
		if cached && !perLife && !m.listed.Same(o) {
			cached = false // the older form: its body changes at every refresh
		}
		if !cached {
			var buf bytes.Buffer
			if err := st.Get(ctx, o.Key, &buf); err != nil {
				if errors.Is(err, storage.ErrNotFound) {
					continue
				}
				return nil, cache, err
			}
			m = Member{}
			if json.Unmarshal(buf.Bytes(), &m) != nil || m.Node != node || (perLife && m.Incarnation != inc) {
				continue
			}
			m.listed = o
		}
		next[o.Key] = m
		if perLife && !o.ModTime.IsZero() {
			m.RefreshedAt, m.storeTime = o.ModTime.UTC(), true
		}
		if have, ok := newest[node]; !ok || m.RefreshedAt.After(have.RefreshedAt) {
			newest[node] = m
		}
	}
	out := slices.SortedFunc(maps.Values(newest), func(a, b Member) int { return strings.Compare(a.Node, b.Node) })
	return out, next, nil
}

// pages is how many listing pages (1,000 keys each) the registry took
// when last read.
func (j *Job) pages() int {
	j.mu.Lock()
	defer j.mu.Unlock()
	return max(1, (j.listed+999)/1000)
}

func (j *Job) refreshMembers(ctx context.Context) ([]Member, error) {
	j.mu.Lock()
	cache := j.registrations
	j.mu.Unlock()
	ms, cache, err := ReadMembersCached(ctx, j.store, j.cfg.Run, cache)
	if err != nil {
		return nil, err
	}
	// The store's times in this node's clock: this node's own registration
	// was listed with the time of its last write, which ended at putAt
	// (a store's clock, or its times' granularity, may differ from ours).
	j.mu.Lock()
	putAt := j.putAt
	j.mu.Unlock()
	var offset time.Duration
	for _, m := range ms {
		if m.Node == j.cfg.Node && m.Incarnation == j.incarnation && m.storeTime && !putAt.IsZero() {
			offset = putAt.Sub(m.RefreshedAt)
		}
	}
	for i := range ms {
		if ms[i].storeTime {
			ms[i].RefreshedAt = ms[i].RefreshedAt.Add(offset)
		}
	}
	j.mu.Lock()
	j.members, j.membersAt, j.registrations, j.listed = ms, j.now(), cache, len(cache)
	j.mu.Unlock()
	return ms, nil
}

func (j *Job) liveCount(ms []Member) int {
	n := 0
	for _, m := range ms {
		if j.live(m) {
			n++
		}
	}
	return n
}

// live says whether m was refreshed within the TTL.
func (j *Job) live(m Member) bool { return j.now().Sub(m.RefreshedAt) <= j.ttl() }

// Members returns the job's live nodes, for the committer: read again
// when the list is more than a few seconds old.
func (j *Job) Members(ctx context.Context) (map[string]bool, error) {
	j.mu.Lock()
	ms, at := j.members, j.membersAt
	j.mu.Unlock()
	// Read again when a few seconds old: a listing (a page per 1,000
	// nodes, each every 5 s at most) and no GET of a registration already read.
	if j.now().Sub(at) > time.Duration(j.pages())*5*time.Second {
		var err error
		if ms, err = j.refreshMembers(ctx); err != nil {
			return nil, err
		}
	}
	out := map[string]bool{j.cfg.Node: true}
	for _, m := range ms {
		if j.live(m) {
			out[m.Node] = true
		}
	}
	return out, nil
}

// Status is the job for `preemptd status`.
func (j *Job) Status() *agent.JobStatus {
	j.mu.Lock()
	defer j.mu.Unlock()
	s := &agent.JobStatus{Node: j.cfg.Node, Nodes: j.cfg.Nodes, Members: []agent.JobMember{}}
	var live []string
	for _, m := range j.members {
		s.Members = append(s.Members, agent.JobMember{Node: m.Node, Instance: m.Instance, Host: m.Host, Push: m.Push,
			RefreshedAt: m.RefreshedAt, Live: j.live(m)})
		if j.live(m) {
			live = append(live, m.Node)
		}
	}
	if len(live) > j.cfg.Nodes {
		named := strings.Join(live[:min(len(live), 8)], ", ")
		if len(live) > 8 {
			named += fmt.Sprintf(" and %d more", len(live)-8)
		}
		s.Problem = fmt.Sprintf("%d live nodes (%s) for job.nodes %d: no checkpoint of the job commits; stop the extra daemon, or set job.nodes to %d on every node",
			len(live), named, j.cfg.Nodes, len(live))
	}
	return s
}

// peers are the live members that take pushes, this node aside.
func (j *Job) peers() []Member {
	j.mu.Lock()
	defer j.mu.Unlock()
	var out []Member
	for _, m := range j.members {
		if m.Node != j.cfg.Node && m.Push != "" && j.live(m) {
			out = append(out, m)
		}
	}
	return out
}

// noticeID names one publication of a notice: its node, provider and id,
// made safe for a key (and hashed when long), and the publication's nonce.
func noticeID(node string, n agent.Notice, pub string) string {
	s := storage.SafeElement(n.Provider + "-" + n.ID)
	if len(s) > 100 {
		sum := sha256.Sum256([]byte(s))
		s = s[:60] + "-" + hex.EncodeToString(sum[:8])
	}
	return node + "--" + s + "--" + pub
}

// fansOut says whether this node's notice n stops the job: a fatal notice
// from a cloud, the machine's shutdown or the local provider, or a drill
// made with --job; never a job notice itself.
func fansOut(n agent.Notice) bool {
	switch n.Provider {
	case "job":
		return false
	case agent.ProviderSimulate:
		return n.Job
	}
	return true
}

// Fatal implements agent.Relay: the notice goes to the store and to the
// peers at once, in the background, as a new publication.
func (j *Job) Fatal(n agent.Notice) {
	if !fansOut(n) {
		return
	}
	p := Published{Run: j.cfg.Run, ID: noticeID(j.cfg.Node, n, nonce()), Node: j.cfg.Node, Provider: n.Provider, Kind: n.Kind,
		NoticeID: n.ID, NoticedAt: n.NoticedAt.UTC(), Deadline: n.Deadline.UTC()}
	if p.NoticedAt.IsZero() {
		p.NoticedAt = j.now().UTC()
	}
	if p.Deadline.IsZero() { // every object has one: the peers drop any without
		p.Deadline = p.NoticedAt.Add(2 * time.Minute)
	}
	j.mu.Lock()
	if _, done := j.mine[n.Key()]; done {
		j.mu.Unlock()
		return
	}
	ctx, cancel := context.WithDeadline(context.Background(), j.until(p))
	published := make(chan struct{})
	j.mine[n.Key()] = mine{p: p, cancel: cancel, published: published}
	j.mu.Unlock()
	j.log.Warn("stopping the job: publishing this node's fatal notice to its other nodes", "id", p.ID, "deadline", p.Deadline)
	j.wg.Go(func() {
		defer cancel()
		var both sync.WaitGroup
		both.Go(func() { j.push(ctx, p) })
		both.Go(func() { defer close(published); j.publish(ctx, p) })
		both.Wait()
	})
}

// until is how long a publication keeps trying: the notice's deadline, or
// two minutes without one (or with one almost past).
func (j *Job) until(p Published) time.Time {
	if p.Deadline.IsZero() || p.Deadline.Before(j.now().Add(5*time.Second)) {
		return j.now().Add(2 * time.Minute)
	}
	return p.Deadline
}

// publish creates the notice's object, retrying until the deadline or the
// withdrawal.
func (j *Job) publish(ctx context.Context, p Published) {
	b, _ := json.Marshal(p)
	for wait := 100 * time.Millisecond; ; wait = min(2*wait, 2*time.Second) {
		err := j.store.Create(ctx, j.noticeKey(p.ID), b)
		if err == nil || errors.Is(err, storage.ErrExists) {
			j.touch(ctx)
			return
		}
		if ctx.Err() != nil {
			j.log.Info("job notice publication ended before it reached the store", "id", p.ID, "err", err)
			return
		}
		j.log.Warn("job notice not in the store yet; retrying", "id", p.ID, "err", err)
		select {
		case <-ctx.Done():
			j.log.Error("job notice never reached the store", "id", p.ID, "err", err)
			return
		case <-time.After(wait):
		}
	}
}

// Withdrawn implements agent.Relay: a withdrawn notice of this node's
// withdraws the job notice it made. Its publication is ended; a tombstone
// goes to the store first, so that a create still on its way when it was
// ended, landing after the delete, stops nobody; beside it the notice's
// object is deleted (once its create has answered) — both retried until the
// notice's deadline.
func (j *Job) Withdrawn(n agent.Notice) {
	j.mu.Lock()
	m, ok := j.mine[n.Key()]
	delete(j.mine, n.Key())
	j.mu.Unlock()
	if !ok {
		return
	}
	m.cancel()
	p := m.p
	j.log.Info("this node's notice withdrawn: withdrawing the job notice", "id", p.ID)
	p.Withdrawn = true
	end := p.Deadline.Add(grace)
	if min := j.now().Add(time.Minute); end.Before(min) {
		end = min
	}
	ctx, cancel := context.WithDeadline(context.Background(), end)
	j.wg.Go(func() {
		defer cancel()
		var all sync.WaitGroup
		all.Go(func() { j.push(ctx, p) })
		all.Go(func() {
			b, _ := json.Marshal(p)
			retry(ctx, func() error { return j.store.PutBytes(ctx, j.tombstoneKey(p.ID), b) })
			j.touch(ctx)
		})
		all.Go(func() {
			select { // a delete before a create in flight lands would leave the notice behind it
			case <-m.published:
			case <-time.After(30 * time.Second):
			case <-ctx.Done():
			}
			retry(ctx, func() error { return j.store.Delete(ctx, j.noticeKey(p.ID)) })
			j.touch(ctx)
		})
		all.Wait()
	})
}

// retry calls f until it succeeds or ctx ends, after a growing pause.
func retry(ctx context.Context, f func() error) {
	for wait := 100 * time.Millisecond; ctx.Err() == nil; wait = min(2*wait, 2*time.Second) {
		if f() == nil {
			return
		}
		select {
		case <-ctx.Done():
		case <-time.After(wait):
		}
	}
}

// Wait waits for publications in flight (at exit).
func (j *Job) Wait() { j.wg.Wait() }
