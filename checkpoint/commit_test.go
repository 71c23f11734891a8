package checkpoint

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"maps"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/preemptd/preemptd/checkpoint/storage"
	"github.com/preemptd/preemptd/test/peers"
)

// stores runs f against a directory store and every kind of real server:
// MinIO and versitygw (S3), fake-gcs-server (GCS, on the VM's token) and
// Azurite (Azure Blob).
func stores(t *testing.T, f func(t *testing.T, st storage.Store)) {
	t.Run("dir", func(t *testing.T) {
		st, err := storage.NewDir(t.TempDir())
		if err != nil {
			t.Fatal(err)
		}
		f(t, st)
	})
	o := storage.Options{PartSize: 5 << 20, Threads: 4}
	t.Run("minio", func(t *testing.T) { f(t, peers.StartMinIO(t).Open(t, "runs", o)) })
	t.Run("versitygw", func(t *testing.T) { f(t, peers.StartVersity(t).Open(t, "runs", o)) })
	t.Run("gcs", func(t *testing.T) { f(t, peers.StartGCSVM(t).Open(t, "runs", o)) })
	t.Run("azurite", func(t *testing.T) { f(t, peers.StartAzurite(t).Open(t, "runs", o)) })
}

func randomFile(t *testing.T, p string, n int) {
	t.Helper()
	b := make([]byte, n)
	rand.Read(b)
	os.MkdirAll(filepath.Dir(p), 0o755)
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

func scanOne(t *testing.T, root, name string) Checkpoint {
	t.Helper()
	return findScanned(t, Scan, LayoutDCP, root, name)
}

// findScanned is the checkpoint name as scan finds it complete in root.
func findScanned(t *testing.T, scan func(string, string, time.Duration, time.Time) ([]Checkpoint, error), layout, root, name string) Checkpoint {
	t.Helper()
	cks, err := scan(root, layout, 0, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range cks {
		if c.Name == name {
			return c
		}
	}
	t.Fatalf("%s not complete in %s", name, root)
	return Checkpoint{}
}

// dcp writes a DCP-layout checkpoint: shards, then .metadata last.
func dcp(t *testing.T, root, name string, shards map[string]int) {
	t.Helper()
	for shard, size := range shards {
		randomFile(t, filepath.Join(root, name, shard), size)
	}
	randomFile(t, filepath.Join(root, name, ".metadata"), 512)
}

func sumTree(t *testing.T, dir string) map[string][32]byte {
	t.Helper()
	out := map[string][32]byte{}
	filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		rel, _ := filepath.Rel(dir, p)
		out[rel] = sha256.Sum256(b)
		return nil
	})
	return out
}

func TestCommitRestoreIncrementalPrune(t *testing.T) {
	stores(t, func(t *testing.T, st storage.Store) {
		ctx := t.Context()
		root := t.TempDir()
		c := &Committer{Store: st, Run: "run-1", Instance: "i-1", Keep: 2}

		dcp(t, root, "step-100", map[string]int{"__0_0.distcp": 12 << 20, "__1_0.distcp": 3 << 20})
		r1, err := c.Commit(ctx, scanOne(t, root, "step-100"))
		if err != nil {
			t.Fatal(err)
		}
		if r1.Manifest.SentBytes != r1.Manifest.Bytes || r1.Manifest.Step != 100 {
			t.Fatalf("first commit manifest = %+v", r1.Manifest)
		}

		// step-200 shares one shard byte for byte: it is copied, not sent.
		os.MkdirAll(filepath.Join(root, "step-200"), 0o755)
		b, _ := os.ReadFile(filepath.Join(root, "step-100", "__1_0.distcp"))
		os.WriteFile(filepath.Join(root, "step-200", "__1_0.distcp"), b, 0o644)
		dcp(t, root, "step-200", map[string]int{"__0_0.distcp": 12 << 20})
		r2, err := c.Commit(ctx, scanOne(t, root, "step-200"))
		if err != nil {
			t.Fatal(err)
		}
		reused := 0
		for _, f := range r2.Manifest.Files {
			if f.Reused {
				reused++
				if f.Path != "step-200/__1_0.distcp" {
					t.Fatalf("reused %s", f.Path)
				}
			}
		}
		if reused != 1 || r2.Manifest.SentBytes != r2.Manifest.Bytes-3<<20 {
			t.Fatalf("incremental: reused %d, sent %d of %d", reused, r2.Manifest.SentBytes, r2.Manifest.Bytes)
		}

		dcp(t, root, "step-300", map[string]int{"__0_0.distcp": 1 << 20})
		if _, err := c.Commit(ctx, scanOne(t, root, "step-300")); err != nil {
			t.Fatal(err)
		}
		ms, latest, err := c.List(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if len(ms) != 2 || ms[0].Name != "step-200" || latest != "step-300" {
			t.Fatalf("after keep 2: %d manifests (first %s), latest %s", len(ms), ms[0].Name, latest)
		}

		// Restore the latest into an empty folder: byte for byte.
		dst := filepath.Join(t.TempDir(), "restored")
		m, p, err := c.Restore(ctx, dst, "")
		if err != nil {
			t.Fatal(err)
		}
		if m.Name != "step-300" || p != filepath.Join(dst, "step-300") {
			t.Fatalf("restored %s at %s", m.Name, p)
		}
		want, got := sumTree(t, filepath.Join(root, "step-300")), sumTree(t, p)
		if len(got) != len(want) {
			t.Fatalf("restored %d files, want %d", len(got), len(want))
		}
		for k, v := range want {
			if got[k] != v {
				t.Fatalf("%s differs after restore", k)
			}
		}
		// The reused file of step-200 restores too (it was copied server-side).
		if _, p2, err := c.Restore(ctx, dst, "step-200"); err != nil || len(sumTree(t, p2)) != 3 {
			t.Fatalf("restore step-200: %v", err)
		}
		if r, err := c.RestoreInto(ctx, dst, RestoreOptions{Name: "step-300"}); err != nil || r.Kept != len(r.Manifest.Files) || r.Fetched != 0 {
			t.Fatalf("restore over the same checkpoint: %+v %v", r, err)
		}
		if _, _, err := c.Restore(ctx, dst, "step-100"); err == nil || !strings.Contains(err.Error(), "not committed") {
			t.Fatalf("restore of a pruned checkpoint: %v", err)
		}
	})
}

// TestChangedDuringUploadNotCommitted: a checkpoint rewritten while it
// uploads is refused, and latest keeps naming the previous one.
func TestChangedDuringUploadNotCommitted(t *testing.T) {
	stores(t, func(t *testing.T, st storage.Store) {
		ctx := t.Context()
		root := t.TempDir()
		c := &Committer{Store: st, Run: "r"}
		dcp(t, root, "step-1", map[string]int{"a": 1000})
		if _, err := c.Commit(ctx, scanOne(t, root, "step-1")); err != nil {
			t.Fatal(err)
		}
		dcp(t, root, "step-2", map[string]int{"a": 1000})
		ck := scanOne(t, root, "step-2")
		time.Sleep(10 * time.Millisecond)
		randomFile(t, filepath.Join(root, "step-2", "a"), 1000) // same size, new bytes and mtime
		if _, err := c.Commit(ctx, ck); !errors.Is(err, ErrChanged) {
			t.Fatalf("Commit = %v, want ErrChanged", err)
		}
		if _, latest, _ := c.List(ctx); latest != "step-1" {
			t.Fatalf("latest = %q, want step-1", latest)
		}
	})
}

// rotator removes the checkpoint's folder as its first file starts to
// upload: a framework rotating old checkpoints away (HF's
// save_total_limit, Lightning's save_top_k) while preemptd syncs them.
type rotator struct {
	storage.Store
	dir  string
	once *sync.Once
}

func (r rotator) PutFile(ctx context.Context, key string, f *os.File, size int64) error {
	r.once.Do(func() { os.RemoveAll(r.dir) })
	return r.Store.PutFile(ctx, key, f, size)
}

// TestRotatedAwayDuringUploadCommitted: a complete checkpoint removed by
// its framework while it uploads is still committed whole — its files were
// opened before the first byte went — and restores to the bytes it had.
func TestRotatedAwayDuringUploadCommitted(t *testing.T) {
	stores(t, func(t *testing.T, st storage.Store) {
		ctx := t.Context()
		root := t.TempDir()
		dcp(t, root, "step-1", map[string]int{"__0_0.distcp": 300 << 10, "__1_0.distcp": 200 << 10})
		want := sumTree(t, filepath.Join(root, "step-1"))
		ck := scanOne(t, root, "step-1")
		c := &Committer{Store: rotator{Store: st, dir: filepath.Join(root, "step-1"), once: &sync.Once{}}, Run: "r"}
		if _, err := c.Commit(ctx, ck); err != nil {
			t.Fatalf("Commit of a checkpoint rotated away mid-upload: %v", err)
		}
		if _, err := os.Stat(filepath.Join(root, "step-1")); !os.IsNotExist(err) {
			t.Fatalf("the folder was not removed during the upload: %v", err)
		}
		dst := t.TempDir()
		_, p, err := c.Restore(ctx, dst, "")
		if err != nil {
			t.Fatal(err)
		}
		if got := sumTree(t, p); !maps.Equal(got, want) {
			t.Fatalf("restored %v, want %v", got, want)
		}
	})
}

// saveAgain is DeepSpeed saving its next tag while the previous one
// uploads: as the first file starts, it writes global_step20 and rewrites
// latest in place to name it.
type saveAgain struct {
	storage.Store
	root string
	once *sync.Once
}

func (s saveAgain) PutFile(ctx context.Context, key string, f *os.File, size int64) error {
	s.once.Do(func() {
		os.MkdirAll(filepath.Join(s.root, "global_step20"), 0o755)
		os.WriteFile(filepath.Join(s.root, "global_step20", "mp_rank_00_model_states.pt"), []byte("newer"), 0o644)
		time.Sleep(10 * time.Millisecond)
		os.WriteFile(filepath.Join(s.root, "latest"), []byte("global_step20"), 0o644) // same inode, new bytes
	})
	return s.Store.PutFile(ctx, key, f, size)
}

// TestPointerRewrittenDuringUploadCommitted: DeepSpeed's latest, rewritten
// to name the next tag while the previous tag uploads, does not stop that
// tag's commit: latest is sent as it named it, and restores so.
func TestPointerRewrittenDuringUploadCommitted(t *testing.T) {
	stores(t, func(t *testing.T, st storage.Store) {
		ctx := t.Context()
		root := t.TempDir()
		randomFile(t, filepath.Join(root, "global_step10", "mp_rank_00_model_states.pt"), 300<<10)
		if err := os.WriteFile(filepath.Join(root, "latest"), []byte("global_step10"), 0o644); err != nil {
			t.Fatal(err)
		}
		ck := findScanned(t, Scan, LayoutDeepSpeed, root, "global_step10")
		c := &Committer{Store: saveAgain{Store: st, root: root, once: &sync.Once{}}, Run: "r"}
		if _, err := c.Commit(ctx, ck); err != nil {
			t.Fatalf("Commit while latest moved on: %v", err)
		}
		if b, _ := os.ReadFile(filepath.Join(root, "latest")); string(b) != "global_step20" {
			t.Fatalf("latest was not rewritten during the upload: %q", b)
		}
		dst := t.TempDir()
		if _, _, err := c.Restore(ctx, dst, ""); err != nil {
			t.Fatal(err)
		}
		if b, err := os.ReadFile(filepath.Join(dst, "latest")); err != nil || string(b) != "global_step10" {
			t.Fatalf("restored latest = %q (%v), want global_step10", b, err)
		}
	})
}

// TestRestoreRefusesEscapeAndCorruption: a manifest naming a path outside
// the target, and an object whose bytes do not match, are both refused.
func TestRestoreRefusesEscapeAndCorruption(t *testing.T) {
	storeDir := t.TempDir()
	st, _ := storage.NewDir(storeDir)
	ctx := context.Background()
	c := &Committer{Store: st, Run: "r"}
	evil := Manifest{Version: 1, Run: "r", Name: "evil", Bytes: 1, Files: []ManifestFile{{Path: "../../../tmp/pwned", Size: 1,
		SHA256: strings.Repeat("a", 64)}}}
	b, _ := json.Marshal(evil)
	st.PutBytes(ctx, "r/evil/"+ManifestName, b)
	if _, _, err := c.Restore(ctx, t.TempDir(), "evil"); err == nil || !strings.Contains(err.Error(), "escapes") {
		t.Fatalf("escaping manifest: %v", err)
	}

	root := t.TempDir()
	dcp(t, root, "step-1", map[string]int{"a": 4096})
	if _, err := c.Commit(ctx, scanOne(t, root, "step-1")); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(storeDir, "r", "step-1", "a"), bytes.Repeat([]byte{1}, 4096), 0o644)
	dst := t.TempDir()
	if _, _, err := c.Restore(ctx, dst, ""); err == nil || !strings.Contains(err.Error(), "checksum mismatch") {
		t.Fatalf("corrupt object: %v", err)
	}
	filepath.WalkDir(dst, func(p string, d os.DirEntry, err error) error {
		// What was in flight is left to continue from, never under its name.
		if err == nil && !d.IsDir() && !strings.HasSuffix(p, partialSuffix) && !strings.HasSuffix(p, journalSuffix) {
			t.Errorf("a failed restore left %s in the target", p)
		}
		return nil
	})
}

func TestRestoreNothingCommitted(t *testing.T) {
	st, _ := storage.NewDir(t.TempDir())
	c := &Committer{Store: st, Run: "empty"}
	if _, _, err := c.Restore(t.Context(), t.TempDir(), ""); err == nil || !strings.Contains(err.Error(), "no committed checkpoint") {
		t.Fatalf("Restore = %v", err)
	}
}

// TestRepairLatest: a crash between a checkpoint's manifest and the latest
// pointer leaves latest behind; Repair moves it to the whole checkpoint.
func TestRepairLatest(t *testing.T) {
	st, _ := storage.NewDir(t.TempDir())
	ctx := context.Background()
	root := t.TempDir()
	c := &Committer{Store: st, Run: "r"}
	dcp(t, root, "step-1", map[string]int{"a": 100})
	dcp(t, root, "step-2", map[string]int{"a": 100})
	c.Commit(ctx, scanOne(t, root, "step-1"))
	old, _ := json.Marshal(Latest{Name: "step-1"})
	c.Commit(ctx, scanOne(t, root, "step-2"))
	st.PutBytes(ctx, latestKey("r"), old) // as if the crash came before the pointer moved
	if name, err := c.Repair(ctx); err != nil || name != "step-2" {
		t.Fatalf("Repair = %q, %v", name, err)
	}
	if _, latest, _ := c.List(ctx); latest != "step-2" {
		t.Fatalf("latest = %s", latest)
	}
	if name, _ := c.Repair(ctx); name != "" {
		t.Fatalf("second Repair changed %q", name)
	}
}
