package checkpoint

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/preemptd/preemptd/checkpoint/storage"
)

// TestPrehash: files hashed ahead of their commit (as the syncer does while
// the trainer writes the rest) decide reuse without being read again; a
// file rewritten after it was hashed (same size, new content) is hashed
// anew, never committed under its old sum; a file changing while it is
// hashed is not cached.
func TestPrehash(t *testing.T) {
	ctx := context.Background()
	st, _ := storage.NewDir(t.TempDir())
	c := &Committer{Store: st, Run: "r"}
	root := t.TempDir()
	shards := map[string]int{"__0_0.distcp": 64 << 10, "__1_0.distcp": 64 << 10, "__2_0.distcp": 64 << 10}
	dcp(t, root, "step-1", shards)
	if _, err := c.Commit(ctx, scanOne(t, root, "step-1")); err != nil {
		t.Fatal(err)
	}
	// step-2: two shards unchanged, one new; all hashed ahead.
	for _, n := range []string{"__0_0.distcp", "__1_0.distcp"} {
		b, _ := os.ReadFile(filepath.Join(root, "step-1", n))
		os.MkdirAll(filepath.Join(root, "step-2"), 0o755)
		os.WriteFile(filepath.Join(root, "step-2", n), b, 0o644)
	}
	dcp(t, root, "step-2", map[string]int{"__2_0.distcp": 64 << 10})
	ck := scanOne(t, root, "step-2")
	for _, f := range ck.Files {
		if err := c.Prehash(filepath.Join(root, filepath.FromSlash(f.Path))); err != nil {
			t.Fatal(err)
		}
		if !c.knownCopy(f, c.reusable(ctx, Manifest{Name: "step-2"})) && f.Path != "step-2/__2_0.distcp" && f.Path != "step-2/.metadata" {
			t.Errorf("%s hashed ahead but not known as a copy", f.Path)
		}
	}
	res, err := c.Commit(ctx, ck)
	if err != nil {
		t.Fatal(err)
	}
	if res.Manifest.SentBytes != 64<<10+512 {
		t.Fatalf("sent %d bytes, want the new shard and the marker only", res.Manifest.SentBytes)
	}

	// step-3: a shard hashed, then rewritten with other bytes of the same size.
	dcp(t, root, "step-3", shards)
	p := filepath.Join(root, "step-3", "__0_0.distcp")
	if err := c.Prehash(p); err != nil {
		t.Fatal(err)
	}
	time.Sleep(10 * time.Millisecond) // a new modification time
	randomFile(t, p, 64<<10)
	randomFile(t, filepath.Join(root, "step-3", ".metadata"), 512) // written last, as DCP does
	b, _ := os.ReadFile(p)
	want := sha256.Sum256(b)
	res, err = c.Commit(ctx, scanOne(t, root, "step-3"))
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range res.Manifest.Files {
		if f.Path == "step-3/__0_0.distcp" && f.SHA256 != hex.EncodeToString(want[:]) {
			t.Fatalf("the rewritten shard was committed with the sum of its old bytes")
		}
	}

	// A symlink is never followed.
	os.Symlink(p, filepath.Join(root, "link"))
	if err := c.Prehash(filepath.Join(root, "link")); err == nil {
		t.Fatal("Prehash followed a symlink")
	}
}
