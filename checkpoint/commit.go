package checkpoint

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"maps"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/preemptd/preemptd/agent"
	"github.com/preemptd/preemptd/checkpoint/storage"
)

// ErrUnsigned is returned, with storage.verify_key set, for a checkpoint
// whose manifest is not signed by the matching sign key.
var ErrUnsigned = errors.New("not signed by storage.sign_key")

// SignatureName is the manifest's ed25519 signature (base64) beside it.
const SignatureName = ".preemptd-manifest.sig"

// ErrChanged is returned when a checkpoint's files changed while it was
// being uploaded: it is not committed.
var ErrChanged = errors.New("checkpoint changed during upload")

// Latest is the run's pointer to its newest committed checkpoint: a job
// checkpoint's names its commit (the set of parts), since a name saved
// again has one manifest per save.
type Latest struct {
	Name        string    `json:"name"`
	Step        int64     `json:"step"`
	CommittedAt time.Time `json:"committed_at"`
	WrittenAt   time.Time `json:"written_at,omitzero"`
	Commit      string    `json:"commit,omitempty"`
}

func latestOf(m Manifest) Latest {
	return Latest{Name: m.Name, Step: m.Step, CommittedAt: m.CommittedAt, WrittenAt: m.WrittenAt, Commit: m.Commit}
}

// manifest is what latest says of its checkpoint, for newer.
func (l Latest) manifest() Manifest {
	return Manifest{Name: l.Name, Step: l.Step, CommittedAt: l.CommittedAt, WrittenAt: l.WrittenAt, Commit: l.Commit}
}

// newer orders committed checkpoints: by when they were saved (the newest
// file of the save: a name saved again, a job's nodes committing in any
// order, a rollback trained forward again), then by commit time, then by
// commit id (so that every node orders two commits alike).
func newer(a, b Manifest) bool {
	switch {
	case !a.WrittenAt.IsZero() && !b.WrittenAt.IsZero() && !a.WrittenAt.Equal(b.WrittenAt):
		return a.WrittenAt.After(b.WrittenAt)
	case !a.CommittedAt.Equal(b.CommittedAt):
		return a.CommittedAt.After(b.CommittedAt)
	}
	return a.Commit > b.Commit
}

// Store keys of a run.
func runKey(run, name string) string { return run + "/" + name }
func latestKey(run string) string    { return run + "/latest" }

// Committer uploads checkpoints of one run with the commit protocol.
type Committer struct {
	Store    storage.Store
	Run      string
	Instance string
	// Keep is how many committed checkpoints to keep (0: all).
	Keep int
	Log  *slog.Logger
	// Parallel is how many files upload at once (each itself in parallel parts).
	Parallel int
	// Now is the clock; time.Now when nil.
	Now func() time.Time
	// OnCommit, if set, is told of every commit (metrics).
	OnCommit func(Result)

	// SignKey, if set, signs every manifest (ed25519; the signature is
	// stored beside it); VerifyKey, if set, makes every manifest read —
	// restore, ls, reuse — count only when its signature verifies.
	// Checkpoints are code (torch.load unpickles): a verify key keeps a
	// checkpoint planted by anyone who can write to the bucket off the next
	// machine.
	SignKey   ed25519.PrivateKey
	VerifyKey ed25519.PublicKey

	// Node and Nodes make commits a multi-node job's (Nodes > 1): this
	// node uploads its part of each checkpoint and the checkpoint commits
	// once every node's part is in the store (see parts.go).
	Node  string
	Nodes int
	// Members, if set, returns the job's live nodes (its registry): only
	// their parts count, so that a part an earlier incarnation of the job
	// left never completes a checkpoint.
	Members func(ctx context.Context) (map[string]bool, error)
	// PartPoll is how often other nodes' parts are looked for (default
	// 500ms); PartWait bounds a background commit's wait for them (default
	// 2m; an emergency commit waits until its deadline).
	PartPoll, PartWait time.Duration
	// SaveSkew is how far apart the nodes' clocks may be (default
	// DefaultSaveSkew): a rank's part pairs with a coordinator's part no
	// older than its own files, less this (see parts.go).
	SaveSkew time.Duration

	// Journal, if set, is a file (in state_dir) listing the keys whose
	// uploads are in flight, so that after a crash Cleanup aborts exactly
	// this node's interrupted uploads and never another node's.
	Journal string

	// sums are files' hashes computed ahead (Prehash).
	sums sums

	mu sync.Mutex // one commit at a time
	// throughput is the last measured upload rate, bytes per second, as
	// math.Float64bits: read without the lock a commit holds.
	throughput atomic.Uint64

	jmu      sync.Mutex
	inflight map[string]int // key → uploads in flight
	loaded   bool

	// waiting names the job checkpoint whose other parts (or marker) a
	// commit is waiting for, with its data sent: "" when none.
	waiting atomic.Value
	// asked counts the store requests of looks at a job checkpoint (LIST
	// pages and part reads), to pace them.
	asked atomic.Int64

	// partCache holds the part manifests read, by key (see readPart).
	pmu       sync.Mutex
	partCache map[string]cachedPart
}

// Result says what a commit did.
type Result struct {
	Manifest Manifest
	Took     time.Duration
}

func (c *Committer) now() time.Time {
	if c.Now != nil {
		return c.Now()
	}
	return time.Now()
}

func (c *Committer) log() *slog.Logger {
	if c.Log == nil {
		return slog.New(slog.DiscardHandler)
	}
	return c.Log
}

// Throughput is the last measured upload rate in bytes per second (0 before
// any upload).
func (c *Committer) Throughput() float64 {
	return math.Float64frombits(c.throughput.Load())
}

// Commit makes ck durable: it hashes every file, reuses by server-side copy
// what an earlier committed checkpoint of the run already holds unchanged,
// uploads the data, then the markers, checks that nothing changed on disk,
// writes the manifest and last moves the run's latest pointer. A name
// committed before is stored below a save attempt of its own, so that the
// manifest already there never points at a byte of the new save.
func (c *Committer) Commit(ctx context.Context, ck Checkpoint) (Result, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	start := c.now()
	if err := safeName(ck.Name); err != nil {
		return Result{}, err
	}
	m := Manifest{Version: ManifestVersion, Run: c.Run, Name: ck.Name, Layout: ck.Layout, Step: ck.Step,
		Markers: ck.Markers, Instance: c.Instance, WrittenAt: ck.ModTime.UTC()}
	node := "" // a job's files are stored below their node's part folder
	var prev *Manifest
	switch {
	case c.job():
		if err := SafeNode(c.Node); err != nil {
			return Result{}, err
		}
		m.Version, m.Node, m.Attempt, node = AttemptManifestVersion, c.Node, newAttempt(), c.Node
	default: // a single node's commits write the name's one manifest
		switch p, err := c.readManifest(ctx, runKey(c.Run, ck.Name)+"/"+ManifestName, runKey(c.Run, ck.Name)+"/"+SignatureName); {
		case err == nil:
			prev = &p
			m.Version, m.Attempt = AttemptManifestVersion, newAttempt()
		case !errors.Is(err, storage.ErrNotFound):
			// Something is there (unreadable, unsigned, or the store
			// failed to say): never write over it.
			m.Version, m.Attempt = AttemptManifestVersion, newAttempt()
		}
	}
	objects := map[string]string{}
	for _, f := range ck.Files {
		obj := m.Object(ManifestFile{Path: f.Path, Node: node, Attempt: m.Attempt})
		if other, dup := objects[obj]; dup {
			return Result{}, fmt.Errorf("checkpoint %s: %s and %s would be stored under the same name %s", ck.Name, other, f.Path, obj)
		}
		objects[obj] = f.Path
	}
	reuse := c.reusable(ctx, m)
	for _, f := range ck.Files {
		m.Files = append(m.Files, ManifestFile{Path: f.Path, Size: f.Size, Node: node, Attempt: m.Attempt})
		m.Bytes += f.Size
	}

	// Data first, in parallel; markers after every data file is there.
	// The files known (hashed ahead) to be copies go last: the uploads, which
	// the link bounds, start at once, and the copies fill in beside them.
	var data, copies, markers []int
	for i, f := range m.Files {
		switch {
		case slices.Contains(ck.Markers, f.Path):
			markers = append(markers, i)
		case c.knownCopy(ck.Files[i], reuse):
			copies = append(copies, i)
		default:
			data = append(data, i)
		}
	}
	data = append(data, copies...)
	// Every file is opened now, as the scan saw it, and read through these
	// descriptors: a framework that removes the checkpoint meanwhile (HF's
	// save_total_limit, Lightning's save_top_k, Orbax's max_to_keep while
	// newer saves are written) takes its names away, not the bytes.
	pinned, pointers, err := pin(ck)
	if err != nil {
		return Result{}, err
	}
	defer closeAll(pinned)
	var sent int64
	var sentMu sync.Mutex
	put := func(ctx context.Context, i int) error {
		f := &m.Files[i]
		key := runKey(c.Run, ck.Name) + "/" + m.Object(*f)
		if b := pointers[i]; b != nil {
			// A pointer file as it named this checkpoint, whatever it
			// names by now.
			sum := sha256.Sum256(b)
			f.SHA256 = hex.EncodeToString(sum[:])
			if err := c.Store.PutBytes(ctx, key, b); err != nil {
				return err
			}
			sentMu.Lock()
			sent += f.Size
			sentMu.Unlock()
			return nil
		}
		// A file that may be reused (the latest checkpoint has one of its
		// size) is hashed first, to decide — usually already, while the
		// trainer wrote the rest (Prehash); any other is hashed while it
		// uploads.
		if reuse.sizes[f.Size] {
			if err := c.hashScanned(ck, ck.Files[i], f); err != nil {
				return err
			}
		}
		if src, ok := reuse.keys[f.SHA256+"/"+fmt.Sprint(f.Size)]; ok && f.SHA256 != "" {
			if err := c.Store.Copy(ctx, key, src); err == nil {
				f.Reused = true
				return nil
			}
		}
		file := pinned[i]
		if file == nil {
			var err error
			if file, err = openScanned(ck, ck.Files[i]); err != nil {
				return err
			}
			defer file.Close()
		}
		if f.SHA256 == "" && ck.Files[i].Ino != 0 { // hashed ahead: not read twice
			if sum, ok := c.sums.peek(versionOf(ck.Files[i])); ok {
				f.SHA256 = sum
			}
		}
		hashed := make(chan error, 1)
		if f.SHA256 == "" {
			go func() { hashed <- hashInto(ck, f, file) }()
		} else {
			hashed <- nil
		}
		if err := c.track(key, 1); err != nil {
			return err
		}
		err := c.Store.PutFile(ctx, key, file, f.Size)
		if err == nil {
			c.track(key, -1) // a failed upload stays listed for Cleanup
		}
		if herr := <-hashed; err == nil {
			err = herr
		}
		if err != nil {
			return err
		}
		sentMu.Lock()
		sent += f.Size
		sentMu.Unlock()
		return nil
	}
	if err := c.each(ctx, data, put); err != nil {
		return Result{}, fmt.Errorf("checkpoint %s: %w", ck.Name, err)
	}
	if err := c.each(ctx, markers, put); err != nil {
		return Result{}, fmt.Errorf("checkpoint %s: %w", ck.Name, err)
	}
	if c.job() && ck.Part {
		// This node's files have no completion marker of their own: they
		// are whole once the job's marker is (DCP writes .metadata on the
		// coordinator only after every rank's files), and unchanged since:
		// they belong to the save the coordinator's part of it names.
		pair, err := c.waitPair(ctx, ck, m)
		if err != nil {
			return Result{}, fmt.Errorf("checkpoint %s: %w", ck.Name, err)
		}
		m.Pairs = pair
	}
	if err := unchanged(ck, pinned, pointers); err != nil {
		return Result{}, err
	}
	m.SentBytes = sent
	m.CommittedAt = c.now().UTC()
	if c.job() {
		return c.commitPart(ctx, m, start)
	}
	b, _ := json.MarshalIndent(m, "", "  ")
	if c.SignKey != nil { // the signature first: the manifest commits
		if err := c.Store.PutBytes(ctx, runKey(c.Run, ck.Name)+"/"+SignatureName, []byte(sign(c.SignKey, b))); err != nil {
			return Result{}, fmt.Errorf("checkpoint %s: signature: %w", ck.Name, err)
		}
	}
	if err := c.Store.PutBytes(ctx, runKey(c.Run, ck.Name)+"/"+ManifestName, b); err != nil {
		return Result{}, fmt.Errorf("checkpoint %s: manifest: %w", ck.Name, err)
	}
	if _, err := c.advanceLatest(ctx, m); err != nil {
		return Result{}, err
	}
	if m.Attempt != "" {
		c.collectSaved(ctx, m, prev)
	}
	took := c.now().Sub(start)
	c.measured(sent, took)
	return c.committed(ctx, m, took), nil
}

// collectSaved deletes, after a single node's re-save m of a name, the
// objects of the name that neither m nor the manifest it replaced (prev,
// which a restore may be reading) points at.
func (c *Committer) collectSaved(ctx context.Context, m Manifest, prev *Manifest) {
	prefix := runKey(c.Run, m.Name)
	objs, err := c.Store.List(ctx, prefix)
	if err != nil {
		return
	}
	keep := map[string]bool{prefix + "/" + ManifestName: true, prefix + "/" + SignatureName: true}
	for _, man := range []*Manifest{&m, prev} {
		if man == nil {
			continue
		}
		for _, f := range man.Files {
			keep[prefix+"/"+man.Object(f)] = true
		}
	}
	var dead []string
	for _, o := range objs {
		if !keep[o.Key] {
			dead = append(dead, o.Key)
		}
	}
	if len(dead) == 0 {
		return
	}
	if err := c.Store.Delete(ctx, dead...); err != nil {
		c.log().Warn("deleting the objects of a checkpoint's earlier saves", "name", m.Name, "err", err)
	}
}

// measured keeps the upload rate of sent bytes in took.
func (c *Committer) measured(sent int64, took time.Duration) {
	if sent > 0 && took > 0 {
		c.throughput.Store(math.Float64bits(float64(sent) / took.Seconds()))
	}
}

// committed logs, reports and prunes after m's commit.
func (c *Committer) committed(ctx context.Context, m Manifest, took time.Duration) Result {
	c.log().Info("checkpoint committed", "name", m.Name, "step", m.Step, "bytes", m.Bytes, "sent", m.SentBytes,
		"took", took.Round(time.Millisecond).String(), "store", c.Store.String(), "parts", len(m.Parts))
	res := Result{Manifest: m, Took: took}
	if c.OnCommit != nil {
		c.OnCommit(res)
	}
	if c.Keep > 0 {
		if err := c.prune(ctx, m.Name); err != nil {
			c.log().Warn("pruning old checkpoints", "err", err)
		}
	}
	return res
}

// each runs f over idx with at most Parallel at once; the first error
// cancels the rest.
func (c *Committer) each(ctx context.Context, idx []int, f func(context.Context, int) error) error {
	n := c.Parallel
	if n <= 0 {
		n = 4
	}
	return eachOf(ctx, n, idx, f)
}

// eachOf runs f over idx with at most n at once; the first error cancels
// the rest.
func eachOf(ctx context.Context, n int, idx []int, f func(context.Context, int) error) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	sem := make(chan struct{}, n)
	var wg sync.WaitGroup
	var once sync.Once
	var first error
	for _, i := range idx {
		select {
		case sem <- struct{}{}:
		case <-ctx.Done():
		}
		if ctx.Err() != nil {
			break
		}
		wg.Go(func() {
			defer func() { <-sem }()
			if err := f(ctx, i); err != nil {
				once.Do(func() { first = err; cancel() })
			}
		})
	}
	wg.Wait()
	if first == nil && ctx.Err() != nil {
		return ctx.Err()
	}
	return first
}

// unchanged re-reads the files' sizes and times: a checkpoint rewritten
// while it was uploading is not committed.
func unchanged(ck Checkpoint, pinned []*os.File, pointers [][]byte) error {
	for i, f := range ck.Files {
		if i < len(pointers) && pointers[i] != nil {
			continue // sent as it was read, consistent with the scan
		}
		var st os.FileInfo
		var err error
		if i < len(pinned) && pinned[i] != nil {
			st, err = pinned[i].Stat() // the file read, even if its name is gone
		} else {
			st, err = os.Stat(filepath.Join(ck.Root, filepath.FromSlash(f.Path)))
		}
		if err != nil || st.Size() != f.Size || !st.ModTime().Equal(f.ModTime) {
			return fmt.Errorf("checkpoint %s: %s: %w", ck.Name, f.Path, ErrChanged)
		}
	}
	return nil
}

// maxPinned bounds the files a commit holds open at once; a checkpoint of
// more files opens the rest one at a time as they upload, by name.
const maxPinned = 4096

// maxPointer bounds a pointer file read whole (DeepSpeed's latest names a
// tag; readMarker takes no more than 4 KiB either).
const maxPointer = 64 << 10

// pin opens every file of ck (the first maxPinned), each checked to be the
// file the scan saw; nil entries are opened later by name. A pointer file
// (a marker beside the checkpoint's folder: DeepSpeed's latest, Megatron's
// latest_checkpointed_iteration.txt) is read whole instead, as the scan saw
// it: the framework rewrites it in place at its next save, to name that
// one, often before this checkpoint has finished uploading.
func pin(ck Checkpoint) ([]*os.File, [][]byte, error) {
	pinned := make([]*os.File, len(ck.Files))
	pointers := make([][]byte, len(ck.Files))
	for i, f := range ck.Files {
		if i >= maxPinned {
			break
		}
		file, err := openScanned(ck, f)
		if err != nil {
			closeAll(pinned)
			return nil, nil, err
		}
		if pointer(ck, f.Path) && f.Size <= maxPointer {
			b, err := readWhole(ck, f, file)
			file.Close()
			if err != nil {
				closeAll(pinned)
				return nil, nil, err
			}
			pointers[i] = b
			continue
		}
		pinned[i] = file
	}
	return pinned, pointers, nil
}

// pointer says whether path is a marker outside the checkpoint's own
// folder (or file).
func pointer(ck Checkpoint, path string) bool {
	return slices.Contains(ck.Markers, path) && path != ck.Name && !strings.HasPrefix(path, ck.Name+"/")
}

// readWhole reads file (f as scanned) and checks it did not change meanwhile.
func readWhole(ck Checkpoint, f File, file *os.File) ([]byte, error) {
	b, err := io.ReadAll(io.NewSectionReader(file, 0, f.Size+1))
	if err != nil {
		return nil, fmt.Errorf("checkpoint %s: %w", ck.Name, err)
	}
	st, err := file.Stat()
	if err != nil || int64(len(b)) != f.Size || st.Size() != f.Size || !st.ModTime().Equal(f.ModTime) {
		return nil, fmt.Errorf("checkpoint %s: %s: %w", ck.Name, f.Path, ErrChanged)
	}
	return b, nil
}

func closeAll(files []*os.File) {
	for _, f := range files {
		if f != nil {
			f.Close()
		}
	}
}

// reuse is what the newest committed checkpoint of the run holds.
type reuse struct {
	keys  map[string]string // "sha256/size" → key, for server-side copies
	sizes map[int64]bool    // the sizes among them
}

func (c *Committer) reusable(ctx context.Context, m Manifest) reuse {
	r := reuse{keys: map[string]string{}, sizes: map[int64]bool{}}
	l, err := c.latest(ctx)
	if err != nil || l.Name == m.Name && m.Attempt == "" {
		return r // a copy onto the object it reads from
	}
	lm, err := c.latestManifest(ctx, l)
	if err != nil {
		return r
	}
	for _, f := range lm.Files {
		r.keys[f.SHA256+"/"+fmt.Sprint(f.Size)] = runKey(c.Run, lm.Name) + "/" + lm.Object(f)
		r.sizes[f.Size] = true
	}
	return r
}

// knownCopy says whether sf's sum is known already and the latest
// checkpoint holds a file with it (a server-side copy, not an upload).
func (c *Committer) knownCopy(sf File, reuse reuse) bool {
	if sf.Ino == 0 || !reuse.sizes[sf.Size] {
		return false
	}
	sum, ok := c.sums.peek(versionOf(sf))
	_, reusable := reuse.keys[sum+"/"+fmt.Sprint(sf.Size)]
	return ok && reusable
}

// hashScanned fills mf's SHA-256 for the scanned file sf: from the cache
// when Prehash (or another commit) hashed this version of it, else read
// now and cached.
func (c *Committer) hashScanned(ck Checkpoint, sf File, mf *ManifestFile) error {
	compute := func() (string, error) {
		file, err := openScanned(ck, sf)
		if err != nil {
			return "", err
		}
		defer file.Close()
		one := *mf
		if err := hashInto(ck, &one, file); err != nil {
			return "", err
		}
		return one.SHA256, nil
	}
	if sf.Ino == 0 {
		sum, err := compute()
		mf.SHA256 = sum
		return err
	}
	sum, err := c.sums.get(versionOf(sf), compute)
	mf.SHA256 = sum
	return err
}

// hashInto fills f's SHA-256 from the open file (read with ReadAt, beside
// an upload of the same file), checking its size.
func hashInto(ck Checkpoint, f *ManifestFile, file *os.File) error {
	h := sha256.New()
	n, err := io.Copy(h, io.NewSectionReader(file, 0, f.Size+1))
	sum := hex.EncodeToString(h.Sum(nil))
	if err != nil {
		return fmt.Errorf("checkpoint %s: %w", ck.Name, err)
	}
	if n != f.Size {
		return fmt.Errorf("checkpoint %s: %s: %w", ck.Name, f.Path, ErrChanged)
	}
	f.SHA256 = sum
	return nil
}

func (c *Committer) latest(ctx context.Context) (Latest, error) {
	var buf bytes.Buffer
	if err := c.Store.Get(ctx, latestKey(c.Run), &buf); err != nil {
		return Latest{}, err
	}
	return parseLatest(buf.Bytes())
}

func parseLatest(b []byte) (Latest, error) {
	var l Latest
	if err := json.Unmarshal(b, &l); err != nil {
		return Latest{}, fmt.Errorf("latest pointer: %w", err)
	}
	if err := safeName(l.Name); err != nil {
		return Latest{}, fmt.Errorf("latest pointer: %w", err)
	}
	return l, nil
}

// manifest is the newest committed manifest of checkpoint name that
// verifies: a single node's (or an earlier release's job manifest) at
// <name>/.preemptd-manifest.json, or a job's under <name>/.preemptd-commits.
func (c *Committer) manifest(ctx context.Context, name string) (Manifest, error) {
	if err := safeName(name); err != nil {
		return Manifest{}, err
	}
	var found []Manifest
	m, err := c.readManifest(ctx, runKey(c.Run, name)+"/"+ManifestName, runKey(c.Run, name)+"/"+SignatureName)
	firstErr := err
	if err == nil {
		found = append(found, m)
	} else if !errors.Is(err, storage.ErrNotFound) {
		firstErr = fmt.Errorf("checkpoint %s: %w", name, err)
	}
	prefix := runKey(c.Run, name) + "/" + CommitsDir
	objs, err := c.Store.List(ctx, prefix)
	if err != nil {
		return Manifest{}, err
	}
	for _, o := range objs {
		cid, ok := strings.CutSuffix(strings.TrimPrefix(o.Key, prefix+"/"), ".json")
		if !ok || strings.Contains(cid, "/") {
			continue
		}
		m, err := c.readCommit(ctx, name, cid)
		if err != nil {
			if firstErr == nil || errors.Is(firstErr, storage.ErrNotFound) {
				firstErr = fmt.Errorf("checkpoint %s: %w", name, err)
			}
			continue
		}
		found = append(found, m)
	}
	if len(found) == 0 {
		return Manifest{}, firstErr
	}
	return slices.MaxFunc(found, func(a, b Manifest) int {
		if newer(a, b) {
			return 1
		}
		return -1
	}), nil
}

// readCommit reads job manifest cid of checkpoint name.
func (c *Committer) readCommit(ctx context.Context, name, cid string) (Manifest, error) {
	m, err := c.readManifest(ctx, commitKey(c.Run, name, cid), commitSigKey(c.Run, name, cid))
	if err == nil && (m.Commit != cid || m.Name != name || m.Version != AttemptManifestVersion) {
		err = fmt.Errorf("job manifest %s names commit %q of %q (version %d)", cid, m.Commit, m.Name, m.Version)
	}
	return m, err
}

// readManifest reads the manifest at key, checking its signature at sigKey
// with readKey when one is set.
func (c *Committer) readManifest(ctx context.Context, key, sigKey string) (Manifest, error) {
	var buf bytes.Buffer
	if err := c.Store.Get(ctx, key, &buf); err != nil {
		return Manifest{}, err
	}
	if pub := c.readKey(); pub != nil {
		if err := c.verify(ctx, pub, sigKey, buf.Bytes()); err != nil {
			return Manifest{}, err
		}
	}
	return ParseManifest(buf.Bytes())
}

// latestManifest is the manifest latest points at: its commit, for a job;
// else the name's one manifest (a single node's, or an earlier release's
// job's).
func (c *Committer) latestManifest(ctx context.Context, l Latest) (Manifest, error) {
	var m Manifest
	var err error
	if l.Commit != "" {
		m, err = c.readCommit(ctx, l.Name, l.Commit)
	} else {
		m, err = c.readManifest(ctx, runKey(c.Run, l.Name)+"/"+ManifestName, runKey(c.Run, l.Name)+"/"+SignatureName)
	}
	if err != nil && !errors.Is(err, storage.ErrNotFound) {
		err = fmt.Errorf("checkpoint %s: %w", l.Name, err)
	}
	return m, err
}

// sign is the ed25519 signature of b as stored beside what it signs.
func sign(key ed25519.PrivateKey, b []byte) string {
	return base64.StdEncoding.EncodeToString(ed25519.Sign(key, b)) + "\n"
}

// verify checks the signature stored at sigKey over body with pub
// (ErrUnsigned when it is missing or does not verify).
func (c *Committer) verify(ctx context.Context, pub ed25519.PublicKey, sigKey string, body []byte) error {
	var sig bytes.Buffer
	err := c.Store.Get(ctx, sigKey, &sig)
	if errors.Is(err, storage.ErrNotFound) {
		return fmt.Errorf("%w: no signature", ErrUnsigned)
	}
	if err != nil {
		return err
	}
	raw, err := base64.StdEncoding.DecodeString(strings.TrimSpace(sig.String()))
	if err != nil || !ed25519.Verify(pub, body, raw) {
		return fmt.Errorf("%w: the signature does not verify", ErrUnsigned)
	}
	return nil
}

// List returns the run's committed checkpoints — of each name its newest
// valid manifest — oldest save first, and the latest pointer's name.
func (c *Committer) List(ctx context.Context) ([]Manifest, string, error) {
	l, err := c.Listing(ctx)
	return l.Manifests, l.Latest, err
}

// Listing is what a look at the run's checkpoints found.
type Listing struct {
	// Manifests are the committed checkpoints that verify, oldest first.
	Manifests []Manifest
	// Latest is the name latest points at ("" when none).
	Latest string
	// Hidden are checkpoints left out because no manifest of theirs reads
	// or verifies (a wrong storage.verify_key, a planted manifest), by name.
	Hidden map[string]error
}

// ErrNothingCommitted is returned when a run has no committed checkpoint:
// a fresh start, not a failure.
var ErrNothingCommitted = errors.New("no committed checkpoint")

// Listing lists the run's committed checkpoints and says which it hides.
func (c *Committer) Listing(ctx context.Context) (Listing, error) {
	objs, err := c.Store.List(ctx, c.Run)
	if err != nil {
		return Listing{}, err
	}
	hidden := map[string]error{}
	byName := map[string]Manifest{}
	for _, o := range objs {
		rest := strings.TrimPrefix(o.Key, c.Run+"/")
		name, file, ok := strings.Cut(rest, "/")
		if !ok || safeName(name) != nil {
			continue
		}
		var m Manifest
		switch cid, isCommit := strings.CutSuffix(strings.TrimPrefix(file, CommitsDir+"/"), ".json"); {
		case file == ManifestName:
			m, err = c.readManifest(ctx, o.Key, runKey(c.Run, name)+"/"+SignatureName)
		case isCommit && strings.HasPrefix(file, CommitsDir+"/") && !strings.Contains(cid, "/"):
			m, err = c.readCommit(ctx, name, cid)
		default:
			continue
		}
		if err != nil {
			c.log().Warn("ignoring checkpoint with a bad manifest", "name", name, "key", o.Key, "err", err)
			hidden[name] = err
			continue
		}
		if have, ok := byName[name]; !ok || newer(m, have) {
			byName[name] = m
		}
	}
	for name := range byName {
		delete(hidden, name)
	}
	out := slices.Collect(maps.Values(byName))
	slices.SortFunc(out, func(a, b Manifest) int {
		if newer(a, b) {
			return 1
		}
		if newer(b, a) {
			return -1
		}
		return 0
	})
	res := Listing{Manifests: out, Hidden: hidden}
	l, err := c.latest(ctx)
	if err != nil && !errors.Is(err, storage.ErrNotFound) {
		return res, err
	}
	res.Latest = l.Name
	return res, nil
}

// HiddenError says why a run shows no checkpoint although some exist.
func HiddenError(run string, hidden map[string]error) error {
	names := slices.Sorted(maps.Keys(hidden))
	return fmt.Errorf("run %q has %d checkpoint(s) that fail verification and none that passes (%s: %v); "+
		"check storage.verify_key (or sign_key) against the key the checkpoints were signed with", run, len(names), names[len(names)-1], hidden[names[len(names)-1]])
}

// prune deletes committed checkpoints beyond Keep, oldest first, never the
// latest; the manifest goes first so that a half-pruned one no longer exists.
func (c *Committer) prune(ctx context.Context, latest string) error {
	ms, _, err := c.List(ctx)
	if err != nil {
		return err
	}
	excess := len(ms) - c.Keep
	for _, m := range ms {
		if excess <= 0 {
			break
		}
		if m.Name == latest {
			continue
		}
		prefix := runKey(c.Run, m.Name)
		if err := c.Store.Delete(ctx, prefix+"/"+ManifestName); err != nil {
			return err
		}
		objs, err := c.Store.List(ctx, prefix)
		if err != nil {
			return err
		}
		keys := make([]string, 0, len(objs))
		for _, o := range objs {
			keys = append(keys, o.Key)
		}
		if err := c.Store.Delete(ctx, keys...); err != nil {
			return err
		}
		c.log().Info("pruned checkpoint", "name", m.Name)
		excess--
	}
	return nil
}

// Restore downloads the latest committed checkpoint (or the one named) into
// dir with RestoreInto's defaults. It returns the manifest and the restored
// checkpoint's path.
func (c *Committer) Restore(ctx context.Context, dir, name string) (Manifest, string, error) {
	return c.RestorePart(ctx, dir, name, "")
}

// RestorePart is Restore of one node's part of a job's checkpoint: the
// files node held, and the layout's markers (DCP's .metadata), which is
// what its ranks read back at the same world size. An empty node restores
// the whole checkpoint.
func (c *Committer) RestorePart(ctx context.Context, dir, name, node string) (Manifest, string, error) {
	r, err := c.RestoreInto(ctx, dir, RestoreOptions{Name: name, Node: node})
	return r.Manifest, r.Path, err
}

// newest is the checkpoint to restore: latest's, unless a newer one is
// committed (a merger stopped between its manifest and the pointer, two
// nodes moved it at once): then that one, and latest is moved to it.
func (c *Committer) newest(ctx context.Context) (Manifest, error) {
	l, err := c.latest(ctx)
	var m Manifest
	if err == nil {
		m, err = c.latestManifest(ctx, l)
	}
	if err != nil && !errors.Is(err, storage.ErrNotFound) {
		return m, err // latest's checkpoint does not verify, or the store failed: say so, never fall back quietly
	}
	lst, lerr := c.Listing(ctx)
	ms := lst.Manifests
	switch {
	case lerr != nil && err == nil:
		return m, nil
	case lerr != nil:
		return m, lerr
	case len(ms) == 0 && err == nil:
		return m, nil
	case len(ms) == 0 && len(lst.Hidden) > 0:
		return m, HiddenError(c.Run, lst.Hidden)
	case len(ms) == 0:
		return m, fmt.Errorf("run %q has %w", c.Run, ErrNothingCommitted)
	}
	if n := ms[len(ms)-1]; err != nil || newer(n, m) {
		if _, aerr := c.advanceLatest(ctx, n); aerr != nil {
			c.log().Warn("a newer checkpoint is committed than latest names; latest not moved", "newest", n.Name, "err", aerr)
		}
		return n, nil
	}
	return m, nil
}

// Repair points latest at the newest committed checkpoint when a crash came
// between a manifest and the pointer (the manifest is written only after
// every byte, so that checkpoint is whole). It says what it did.
func (c *Committer) Repair(ctx context.Context) (string, error) {
	ms, _, err := c.List(ctx)
	if err != nil || len(ms) == 0 {
		return "", err
	}
	n := ms[len(ms)-1]
	moved, err := c.advanceLatest(ctx, n)
	if err != nil || !moved {
		return "", err
	}
	return n.Name, nil
}

// Cleanup aborts this node's interrupted uploads: those a crash left (in
// the journal) and those a cancelled upload left since. Nothing else may
// upload while it runs.
func (c *Committer) Cleanup(ctx context.Context) (int, error) {
	c.jmu.Lock()
	if err := c.loadJournalLocked(); err != nil {
		c.jmu.Unlock()
		return 0, err
	}
	keys := make([]string, 0, len(c.inflight))
	for k := range c.inflight {
		keys = append(keys, k)
	}
	c.jmu.Unlock()
	if len(keys) == 0 {
		return 0, nil
	}
	slices.Sort(keys)
	n, err := c.Store.AbortUploads(ctx, keys...)
	if err != nil {
		return n, err
	}
	c.jmu.Lock()
	defer c.jmu.Unlock()
	for _, k := range keys {
		delete(c.inflight, k)
	}
	return n, c.saveJournalLocked()
}

// track counts an upload to key in (+1) or out (-1) of the journal.
func (c *Committer) track(key string, d int) error {
	c.jmu.Lock()
	defer c.jmu.Unlock()
	if err := c.loadJournalLocked(); err != nil {
		return err
	}
	c.inflight[key] += d
	if c.inflight[key] <= 0 {
		delete(c.inflight, key)
	}
	return c.saveJournalLocked()
}

func (c *Committer) loadJournalLocked() error {
	if c.inflight == nil {
		c.inflight = map[string]int{}
	}
	if c.loaded || c.Journal == "" {
		c.loaded = true
		return nil
	}
	b, err := os.ReadFile(c.Journal)
	if errors.Is(err, fs.ErrNotExist) {
		c.loaded = true
		return nil
	}
	if err != nil {
		return fmt.Errorf("upload journal: %w", err)
	}
	var keys []string
	if err := json.Unmarshal(b, &keys); err != nil {
		c.log().Warn("upload journal unreadable; starting a new one", "path", c.Journal, "err", err)
	}
	for _, k := range keys {
		c.inflight[k]++
	}
	c.loaded = true
	return nil
}

func (c *Committer) saveJournalLocked() error {
	if c.Journal == "" {
		return nil
	}
	keys := make([]string, 0, len(c.inflight))
	for k := range c.inflight {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	b, _ := json.Marshal(keys)
	if err := agent.WriteFileAtomic(c.Journal, b, 0o600); err != nil {
		return fmt.Errorf("upload journal: %w", err)
	}
	return nil
}
