// Package checkpoint decides when a training checkpoint is complete, per
// framework layout (torch DCP, Orbax, DeepSpeed, Megatron, Lightning,
// Hugging Face Trainer, or a generic quiet-period rule), watches for new ones
// with fsnotify, and makes them durable in an object store with a commit
// protocol — data, then the framework's marker, then preemptd's manifest,
// then the run's latest pointer — and restores them.
package checkpoint

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Layouts preemptd understands.
const (
	LayoutAuto      = "auto"
	LayoutDCP       = "dcp"
	LayoutOrbax     = "orbax"
	LayoutDeepSpeed = "deepspeed"
	LayoutMegatron  = "megatron"
	LayoutLightning = "lightning"
	LayoutHF        = "hf"
	LayoutFiles     = "files"
)

// Layouts lists the valid checkpoint.layout values.
var Layouts = []string{LayoutAuto, LayoutDCP, LayoutOrbax, LayoutDeepSpeed, LayoutMegatron, LayoutLightning, LayoutHF, LayoutFiles}

// File is one file of a checkpoint, its path relative to the watched root.
type File struct {
	Path    string    `json:"path"`
	Size    int64     `json:"size"`
	ModTime time.Time `json:"-"`
	// Dev and Ino identify the file the scan saw (0 when unknown).
	Dev uint64 `json:"-"`
	Ino uint64 `json:"-"`
}

// Checkpoint is a complete checkpoint found under Root.
type Checkpoint struct {
	// Name identifies it within the run (the folder or file name).
	Name   string
	Layout string
	// Step is parsed from the name; -1 when there is none.
	Step int64
	Root string
	// Files are every file, data and markers, sorted by path.
	Files []File
	// Markers are the framework's completion markers, uploaded after the data.
	Markers []string
	// ModTime is the newest file's modification time.
	ModTime time.Time
	// Part marks a multi-node job's share of a checkpoint whose completion
	// marker another node writes (a DCP folder of .distcp files without
	// .metadata): whole only once the job's marker is (see ScanJob).
	Part bool
}

// Size is the total of the files' sizes.
func (c Checkpoint) Size() int64 {
	var n int64
	for _, f := range c.Files {
		n += f.Size
	}
	return n
}

// Signature changes whenever any file of the checkpoint does.
func (c Checkpoint) Signature() string {
	var b strings.Builder
	for _, f := range c.Files {
		fmt.Fprintf(&b, "%s:%d:%d;", f.Path, f.Size, f.ModTime.UnixNano())
	}
	return b.String()
}

var (
	digits    = regexp.MustCompile(`[0-9]+`)
	orbaxStep = regexp.MustCompile(`^[0-9]+$`)
	// orbaxTmp is Orbax's temporary folder: "<step>.orbax-checkpoint-tmp"
	// (0.12) or "<step>.orbax-checkpoint-tmp-<timestamp>" (earlier).
	orbaxTmp     = regexp.MustCompile(`\.orbax-checkpoint-tmp(-|$)`)
	hfCheckpoint = regexp.MustCompile(`^checkpoint-[0-9]+$`)
)

// stepOf is the last integer in a name, or -1.
func stepOf(name string) int64 {
	all := digits.FindAllString(name, -1)
	if len(all) == 0 {
		return -1
	}
	n, err := strconv.ParseInt(all[len(all)-1], 10, 64)
	if err != nil {
		return -1
	}
	return n
}

// hidden are the names no layout treats as a checkpoint: dot files and the
// temporary names writers use.
func hidden(name string) bool {
	return strings.HasPrefix(name, ".") || strings.HasSuffix(name, ".tmp") || strings.HasSuffix(name, ".partial") ||
		orbaxTmp.MatchString(name)
}

// tree lists the regular files under root/rel, relative to root.
func tree(root, rel string) ([]File, error) {
	var files []File
	base := filepath.Join(root, rel)
	err := filepath.WalkDir(base, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil // deleted while we looked
			}
			return err
		}
		if !d.Type().IsRegular() {
			return nil
		}
		info, err := d.Info()
		if err != nil {
			return nil
		}
		r, _ := filepath.Rel(root, p)
		file := File{Path: filepath.ToSlash(r), Size: info.Size(), ModTime: info.ModTime()}
		if st, ok := info.Sys().(*syscall.Stat_t); ok {
			file.Dev, file.Ino = uint64(st.Dev), st.Ino
		}
		files = append(files, file)
		return nil
	})
	slices.SortFunc(files, func(a, b File) int { return strings.Compare(a.Path, b.Path) })
	return files, err
}

func newest(files []File) time.Time {
	var t time.Time
	for _, f := range files {
		if f.ModTime.After(t) {
			t = f.ModTime
		}
	}
	return t
}

func exists(p string) bool {
	st, err := os.Stat(p)
	return err == nil && st.Mode().IsRegular()
}

// Scan returns the complete checkpoints under root for layout (auto
// chooses by what it sees). quiet is how long a checkpoint must have gone
// unwritten where the layout has no marker.
func Scan(root, layout string, quiet time.Duration, now time.Time) ([]Checkpoint, error) {
	return scan(root, layout, quiet, now, false)
}

// ScanJob is Scan for one node of a multi-node job: beside the complete
// checkpoints, the DCP folders of .distcp shards without .metadata (the
// coordinator, on another node, writes it), once unwritten for quiet, as
// Parts: the committer takes them as whole only after the job's marker is.
func ScanJob(root, layout string, quiet time.Duration, now time.Time) ([]Checkpoint, error) {
	return scan(root, layout, quiet, now, true)
}

func scan(root, layout string, quiet time.Duration, now time.Time, parts bool) ([]Checkpoint, error) {
	ents, err := os.ReadDir(root)
	if err != nil {
		return nil, fmt.Errorf("checkpoint dir: %w", err)
	}
	if layout == LayoutAuto || layout == "" {
		layout = Detect(root, ents)
	}
	var out []Checkpoint
	add := func(name, rel string, markers []string, needQuiet, part bool) error {
		var files []File
		var err error
		if rel == "" {
			files, err = tree(root, name)
		} else {
			files, err = tree(root, rel)
		}
		if err != nil {
			return err
		}
		for _, m := range markers {
			if !slices.ContainsFunc(files, func(f File) bool { return f.Path == m }) {
				fs, err := tree(root, m)
				if err != nil {
					return err
				}
				files = append(files, fs...)
			}
		}
		if len(files) == 0 {
			return nil
		}
		slices.SortFunc(files, func(a, b File) int { return strings.Compare(a.Path, b.Path) })
		mt := newest(files)
		if needQuiet && now.Sub(mt) < quiet {
			return nil
		}
		out = append(out, Checkpoint{Name: name, Layout: layout, Step: stepOf(name), Root: root, Files: files,
			Markers: markers, ModTime: mt, Part: part})
		return nil
	}
	for _, e := range ents {
		if hidden(e.Name()) {
			continue
		}
		name := e.Name()
		var err error
		switch layout {
		case LayoutDCP:
			dir := filepath.Join(root, name)
			switch {
			case !e.IsDir():
			case exists(filepath.Join(dir, ".metadata")):
				if !metadataLast(dir) {
					break // saved again: its new .metadata is not written yet
				}
				err = add(name, "", []string{name + "/.metadata"}, false, false)
			case parts && !exists(filepath.Join(dir, ".metadata.tmp")) && hasDistcp(dir):
				err = add(name, "", nil, true, true) // another node writes .metadata
			}
		case LayoutOrbax:
			if e.IsDir() && orbaxStep.MatchString(name) {
				var markers []string
				for _, m := range []string{"commit_success.txt", "_CHECKPOINT_METADATA"} {
					if exists(filepath.Join(root, name, m)) {
						markers = append(markers, name+"/"+m)
					}
				}
				err = add(name, "", markers, false, false)
			}
		case LayoutHF:
			if e.IsDir() && hfCheckpoint.MatchString(name) && !exists(filepath.Join(root, name, "checkpoint-is-incomplete.txt")) {
				var markers []string
				if exists(filepath.Join(root, name, "trainer_state.json")) {
					markers = []string{name + "/trainer_state.json"}
				}
				err = add(name, "", markers, true, false)
			}
		case LayoutLightning:
			if e.Type().IsRegular() && strings.HasSuffix(name, ".ckpt") {
				err = add(name, "", nil, true, false)
			}
		case LayoutFiles:
			err = add(name, "", nil, true, false)
		}
		if err != nil {
			return nil, err
		}
	}
	switch layout {
	case LayoutDeepSpeed:
		if tag, ok := readMarker(filepath.Join(root, "latest")); ok && safeName(tag) == nil {
			if st, err := os.Stat(filepath.Join(root, tag)); err == nil && st.IsDir() {
				if err := add(tag, "", []string{"latest"}, false, false); err != nil {
					return nil, err
				}
			}
		}
	case LayoutMegatron:
		if it, ok := readMarker(filepath.Join(root, "latest_checkpointed_iteration.txt")); ok {
			dir := "release"
			if it != "release" {
				n, err := strconv.Atoi(it)
				if err != nil {
					break
				}
				dir = fmt.Sprintf("iter_%07d", n)
			}
			if st, err := os.Stat(filepath.Join(root, dir)); err == nil && st.IsDir() {
				if err := add(dir, "", []string{"latest_checkpointed_iteration.txt"}, false, false); err != nil {
					return nil, err
				}
			}
		}
	}
	slices.SortFunc(out, func(a, b Checkpoint) int { return a.ModTime.Compare(b.ModTime) })
	return out, nil
}

func readMarker(p string) (string, bool) {
	b, err := os.ReadFile(p)
	if err != nil || len(b) > 4096 {
		return "", false
	}
	s := strings.TrimSpace(string(b))
	return s, s != ""
}

// Detect names the layout of root from what is in it.
func Detect(root string, ents []fs.DirEntry) string {
	if exists(filepath.Join(root, "latest")) {
		return LayoutDeepSpeed
	}
	if exists(filepath.Join(root, "latest_checkpointed_iteration.txt")) {
		return LayoutMegatron
	}
	var ckpt, hf, orbax, dcp bool
	for _, e := range ents {
		n := e.Name()
		switch {
		case e.IsDir() && orbaxTmp.MatchString(n):
			orbax = true
		case e.IsDir() && orbaxStep.MatchString(n) && (exists(filepath.Join(root, n, "_CHECKPOINT_METADATA")) ||
			exists(filepath.Join(root, n, "commit_success.txt"))):
			orbax = true
		case e.IsDir() && (exists(filepath.Join(root, n, ".metadata")) || exists(filepath.Join(root, n, ".metadata.tmp"))):
			dcp = true
		case e.IsDir() && hfCheckpoint.MatchString(n):
			hf = true
		case e.Type().IsRegular() && strings.HasSuffix(n, ".ckpt"):
			ckpt = true
		}
	}
	if !dcp && !orbax && !hf && !ckpt {
		// Nothing else recognised: a job node's DCP folders hold shards
		// without .metadata (looked for only now: it reads each folder).
		dcp = slices.ContainsFunc(ents, func(e fs.DirEntry) bool { return e.IsDir() && hasDistcp(filepath.Join(root, e.Name())) })
	}
	switch {
	case dcp:
		return LayoutDCP
	case orbax:
		return LayoutOrbax
	case hf:
		return LayoutHF
	case ckpt:
		return LayoutLightning
	}
	return LayoutFiles
}

// metadataLast says whether dir's .metadata is at least as new as every
// shard (*.distcp) beside it, as DCP writes them: a shard newer than it is
// a later save's, over the folder of an earlier one, still in progress (or
// torn), whose .metadata has not replaced the old one yet.
func metadataLast(dir string) bool {
	mst, err := os.Stat(filepath.Join(dir, ".metadata"))
	if err != nil {
		return false
	}
	shards, _ := filepath.Glob(filepath.Join(dir, "*.distcp"))
	for _, s := range shards {
		if st, err := os.Stat(s); err == nil && st.ModTime().After(mst.ModTime()) {
			return false
		}
	}
	return true
}

// hasDistcp says whether dir holds a DCP shard file: a job node other than
// the coordinator has those without .metadata.
func hasDistcp(dir string) bool {
	m, _ := filepath.Glob(filepath.Join(dir, "*.distcp"))
	return len(m) > 0
}
