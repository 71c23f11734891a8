package checkpoint

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"math/bits"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/preemptd/preemptd/checkpoint/storage"
)

// A multi-node job's checkpoint is committed only when every node's part of
// one save is in the store. The protocol, below <run>/<name>/:
//
//  1. Each node uploads its files below its own save attempt,
//     .preemptd-parts/<node>/<attempt>/ (a fresh attempt per commit, so
//     that a name saved again never overwrites what an earlier manifest
//     points at).
//  2. A node whose files lack the layout's markers (a DCP rank's shards;
//     .metadata is the coordinator's, written after every rank's shards)
//     waits for the coordinator's part of the same save and pairs with it:
//     the newest coordinator part not older than its own files (less
//     SaveSkew for the clocks). It then checks its files are unchanged
//     since the scan — so it never pairs with a later save either (that
//     save's coordinator part exists only once every rank's files of it,
//     this node's too, were written).
//  3. It writes its part manifest, .preemptd-parts/<node>.json (the
//     attempt, the files with their SHA-256, the pairing; signed in
//     <node>.sig with a sign key): the node's current part, replaced by
//     its next.
//  4. Whichever node sees the coordinator's part and a part paired with
//     it from every other live node — exactly job.nodes of them, every
//     file of each listed in the store — merges them into the checkpoint's
//     manifest. The merge is deterministic: every node makes the same
//     bytes (and, with one sign key, the same signature) for one set, so
//     a lost answer, a retry or two mergers at once change nothing. It is
//     stored at .preemptd-commits/<cid>.json, cid naming the set: the
//     signature first, then the manifest with a conditional create (a
//     taken key holding other bytes was planted: it is replaced).
//  5. Latest moves forward to it — by whichever node gets there, on every
//     look, so a merger that stopped after its create leaves nothing stuck.
//
// A part is never merged beside a part of another save: the pairing names
// the coordinator's save by its markers' SHA-256 and time, and parts of
// nodes that are not live members never count. More live members than
// job.nodes commit nothing (ErrTooManyNodes).

// ErrPartsMissing is wrapped when a job checkpoint's set of parts was not
// complete by the deadline: the previous checkpoint stays latest.
var ErrPartsMissing = errors.New("parts missing")

// ErrTooManyNodes is wrapped when more nodes are live in the job than
// job.nodes: a checkpoint merged from job.nodes of them would lack the
// others' files, so nothing is committed.
var ErrTooManyNodes = errors.New("more live nodes than job.nodes")

// DefaultSaveSkew is how much earlier than a rank's own files the
// coordinator's part of the same save may look: the nodes' clocks may
// differ by this much. A name saved again sooner than this after its last
// save could be taken for that save.
const DefaultSaveSkew = 2 * time.Second

// PartsError says which nodes' parts a job checkpoint lacks.
type PartsError struct {
	Name    string
	Have    []string
	Missing []string // the job's live nodes without a part; empty when unknown
	// Other are nodes whose part in the store belongs to another save;
	// Refused, nodes whose part is there but was not taken, and why
	// (unsigned, malformed).
	Other   []string
	Refused map[string]string
	Nodes   int
	// Committer, when every part is in the store, is the node whose commit
	// of them this one waits for (see commitTurn).
	Committer string
}

func (e *PartsError) Error() string {
	msg := fmt.Sprintf("checkpoint %s: %d of %d parts in the store", e.Name, len(e.Have), e.Nodes)
	if len(e.Have) > 0 {
		msg += " (from " + nodeList(e.Have) + ")"
	}
	if len(e.Missing) > 0 {
		msg += "; missing the part of " + nodeList(e.Missing)
	}
	if len(e.Other) > 0 {
		msg += "; the part of " + nodeList(e.Other) + " in the store is of another save"
	}
	for i, n := range slices.Sorted(maps.Keys(e.Refused)) {
		if i == maxNames {
			msg += fmt.Sprintf("; %d more parts refused", len(e.Refused)-maxNames)
			break
		}
		msg += "; the part of " + n + " was refused: " + e.Refused[n]
	}
	if e.Committer != "" {
		msg += "; waiting for " + e.Committer + " to commit them"
	}
	return msg + "; the previous checkpoint stays latest"
}

// maxNames is how many nodes an error names before it counts the rest: a
// job of a thousand nodes must not make a thousand-name log line.
const maxNames = 8

// nodeList joins nodes, the first maxNames of them and the number of others.
func nodeList(nodes []string) string {
	if len(nodes) <= maxNames {
		return strings.Join(nodes, ", ")
	}
	return fmt.Sprintf("%s and %d more", strings.Join(nodes[:maxNames], ", "), len(nodes)-maxNames)
}

func (e *PartsError) Unwrap() error { return ErrPartsMissing }

func (c *Committer) job() bool { return c.Nodes > 1 }

// WaitingOn says whether a commit of checkpoint name has sent this node's
// part and is waiting on the other nodes: a newer checkpoint should
// replace it then (every node moves to the newest; a part the others skip
// never completes).
func (c *Committer) WaitingOn(name string) bool {
	w, _ := c.waiting.Load().(string)
	return w != "" && w == name
}

func (c *Committer) setWaiting(name string) func() {
	c.waiting.Store(name)
	return func() { c.waiting.Store("") }
}

// partKey and partSigKey are a node's part manifest and its signature.
func partKey(run, name, node string) string {
	return runKey(run, name) + "/" + PartsDir + "/" + node + ".json"
}

func partSigKey(run, name, node string) string {
	return runKey(run, name) + "/" + PartsDir + "/" + node + ".sig"
}

// commitKey and commitSigKey are a job checkpoint's manifest for one set of
// parts, and its signature.
func commitKey(run, name, cid string) string {
	return runKey(run, name) + "/" + CommitsDir + "/" + cid + ".json"
}

func commitSigKey(run, name, cid string) string {
	return runKey(run, name) + "/" + CommitsDir + "/" + cid + ".sig"
}

// commitID names a set of parts: its nodes and their attempts.
func commitID(parts []Manifest) string {
	h := sha256.New()
	for _, p := range parts {
		fmt.Fprintf(h, "%s %s\n", p.Node, p.Attempt)
	}
	return hex.EncodeToString(h.Sum(nil)[:16])
}

func (c *Committer) poll() time.Duration {
	if c.PartPoll > 0 {
		return c.PartPoll
	}
	return 500 * time.Millisecond
}

func (c *Committer) skew() time.Duration {
	if c.SaveSkew > 0 {
		return c.SaveSkew
	}
	return DefaultSaveSkew
}

// partCtx bounds a wait for other nodes: the caller's deadline (the
// emergency path's), else PartWait.
func (c *Committer) partCtx(ctx context.Context) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok {
		return context.WithCancel(ctx)
	}
	wait := c.PartWait
	if wait <= 0 {
		wait = 2 * time.Minute
	}
	return context.WithTimeout(ctx, wait)
}

// writePart stores this node's part manifest m, its signature first.
func (c *Committer) writePart(ctx context.Context, m Manifest) error {
	b, _ := json.MarshalIndent(m, "", "  ")
	if c.SignKey != nil {
		if err := c.Store.PutBytes(ctx, partSigKey(c.Run, m.Name, c.Node), []byte(sign(c.SignKey, b))); err != nil {
			return fmt.Errorf("checkpoint %s: part signature: %w", m.Name, err)
		}
	}
	if err := c.Store.PutBytes(ctx, partKey(c.Run, m.Name, c.Node), b); err != nil {
		return fmt.Errorf("checkpoint %s: part manifest: %w", m.Name, err)
	}
	return nil
}

// commitPart writes this node's part manifest, then completes the job's
// checkpoint once the set is whole, else waits for the other parts
// (another node may complete it) until the deadline.
func (c *Committer) commitPart(ctx context.Context, m Manifest, start time.Time) (Result, error) {
	if err := c.writePart(ctx, m); err != nil {
		return Result{}, err
	}
	c.measured(m.SentBytes, c.now().Sub(start))
	c.log().Info("checkpoint part uploaded", "name", m.Name, "node", c.Node, "attempt", m.Attempt, "files", len(m.Files),
		"bytes", m.Bytes, "sent", m.SentBytes, "took", c.now().Sub(start).Round(time.Millisecond).String())

	var res Result
	var lastPerr *PartsError // what was missing the last time it could be told
	var lastErr error
	warned := map[string]bool{}
	t := turn{first: true}
	err := c.await(ctx, m.Name, func(wctx context.Context) bool {
		done, perr, err := c.complete(wctx, m, &t)
		if perr != nil {
			lastPerr = perr
		}
		if lastErr = err; err != nil && wctx.Err() == nil {
			if msg := err.Error(); !warned[msg] { // once per kind of trouble, not every poll
				warned[msg] = true
				if errors.Is(err, ErrTooManyNodes) {
					c.log().Error("job checkpoint not committed", "name", m.Name, "err", err)
				} else {
					c.log().Warn("checking the job checkpoint's parts", "name", m.Name, "err", err)
				}
			}
		}
		if err != nil || perr != nil {
			return false
		}
		took := c.now().Sub(start)
		if done.won {
			res = c.committed(ctx, done.m, took)
		} else {
			c.log().Info("job checkpoint committed by another node", "name", m.Name, "commit", done.m.Commit, "parts", len(done.m.Parts))
			res = Result{Manifest: done.m, Took: took}
		}
		c.collect(ctx, done.v, done.m)
		return true
	})
	switch {
	case err == nil:
		return res, nil
	case errors.Is(lastErr, ErrTooManyNodes):
		return Result{}, lastErr
	case lastPerr != nil:
		return Result{}, lastPerr
	}
	return Result{}, fmt.Errorf("checkpoint %s not committed: %w", m.Name, lastErr)
}

// view is one look at a job checkpoint's objects: a single listing of its
// prefix, and the part manifests of the live nodes read from it.
type view struct {
	objs    map[string]storage.Object // by key
	listed  map[string]bool           // by node: the live nodes whose part manifest is listed
	parts   map[string]Manifest       // by node: the current parts read, verified
	bad     map[string]error          // by node: why its part was refused
	members map[string]bool           // the job's live nodes (nil: unknown, every part counts)
}

// readers is how many part manifests a look reads at once.
const readers = 16

// look lists checkpoint name's prefix once and reads the parts of the
// job's live nodes that the filter which makes of the listing says to
// (nil: all of them; each read again only when its object changed),
// readers at a time.
func (c *Committer) look(ctx context.Context, name string, which func(v view) func(node string) bool) (view, error) {
	v := view{objs: map[string]storage.Object{}, listed: map[string]bool{}, parts: map[string]Manifest{}, bad: map[string]error{}}
	objs, err := c.Store.List(ctx, runKey(c.Run, name))
	c.asked.Add(int64(max(1, (len(objs)+999)/1000))) // a page per 1,000 keys
	if err != nil {
		return v, err
	}
	for _, o := range objs {
		v.objs[o.Key] = o
	}
	if v.members, err = c.members(ctx); err != nil {
		return v, err
	}
	prefix := runKey(c.Run, name) + "/" + PartsDir + "/"
	var toRead []storage.Object
	for _, o := range objs {
		node, ok := strings.CutSuffix(strings.TrimPrefix(o.Key, prefix), ".json")
		if !ok || !strings.HasPrefix(o.Key, prefix) || strings.Contains(node, "/") || SafeNode(node) != nil {
			continue
		}
		if v.members != nil && !v.members[node] {
			continue // a node not (or no longer) in the job: an earlier incarnation's
		}
		v.listed[node] = true
		toRead = append(toRead, o)
	}
	var read func(string) bool
	if which != nil {
		read = which(v)
	}
	var mu sync.Mutex
	sem := make(chan struct{}, readers)
	var wg sync.WaitGroup
	for _, o := range toRead {
		node := strings.TrimSuffix(strings.TrimPrefix(o.Key, prefix), ".json")
		if read != nil && !read(node) {
			continue
		}
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			p, err := c.readPart(ctx, name, node, o, v.objs[partSigKey(c.Run, name, node)])
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				v.bad[node] = err
				return
			}
			v.parts[node] = p
		})
	}
	wg.Wait()
	return v, nil
}

// only is look's filter for node's part alone.
func only(node string) func(view) func(string) bool {
	return func(view) func(string) bool { return func(n string) bool { return n == node } }
}

// turn is where one node's wait for a job checkpoint's commit stands.
type turn struct {
	first bool      // the next look is the first since this node's part was written
	whole time.Time // when this node first saw every part in the store
}

// commitTurn says whether this node reads every part and commits them
// now, and else which node it waits for. Reading every part is N requests,
// so not every node does it (N² for the job): the node whose own part
// made the set whole (it sees them all at its first look after writing
// it) and the first live node by name commit at once; should neither have
// committed, more nodes join at every 2 polls, doubling each time (the
// 2nd and 3rd by name, then the 4th to 7th, ...), so that a node dead after
// its part was written delays the commit by a few polls at most.
func (c *Committer) commitTurn(v view, t *turn, first bool) (now bool, waitFor string) {
	nodes := slices.Sorted(maps.Keys(v.listed))
	if v.members != nil {
		nodes = slices.Sorted(maps.Keys(v.members))
	}
	i := slices.Index(nodes, c.Node)
	if first || i <= 0 {
		return true, ""
	}
	if t.whole.IsZero() {
		t.whole = c.now()
	}
	tier := bits.Len(uint(i+1)) - 1 // 1 for the 2nd and 3rd, 2 for the 4th to 7th, ...
	if c.now().Sub(t.whole) >= time.Duration(tier)*2*c.poll() {
		return true, ""
	}
	return false, nodes[0]
}

// cachedPart is a part manifest as read, with the objects it came from.
type cachedPart struct {
	obj, sig storage.Object
	m        Manifest
}

// recall is the manifest read from key while its object (obj, and its
// signature's, sig, as listed) is the one it was read from.
func (c *Committer) recall(key string, obj, sig storage.Object) (Manifest, bool) {
	c.pmu.Lock()
	defer c.pmu.Unlock()
	hit, ok := c.partCache[key]
	if ok && hit.obj.Same(obj) && hit.sig.Same(sig) {
		return hit.m, true
	}
	return Manifest{}, false
}

// remember caches m, read from key (obj and sig, as listed), verified.
func (c *Committer) remember(key string, obj, sig storage.Object, m Manifest) {
	c.pmu.Lock()
	defer c.pmu.Unlock()
	if c.partCache == nil {
		c.partCache = map[string]cachedPart{}
	}
	c.partCache[key] = cachedPart{obj: obj, sig: sig, m: m}
}

// readPart reads node's part manifest (obj, its listing; sig, its
// signature's), checking it, from the cache while neither has changed.
func (c *Committer) readPart(ctx context.Context, name, node string, obj, sig storage.Object) (Manifest, error) {
	key := partKey(c.Run, name, node)
	if m, ok := c.recall(key, obj, sig); ok {
		return m, nil
	}
	var buf bytes.Buffer
	c.asked.Add(1)
	if err := c.Store.Get(ctx, key, &buf); err != nil {
		return Manifest{}, err
	}
	if pub := c.readKey(); pub != nil {
		c.asked.Add(1)
		if err := c.verify(ctx, pub, partSigKey(c.Run, name, node), buf.Bytes()); err != nil {
			return Manifest{}, fmt.Errorf("part %s: %w", node, err)
		}
	}
	m, err := ParseManifest(buf.Bytes())
	if err != nil {
		return m, err
	}
	if m.Version != AttemptManifestVersion || m.Node != node || m.Name != name || m.Run != c.Run || m.Attempt == "" {
		return m, fmt.Errorf("part manifest of %s names node %q, checkpoint %q, run %q (version %d, attempt %q)",
			node, m.Node, m.Name, m.Run, m.Version, m.Attempt)
	}
	for _, f := range m.Files {
		if f.Node != node || f.Attempt != m.Attempt {
			return m, fmt.Errorf("part manifest of %s lists %s as node %s's, attempt %s", node, f.Path, f.Node, f.Attempt)
		}
	}
	c.remember(key, obj, sig, m)
	return m, nil
}

// readKey is the key every manifest read is verified with: the verify key,
// else the sign key's own public half (a machine that signs trusts only
// what its key signed); nil when neither is set.
func (c *Committer) readKey() ed25519.PublicKey {
	if c.VerifyKey != nil {
		return c.VerifyKey
	}
	if c.SignKey != nil {
		return c.SignKey.Public().(ed25519.PublicKey)
	}
	return nil
}

// pick chooses the parts of one save from v: a coordinator's part (one
// with the layout's markers) and the parts paired with that very save; when
// no part needs pairing (every node's part complete by its own rule), every
// live node's part. When that is not a part from every node it says which
// are missing, and which nodes' parts are of another save.
func (c *Committer) pick(name string, v view) ([]Manifest, *PartsError) {
	nodes := sortedNodes(v)
	paired := slices.ContainsFunc(nodes, func(n string) bool { return v.parts[n].Pairs != nil })
	var best []Manifest
	if !paired {
		for _, n := range nodes {
			best = append(best, v.parts[n])
		}
	}
	for _, cn := range nodes { // each candidate coordinator, by node name
		coord := v.parts[cn]
		if !paired || coord.Pairs != nil || len(coord.Markers) == 0 {
			continue
		}
		set := []Manifest{coord}
		for _, n := range nodes {
			if p := v.parts[n]; p.Pairs.Is(coord) {
				set = append(set, p)
			}
		}
		if len(set) > len(best) {
			best = set
		}
	}
	perr := &PartsError{Name: name, Nodes: c.Nodes}
	for _, p := range best {
		perr.Have = append(perr.Have, p.Node)
	}
	slices.Sort(perr.Have)
	for _, n := range nodes {
		if !slices.Contains(perr.Have, n) {
			perr.Other = append(perr.Other, n)
		}
	}
	for n, err := range v.bad {
		if perr.Refused == nil {
			perr.Refused = map[string]string{}
		}
		perr.Refused[n] = err.Error()
	}
	for n := range v.members {
		if _, ok := v.parts[n]; !ok && v.bad[n] == nil {
			perr.Missing = append(perr.Missing, n)
		}
	}
	slices.Sort(perr.Missing)
	if len(best) != c.Nodes || len(perr.Missing) > 0 || len(perr.Refused) > 0 {
		return nil, perr
	}
	slices.SortFunc(best, func(a, b Manifest) int { return strings.Compare(a.Node, b.Node) })
	return best, nil
}

func sortedNodes(v view) []string {
	nodes := make([]string, 0, len(v.parts))
	for n := range v.parts {
		nodes = append(nodes, n)
	}
	slices.Sort(nodes)
	return nodes
}

// committedJob is what complete found: the job checkpoint's manifest m,
// whether this node's create made it (won), and the look it came from.
type committedJob struct {
	m   Manifest
	won bool
	v   view
}

// complete looks at the job checkpoint's parts once: when this node's part
// mine and a part of the same save from every other node are there, it
// commits them (or finds them committed) and moves latest; otherwise perr
// says which parts are missing.
func (c *Committer) complete(ctx context.Context, mine Manifest, t *turn) (done committedJob, perr *PartsError, err error) {
	name := mine.Name
	first := t.first
	t.first = false
	v, err := c.look(ctx, name, only(c.Node))
	if err != nil {
		return done, nil, err
	}
	if v.members != nil && len(v.members) > c.Nodes {
		live := slices.Sorted(maps.Keys(v.members))
		return done, nil, fmt.Errorf("checkpoint %s not committed: %d live nodes (%s) for job.nodes %d: a checkpoint of %d parts would lack the others' files; stop the extra daemon, or set job.nodes to %d on every node: %w",
			name, len(live), nodeList(live), c.Nodes, c.Nodes, len(live), ErrTooManyNodes)
	}
	if own, ok := v.parts[c.Node]; !ok || own.Attempt != mine.Attempt {
		// This node's current part is another (an earlier attempt's write
		// that landed late, or one put there): this attempt is current.
		if err := c.writePart(ctx, mine); err != nil {
			return done, nil, err
		}
		return done, nil, fmt.Errorf("checkpoint %s: this node's part in the store was not its current one; written again", name)
	}
	// Until the listing shows a part from every live node, no part is read.
	if perr := c.unlisted(name, v); perr != nil {
		return done, perr, nil
	}
	// Every part is there: committed already (by the node whose turn it
	// was), or this node's turn to read them all and commit.
	if m, ok := c.committedWith(ctx, v, mine); ok {
		if _, err := c.advanceLatest(ctx, m); err != nil {
			return done, nil, err
		}
		return committedJob{m: m, v: v}, nil, nil
	}
	now, waitFor := c.commitTurn(v, t, first)
	if !now {
		have := slices.Sorted(maps.Keys(v.listed))
		return done, &PartsError{Name: name, Nodes: c.Nodes, Have: have, Committer: waitFor}, nil
	}
	if v, err = c.look(ctx, name, nil); err != nil {
		return done, nil, err
	}
	set, perr := c.pick(name, v)
	if perr != nil {
		return done, perr, nil
	}
	for _, p := range set {
		for _, f := range p.Files {
			key := runKey(c.Run, name) + "/" + p.Object(f)
			if o, ok := v.objs[key]; !ok || o.Size != f.Size {
				return done, nil, fmt.Errorf("checkpoint %s: %s of %s is not in the store whole (%s)", name, f.Path, p.Node, key)
			}
		}
	}
	m, err := mergeParts(set)
	if err != nil {
		return done, nil, err
	}
	won, err := c.store(ctx, v, m)
	if err != nil {
		return done, nil, err
	}
	if _, err := c.advanceLatest(ctx, m); err != nil {
		return done, nil, err
	}
	return committedJob{m: m, won: won, v: v}, nil, nil
}

// unlisted says which live nodes' parts the listing of v lacks (nil when
// none does, and there are job.nodes of them).
func (c *Committer) unlisted(name string, v view) *PartsError {
	perr := &PartsError{Name: name, Nodes: c.Nodes, Have: slices.Sorted(maps.Keys(v.listed))}
	for n := range v.members {
		if !v.listed[n] {
			perr.Missing = append(perr.Missing, n)
		}
	}
	slices.Sort(perr.Missing)
	if len(perr.Missing) > 0 || len(v.listed) < c.Nodes {
		return perr
	}
	return nil
}

// committedWith finds, among the job manifests v lists for mine's name,
// one that verifies and holds mine (its node and attempt): every part of
// this node's save committed by another node.
func (c *Committer) committedWith(ctx context.Context, v view, mine Manifest) (Manifest, bool) {
	for _, m := range c.commits(ctx, v, mine.Name) {
		if slices.ContainsFunc(m.Parts, func(p Part) bool { return p.Node == c.Node && p.Attempt == mine.Attempt }) {
			return m, true
		}
	}
	return Manifest{}, false
}

// readCommitCached reads the job manifest cid of name (obj and sig, its
// listing and its signature's), verified, from the cache while neither
// has changed.
func (c *Committer) readCommitCached(ctx context.Context, name, cid string, obj, sig storage.Object) (Manifest, error) {
	key := commitKey(c.Run, name, cid)
	if m, ok := c.recall(key, obj, sig); ok {
		return m, nil
	}
	c.asked.Add(1)
	m, err := c.readCommit(ctx, name, cid)
	if err != nil {
		return m, err
	}
	c.remember(key, obj, sig, m)
	return m, nil
}

// store makes merged job manifest m durable at its commit key: signature
// first, then a conditional create; a manifest found there is kept when it
// is byte for byte this merge (another node's, or this node's own whose
// answer was lost: its signature is finished when missing) and replaced
// when it is not (it was put there by someone else). won says this call
// created it.
func (c *Committer) store(ctx context.Context, v view, m Manifest) (won bool, err error) {
	b, _ := json.MarshalIndent(m, "", "  ")
	key, sigKey := commitKey(c.Run, m.Name, m.Commit), commitSigKey(c.Run, m.Name, m.Commit)
	putSig := func() error {
		if c.SignKey == nil {
			return nil
		}
		if err := c.Store.PutBytes(ctx, sigKey, []byte(sign(c.SignKey, b))); err != nil {
			return fmt.Errorf("checkpoint %s: signature: %w", m.Name, err)
		}
		return nil
	}
	if _, ok := v.objs[key]; !ok {
		if err := putSig(); err != nil {
			return false, err
		}
		err := c.Store.Create(ctx, key, b)
		if err == nil {
			return true, nil
		}
		if !errors.Is(err, storage.ErrExists) {
			return false, fmt.Errorf("checkpoint %s: manifest: %w", m.Name, err)
		}
	}
	var have bytes.Buffer
	if err := c.Store.Get(ctx, key, &have); err != nil {
		return false, fmt.Errorf("checkpoint %s: manifest: %w", m.Name, err)
	}
	if !bytes.Equal(have.Bytes(), b) {
		c.log().Warn("a job manifest in the store is not the merge of its parts; replacing it", "name", m.Name, "key", key)
		if err := putSig(); err != nil {
			return false, err
		}
		if err := c.Store.PutBytes(ctx, key, b); err != nil {
			return false, fmt.Errorf("checkpoint %s: manifest: %w", m.Name, err)
		}
		return false, nil
	}
	if pub := c.readKey(); pub != nil && c.SignKey != nil && c.verify(ctx, pub, sigKey, b) != nil {
		c.log().Info("signing a job checkpoint whose merger stopped before its signature", "name", m.Name, "commit", m.Commit)
		return false, putSig()
	}
	return false, nil
}

// collect deletes what the commit of committed leaves behind, as v (the
// look that found it) shows the name: its job manifests beyond the newest
// two and latest's (a restore may be reading the one before), and this
// node's objects of attempts that no manifest kept points at (failed and
// superseded saves) — never another node's objects, never those of an
// attempt this node may still write (its commits run one at a time).
// Failures are logged; the next commit tries again.
func (c *Committer) collect(ctx context.Context, v view, committed Manifest) {
	name := committed.Name
	if _, legacy := v.objs[runKey(c.Run, name)+"/"+ManifestName]; legacy {
		return // a name committed by an earlier release: its objects are not in attempt folders
	}
	l, lerr := c.latest(ctx)
	if lerr != nil && !errors.Is(lerr, storage.ErrNotFound) {
		return
	}
	ms := c.commits(ctx, v, name)
	if !slices.ContainsFunc(ms, func(m Manifest) bool { return m.Commit == committed.Commit }) {
		ms = append(ms, committed)
	}
	slices.SortFunc(ms, func(a, b Manifest) int {
		if newer(a, b) {
			return -1
		}
		return 1
	})
	keep := map[string]bool{} // attempts of this node still pointed at
	if p, ok := v.parts[c.Node]; ok {
		keep[p.Attempt] = true
	}
	var dead []string
	for i, m := range ms {
		if i >= 2 && !(l.Name == name && l.Commit == m.Commit) {
			dead = append(dead, commitKey(c.Run, name, m.Commit), commitSigKey(c.Run, name, m.Commit))
			continue
		}
		for _, p := range m.Parts {
			if p.Node == c.Node {
				keep[p.Attempt] = true
			}
		}
	}
	prefix := runKey(c.Run, name) + "/" + PartsDir + "/" + c.Node + "/"
	for key := range v.objs {
		rest, ok := strings.CutPrefix(key, prefix)
		if !ok {
			continue
		}
		attempt, _, _ := strings.Cut(rest, "/")
		if attemptName.MatchString(attempt) && !keep[attempt] {
			dead = append(dead, key)
		}
	}
	if len(dead) == 0 {
		return
	}
	slices.Sort(dead)
	if err := c.Store.Delete(ctx, dead...); err != nil {
		c.log().Warn("deleting superseded objects of a job checkpoint", "name", name, "err", err)
		return
	}
	c.log().Info("deleted superseded objects of a job checkpoint", "name", name, "objects", len(dead))
}

// commits reads the job manifests of name in v that verify.
// Each is read once while its object, and its signature's, are unchanged.
func (c *Committer) commits(ctx context.Context, v view, name string) []Manifest {
	prefix := runKey(c.Run, name) + "/" + CommitsDir + "/"
	var out []Manifest
	for key, o := range v.objs {
		cid, ok := strings.CutSuffix(strings.TrimPrefix(key, prefix), ".json")
		if !ok || !strings.HasPrefix(key, prefix) || strings.Contains(cid, "/") {
			continue
		}
		if m, err := c.readCommitCached(ctx, name, cid, o, v.objs[commitSigKey(c.Run, name, cid)]); err == nil {
			out = append(out, m)
		}
	}
	return out
}

// advanceLatest points latest at m unless it points at m or a newer
// checkpoint already (nodes of a job commit in any order): a conditional
// replace where the store has one (every store here), so that of nodes
// moving it at once none moves it back; read again and retried when
// another got there first. moved says it pointed latest at m.
func (c *Committer) advanceLatest(ctx context.Context, m Manifest) (moved bool, err error) {
	lb, _ := json.Marshal(latestOf(m))
	sw, swaps := c.Store.(storage.Swapper)
	for try := 0; swaps && try < 8; try++ {
		var buf bytes.Buffer
		version, err := sw.GetVersion(ctx, latestKey(c.Run), &buf)
		switch {
		case errors.Is(err, storage.ErrNotFound):
			version = ""
		case err != nil:
			return false, fmt.Errorf("checkpoint %s: latest: %w", m.Name, err)
		default:
			if l, err := parseLatest(buf.Bytes()); err == nil && !c.ahead(m, l) {
				return false, nil
			}
		}
		err = sw.PutIf(ctx, latestKey(c.Run), lb, version)
		switch {
		case err == nil:
			return true, nil
		case errors.Is(err, storage.ErrNoSwap):
			swaps = false
		case !errors.Is(err, storage.ErrConflict):
			return false, fmt.Errorf("checkpoint %s: latest: %w", m.Name, err)
		}
	}
	if swaps {
		return false, fmt.Errorf("checkpoint %s: latest: changed by others at every one of 8 tries", m.Name)
	}
	if l, err := c.latest(ctx); err == nil && !c.ahead(m, l) {
		return false, nil
	}
	if err := c.Store.PutBytes(ctx, latestKey(c.Run), lb); err != nil {
		return false, fmt.Errorf("checkpoint %s: latest: %w", m.Name, err)
	}
	return true, nil
}

// ahead says whether m is newer than the checkpoint latest l names.
func (c *Committer) ahead(m Manifest, l Latest) bool {
	if newer(m, l.manifest()) {
		return true
	}
	if l.Name != m.Name || l.Commit != m.Commit {
		c.log().Info("checkpoint committed; latest stays at a newer one", "name", m.Name, "latest", l.Name)
	}
	return false
}

// members are the job's live nodes (nil: every part counts).
func (c *Committer) members(ctx context.Context) (map[string]bool, error) {
	if c.Members == nil {
		return nil, nil
	}
	return c.Members(ctx)
}

// mergeParts is the job checkpoint's manifest from the parts of one save:
// every file once (a file two nodes hold identically is kept once, from
// the first node by name; different contents at one path are refused),
// the markers of every part, times the latest part's, and the set's
// commit id. The same parts always make the same bytes.
func mergeParts(parts []Manifest) (Manifest, error) {
	parts = slices.Clone(parts)
	slices.SortFunc(parts, func(a, b Manifest) int { return strings.Compare(a.Node, b.Node) })
	first := parts[0]
	m := Manifest{Version: AttemptManifestVersion, Run: first.Run, Name: first.Name, Layout: first.Layout, Step: first.Step,
		Commit: commitID(parts)}
	byPath := map[string]ManifestFile{}
	for _, p := range parts {
		if p.Name != first.Name || p.Run != first.Run {
			return Manifest{}, fmt.Errorf("parts of %s disagree on the checkpoint (%s/%s vs %s/%s)", first.Name, p.Run, p.Name, first.Run, first.Name)
		}
		if len(p.Markers) > 0 {
			m.Layout = p.Layout // the coordinator's word on the layout
		}
		for _, f := range p.Files {
			if have, ok := byPath[f.Path]; ok {
				if have.SHA256 != f.SHA256 || have.Size != f.Size {
					return Manifest{}, fmt.Errorf("checkpoint %s: nodes %s and %s both hold %s, with different contents", m.Name, have.Node, f.Node, f.Path)
				}
				continue
			}
			byPath[f.Path] = f
			m.Bytes += f.Size
		}
		for _, mk := range p.Markers {
			if !slices.Contains(m.Markers, mk) {
				m.Markers = append(m.Markers, mk)
			}
		}
		m.SentBytes += p.SentBytes
		if p.WrittenAt.After(m.WrittenAt) {
			m.WrittenAt = p.WrittenAt
		}
		if p.CommittedAt.After(m.CommittedAt) {
			m.CommittedAt = p.CommittedAt
		}
		m.Parts = append(m.Parts, Part{Node: p.Node, Instance: p.Instance, Attempt: p.Attempt, WrittenAt: p.WrittenAt,
			Files: len(p.Files), Bytes: p.Bytes})
	}
	for _, f := range byPath {
		m.Files = append(m.Files, f)
	}
	slices.SortFunc(m.Files, func(a, b ManifestFile) int { return strings.Compare(a.Path, b.Path) })
	slices.Sort(m.Markers)
	return m, m.Validate()
}

// waitPair waits until the coordinator's part of the save that wrote this
// node's part m is in the store, and returns its identity: the newest
// coordinator part (one with the layout's markers, of another live node)
// whose files are not older than m's, less SaveSkew. A marker appearing
// in this node's own folder instead means its copy is the coordinator's,
// and changed: ErrChanged.
func (c *Committer) waitPair(ctx context.Context, ck Checkpoint, m Manifest) (*Pairing, error) {
	changed := false
	var pair *Pairing
	err := c.await(ctx, ck.Name, func(wctx context.Context) bool {
		if changed = localMarker(ck); changed {
			return true
		}
		v, err := c.look(wctx, ck.Name, c.mayCoordinate(ck))
		if err != nil {
			return false
		}
		var best *Manifest
		for _, node := range sortedNodes(v) {
			p := v.parts[node]
			if node == c.Node || len(p.Markers) == 0 || p.WrittenAt.Before(m.WrittenAt.Add(-c.skew())) {
				continue // not a coordinator, or a save before this node's (a part left by a failed one)
			}
			if best == nil || p.WrittenAt.After(best.WrittenAt) {
				best = &p
			}
		}
		if best != nil {
			pair = pairing(*best)
		}
		return best != nil
	})
	switch {
	case changed:
		return nil, ErrChanged
	case err != nil:
		return nil, fmt.Errorf("the job's completion marker (the part of the node that writes it, of this save) is not in the store: %w (%w)",
			ErrPartsMissing, err)
	}
	return pair, nil
}

// mayCoordinate says which parts a look for ck's coordinator reads: those
// of nodes whose upload holds one of the layout's markers (ck's own folder
// lacks them) — one part, not every node's; every part when the layout
// names no marker.
func (c *Committer) mayCoordinate(ck Checkpoint) func(view) func(string) bool {
	markers := ck.Markers
	if ck.Part && len(markers) == 0 {
		markers = []string{ck.Name + "/.metadata"} // a DCP rank's part: the coordinator's marker
	}
	if len(markers) == 0 {
		return nil
	}
	prefix := runKey(c.Run, ck.Name) + "/" + PartsDir + "/"
	return func(v view) func(string) bool {
		coords := map[string]bool{} // one pass over the listing, not one a node
		for key := range v.objs {
			rest, ok := strings.CutPrefix(key, prefix)
			if !ok {
				continue
			}
			node, rest, _ := strings.Cut(rest, "/")
			_, path, _ := strings.Cut(rest, "/") // past the attempt
			if slices.ContainsFunc(markers, func(mk string) bool { return objectName(ck.Name, mk) == path }) {
				coords[node] = true
			}
		}
		return func(node string) bool { return node != c.Node && coords[node] }
	}
}

// waitRate is how many store requests a second a node's looks may ask
// while it waits for the other nodes' parts: a look that asks more (a
// checkpoint of more than 1,000 objects lists in pages; parts read for the
// first time) is followed by a longer pause, so a waiting node asks about
// as much of the store at 1,000 nodes as at 8. With the registry's
// re-read (a listing page every 5 s at most) that is under 4 a second.
const waitRate = 3.5

// await calls try every PartPoll (longer after a look that asked more of
// the store than waitRate allows), marking this committer as waiting on
// the job's other nodes for name, until the caller's deadline (else
// PartWait); it returns why the wait ended early.
func (c *Committer) await(ctx context.Context, name string, try func(ctx context.Context) bool) error {
	wctx, cancel := c.partCtx(ctx)
	defer cancel()
	defer c.setWaiting(name)()
	for {
		start, asked := time.Now(), c.asked.Load()
		if try(wctx) {
			return nil
		}
		pause := max(c.poll(), time.Duration(float64(c.asked.Load()-asked)/waitRate*float64(time.Second)))
		select {
		case <-time.After(time.Until(start.Add(pause))):
		case <-wctx.Done():
			return context.Cause(wctx)
		}
	}
}

// localMarker says whether a part's folder has grown its own marker.
func localMarker(ck Checkpoint) bool {
	return exists(filepath.Join(ck.Root, ck.Name, ".metadata")) || exists(filepath.Join(ck.Root, ck.Name, ".metadata.tmp"))
}
