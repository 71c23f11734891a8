package logship

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/preemptd/preemptd/agent"
	"github.com/preemptd/preemptd/checkpoint/storage"
)

// stored concatenates a file's chunks in name order, per generation.
func stored(t *testing.T, st storage.Store, prefix string) (string, []string) {
	t.Helper()
	objs, err := st.List(context.Background(), prefix)
	if err != nil {
		t.Fatal(err)
	}
	var keys []string
	for _, o := range objs {
		keys = append(keys, o.Key)
	}
	slices.Sort(keys)
	var all bytes.Buffer
	for _, k := range keys {
		st.Get(context.Background(), k, &all)
	}
	return all.String(), keys
}

func TestAppendOnlyTails(t *testing.T) {
	dir := t.TempDir()
	st, _ := storage.NewDir(t.TempDir())
	log := filepath.Join(dir, "train.log")
	os.WriteFile(log, []byte("step 1\n"), 0o644)
	s := &Shipper{Paths: []string{filepath.Join(dir, "*.log")}, Store: st, Prefix: "run/logs/host"}
	ctx := context.Background()
	if err := s.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	f, _ := os.OpenFile(log, os.O_APPEND|os.O_WRONLY, 0)
	f.WriteString("step 2\n")
	f.Close()
	s.Flush(ctx)
	s.Flush(ctx) // nothing new: no new object
	content, keys := stored(t, st, "run/logs/host")
	if content != "step 1\nstep 2\n" || len(keys) != 2 {
		t.Fatalf("stored %q in %v", content, keys)
	}
	if !strings.HasSuffix(keys[1], "0000-0000000000000007.log") {
		t.Fatalf("second chunk key %s: want the offset 7 of generation 0", keys[1])
	}

	// Rotation: a new file under the same name starts generation 1.
	os.Rename(log, log+".1")
	os.WriteFile(log, []byte("fresh\n"), 0o644)
	s.Flush(ctx)
	_, keys = stored(t, st, "run/logs/host")
	if len(keys) != 3 || !strings.HasSuffix(keys[2], "0001-0000000000000000.log") {
		t.Fatalf("after rotation: %v", keys)
	}
	if err := s.Step().Run(ctx, agent.Notice{}); err != nil {
		t.Fatal(err)
	}
}
