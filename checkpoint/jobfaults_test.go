package checkpoint

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/preemptd/preemptd/checkpoint/storage"
)

// The failures a job's commit exists for, each as it was reproduced
// against the packages: a node dead mid-save, the same name saved again,
// a merger stopped between its steps, a lost response, a planted or
// replayed object.

// saveJob writes one collective DCP save of name on every node in roots
// (node i's shard; node 0, the coordinator, writes .metadata last), its
// files dated age ago, and returns what each file holds. A save after a
// restart comes minutes after the one before; age says how long.
func saveJob(t *testing.T, roots []string, name string, age time.Duration, nodes ...int) map[string][32]byte {
	t.Helper()
	if len(nodes) == 0 {
		for i := range roots {
			nodes = append(nodes, i)
		}
	}
	at := time.Now().Add(-age)
	want := map[string][32]byte{}
	for _, i := range nodes {
		shardsOf(t, roots[i], name, i, 1000+i)
		for _, f := range []string{"__" + fmt.Sprint(i) + "_0.distcp", ".metadata"} {
			p := filepath.Join(roots[i], name, f)
			b, err := os.ReadFile(p)
			if err != nil {
				continue // .metadata is the coordinator's alone
			}
			when := at
			if f == ".metadata" {
				when = at.Add(time.Millisecond) // written last
			}
			if err := os.Chtimes(p, when, when); err != nil {
				t.Fatal(err)
			}
			want[name+"/"+f] = sha256.Sum256(b)
		}
	}
	return want
}

// commitJob commits name on the given nodes at once, each within wait.
func commitJob(t *testing.T, cs []*Committer, roots []string, name string, wait time.Duration, nodes ...int) []error {
	t.Helper()
	if len(nodes) == 0 {
		for i := range cs {
			nodes = append(nodes, i)
		}
	}
	errs := make([]error, len(cs))
	var wg sync.WaitGroup
	for _, i := range nodes {
		ck := scanJobOne(t, roots[i], name)
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(context.Background(), wait)
			defer cancel()
			_, errs[i] = cs[i].Commit(ctx, ck)
		})
	}
	wg.Wait()
	return errs
}

// restoredLatest restores the run's latest with c into a fresh folder and
// returns what every file holds.
func restoredLatest(t *testing.T, c *Committer) (Manifest, map[string][32]byte, error) {
	t.Helper()
	dst := t.TempDir()
	m, _, err := c.Restore(context.Background(), dst, "")
	if err != nil {
		return m, nil, err
	}
	return m, sumTree(t, dst), nil
}

// wantLatest fails unless latest, restored with c, is checkpoint name
// ("" for any) holding exactly want; why says what latest should be.
func wantLatest(t *testing.T, c *Committer, name string, want map[string][32]byte, why string) {
	t.Helper()
	m, got, err := restoredLatest(t, c)
	switch {
	case err != nil:
		t.Fatalf("latest does not restore (%v); want %s", err, why)
	case name != "" && m.Name != name:
		t.Fatalf("latest is %s; want %s", m.Name, why)
	case !maps.Equal(got, want):
		t.Fatalf("latest %s restores other bytes; want %s", m.Name, why)
	}
}

func noErrors(t *testing.T, what string, errs []error) {
	t.Helper()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("%s: node%d: %v", what, i, err)
		}
	}
}

// hooked is a store whose calls can be intercepted, one rule a call kind.
type hooked struct {
	storage.Store
	mu  sync.Mutex
	put func(key string) error // before PutBytes; an error fails it unsent
	// create, if set, runs after a Create that reached the store and may
	// replace its answer (a lost response).
	create func(key string, err error) error
}

// failOnce makes the first PutBytes of a key that match says true fail
// with why, unsent (the writer stopped there); the flag says it happened.
func (h *hooked) failOnce(match func(key string) bool, why string) *atomic.Bool {
	var failed atomic.Bool
	h.mu.Lock()
	defer h.mu.Unlock()
	h.put = func(key string) error {
		if match(key) && failed.CompareAndSwap(false, true) {
			return errors.New(why)
		}
		return nil
	}
	return &failed
}

func (h *hooked) PutBytes(ctx context.Context, key string, b []byte) error {
	h.mu.Lock()
	put := h.put
	h.mu.Unlock()
	if put != nil {
		if err := put(key); err != nil {
			return err
		}
	}
	return h.Store.PutBytes(ctx, key, b)
}

func (h *hooked) Create(ctx context.Context, key string, b []byte) error {
	err := h.Store.Create(ctx, key, b)
	h.mu.Lock()
	create := h.create
	h.mu.Unlock()
	if create != nil {
		return create(key, err)
	}
	return err
}

// A job checkpoint saved again under the same name (a fixed folder name, or
// the same step after a restart) commits the new save whole: the old
// manifest never points at new bytes, and latest restores the new save.
func TestJobSameNameSavedAgain(t *testing.T) {
	st, _ := storage.NewDir(t.TempDir())
	cs, roots := jobNodes(t, st, 2, "node0", "node1")
	saveJob(t, roots, "step-5", time.Hour)
	noErrors(t, "first save", commitJob(t, cs, roots, "step-5", 10*time.Second))
	want := saveJob(t, roots, "step-5", 0)
	noErrors(t, "second save", commitJob(t, cs, roots, "step-5", 10*time.Second))
	wantLatest(t, cs[0], "step-5", want, "the second save of step-5, whole")
}

// A survivor's part of a save that failed (its peer died mid-save) is never
// merged with the replacement's part of the next save of the same name.
func TestJobStaleSurvivorPartNotMerged(t *testing.T) {
	st, _ := storage.NewDir(t.TempDir())
	cs, roots := jobNodes(t, st, 2, "node0", "node1")
	saveJob(t, roots, "step-5", time.Hour, 0) // node1 died before writing its shard
	if errs := commitJob(t, cs, roots, "step-5", 300*time.Millisecond, 0); !errors.Is(errs[0], ErrPartsMissing) {
		t.Fatalf("node0 alone: %v; want node1's part missing", errs[0])
	}
	// The job restarts: node1 is a new machine (an empty folder), node0
	// survived with its part of the failed save in the store.
	fresh, froots := jobNodes(t, st, 2, "node0", "node1")
	cs[1], roots[1] = fresh[1], froots[1]
	want := saveJob(t, roots, "step-5", 0)
	// The replacement's part goes up first; the survivor's follows.
	errs := make([]error, 2)
	var wg sync.WaitGroup
	ck1 := scanJobOne(t, roots[1], "step-5")
	wg.Go(func() { _, errs[1] = cs[1].Commit(context.Background(), ck1) })
	time.Sleep(400 * time.Millisecond)
	wg.Go(func() { _, errs[0] = cs[0].Commit(context.Background(), scanJobOne(t, roots[0], "step-5")) })
	wg.Wait()
	noErrors(t, "the save after the restart", errs)
	wantLatest(t, cs[0], "step-5", want, "the save after the restart on both nodes, not the survivor's part of the failed save")
}

// More live nodes than job.nodes: nothing commits, and the error names
// every live node.
func TestJobMoreLiveNodesThanJobNodesRefused(t *testing.T) {
	st, _ := storage.NewDir(t.TempDir())
	cs, roots := jobNodes(t, st, 3, "node0", "node1", "node2")
	for _, c := range cs {
		c.Nodes = 2
	}
	saveJob(t, roots, "step-1", 0)
	errs := commitJob(t, cs, roots, "step-1", time.Second, 0, 1)
	errs[2] = commitJob(t, cs, roots, "step-1", time.Second, 2)[2]
	for i, err := range errs {
		if err == nil || !errors.Is(err, ErrTooManyNodes) || !strings.Contains(err.Error(), "node0, node1, node2") {
			t.Fatalf("node%d: %v; want a refusal naming the three live nodes", i, err)
		}
	}
	if ms, _, err := cs[0].List(context.Background()); err != nil || len(ms) != 0 {
		t.Fatalf("committed with a live node left out: %v %v", ms, err)
	}
}

// The node whose manifest create won stops before it moves latest (its
// pointer write fails): another node moves it.
func TestJobLatestMovesWhenMergerStopsAfterCreate(t *testing.T) {
	h := &hooked{}
	h.Store, _ = storage.NewDir(t.TempDir())
	cs, roots := jobNodes(t, h, 2, "node0", "node1")
	saveJob(t, roots, "step-1", time.Hour)
	noErrors(t, "step-1", commitJob(t, cs, roots, "step-1", 10*time.Second))
	failed := h.failOnce(func(key string) bool { return key == latestKey("job") }, "the merger stopped here")
	want := saveJob(t, roots, "step-2", 0)
	commitJob(t, cs, roots, "step-2", 5*time.Second)
	if !failed.Load() {
		t.Fatal("the pointer write was never tried")
	}
	wantLatest(t, cs[0], "step-2", want, "step-2, moved by the node whose create lost")
}

// A manifest create whose response is lost: the retry finds the key taken
// (S3's 412 after minio-go's own retry). The checkpoint is committed and
// latest moves.
func TestJobCreateResponseLost(t *testing.T) {
	h := &hooked{}
	h.Store, _ = storage.NewDir(t.TempDir())
	cs, roots := jobNodes(t, h, 2, "node0", "node1")
	saveJob(t, roots, "step-1", time.Hour)
	noErrors(t, "step-1", commitJob(t, cs, roots, "step-1", 10*time.Second))
	var lost atomic.Int32
	h.create = func(key string, err error) error {
		if err == nil && strings.HasPrefix(key, "job/step-2/") && lost.Add(1) == 1 {
			return errors.New("connection reset by peer (the create landed)")
		}
		return err
	}
	want := saveJob(t, roots, "step-2", 0)
	errs := commitJob(t, cs, roots, "step-2", 5*time.Second)
	if lost.Load() == 0 {
		t.Fatal("no create was made")
	}
	noErrors(t, "step-2", errs)
	wantLatest(t, cs[0], "step-2", want, "step-2, committed once")
}

func signJob(cs []*Committer) (ed25519.PublicKey, ed25519.PrivateKey) {
	pub, priv, _ := ed25519.GenerateKey(nil)
	for _, c := range cs {
		c.SignKey, c.VerifyKey = priv, pub
	}
	return pub, priv
}

// Someone who can write the store but holds no key plants a manifest that
// lists only one node's files: no node signs it, latest never points at
// it, and a restore host with the verify key gets the whole checkpoint
// before it.
func TestJobPlantedManifestNeverSigned(t *testing.T) {
	st, _ := storage.NewDir(t.TempDir())
	cs, roots := jobNodes(t, st, 2, "node0", "node1")
	pub, _ := signJob(cs)
	want := saveJob(t, roots, "step-1", time.Hour)
	noErrors(t, "step-1", commitJob(t, cs, roots, "step-1", 10*time.Second))
	saveJob(t, roots, "step-2", 0)
	// node0's part of step-2 goes up; node1's never does.
	done := make(chan error, 1)
	ck0 := scanJobOne(t, roots[0], "step-2")
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_, err := cs[0].Commit(ctx, ck0)
		done <- err
	}()
	ctx := context.Background()
	var part Manifest
	waitUntil(t, 5*time.Second, "node0's part of step-2", func() bool {
		var buf bytes.Buffer
		if st.Get(ctx, partKey("job", "step-2", "node0"), &buf) != nil {
			return false
		}
		part, _ = ParseManifest(buf.Bytes())
		return part.Node == "node0"
	})
	planted := part
	planted.Node, planted.Parts = "", []Part{{Node: "node0", Files: len(part.Files), Bytes: part.Bytes}}
	b, _ := json.MarshalIndent(planted, "", "  ")
	st.PutBytes(ctx, "job/step-2/"+ManifestName, b)
	if err := <-done; err == nil {
		t.Fatal("node0 reports step-2 committed without node1's part")
	}
	wantLatest(t, &Committer{Store: st, Run: "job", VerifyKey: pub}, "step-1", want, "the whole step-1, verified")
}

// An old signed part of a node, replayed over its current one, is never
// merged with another node's part of a newer save of the same name.
func TestJobReplayedSignedPartNotMixed(t *testing.T) {
	st, _ := storage.NewDir(t.TempDir())
	cs, roots := jobNodes(t, st, 2, "node0", "node1")
	pub, _ := signJob(cs)
	saveJob(t, roots, "step-5", time.Hour)
	noErrors(t, "first save", commitJob(t, cs, roots, "step-5", 10*time.Second))
	ctx := context.Background()
	var oldPart, oldSig bytes.Buffer
	st.Get(ctx, partKey("job", "step-5", "node1"), &oldPart)
	st.Get(ctx, partSigKey("job", "step-5", "node1"), &oldSig)
	want := saveJob(t, roots, "step-5", 0)
	// node0 commits its part of the new save while node1's old signed
	// part is replayed in place of node1's.
	st.PutBytes(ctx, partSigKey("job", "step-5", "node1"), oldSig.Bytes())
	st.PutBytes(ctx, partKey("job", "step-5", "node1"), oldPart.Bytes())
	errs := commitJob(t, cs, roots, "step-5", time.Second, 0)
	reader := &Committer{Store: st, Run: "job", VerifyKey: pub}
	if errs[0] == nil {
		if _, got, err := restoredLatest(t, reader); err != nil || !maps.Equal(got, want) {
			t.Fatalf("node0 committed with node1's replayed part: latest restores %v", err)
		}
	}
	noErrors(t, "the new save on both", commitJob(t, cs, roots, "step-5", 10*time.Second))
	wantLatest(t, reader, "step-5", want, "the new save of both nodes")
}

// The documented set-up signs on the committing machines (sign_key only)
// and verifies where it restores: a merger that stops between its manifest
// and its signature leaves the signature to another node, so that the
// restore host's verify key accepts the checkpoint.
func TestJobSignatureFinishedWithSignKeyOnly(t *testing.T) {
	h := &hooked{}
	h.Store, _ = storage.NewDir(t.TempDir())
	cs, roots := jobNodes(t, h, 2, "node0", "node1")
	pub, _ := signJob(cs)
	for _, c := range cs {
		c.VerifyKey = nil
	}
	dropped := h.failOnce(func(key string) bool {
		return strings.HasSuffix(key, "/"+SignatureName) || strings.Contains(key, "/"+CommitsDir+"/") && strings.HasSuffix(key, ".sig")
	}, "the merger stopped before signing")
	want := saveJob(t, roots, "step-1", 0)
	commitJob(t, cs, roots, "step-1", 5*time.Second)
	if !dropped.Load() {
		t.Fatal("no manifest signature was written")
	}
	wantLatest(t, &Committer{Store: h.Store, Run: "job", VerifyKey: pub}, "step-1", want, "step-1, its signature finished by a node")
}

func waitUntil(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	for end := time.Now().Add(d); time.Now().Before(end); time.Sleep(10 * time.Millisecond) {
		if cond() {
			return
		}
	}
	t.Fatalf("no %s within %v", what, d)
}

// slowReader is a directory store whose first read of latest's version
// waits until release is closed: a node that read latest, then stalled.
type slowReader struct {
	*storage.Dir
	once    sync.Once
	read    chan struct{} // closed once the stalled read has read
	release chan struct{}
}

func (s *slowReader) GetVersion(ctx context.Context, key string, w io.Writer) (string, error) {
	v, err := s.Dir.GetVersion(ctx, key, w)
	stall := false
	s.once.Do(func() { stall = true })
	if stall {
		close(s.read)
		<-s.release
	}
	return v, err
}

// Two nodes move latest at once: one read it (step-1), stalled, and
// another moved it to step-3 meanwhile; the first, moving it to step-2,
// must not move it back.
func TestLatestNeverMovesBack(t *testing.T) {
	dir, _ := storage.NewDir(t.TempDir())
	ctx := context.Background()
	c := &Committer{Store: dir, Run: "r"}
	root := t.TempDir()
	at := time.Now().Add(-time.Hour)
	for i, name := range []string{"step-1", "step-2", "step-3"} {
		dcp(t, root, name, map[string]int{"__0_0.distcp": 100})
		for _, f := range []string{"__0_0.distcp", ".metadata"} {
			when := at.Add(time.Duration(i) * time.Minute)
			os.Chtimes(filepath.Join(root, name, f), when, when)
		}
	}
	res := map[string]Result{}
	for _, name := range []string{"step-1", "step-2", "step-3"} {
		r, err := c.Commit(ctx, scanOne(t, root, name))
		if err != nil {
			t.Fatal(err)
		}
		res[name] = r
	}
	dir.PutBytes(ctx, latestKey("r"), mustJSON(latestOf(res["step-1"].Manifest))) // latest at step-1 again
	slow := &slowReader{Dir: dir, read: make(chan struct{}), release: make(chan struct{})}
	stalled := &Committer{Store: slow, Run: "r"}
	done := make(chan error, 1)
	go func() { _, err := stalled.advanceLatest(ctx, res["step-2"].Manifest); done <- err }()
	<-slow.read
	if _, err := c.advanceLatest(ctx, res["step-3"].Manifest); err != nil {
		t.Fatal(err)
	}
	close(slow.release)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if l := latestName(t, c); l != "step-3" {
		t.Fatalf("latest %s; a node that read it before another moved it forward moved it back", l)
	}
}

func mustJSON(v any) []byte {
	b, _ := json.Marshal(v)
	return b
}

// A parts error of a large job names a few nodes and counts the others.
func TestPartsErrorOfALargeJobStaysShort(t *testing.T) {
	var have []string
	for i := range 999 {
		have = append(have, fmt.Sprintf("n%04d", i))
	}
	msg := (&PartsError{Name: "step-1", Have: have, Missing: []string{"n0999"}, Nodes: 1000}).Error()
	want := "checkpoint step-1: 999 of 1000 parts in the store (from n0000, n0001, n0002, n0003, n0004, n0005, n0006, n0007 and 991 more); missing the part of n0999; the previous checkpoint stays latest"
	if msg != want {
		t.Fatalf("%s\nwant\n%s", msg, want)
	}
}
