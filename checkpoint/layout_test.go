package checkpoint

import (
	"cmp"
	"maps"
	"os"
	"path"
	"path/filepath"
	"slices"
	"testing"
	"time"
)

// files writes each path (relative to root) with its content, in name
// order, a DCP folder's .metadata after its shards (as DCP writes them).
func files(t *testing.T, root string, fs map[string]string) {
	t.Helper()
	paths := slices.Sorted(maps.Keys(fs))
	slices.SortStableFunc(paths, func(a, b string) int {
		return cmp.Compare(boolInt(path.Base(a) == ".metadata"), boolInt(path.Base(b) == ".metadata"))
	})
	for _, p := range paths {
		c := fs[p]
		full := filepath.Join(root, p)
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(full, []byte(c), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}

func names(cks []Checkpoint) []string {
	var out []string
	for _, c := range cks {
		out = append(out, c.Name)
	}
	slices.Sort(out)
	return out
}

func TestScanLayouts(t *testing.T) {
	later := time.Now().Add(time.Hour) // every quiet period has passed
	tests := []struct {
		name   string
		files  map[string]string
		layout string
		want   []string
		marker string
	}{
		{"dcp complete and torn", map[string]string{
			"step-100/__0_0.distcp": "a", "step-100/.metadata": "m",
			"step-200/__0_0.distcp": "b", "step-200/.metadata.tmp": "half"}, LayoutDCP, []string{"step-100"}, "step-100/.metadata"},
		{"orbax renamed and tmp", map[string]string{
			"100/state/x": "a", "100/_CHECKPOINT_METADATA": "{}",
			"200.orbax-checkpoint-tmp-1700000000/state/x": "b"}, LayoutOrbax, []string{"100"}, "100/_CHECKPOINT_METADATA"},
		// Orbax 0.12 names its temporary folder without a timestamp.
		{"orbax tmp without a suffix", map[string]string{
			"100/default/x": "a", "100/_CHECKPOINT_METADATA": "{}",
			"200.orbax-checkpoint-tmp/default/x": "b"}, LayoutOrbax, []string{"100"}, "100/_CHECKPOINT_METADATA"},
		{"deepspeed latest names the tag", map[string]string{
			"global_step10/mp_rank_00_model_states.pt": "a", "global_step20/mp_rank_00_model_states.pt": "b",
			"latest": "global_step10\n"}, LayoutDeepSpeed, []string{"global_step10"}, "latest"},
		{"megatron iteration", map[string]string{
			"iter_0000500/mp_rank_00/model_optim_rng.pt": "a", "iter_0001000/mp_rank_00/model_optim_rng.pt": "b",
			"latest_checkpointed_iteration.txt": "500"}, LayoutMegatron, []string{"iter_0000500"}, "latest_checkpointed_iteration.txt"},
		{"lightning ckpt files", map[string]string{
			"epoch=0-step=100.ckpt": "a", "epoch=0-step=200.ckpt.tmp": "half", "notes.txt": "x"}, LayoutLightning,
			[]string{"epoch=0-step=100.ckpt"}, ""},
		{"hf without the incomplete marker", map[string]string{
			"checkpoint-10/model.safetensors": "a", "checkpoint-10/trainer_state.json": "{}",
			"checkpoint-20/model.safetensors": "b", "checkpoint-20/checkpoint-is-incomplete.txt": ""}, LayoutHF,
			[]string{"checkpoint-10"}, "checkpoint-10/trainer_state.json"},
		{"generic files", map[string]string{"run-a/w.bin": "a", "single.bin": "b", ".hidden": "c"}, LayoutFiles,
			[]string{"run-a", "single.bin"}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			root := t.TempDir()
			files(t, root, tt.files)
			for _, layout := range []string{tt.layout, LayoutAuto} {
				cks, err := Scan(root, layout, 5*time.Second, later)
				if err != nil {
					t.Fatal(err)
				}
				if got := names(cks); !slices.Equal(got, tt.want) {
					t.Fatalf("layout %s: complete = %v, want %v", layout, got, tt.want)
				}
				if cks[0].Layout != tt.layout {
					t.Fatalf("layout %s: detected %s, want %s", layout, cks[0].Layout, tt.layout)
				}
				if tt.marker != "" && !slices.Equal(cks[0].Markers, []string{tt.marker}) {
					t.Fatalf("markers = %v, want [%s]", cks[0].Markers, tt.marker)
				}
				for _, m := range cks[0].Markers {
					if !slices.ContainsFunc(cks[0].Files, func(f File) bool { return f.Path == m }) {
						t.Fatalf("marker %s not among the files %v", m, cks[0].Files)
					}
				}
			}
		})
	}
}

// TestOrbaxFirstSaveInProgress: Orbax's first save, still in its temporary
// folder (0.12 names it "<step>.orbax-checkpoint-tmp", earlier versions add
// "-<timestamp>"), is no checkpoint of any layout, however long it takes.
func TestOrbaxFirstSaveInProgress(t *testing.T) {
	for _, tmp := range []string{"10.orbax-checkpoint-tmp", "10.orbax-checkpoint-tmp-1700000000"} {
		root := t.TempDir()
		files(t, root, map[string]string{tmp + "/default/x": "b"})
		if got := Detect(root, mustReadDir(t, root)); got != LayoutOrbax {
			t.Errorf("%s: detected %s, want orbax", tmp, got)
		}
		for _, layout := range []string{LayoutAuto, LayoutOrbax, LayoutFiles} {
			cks, err := Scan(root, layout, time.Second, time.Now().Add(time.Hour))
			if err != nil || len(cks) != 0 {
				t.Errorf("%s, layout %s: complete = %v (%v), want none", tmp, layout, names(cks), err)
			}
		}
	}
}

func mustReadDir(t *testing.T, dir string) []os.DirEntry {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	return ents
}

// TestQuietPeriod: a layout without a marker waits for the quiet period.
func TestQuietPeriod(t *testing.T) {
	root := t.TempDir()
	files(t, root, map[string]string{"checkpoint-5/model.safetensors": "a"})
	now := time.Now()
	if cks, _ := Scan(root, LayoutHF, 5*time.Second, now); len(cks) != 0 {
		t.Fatalf("complete before the quiet period: %v", names(cks))
	}
	if cks, _ := Scan(root, LayoutHF, 5*time.Second, now.Add(6*time.Second)); len(cks) != 1 {
		t.Fatalf("not complete after the quiet period")
	}
}

func TestStepOf(t *testing.T) {
	for name, want := range map[string]int64{"step-100": 100, "global_step20": 20, "epoch=3-step=4000.ckpt": 4000,
		"iter_0000500": 500, "checkpoint-7": 7, "final": -1, "100": 100} {
		if got := stepOf(name); got != want {
			t.Errorf("stepOf(%q) = %d, want %d", name, got, want)
		}
	}
}

func TestSafePath(t *testing.T) {
	for p, ok := range map[string]bool{"a/b.pt": true, "step-1/.metadata": true, "../x": false, "a/../../x": false,
		"/etc/passwd": false, "a//b": false, "./a": false, "": false, "a\\b": false, "..": false, "a/./b": false} {
		if err := SafePath(p); (err == nil) != ok {
			t.Errorf("SafePath(%q) = %v, want ok %v", p, err, ok)
		}
	}
}

func TestManifestValidate(t *testing.T) {
	good := Manifest{Version: 1, Name: "step-1", Bytes: 3, Files: []ManifestFile{{Path: "step-1/a", Size: 3,
		SHA256: "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"}}}
	if err := good.Validate(); err != nil {
		t.Fatal(err)
	}
	bad := map[string]func(*Manifest){
		"escaping path":  func(m *Manifest) { m.Files[0].Path = "../../etc/cron.d/x" },
		"absolute path":  func(m *Manifest) { m.Files[0].Path = "/etc/x" },
		"bad sha":        func(m *Manifest) { m.Files[0].SHA256 = "zz" },
		"size mismatch":  func(m *Manifest) { m.Bytes = 4 },
		"reserved name":  func(m *Manifest) { m.Name = "latest" },
		"name with dirs": func(m *Manifest) { m.Name = "a/b" },
		"version":        func(m *Manifest) { m.Version = 9 },
		"no files":       func(m *Manifest) { m.Files = nil; m.Bytes = 0 },
	}
	for name, mutate := range bad {
		m := good
		m.Files = slices.Clone(good.Files)
		mutate(&m)
		if err := m.Validate(); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

func FuzzParseManifest(f *testing.F) {
	f.Add([]byte(`{"version":1,"name":"s","bytes":1,"files":[{"path":"s/a","size":1,"sha256":"ca978112ca1bbdcafac231b39a23dc4da786eff8147c4e72b9807785afee48bb"}]}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := ParseManifest(b)
		if err != nil {
			return
		}
		for _, fl := range m.Files {
			if SafePath(fl.Path) != nil {
				t.Fatalf("accepted unsafe path %q", fl.Path)
			}
		}
	})
}

// A DCP folder saved again (a fixed folder name, the same step after a
// restart): while its shards are rewritten the old .metadata is still
// there, and a save that dies midway leaves it so. Such a folder is not a
// complete checkpoint: DCP writes .metadata after every shard, so a shard
// newer than it belongs to a save whose .metadata is not written yet.
func TestDCPSavedAgainIncompleteUntilItsMetadata(t *testing.T) {
	root := t.TempDir()
	files(t, root, map[string]string{"last/__0_0.distcp": "old", "last/.metadata": "old"})
	old := time.Now().Add(-time.Minute)
	os.Chtimes(filepath.Join(root, "last", "__0_0.distcp"), old, old)
	os.Chtimes(filepath.Join(root, "last", ".metadata"), old, old)
	if got := names(scanned(t, root)); !slices.Equal(got, []string{"last"}) {
		t.Fatalf("before the new save: %v", got)
	}
	os.WriteFile(filepath.Join(root, "last", "__0_0.distcp"), []byte("new, half"), 0o644) // the new save, midway
	if got := names(scanned(t, root)); len(got) != 0 {
		t.Fatalf("mid-save over an old .metadata: %v complete", got)
	}
	os.WriteFile(filepath.Join(root, "last", ".metadata"), []byte("new"), 0o644)
	if got := names(scanned(t, root)); !slices.Equal(got, []string{"last"}) {
		t.Fatalf("after its .metadata: %v", got)
	}
}

func scanned(t *testing.T, root string) []Checkpoint {
	t.Helper()
	cks, err := Scan(root, LayoutDCP, 0, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	return cks
}
