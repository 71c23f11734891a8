package checkpoint

import (
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/preemptd/preemptd/checkpoint/storage"
)

// rangeFaults is a store whose ranged reads fail as a test says.
type rangeFaults struct {
	storage.Store
	mu     sync.Mutex
	ranges int
	// fault is asked before each range: refuse it (an error), or pass it
	// through corrupt (one byte flipped); n counts the ranges so far.
	fault func(key string, off int64, n int) (refuse, corrupt bool)
}

func (s *rangeFaults) GetRange(ctx context.Context, key string, off, n int64, w io.Writer) error {
	s.mu.Lock()
	s.ranges++
	i := s.ranges
	s.mu.Unlock()
	refuse, corrupt := false, false
	if s.fault != nil {
		refuse, corrupt = s.fault(key, off, i)
	}
	if refuse {
		return errors.New("503 Slow Down")
	}
	if !corrupt {
		return s.Store.GetRange(ctx, key, off, n, w)
	}
	var b strings.Builder
	if err := s.Store.GetRange(ctx, key, off, n, &b); err != nil {
		return err
	}
	body := []byte(b.String())
	body[len(body)/2] ^= 0x40
	_, err := w.Write(body)
	return err
}

func (s *rangeFaults) count() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.ranges
}

// committed commits a 3-shard DCP checkpoint step-1 of shards of 300 KiB
// (many 64 KiB ranges each) and returns its folder.
func committedForRestore(t *testing.T, st storage.Store) (*Committer, string) {
	t.Helper()
	root := t.TempDir()
	dcp(t, root, "step-1", map[string]int{"__0_0.distcp": 300 << 10, "__1_0.distcp": 300<<10 + 7, "__2_0.distcp": 0})
	c := &Committer{Store: st, Run: "r"}
	if _, err := c.Commit(t.Context(), scanOne(t, root, "step-1")); err != nil {
		t.Fatal(err)
	}
	return c, filepath.Join(root, "step-1")
}

func sameTree(t *testing.T, want, got string) {
	t.Helper()
	w, g := sumTree(t, want), sumTree(t, got)
	if len(w) != len(g) {
		t.Fatalf("%d files restored, want %d: %v", len(g), len(w), g)
	}
	for k, v := range w {
		if g[k] != v {
			t.Fatalf("%s differs after restore", k)
		}
	}
}

const testPart = 64 << 10

// TestRestoreInRangesKeepsWhatIsThere: a checkpoint restored in many
// ranges at once on every store is byte-exact; restored again into the
// same folder, every file is kept and nothing fetched; a stale file of the
// right size but other bytes is fetched again and replaced.
func TestRestoreInRangesKeepsWhatIsThere(t *testing.T) {
	stores(t, func(t *testing.T, st storage.Store) {
		ctx := t.Context()
		c, src := committedForRestore(t, st)
		dst := t.TempDir()
		o := RestoreOptions{Threads: 8, PartSize: testPart}
		var last, total int64
		o.Progress = func(done, all int64) { last, total = done, all }
		r, err := c.RestoreInto(ctx, dst, o)
		if err != nil {
			t.Fatal(err)
		}
		sameTree(t, src, r.Path)
		if r.Fetched != 4 || r.Kept != 0 || r.FetchedBytes != r.Manifest.Bytes || last != total || total != r.Manifest.Bytes {
			t.Fatalf("first restore: %+v (progress %d of %d)", r, last, total)
		}
		o.Progress = nil
		r, err = c.RestoreInto(ctx, dst, o)
		if err != nil || r.Kept != 4 || r.Fetched != 0 || r.FetchedBytes != 0 {
			t.Fatalf("restore into the same folder: %+v %v", r, err)
		}
		stale := filepath.Join(r.Path, "__1_0.distcp")
		b, _ := os.ReadFile(stale)
		b[100] ^= 1
		os.WriteFile(stale, b, 0o644)
		os.WriteFile(filepath.Join(r.Path, ".metadata"), []byte("a torn save's"), 0o644)
		ctx2, cancel := context.WithCancel(ctx)
		c.Store = &rangeFaults{Store: st, fault: func(string, int64, int) (bool, bool) { cancel(); return false, false }}
		if _, err := c.RestoreInto(ctx2, dst, o); err == nil {
			t.Fatal("a cancelled restore succeeded")
		}
		if _, err := os.Stat(filepath.Join(r.Path, ".metadata")); err == nil {
			t.Fatal("another save's marker stayed while the checkpoint's files were being replaced")
		}
		c.Store = st
		r, err = c.RestoreInto(ctx, dst, o)
		if err != nil || r.Kept != 2 || r.Fetched != 2 || r.FetchedBytes+r.ResumedBytes != int64(len(b))+512 {
			t.Fatalf("restore over a stale file and marker: %+v %v", r, err)
		}
		sameTree(t, src, r.Path)
		if leftovers, _ := filepath.Glob(filepath.Join(r.Path, "*.preemptd-partial*")); len(leftovers) > 0 {
			t.Fatalf("left behind: %v", leftovers)
		}
	})
}

// TestRestoreRangeRefusedOrCorrupted: a refused range is asked for again;
// a range whose bytes were changed on the way makes its file fail its
// SHA-256 and the file is fetched again, never accepted; a store that
// keeps sending wrong bytes fails the restore and the file never takes
// its name.
func TestRestoreRangeRefusedOrCorrupted(t *testing.T) {
	st, err := storage.NewDir(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	c, src := committedForRestore(t, st)
	var refused, corrupted atomic.Int32
	fs := &rangeFaults{Store: st, fault: func(key string, off int64, i int) (bool, bool) {
		switch {
		case strings.HasSuffix(key, "__0_0.distcp") && off == 2*testPart && refused.Add(1) <= 2:
			return true, false
		case strings.HasSuffix(key, "__1_0.distcp") && off == 3*testPart && corrupted.Add(1) == 1:
			return false, true
		}
		return false, false
	}}
	c.Store = fs
	r, err := c.RestoreInto(t.Context(), t.TempDir(), RestoreOptions{Threads: 4, PartSize: testPart})
	if err != nil {
		t.Fatal(err)
	}
	sameTree(t, src, r.Path)
	if r.Refetched != 1 || refused.Load() != 3 || corrupted.Load() != 2 {
		t.Fatalf("refetched %d files, range refused %d times, corrupt range asked %d times", r.Refetched, refused.Load(), corrupted.Load())
	}

	fs.fault = func(key string, off int64, i int) (bool, bool) {
		return false, strings.HasSuffix(key, "__1_0.distcp") && off == 0
	}
	dst := t.TempDir()
	_, err = c.RestoreInto(t.Context(), dst, RestoreOptions{Threads: 4, PartSize: testPart})
	if err == nil || !strings.Contains(err.Error(), "checksum mismatch") || !strings.Contains(err.Error(), "__1_0.distcp") {
		t.Fatalf("restore from a store that corrupts one file: %v", err)
	}
	if _, serr := os.Stat(filepath.Join(dst, "step-1", "__1_0.distcp")); serr == nil {
		t.Fatal("a file that failed its checksum took its name")
	}
	if _, serr := os.Stat(filepath.Join(dst, "step-1", ".metadata")); serr == nil {
		t.Fatal("the marker is in place although a shard failed: the folder looks complete")
	}
}

// TestRestoreStoppedHalfwayContinues: a restore stopped halfway (the
// context cancelled after some ranges, as a killed process would stop)
// leaves no checkpoint that looks complete, and the next restore fetches
// only the ranges that were missing.
func TestRestoreStoppedHalfwayContinues(t *testing.T) {
	st, err := storage.NewDir(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	c, src := committedForRestore(t, st)
	all := 0
	for _, f := range []int{300 << 10, 300<<10 + 7} {
		all += (f + testPart - 1) / testPart
	}
	all++ // .metadata
	ctx, cancel := context.WithCancel(t.Context())
	fs := &rangeFaults{Store: st, fault: func(key string, off int64, i int) (bool, bool) {
		if i == 6 {
			cancel()
		}
		return false, false
	}}
	c.Store = fs
	dst := t.TempDir()
	o := RestoreOptions{Threads: 1, PartSize: testPart}
	if _, err := c.RestoreInto(ctx, dst, o); err == nil {
		t.Fatal("a stopped restore reported success")
	}
	if _, err := os.Stat(filepath.Join(dst, "step-1", ".metadata")); err == nil {
		t.Fatal("the marker is in place after a stopped restore")
	}
	before := fs.count()
	r, err := c.RestoreInto(t.Context(), dst, o)
	if err != nil {
		t.Fatal(err)
	}
	sameTree(t, src, r.Path)
	again := fs.count() - before
	if r.Resumed == 0 || r.ResumedBytes == 0 || again >= all || again+r.Kept < all-5 {
		t.Fatalf("second restore: %+v; %d ranges asked, %d in all, %d before", r, again, all, before)
	}
}

// TestRestoreStalePartialReplaced: a partial file from an interrupted
// restore whose bytes were changed since (its journal says its ranges are
// in) fails the file's SHA-256; the file is fetched again from scratch.
func TestRestoreStalePartialReplaced(t *testing.T) {
	st, err := storage.NewDir(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	c, src := committedForRestore(t, st)
	ctx, cancel := context.WithCancel(t.Context())
	c.Store = &rangeFaults{Store: st, fault: func(key string, off int64, i int) (bool, bool) {
		if i == 3 {
			cancel()
		}
		return false, false
	}}
	dst := t.TempDir()
	o := RestoreOptions{Threads: 1, PartSize: testPart}
	c.RestoreInto(ctx, dst, o)
	partials, _ := filepath.Glob(filepath.Join(dst, "step-1", "*"+partialSuffix))
	if len(partials) == 0 {
		t.Fatal("no partial file left by the stopped restore")
	}
	for _, p := range partials {
		f, _ := os.OpenFile(p, os.O_RDWR, 0)
		f.WriteAt([]byte("garbage"), 10)
		f.Close()
	}
	c.Store = st
	r, err := c.RestoreInto(t.Context(), dst, o)
	if err != nil {
		t.Fatal(err)
	}
	sameTree(t, src, r.Path)
	if r.Refetched == 0 {
		t.Fatalf("the stale partial was not refetched: %+v", r)
	}
}
