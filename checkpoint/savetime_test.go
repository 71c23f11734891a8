package checkpoint

import (
	"context"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/preemptd/preemptd/checkpoint/storage"
)

// TestSaveTimeMeasured: the syncer tells OnComplete of each checkpoint once,
// with its save time from the first write seen under its folder to its
// completion marker (a rename from the writer's temporary name keeps the
// start); a checkpoint complete before the watch began is told without one.
func TestSaveTimeMeasured(t *testing.T) {
	st, _ := storage.NewDir(t.TempDir())
	dir := t.TempDir()
	dcp(t, dir, "step-1", map[string]int{"__0_0.distcp": 1024})
	type told struct {
		name string
		save time.Duration
	}
	var mu sync.Mutex
	var got []told
	c := &Committer{Store: st, Run: "r", Journal: filepath.Join(t.TempDir(), "journal")}
	s := &Syncer{Dir: dir, Layout: LayoutDCP, Quiet: time.Second, Committer: c, Background: true, Margin: time.Second,
		OnComplete: func(ck Checkpoint, save time.Duration) {
			mu.Lock()
			got = append(got, told{ck.Name, save})
			mu.Unlock()
		}}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { s.Run(ctx); close(done) }()
	defer func() { cancel(); <-done }()
	wait := func(n int) []told {
		t.Helper()
		for end := time.Now().Add(10 * time.Second); time.Now().Before(end); time.Sleep(20 * time.Millisecond) {
			mu.Lock()
			g := append([]told(nil), got...)
			mu.Unlock()
			if len(g) >= n {
				return g
			}
		}
		t.Fatalf("OnComplete told %d times, want %d", len(got), n)
		return nil
	}
	if g := wait(1); g[0].name != "step-1" || g[0].save != 0 {
		t.Fatalf("at start: %+v, want step-1 without a save time", g)
	}
	// A save that takes at least 600 ms: one shard, a pause, the other
	// shard and the marker.
	randomFile(t, filepath.Join(dir, "step-2", "__0_0.distcp"), 1024)
	time.Sleep(600 * time.Millisecond)
	dcp(t, dir, "step-2", map[string]int{"__1_0.distcp": 1024})
	if g := wait(2); g[1].name != "step-2" || g[1].save < 600*time.Millisecond || g[1].save > time.Minute {
		t.Fatalf("step-2: %+v, want a save time of at least 600ms", g[1])
	}
	time.Sleep(300 * time.Millisecond) // scans that find nothing new tell nothing
	if g := wait(2); len(g) != 2 {
		t.Fatalf("told again: %+v", g)
	}
}

func TestSaveKey(t *testing.T) {
	for in, want := range map[string]string{
		"step-2/__0_0.distcp":                       "step-2",
		"100.orbax-checkpoint-tmp-1712/state/array": "100",
		"100.orbax-checkpoint-tmp/default/array":    "100",
		"tmp-checkpoint-500/model.safetensors":      "checkpoint-500",
		"epoch=1-step=20.ckpt.tmp":                  "epoch=1-step=20.ckpt",
		"global_step10/mp_rank_00_model_states.pt":  "global_step10",
		"last.ckpt": "last.ckpt",
	} {
		if got := saveKey(in); got != want {
			t.Errorf("saveKey(%q) = %q, want %q", in, got, want)
		}
	}
}
