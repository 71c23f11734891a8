package checkpoint

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/preemptd/preemptd/agent"
	"github.com/preemptd/preemptd/checkpoint/storage"
)

// TestObjectLayout: a folder checkpoint's files are stored at
// <run>/<name>/<file>, not <run>/<name>/<name>/<file>; a checkpoint stored
// in the old layout (manifest version 1) still restores.
func TestObjectLayout(t *testing.T) {
	storeDir := t.TempDir()
	st, _ := storage.NewDir(storeDir)
	ctx := context.Background()
	c := &Committer{Store: st, Run: "r"}
	root := t.TempDir()
	dcp(t, root, "step-1", map[string]int{"__0_0.distcp": 4096})
	if _, err := c.Commit(ctx, scanOne(t, root, "step-1")); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"r/step-1/__0_0.distcp", "r/step-1/.metadata", "r/step-1/" + ManifestName} {
		if _, err := os.Stat(filepath.Join(storeDir, filepath.FromSlash(want))); err != nil {
			t.Errorf("%s not stored: %v", want, err)
		}
	}
	if _, err := os.Stat(filepath.Join(storeDir, "r", "step-1", "step-1")); err == nil {
		t.Error("files stored under <name>/<name>/")
	}

	// A version-1 checkpoint, laid out as earlier releases wrote it.
	old := Manifest{Version: 1, Run: "r", Name: "step-0", Layout: LayoutDCP, Bytes: 5,
		Files: []ManifestFile{{Path: "step-0/__0_0.distcp", Size: 5, SHA256: "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"}}}
	st.PutBytes(ctx, "r/step-0/step-0/__0_0.distcp", []byte("hello"))
	b, _ := json.Marshal(old)
	st.PutBytes(ctx, "r/step-0/"+ManifestName, b)
	dst := t.TempDir()
	if _, _, err := c.Restore(ctx, dst, "step-0"); err != nil {
		t.Fatalf("restore of a version-1 checkpoint: %v", err)
	}
	if got, _ := os.ReadFile(filepath.Join(dst, "step-0", "__0_0.distcp")); string(got) != "hello" {
		t.Fatalf("restored %q", got)
	}
}

// TestCleanupOnlyThisNodesUploads: Cleanup aborts the uploads this node's
// journal lists (a crash mid-upload), never another node's in flight under
// the same run.
func TestCleanupOnlyThisNodesUploads(t *testing.T) {
	storeDir := t.TempDir()
	st, _ := storage.NewDir(storeDir)
	// Two nodes' half-written objects under one run, as a crash leaves them.
	for _, key := range []string{"r/step-2/__0_0.distcp", "r/step-2/__1_0.distcp"} {
		p := filepath.Join(storeDir, filepath.FromSlash(key))
		os.MkdirAll(filepath.Dir(p), 0o755)
		os.WriteFile(filepath.Join(filepath.Dir(p), ".preemptd-tmp-"+filepath.Base(p)+".123"), []byte("half"), 0o644)
	}
	journal := filepath.Join(t.TempDir(), "uploads.json")
	os.WriteFile(journal, []byte(`["r/step-2/__0_0.distcp"]`), 0o600)
	c := &Committer{Store: st, Run: "r", Journal: journal}
	n, err := c.Cleanup(context.Background())
	if err != nil || n != 1 {
		t.Fatalf("Cleanup = %d, %v; want this node's one upload", n, err)
	}
	left, _ := filepath.Glob(filepath.Join(storeDir, "r", "step-2", ".preemptd-tmp-*"))
	if len(left) != 1 || !strings.Contains(left[0], "__1_0") {
		t.Fatalf("left = %v, want only the other node's upload", left)
	}
	if b, _ := os.ReadFile(journal); string(b) != "[]" {
		t.Fatalf("journal after cleanup = %s", b)
	}
}

// gate is a store whose uploads of keys containing block hang until their
// context ends (a background upload on a slow link).
type gate struct {
	storage.Store
	block string
}

func (g gate) PutFile(ctx context.Context, key string, f *os.File, size int64) error {
	if strings.Contains(key, g.block) {
		<-ctx.Done()
		return ctx.Err()
	}
	return g.Store.PutFile(ctx, key, f, size)
}

func startSyncer(t *testing.T, st storage.Store, dir string) (*Syncer, *Committer) {
	t.Helper()
	c := &Committer{Store: st, Run: "r", Journal: filepath.Join(t.TempDir(), "journal")}
	s := &Syncer{Dir: dir, Layout: LayoutDCP, Quiet: time.Second, Committer: c, Background: true, Margin: time.Second}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { s.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	return s, c
}

func latestName(t *testing.T, c *Committer) string {
	t.Helper()
	l, err := c.latest(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return l.Name
}

// TestNoticeDuringPeriodicSave: the notice lands while the trainer is
// writing step-16; it finishes that save, then writes its final step-17 and
// exits. Both are committed and step-17 — the trainer's last — is latest
// and the step's result.
func TestNoticeDuringPeriodicSave(t *testing.T) {
	dir := t.TempDir()
	st, _ := storage.NewDir(t.TempDir())
	dcp(t, dir, "step-15", map[string]int{"__0_0.distcp": 64 << 10})
	s, c := startSyncer(t, st, dir)
	waitLatest(t, c, "step-15")

	// Mid-save at the notice: step-16's shard is there, its .metadata not yet.
	randomFile(t, filepath.Join(dir, "step-16", "__0_0.distcp"), 64<<10)
	exited := make(chan struct{})
	go func() {
		time.Sleep(300 * time.Millisecond)
		randomFile(t, filepath.Join(dir, "step-16", ".metadata"), 512) // the save in progress completes
		time.Sleep(500 * time.Millisecond)
		dcp(t, dir, "step-17", map[string]int{"__0_0.distcp": 64 << 10}) // the final save on SIGTERM
		time.Sleep(100 * time.Millisecond)
		close(exited)
	}()
	ctx, cancel := context.WithTimeout(agent.WithTrainerExited(context.Background(), exited), 30*time.Second)
	defer cancel()
	step := s.Emergency()
	if err := step.Run(ctx, agent.Notice{}); err != nil {
		t.Fatal(err)
	}
	res := step.(agent.CheckpointReporter).Committed()
	if res == nil || res.Name != "step-17" {
		t.Fatalf("emergency result = %+v, want step-17 (the trainer's last checkpoint)", res)
	}
	if got := latestName(t, c); got != "step-17" {
		t.Fatalf("latest = %s, want step-17", got)
	}
	ms, _, _ := c.List(context.Background())
	var names []string
	for _, m := range ms {
		names = append(names, m.Name)
	}
	if strings.Join(names, ",") != "step-15,step-16,step-17" {
		t.Fatalf("committed = %v", names)
	}
}

func waitLatest(t *testing.T, c *Committer, name string) {
	t.Helper()
	for end := time.Now().Add(10 * time.Second); time.Now().Before(end); time.Sleep(20 * time.Millisecond) {
		if l, err := c.latest(context.Background()); err == nil && l.Name == name {
			return
		}
	}
	t.Fatalf("%s never became latest", name)
}

// TestEmergencyAheadOfBackgroundUpload: a background upload of step-1 is
// stuck on a slow link when the notice comes; the trainer's step-2 is
// committed at once, not after step-1's upload (the estimate must not wait
// on the lock the background commit holds).
func TestEmergencyAheadOfBackgroundUpload(t *testing.T) {
	dir := t.TempDir()
	base, _ := storage.NewDir(t.TempDir())
	st := gate{Store: base, block: "step-1/"}
	s, c := startSyncer(t, st, dir)
	dcp(t, dir, "step-1", map[string]int{"__0_0.distcp": 64 << 10})
	for end := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		s.mu.Lock()
		busy := s.bgDone != nil
		s.mu.Unlock()
		if busy {
			break
		}
		if time.Now().After(end) {
			t.Fatal("the background upload of step-1 never started")
		}
	}
	exited := make(chan struct{})
	go func() {
		time.Sleep(200 * time.Millisecond)
		dcp(t, dir, "step-2", map[string]int{"__0_0.distcp": 64 << 10})
		close(exited)
	}()
	// The stuck upload never ends by itself: a step that waited on it would
	// still be waiting at its deadline, and commit nothing.
	ctx, cancel := context.WithTimeout(agent.WithTrainerExited(context.Background(), exited), 20*time.Second)
	defer cancel()
	if err := s.Emergency().Run(ctx, agent.Notice{}); err != nil || ctx.Err() != nil {
		t.Fatalf("emergency step: %v (deadline passed: %v)", err, ctx.Err() != nil)
	}
	if got := latestName(t, c); got != "step-2" {
		t.Fatalf("latest = %s, want step-2", got)
	}
}

// TestThroughputNotBehindCommit: Throughput answers while a commit holds
// the committer.
func TestThroughputNotBehindCommit(t *testing.T) {
	base, _ := storage.NewDir(t.TempDir())
	c := &Committer{Store: gate{Store: base, block: "step-1/"}, Run: "r"}
	root := t.TempDir()
	dcp(t, root, "step-1", map[string]int{"a": 1024})
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() { c.Commit(ctx, scanOne(t, root, "step-1")) })
	time.Sleep(100 * time.Millisecond)
	got := make(chan float64, 1)
	go func() { got <- c.Throughput() }()
	select {
	case <-got:
	case <-time.After(2 * time.Second):
		t.Error("Throughput blocked behind a commit in progress")
	}
	cancel()
	wg.Wait()
}

// TestUploadFollowsNoSymlink: a checkpoint file swapped for a symlink (to a
// file preemptd must never read as root) between the scan and the upload,
// or a checkpoint folder swapped for one, is refused; nothing of the link's
// target reaches the store, and the checkpoint is not committed.
func TestUploadFollowsNoSymlink(t *testing.T) {
	secret := filepath.Join(t.TempDir(), "shadow")
	os.WriteFile(secret, []byte(strings.Repeat("root:secret-hash:", 64)), 0o600)
	for _, swap := range []string{"file", "folder"} {
		t.Run(swap, func(t *testing.T) {
			storeDir := t.TempDir()
			st, _ := storage.NewDir(storeDir)
			root := t.TempDir()
			dcp(t, root, "step-1", map[string]int{"__0_0.distcp": 1088})
			ck := scanOne(t, root, "step-1")
			shard := filepath.Join(root, "step-1", "__0_0.distcp")
			switch swap {
			case "file":
				os.Remove(shard)
				os.Symlink(secret, shard)
			case "folder":
				real := filepath.Join(root, "elsewhere")
				os.Rename(filepath.Join(root, "step-1"), real)
				os.WriteFile(filepath.Join(real, "__0_0.distcp"), []byte(strings.Repeat("x", 1088)), 0o644)
				os.Symlink(real, filepath.Join(root, "step-1"))
			}
			c := &Committer{Store: st, Run: "r"}
			_, err := c.Commit(context.Background(), ck)
			if !errors.Is(err, ErrNotScanned) && !errors.Is(err, ErrChanged) {
				t.Fatalf("commit through a symlink: %v, want ErrNotScanned", err)
			}
			filepath.WalkDir(storeDir, func(p string, d os.DirEntry, err error) error {
				if err == nil && !d.IsDir() {
					if b, _ := os.ReadFile(p); strings.Contains(string(b), "secret-hash") {
						t.Fatalf("the symlink's target reached the store at %s", p)
					}
					if strings.HasSuffix(p, ManifestName) {
						t.Fatalf("committed: %s", p)
					}
				}
				return nil
			})
		})
	}
}

// TestSignedManifests: with a sign key every manifest is signed; with a
// verify key an unsigned checkpoint (planted by anyone who can write to
// the bucket), one signed by another key, or one whose manifest was edited
// after signing is refused by restore and left out of ls.
func TestSignedManifests(t *testing.T) {
	keys := t.TempDir()
	signPath, verifyPath, err := GenerateKeys(keys)
	if err != nil {
		t.Fatal(err)
	}
	signKey, err := LoadSignKey(signPath)
	if err != nil {
		t.Fatal(err)
	}
	verifyKey, err := LoadVerifyKey(verifyPath)
	if err != nil {
		t.Fatal(err)
	}
	if st, _ := os.Stat(signPath); st.Mode().Perm() != 0o600 {
		t.Fatalf("sign.key mode %04o", st.Mode().Perm())
	}
	other, _, _ := GenerateKeys(t.TempDir())
	otherKey, _ := LoadSignKey(other)

	storeDir := t.TempDir()
	st, _ := storage.NewDir(storeDir)
	ctx := context.Background()
	root := t.TempDir()
	writer := &Committer{Store: st, Run: "r", SignKey: signKey}
	dcp(t, root, "step-1", map[string]int{"a": 4096})
	if _, err := writer.Commit(ctx, scanOne(t, root, "step-1")); err != nil {
		t.Fatal(err)
	}
	planter := &Committer{Store: st, Run: "r"} // no key: what an attacker with bucket access writes
	dcp(t, root, "step-2", map[string]int{"a": 4096})
	if _, err := planter.Commit(ctx, scanOne(t, root, "step-2")); err != nil {
		t.Fatal(err)
	}
	forger := &Committer{Store: st, Run: "r", SignKey: otherKey}
	dcp(t, root, "step-3", map[string]int{"a": 4096})
	if _, err := forger.Commit(ctx, scanOne(t, root, "step-3")); err != nil {
		t.Fatal(err)
	}

	reader := &Committer{Store: st, Run: "r", VerifyKey: verifyKey}
	if _, _, err := reader.Restore(ctx, t.TempDir(), "step-1"); err != nil {
		t.Fatalf("signed checkpoint: %v", err)
	}
	for _, name := range []string{"step-2", "step-3", ""} { // "" is latest: step-3
		if _, _, err := reader.Restore(ctx, t.TempDir(), name); !errors.Is(err, ErrUnsigned) {
			t.Errorf("restore %q: %v, want ErrUnsigned", name, err)
		}
	}
	// An edited manifest no longer matches its signature.
	mp := filepath.Join(storeDir, "r", "step-1", ManifestName)
	b, _ := os.ReadFile(mp)
	os.WriteFile(mp, []byte(strings.Replace(string(b), `"step": 1`, `"step": 7`, 1)), 0o644)
	if _, _, err := reader.Restore(ctx, t.TempDir(), "step-1"); !errors.Is(err, ErrUnsigned) {
		t.Errorf("edited manifest: %v, want ErrUnsigned", err)
	}
	if ms, _, _ := reader.List(ctx); len(ms) != 0 {
		t.Errorf("ls with a verify key lists %d unverified checkpoints", len(ms))
	}
}

// TestQuietLayoutFinalSaveAtExit: a Lightning-style trainer writes its
// final .ckpt and exits at once; complete only after the quiet period, it
// is still the emergency step's checkpoint, not one left to background
// sync after the path.
func TestQuietLayoutFinalSaveAtExit(t *testing.T) {
	dir := t.TempDir()
	st, _ := storage.NewDir(t.TempDir())
	c := &Committer{Store: st, Run: "r"}
	s := &Syncer{Dir: dir, Layout: LayoutLightning, Quiet: time.Second, Committer: c, Background: true, Margin: time.Second}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { s.Run(ctx); close(done) }()
	defer func() { cancel(); <-done }()
	exited := make(chan struct{})
	go func() {
		time.Sleep(300 * time.Millisecond)
		randomFile(t, filepath.Join(dir, "step-12.ckpt"), 4096)
		close(exited)
	}()
	ectx, ecancel := context.WithTimeout(agent.WithTrainerExited(context.Background(), exited), 20*time.Second)
	defer ecancel()
	step := s.Emergency()
	if err := step.Run(ectx, agent.Notice{}); err != nil {
		t.Fatal(err)
	}
	if res := step.(agent.CheckpointReporter).Committed(); res == nil || res.Name != "step-12.ckpt" {
		t.Fatalf("emergency result = %+v, want step-12.ckpt", res)
	}
}

// slowPut takes d for every file upload: a slow link.
type slowPut struct {
	storage.Store
	d time.Duration
}

func (s slowPut) PutFile(ctx context.Context, key string, f *os.File, size int64) error {
	select {
	case <-time.After(s.d):
	case <-ctx.Done():
		return ctx.Err()
	}
	return s.Store.PutFile(ctx, key, f, size)
}

// TestRestartDuringNoticeCommitsCompleteCheckpointFirst: preemptd starts
// (after a crash mid-upload) while the cloud's notice is already served;
// the trainer is gone (no process to signal) and its last checkpoint is
// complete but not committed. That checkpoint is committed at once — not
// at the deadline less the upload estimate, which on a slow link misses the
// deadline — and only a newer one is waited for after it.
func TestRestartDuringNoticeCommitsCompleteCheckpointFirst(t *testing.T) {
	for _, tc := range []struct {
		name    string
		trainer bool // a trainer was signalled, and has exited
	}{{"no trainer found", false}, {"trainer exited", true}} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			base, _ := storage.NewDir(t.TempDir())
			dcp(t, dir, "step-3", map[string]int{"__0_0.distcp": 64 << 10})
			c := &Committer{Store: slowPut{base, 300 * time.Millisecond}, Run: "r"}
			s := &Syncer{Dir: dir, Layout: LayoutDCP, Quiet: time.Second, Committer: c, Background: true, Margin: 3 * time.Second}
			ctx := context.Background()
			if tc.trainer {
				exited := make(chan struct{})
				close(exited)
				ctx = agent.WithTrainerExited(ctx, exited)
			}
			start := time.Now()
			ctx, cancel := context.WithDeadline(ctx, start.Add(12*time.Second))
			defer cancel()
			step := s.Emergency()
			res := make(chan error, 1)
			go func() { res <- step.Run(ctx, agent.Notice{}) }() // the notice's path starts first
			rctx, rcancel := context.WithCancel(context.Background())
			runDone := make(chan struct{})
			go func() { s.Run(rctx); close(runDone) }()
			defer func() { rcancel(); <-runDone }()
			committedAt := time.Time{}
			for time.Since(start) < 12*time.Second && committedAt.IsZero() {
				if l, err := c.latest(context.Background()); err == nil && l.Name == "step-3" {
					committedAt = time.Now()
				}
				time.Sleep(20 * time.Millisecond)
			}
			if committedAt.IsZero() || committedAt.Sub(start) > 3*time.Second {
				t.Fatalf("step-3 committed %v after the notice (0: never); want at once, well before the deadline less the estimate (9 s)",
					committedAt.Sub(start).Round(time.Millisecond))
			}
			err := <-res
			if r := step.(agent.CheckpointReporter).Committed(); r == nil || r.Name != "step-3" {
				t.Fatalf("the step reports %+v committed; want step-3", r)
			}
			if err == nil || strings.Contains(err.Error(), "no new complete checkpoint by") || !strings.Contains(err.Error(), "step-3") {
				t.Fatalf("report: %v; want it to say that no newer checkpoint came and step-3 is latest, without a time still to come", err)
			}
		})
	}
}
