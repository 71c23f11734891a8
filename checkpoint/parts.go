package checkpoint

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/preemptd/preemptd/checkpoint/storage"
)

// A multi-node job's checkpoint is committed only when every node's part is
// in the store. Each node uploads its files below
// <run>/<name>/.preemptd-parts/<node>/ and then writes its part manifest,
// <run>/<name>/.preemptd-parts/<node>.json (signed like a manifest when a
// sign key is set); whichever node sees the set complete merges the parts
// into the checkpoint's manifest — written with a conditional create, so
// that exactly one node commits — then signs it (that node only: a merge
// can differ when a part was rewritten meanwhile, and a loser's signature
// must never replace the winner's) and moves latest.

// ErrPartsMissing is wrapped when a job checkpoint's set of parts was not
// complete by the deadline: the previous checkpoint stays latest.
var ErrPartsMissing = errors.New("parts missing")

// PartsError says which nodes' parts a job checkpoint lacks.
type PartsError struct {
	Name    string
	Have    []string
	Missing []string // the job's live nodes without a part; empty when unknown
	Nodes   int
}

func (e *PartsError) Error() string {
	msg := fmt.Sprintf("checkpoint %s: %d of %d parts in the store (from %s)", e.Name, len(e.Have), e.Nodes, strings.Join(e.Have, ", "))
	if len(e.Missing) > 0 {
		msg += "; missing the part of " + strings.Join(e.Missing, ", ")
	}
	return msg + "; the previous checkpoint stays latest"
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

func (c *Committer) poll() time.Duration {
	if c.PartPoll > 0 {
		return c.PartPoll
	}
	return 500 * time.Millisecond
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

// commitPart writes this node's part manifest, then completes the job's
// checkpoint if its set is whole, else waits for the other parts (another
// node may complete it) until the deadline.
func (c *Committer) commitPart(ctx context.Context, m Manifest, start time.Time) (Result, error) {
	b, _ := json.MarshalIndent(m, "", "  ")
	key := partKey(c.Run, m.Name, c.Node)
	if c.SignKey != nil {
		if err := c.Store.PutBytes(ctx, partSigKey(c.Run, m.Name, c.Node), []byte(sign(c.SignKey, b))); err != nil {
			return Result{}, fmt.Errorf("checkpoint %s: part signature: %w", m.Name, err)
		}
	}
	if err := c.Store.PutBytes(ctx, key, b); err != nil {
		return Result{}, fmt.Errorf("checkpoint %s: part manifest: %w", m.Name, err)
	}
	c.measured(m.SentBytes, c.now().Sub(start))
	c.log().Info("checkpoint part uploaded", "name", m.Name, "node", c.Node, "files", len(m.Files), "bytes", m.Bytes,
		"sent", m.SentBytes, "took", c.now().Sub(start).Round(time.Millisecond).String())

	var res Result
	var lastPerr *PartsError // what was missing the last time it could be told
	var lastErr error
	err := c.await(ctx, m.Name, func(wctx context.Context) bool {
		merged, won, perr, err := c.complete(wctx, m.Name)
		if perr != nil {
			lastPerr = perr
		}
		if lastErr = err; err != nil && wctx.Err() == nil && !errors.Is(err, errCommitting) {
			c.log().Warn("checking the job checkpoint's parts", "name", m.Name, "err", err)
		}
		if err != nil || perr != nil {
			return false
		}
		took := c.now().Sub(start)
		if won {
			res = c.committed(ctx, merged, took)
		} else {
			c.log().Info("job checkpoint committed by another node", "name", m.Name, "parts", len(merged.Parts))
			res = Result{Manifest: merged, Took: took}
		}
		return true
	})
	switch {
	case err == nil:
		return res, nil
	case lastPerr != nil:
		return Result{}, lastPerr
	}
	return Result{}, fmt.Errorf("checkpoint %s not committed: %w", m.Name, lastErr)
}

// complete looks at the job checkpoint's parts: when the checkpoint is
// committed already it returns its manifest; when every node's part is
// there it commits it (won says this node wrote the manifest); otherwise
// perr says which parts are missing.
func (c *Committer) complete(ctx context.Context, name string) (m Manifest, won bool, perr *PartsError, err error) {
	if m, err := c.manifest(ctx, name); err == nil {
		return m, false, nil, nil
	} else if errors.Is(err, ErrUnsigned) && c.SignKey != nil {
		return c.signCommitted(ctx, name)
	} else if !errors.Is(err, storage.ErrNotFound) {
		return Manifest{}, false, nil, err
	}
	parts, err := c.parts(ctx, name)
	if err != nil {
		return Manifest{}, false, nil, err
	}
	members, err := c.members(ctx)
	if err != nil {
		return Manifest{}, false, nil, err
	}
	var have []string
	for _, p := range parts {
		have = append(have, p.Node)
	}
	if len(parts) < c.Nodes {
		var missing []string
		for n := range members {
			if !slices.Contains(have, n) {
				missing = append(missing, n)
			}
		}
		slices.Sort(missing)
		return Manifest{}, false, &PartsError{Name: name, Have: have, Missing: missing, Nodes: c.Nodes}, nil
	}
	if len(parts) > c.Nodes {
		return Manifest{}, false, nil, fmt.Errorf("checkpoint %s: %d parts (from %s) for job.nodes %d: is job.nodes the same on every node?",
			name, len(parts), strings.Join(have, ", "), c.Nodes)
	}
	m, err = mergeParts(parts)
	if err != nil {
		return Manifest{}, false, nil, err
	}
	// Only the node whose create wins signs, after it: a node that lost
	// the race (its merge may differ, when a part was rewritten meanwhile)
	// never overwrites the winner's signature.
	b, _ := json.MarshalIndent(m, "", "  ")
	err = c.Store.Create(ctx, runKey(c.Run, name)+"/"+ManifestName, b)
	if errors.Is(err, storage.ErrExists) {
		return Manifest{}, false, nil, errCommitting // another node was first: read its manifest next time
	}
	if err != nil {
		return Manifest{}, false, nil, fmt.Errorf("checkpoint %s: manifest: %w", name, err)
	}
	if c.SignKey != nil {
		if err := c.Store.PutBytes(ctx, runKey(c.Run, name)+"/"+SignatureName, []byte(sign(c.SignKey, b))); err != nil {
			return Manifest{}, false, nil, fmt.Errorf("checkpoint %s: signature: %w", name, err)
		}
	}
	if err := c.advanceLatest(ctx, m); err != nil {
		return Manifest{}, false, nil, err
	}
	return m, true, nil, nil
}

// errCommitting says another node's commit of the checkpoint is under way.
var errCommitting = errors.New("another node is committing it")

// signCommitted signs a job checkpoint's manifest that is in the store
// without a valid signature — its node's create won and the node stopped
// before signing (or is signing now) — provided every file it lists is in
// the signed, valid part of the node it names: exactly what that node
// would have signed. Then latest moves as it would have.
func (c *Committer) signCommitted(ctx context.Context, name string) (Manifest, bool, *PartsError, error) {
	var buf bytes.Buffer
	if err := c.Store.Get(ctx, runKey(c.Run, name)+"/"+ManifestName, &buf); err != nil {
		return Manifest{}, false, nil, err
	}
	m, err := ParseManifest(buf.Bytes())
	if err != nil {
		return Manifest{}, false, nil, err
	}
	parts, err := c.parts(ctx, name)
	if err != nil {
		return Manifest{}, false, nil, err
	}
	held := map[string]ManifestFile{}
	for _, p := range parts {
		for _, f := range p.Files {
			held[f.Node+"/"+f.Path] = f
		}
	}
	for _, f := range m.Files {
		pf, ok := held[f.Node+"/"+f.Path]
		if !ok || pf.SHA256 != f.SHA256 || pf.Size != f.Size {
			return Manifest{}, false, nil, fmt.Errorf("checkpoint %s: the unsigned manifest lists %s of %s, which no signed part holds: %w",
				name, f.Path, f.Node, ErrUnsigned)
		}
	}
	if err := c.Store.PutBytes(ctx, runKey(c.Run, name)+"/"+SignatureName, []byte(sign(c.SignKey, buf.Bytes()))); err != nil {
		return Manifest{}, false, nil, fmt.Errorf("checkpoint %s: signature: %w", name, err)
	}
	if err := c.advanceLatest(ctx, m); err != nil {
		return Manifest{}, false, nil, err
	}
	c.log().Info("signed a job checkpoint committed by another node", "name", name)
	return m, false, nil, nil
}

// advanceLatest points latest at m unless it points at a newer checkpoint
// already (nodes of a job commit in any order).
func (c *Committer) advanceLatest(ctx context.Context, m Manifest) error {
	if l, err := c.latest(ctx); err == nil && l.Name != m.Name {
		if l.Step > m.Step && m.Step >= 0 || l.Step == m.Step && l.CommittedAt.After(m.CommittedAt) {
			c.log().Info("job checkpoint committed; latest stays at a newer one", "name", m.Name, "latest", l.Name)
			return nil
		}
	}
	lb, _ := json.Marshal(Latest{Name: m.Name, Step: m.Step, CommittedAt: m.CommittedAt})
	if err := c.Store.PutBytes(ctx, latestKey(c.Run), lb); err != nil {
		return fmt.Errorf("checkpoint %s: latest: %w", m.Name, err)
	}
	return nil
}

// members are the job's live nodes (nil: every part counts).
func (c *Committer) members(ctx context.Context) (map[string]bool, error) {
	if c.Members == nil {
		return nil, nil
	}
	return c.Members(ctx)
}

// parts reads the part manifests of checkpoint name written by the job's
// live nodes, checking each (and its signature, with a verify key).
func (c *Committer) parts(ctx context.Context, name string) ([]Manifest, error) {
	prefix := runKey(c.Run, name) + "/" + PartsDir
	objs, err := c.Store.List(ctx, prefix)
	if err != nil {
		return nil, err
	}
	members, err := c.members(ctx)
	if err != nil {
		return nil, err
	}
	var out []Manifest
	for _, o := range objs {
		node, ok := strings.CutSuffix(strings.TrimPrefix(o.Key, prefix+"/"), ".json")
		if !ok || strings.Contains(node, "/") || SafeNode(node) != nil {
			continue
		}
		if members != nil && !members[node] {
			continue // a node not (or no longer) in the job: an earlier incarnation's
		}
		p, err := c.readPart(ctx, name, node)
		if err != nil {
			c.log().Warn("ignoring a bad part manifest", "name", name, "node", node, "err", err)
			continue
		}
		out = append(out, p)
	}
	return out, nil
}

func (c *Committer) readPart(ctx context.Context, name, node string) (Manifest, error) {
	key := partKey(c.Run, name, node)
	var buf bytes.Buffer
	if err := c.Store.Get(ctx, key, &buf); err != nil {
		return Manifest{}, err
	}
	if pub := c.partVerifyKey(); pub != nil {
		if err := c.verify(ctx, pub, partSigKey(c.Run, name, node), buf.Bytes()); err != nil {
			return Manifest{}, fmt.Errorf("part %s: %w", node, err)
		}
	}
	m, err := ParseManifest(buf.Bytes())
	if err != nil {
		return m, err
	}
	if m.Version != JobManifestVersion || m.Node != node || m.Name != name {
		return m, fmt.Errorf("part manifest of %s names node %q, checkpoint %q (version %d)", node, m.Node, m.Name, m.Version)
	}
	for _, f := range m.Files {
		if f.Node != node {
			return m, fmt.Errorf("part manifest of %s lists %s as node %s's", node, f.Path, f.Node)
		}
	}
	return m, nil
}

// partVerifyKey is the key parts are verified with: the verify key, else
// the sign key's own public half (every node of a job signs).
func (c *Committer) partVerifyKey() ed25519.PublicKey {
	if c.VerifyKey != nil {
		return c.VerifyKey
	}
	if c.SignKey != nil {
		return c.SignKey.Public().(ed25519.PublicKey)
	}
	return nil
}

// mergeParts is the job checkpoint's manifest from its parts: every file
// once (a file two nodes hold identically is kept once, from the first
// node by name; different contents at one path are refused), the
// markers of every part, times the latest part's.
func mergeParts(parts []Manifest) (Manifest, error) {
	slices.SortFunc(parts, func(a, b Manifest) int { return strings.Compare(a.Node, b.Node) })
	first := parts[0]
	m := Manifest{Version: JobManifestVersion, Run: first.Run, Name: first.Name, Layout: first.Layout, Step: first.Step}
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
		m.Parts = append(m.Parts, Part{Node: p.Node, Instance: p.Instance, Files: len(p.Files), Bytes: p.Bytes})
	}
	for _, f := range byPath {
		m.Files = append(m.Files, f)
	}
	slices.SortFunc(m.Files, func(a, b ManifestFile) int { return strings.Compare(a.Path, b.Path) })
	slices.Sort(m.Markers)
	return m, m.Validate()
}

// waitMarker waits until the job's completion marker is in the store: a
// part of checkpoint name that carries the layout's marker (or the
// committed checkpoint itself). A marker appearing here instead means this
// node's copy is the coordinator's, and changed: ErrChanged.
func (c *Committer) waitMarker(ctx context.Context, ck Checkpoint) error {
	changed := false
	err := c.await(ctx, ck.Name, func(wctx context.Context) bool {
		if _, err := c.manifest(wctx, ck.Name); err == nil {
			return true
		}
		if changed = localMarker(ck); changed {
			return true
		}
		parts, err := c.parts(wctx, ck.Name)
		return err == nil && slices.ContainsFunc(parts, func(p Manifest) bool { return len(p.Markers) > 0 })
	})
	switch {
	case changed:
		return ErrChanged
	case err != nil:
		return fmt.Errorf("the job's completion marker (the part of the node that writes it) is not in the store: %w (%w)",
			ErrPartsMissing, err)
	}
	return nil
}

// await calls try every PartPoll until it says done, marking this
// committer as waiting on the job's other nodes for name, until the
// caller's deadline (else PartWait); it returns why the wait ended early.
func (c *Committer) await(ctx context.Context, name string, try func(ctx context.Context) bool) error {
	wctx, cancel := c.partCtx(ctx)
	defer cancel()
	defer c.setWaiting(name)()
	tick := time.NewTicker(c.poll())
	defer tick.Stop()
	for !try(wctx) {
		select {
		case <-tick.C:
		case <-wctx.Done():
			return context.Cause(wctx)
		}
	}
	return nil
}

// localMarker says whether a part's folder has grown its own marker.
func localMarker(ck Checkpoint) bool {
	return exists(filepath.Join(ck.Root, ck.Name, ".metadata")) || exists(filepath.Join(ck.Root, ck.Name, ".metadata.tmp"))
}
