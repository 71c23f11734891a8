package checkpoint

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"encoding/json"
	"errors"
	"io"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/preemptd/preemptd/checkpoint/storage"
)

// jobNodes makes n committers of one run sharing st, each with its own
// checkpoint folder, as the nodes of a job.
func jobNodes(t *testing.T, st storage.Store, n int, members ...string) ([]*Committer, []string) {
	t.Helper()
	var cs []*Committer
	var roots []string
	for i := range n {
		node := "node" + string(rune('0'+i))
		c := &Committer{Store: st, Run: "job", Instance: "i-" + node, Node: node, Nodes: n, PartPoll: 20 * time.Millisecond,
			PartWait: 20 * time.Second, Journal: filepath.Join(t.TempDir(), "journal.json")}
		if len(members) > 0 {
			c.Members = func(context.Context) (map[string]bool, error) {
				m := map[string]bool{}
				for _, x := range members {
					m[x] = true
				}
				return m, nil
			}
		}
		cs = append(cs, c)
		roots = append(roots, t.TempDir())
	}
	return cs, roots
}

// shardsOf writes node i's share of a DCP checkpoint: its rank's shard, and
// on node 0 the .metadata (written last, as the coordinator does).
func shardsOf(t *testing.T, root, name string, i, size int) {
	t.Helper()
	randomFile(t, filepath.Join(root, name, "__"+string(rune('0'+i))+"_0.distcp"), size)
	if i == 0 {
		randomFile(t, filepath.Join(root, name, ".metadata"), 300)
	}
}

func scanJobOne(t *testing.T, root, name string) Checkpoint {
	t.Helper()
	return findScanned(t, ScanJob, LayoutAuto, root, name) // a DCP part is recognised without .metadata
}

func TestJobCheckpointCommitsOnceWithEveryPart(t *testing.T) {
	stores(t, func(t *testing.T, st storage.Store) {
		ctx := context.Background()
		cs, roots := jobNodes(t, st, 3, "node0", "node1", "node2")
		for i, r := range roots {
			shardsOf(t, r, "step-10", i, 200<<10+i)
		}
		// Nodes 1 and 2 hold parts without a marker: they wait for node 0's.
		if ck := scanJobOne(t, roots[1], "step-10"); !ck.Part || ck.Layout != LayoutDCP {
			t.Fatalf("node1's folder: part %v layout %s; want a DCP part", ck.Part, ck.Layout)
		}
		var wg sync.WaitGroup
		res := make([]Result, 3)
		errs := make([]error, 3)
		for _, i := range []int{2, 1, 0} { // the coordinator last
			wg.Go(func() { res[i], errs[i] = cs[i].Commit(ctx, scanJobOne(t, roots[i], "step-10")) })
			time.Sleep(50 * time.Millisecond)
		}
		wg.Wait()
		for i, err := range errs {
			if err != nil {
				t.Fatalf("node%d: %v", i, err)
			}
			if len(res[i].Manifest.Parts) != 3 || len(res[i].Manifest.Files) != 4 {
				t.Fatalf("node%d sees %d parts, %d files; want 3 and 4", i, len(res[i].Manifest.Parts), len(res[i].Manifest.Files))
			}
		}
		if l := latestName(t, cs[0]); l != "step-10" {
			t.Fatalf("latest %q", l)
		}
		// The whole checkpoint on a fresh node, byte for byte.
		want := map[string][32]byte{}
		for _, r := range roots {
			maps.Copy(want, sumTree(t, r))
		}
		dst := t.TempDir()
		if _, _, err := cs[0].Restore(ctx, dst, ""); err != nil {
			t.Fatal(err)
		}
		if got := sumTree(t, dst); !maps.Equal(got, want) {
			t.Fatalf("restored %v, want %v", slices.Sorted(maps.Keys(got)), slices.Sorted(maps.Keys(want)))
		}
		// One node's part: its shard and the marker.
		dst = t.TempDir()
		if _, _, err := cs[0].RestorePart(ctx, dst, "step-10", "node1"); err != nil {
			t.Fatal(err)
		}
		got := slices.Sorted(maps.Keys(sumTree(t, dst)))
		if !slices.Equal(got, []string{"step-10/.metadata", "step-10/__1_0.distcp"}) {
			t.Fatalf("--part node1 restored %v", got)
		}
		if _, _, err := cs[0].RestorePart(ctx, t.TempDir(), "step-10", "node9"); err == nil {
			t.Fatal("a part of a node not in the checkpoint restored")
		}
	})
}

func TestJobCheckpointMissingPartNotCommitted(t *testing.T) {
	st, err := storage.NewDir(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	cs, roots := jobNodes(t, st, 3, "node0", "node1", "node2")
	// A committed checkpoint first.
	for i, r := range roots {
		shardsOf(t, r, "step-1", i, 1000)
	}
	var wg sync.WaitGroup
	for i := range cs {
		wg.Go(func() {
			if _, err := cs[i].Commit(context.Background(), scanJobOne(t, roots[i], "step-1")); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	// Step 2: node 1 never uploads its part (it died); the others wait to
	// their deadline.
	for i, r := range roots {
		shardsOf(t, r, "step-2", i, 1000)
	}
	for _, i := range []int{0, 2} {
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			defer cancel()
			_, err := cs[i].Commit(ctx, scanJobOne(t, roots[i], "step-2"))
			var pe *PartsError
			if !errors.As(err, &pe) || !errors.Is(err, ErrPartsMissing) || !slices.Equal(pe.Missing, []string{"node1"}) {
				t.Errorf("node%d: %v; want node1's part missing", i, err)
			}
		})
	}
	wg.Wait()
	if l := latestName(t, cs[0]); l != "step-1" {
		t.Fatalf("latest %q; the previous checkpoint must stay latest", l)
	}
	if _, _, err := cs[0].Restore(context.Background(), t.TempDir(), "step-2"); err == nil {
		t.Fatal("step-2 restorable without node1's part")
	}
}

func TestJobPartOfAnotherIncarnationIgnored(t *testing.T) {
	st, err := storage.NewDir(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	// An earlier incarnation's node "old0" left its part of step-5.
	old, oldRoots := jobNodes(t, st, 2, "node0", "node1")
	old[0].Node = "old0"
	shardsOf(t, oldRoots[0], "step-5", 0, 500)
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	old[0].Members = func(context.Context) (map[string]bool, error) {
		return map[string]bool{"old0": true, "old1": true}, nil
	}
	if _, err := old[0].Commit(ctx, scanJobOne(t, oldRoots[0], "step-5")); !errors.Is(err, ErrPartsMissing) {
		t.Fatalf("old0: %v", err)
	}
	// The new job's node1 alone must not complete step-5 with it.
	cs, roots := jobNodes(t, st, 2, "node0", "node1")
	shardsOf(t, roots[1], "step-5", 1, 500)
	shardsOf(t, roots[0], "step-5", 0, 500)
	done := make(chan error, 1)
	go func() {
		_, err := cs[1].Commit(context.Background(), scanJobOne(t, roots[1], "step-5"))
		done <- err
	}()
	time.Sleep(300 * time.Millisecond)
	if _, err := cs[1].manifest(context.Background(), "step-5"); !errors.Is(err, storage.ErrNotFound) {
		t.Fatalf("step-5 committed with a part of a node not in the job (manifest: %v)", err)
	}
	if _, err := cs[0].Commit(context.Background(), scanJobOne(t, roots[0], "step-5")); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	m, _, err := cs[0].Restore(context.Background(), t.TempDir(), "")
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range m.Parts {
		if p.Node == "old0" {
			t.Fatal("old0's part merged")
		}
	}
}

func TestJobConflictingFilesRefused(t *testing.T) {
	st, err := storage.NewDir(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	cs, roots := jobNodes(t, st, 2)
	for _, r := range roots {
		shardsOf(t, r, "step-3", 0, 700) // both nodes write rank 0's shard and .metadata, differently
	}
	var wg sync.WaitGroup
	errs := make([]error, 2)
	for i := range cs {
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			defer cancel()
			_, errs[i] = cs[i].Commit(ctx, scanJobOne(t, roots[i], "step-3"))
		})
	}
	wg.Wait()
	if errs[0] == nil || errs[1] == nil {
		t.Fatalf("conflicting parts committed: %v / %v", errs[0], errs[1])
	}
	if _, _, err := cs[0].Restore(context.Background(), t.TempDir(), "step-3"); err == nil {
		t.Fatal("a checkpoint with conflicting parts is restorable")
	}
}

// Create is the conditional create (If-None-Match: *) the job's commit and
// fan-out rely on: of writers racing for one key, exactly one wins.
func TestCreateIsConditional(t *testing.T) {
	stores(t, func(t *testing.T, st storage.Store) {
		ctx := context.Background()
		var wg sync.WaitGroup
		var mu sync.Mutex
		won, lost := 0, 0
		for i := range 8 {
			wg.Go(func() {
				err := st.Create(ctx, "job/_job/notices/x.json", []byte{byte('a' + i)})
				mu.Lock()
				defer mu.Unlock()
				switch {
				case err == nil:
					won++
				case errors.Is(err, storage.ErrExists):
					lost++
				default:
					t.Error(err)
				}
			})
		}
		wg.Wait()
		if won != 1 || lost != 7 {
			t.Fatalf("%d creates won, %d lost; want 1 and 7", won, lost)
		}
		if err := st.Create(ctx, "job/_job/notices/x.json", []byte("z")); !errors.Is(err, storage.ErrExists) {
			t.Fatalf("create over an existing key: %v", err)
		}
		objs, err := st.List(ctx, "job")
		if err != nil || len(objs) != 1 {
			t.Fatalf("list after creates: %v %v (no temporary left behind)", objs, err)
		}
	})
}

// Incremental reuse works per node in a job: a shard unchanged since the
// job's last checkpoint is copied inside the store, not sent again.
func TestJobIncrementalReuse(t *testing.T) {
	st, err := storage.NewDir(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	cs, roots := jobNodes(t, st, 2, "node0", "node1")
	commitAll := func(name string) []Result {
		var wg sync.WaitGroup
		res := make([]Result, len(cs))
		for i := range cs {
			wg.Go(func() {
				r, err := cs[i].Commit(context.Background(), scanJobOne(t, roots[i], name))
				if err != nil {
					t.Error(err)
				}
				res[i] = r
			})
		}
		wg.Wait()
		return res
	}
	for i, r := range roots {
		shardsOf(t, r, "step-1", i, 1<<20)
	}
	commitAll("step-1")
	// step-2: node 1's shard unchanged (a frozen layer), node 0's new.
	shardsOf(t, roots[0], "step-2", 0, 1<<20)
	if err := os.MkdirAll(filepath.Join(roots[1], "step-2"), 0o755); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(filepath.Join(roots[1], "step-1", "__1_0.distcp"))
	os.WriteFile(filepath.Join(roots[1], "step-2", "__1_0.distcp"), b, 0o644)
	res := commitAll("step-2")
	m := res[0].Manifest
	var reused []string
	for _, f := range m.Files {
		if f.Reused {
			reused = append(reused, f.Node+":"+f.Path)
		}
	}
	if !slices.Equal(reused, []string{"node1:step-2/__1_0.distcp"}) || m.SentBytes != m.Bytes-int64(len(b)) {
		t.Fatalf("reused %v, sent %d of %d; want node1's unchanged shard copied, the rest sent", reused, m.SentBytes, m.Bytes)
	}
	dst := t.TempDir()
	if _, _, err := cs[0].Restore(context.Background(), dst, "step-2"); err != nil {
		t.Fatal(err)
	}
}

// Signed jobs: every part is signed and verified before it is merged, and
// the merged manifest verifies; a part planted without the key never counts.
func TestJobPartsSigned(t *testing.T) {
	st, err := storage.NewDir(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	pub, priv, _ := ed25519.GenerateKey(nil)
	cs, roots := jobNodes(t, st, 2, "node0", "node1")
	for i, c := range cs {
		c.SignKey, c.VerifyKey = priv, pub
		shardsOf(t, roots[i], "step-1", i, 1000)
	}
	// node0's signed part goes up; a part of node1 without a signature
	// (what anyone who can write the bucket can put there) pairs with it.
	done := make(chan error, 1)
	ck0 := scanJobOne(t, roots[0], "step-1")
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_, err := cs[0].Commit(ctx, ck0)
		done <- err
	}()
	forged := &Committer{Store: st, Run: "job", Node: "node1", Nodes: 2, PartPoll: 20 * time.Millisecond}
	fctx, cancel := context.WithTimeout(context.Background(), time.Second)
	forged.Commit(fctx, scanJobOne(t, roots[1], "step-1"))
	cancel()
	if objs, _ := st.List(context.Background(), "job/step-1/"+PartsDir); !slices.ContainsFunc(objs, func(o storage.Object) bool {
		return o.Key == partKey("job", "step-1", "node1")
	}) {
		t.Fatal("the forged part never reached the store")
	}
	if err := <-done; !errors.Is(err, ErrPartsMissing) || !strings.Contains(err.Error(), "the part of node1 was refused: part node1: not signed by storage.sign_key") {
		t.Fatalf("node0 with only a forged part of node1: %v; want node1's part refused, saying why", err)
	}
	var wg sync.WaitGroup
	for i, c := range cs {
		wg.Go(func() {
			if _, err := c.Commit(context.Background(), scanJobOne(t, roots[i], "step-1")); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	reader := &Committer{Store: st, Run: "job", VerifyKey: pub}
	if m, _, err := reader.Restore(context.Background(), t.TempDir(), "step-1"); err != nil || len(m.Parts) != 2 {
		t.Fatalf("signed job checkpoint: %v (%d parts)", err, len(m.Parts))
	}
}

// A job manifest whose signature is missing (lost, or deleted) is signed
// again by a node whose own merge of the parts is exactly those bytes; a
// manifest at the commit's key that is not that merge (one hash changed,
// planted) is never signed: it is replaced by the merge.
func TestJobUnsignedManifestSignedOnlyIfBacked(t *testing.T) {
	st, err := storage.NewDir(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	pub, priv, _ := ed25519.GenerateKey(nil)
	cs, roots := jobNodes(t, st, 2, "node0", "node1")
	var wg sync.WaitGroup
	res := make([]Result, 2)
	for i, c := range cs {
		c.SignKey, c.VerifyKey = priv, pub
		shardsOf(t, roots[i], "step-1", i, 1000)
		wg.Go(func() {
			var err error
			if res[i], err = c.Commit(context.Background(), scanJobOne(t, roots[i], "step-1")); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	ctx := context.Background()
	cid := res[0].Manifest.Commit
	key, sigKey := commitKey("job", "step-1", cid), commitSigKey("job", "step-1", cid)
	var part bytes.Buffer
	st.Get(ctx, partKey("job", "step-1", "node1"), &part)
	mine, _ := ParseManifest(part.Bytes())
	st.Delete(ctx, sigKey) // the signature lost
	if _, perr, err := cs[1].complete(ctx, mine, &turn{first: true}); err != nil || perr != nil {
		t.Fatalf("complete over an unsigned manifest: %v %v", perr, err)
	}
	reader := &Committer{Store: st, Run: "job", VerifyKey: pub}
	if _, _, err := reader.Restore(ctx, t.TempDir(), "step-1"); err != nil {
		t.Fatalf("after the other node signed it: %v", err)
	}
	// A planted manifest: one file's hash changed, the signature gone.
	var buf bytes.Buffer
	st.Get(ctx, key, &buf)
	m, _ := ParseManifest(buf.Bytes())
	m.Files[0].SHA256 = strings.Repeat("0", 64)
	b, _ := json.MarshalIndent(m, "", "  ")
	st.PutBytes(ctx, key, b)
	st.Delete(ctx, sigKey)
	if _, _, err := reader.Restore(ctx, t.TempDir(), "step-1"); !errors.Is(err, ErrUnsigned) {
		t.Fatalf("the planted manifest restores: %v", err)
	}
	if _, perr, err := cs[1].complete(ctx, mine, &turn{first: true}); err != nil || perr != nil {
		t.Fatalf("complete over a planted manifest: %v %v", perr, err)
	}
	var after bytes.Buffer
	st.Get(ctx, key, &after)
	if bytes.Equal(after.Bytes(), b) {
		t.Fatal("the planted manifest was kept")
	}
	if _, _, err := reader.Restore(ctx, t.TempDir(), "step-1"); err != nil {
		t.Fatalf("after the node replaced the planted manifest with its merge: %v", err)
	}
}

// partReads counts the GETs of part manifests, and of job manifests.
type partReads struct {
	storage.Store
	parts, commits atomic.Int64
}

func (p *partReads) Get(ctx context.Context, key string, w io.Writer) error {
	switch {
	case strings.Contains(key, "/"+PartsDir+"/") && strings.HasSuffix(key, ".json"):
		p.parts.Add(1)
	case strings.Contains(key, "/"+CommitsDir+"/") && strings.HasSuffix(key, ".json"):
		p.commits.Add(1)
	}
	return p.Store.Get(ctx, key, w)
}

// While the nodes of a job wait for the last part, none reads another's
// part manifest (the listing says which are there); once every part is
// there, the node whose part completed the set and the first node by name
// read them and commit, and every other node reads only the job manifest
// that holds its part: the parts are read about twice per commit, not
// once per node and node.
func TestJobPartsReadByTheCommittersOnly(t *testing.T) {
	const n = 8
	dir, err := storage.NewDir(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	st := &partReads{Store: dir}
	names := []string{}
	for i := range n {
		names = append(names, "node"+string(rune('0'+i)))
	}
	cs, roots := jobNodes(t, st, n, names...)
	for i, r := range roots {
		shardsOf(t, r, "step-5", i, 4<<10)
	}
	var wg sync.WaitGroup
	errs := make([]error, n)
	res := make([]Result, n)
	for i := range n - 1 {
		ck := scanJobOne(t, roots[i], "step-5")
		wg.Go(func() { res[i], errs[i] = cs[i].Commit(context.Background(), ck) })
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		objs, _ := st.List(context.Background(), "job/step-5/"+PartsDir)
		parts := 0
		for _, o := range objs {
			if strings.HasSuffix(o.Key, ".json") {
				parts++
			}
		}
		if parts == n-1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("only %d parts written", parts)
		}
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(10 * cs[0].PartPoll) // the waiting nodes look again and again
	// Each node reads its own part once, and each pairing node the
	// coordinator's.
	if got := st.parts.Load(); got > 2*n-1 {
		t.Errorf("%d part manifests read while waiting; want at most %d (each node's own, and the coordinator's by each other node, once)", got, 2*n-1)
	}
	st.parts.Store(0)
	ck := scanJobOne(t, roots[n-1], "step-5")
	res[n-1], errs[n-1] = cs[n-1].Commit(context.Background(), ck)
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("node%d: %v", i, err)
		}
		if res[i].Manifest.Commit != res[0].Manifest.Commit || len(res[i].Manifest.Parts) != n {
			t.Fatalf("node%d: commit %s of %d parts; want %s of %d", i, res[i].Manifest.Commit, len(res[i].Manifest.Parts), res[0].Manifest.Commit, n)
		}
	}
	t.Logf("from the last part on: %d part manifests and %d job manifests read", st.parts.Load(), st.commits.Load())
	if got := st.parts.Load(); got > 2*n {
		t.Errorf("%d part manifests read to commit; want at most %d (two committers), not one read per node and node (%d)", got, 2*n, n*n)
	}
}
