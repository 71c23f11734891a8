package checkpoint

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/preemptd/preemptd/checkpoint/storage"
)

// Restore defaults: ranges of 16 MiB, 32 at once. One stream of an object
// store gets a small share of the NIC (tens to a hundred MB/s), so a fast
// NIC needs many; 32 × 16 MiB is also the most a restore holds in flight.
const (
	DefaultRestoreThreads  = 32
	DefaultRestorePartSize = 16 << 20
)

// A restore's leftovers beside each file it has not finished: the bytes so
// far, written in place, and which of its ranges are in.
const (
	partialSuffix = ".preemptd-partial"
	journalSuffix = ".preemptd-partial.json"
)

// RestoreOptions say what to restore and how.
type RestoreOptions struct {
	// Name is the checkpoint (default: the run's latest).
	Name string
	// Node restores only this job node's part and the markers.
	Node string
	// Threads is how many ranges are fetched at once (default
	// DefaultRestoreThreads); PartSize the bytes of one (default
	// DefaultRestorePartSize).
	Threads  int
	PartSize int64
	// Progress, when set, is called with the bytes done so far (kept and
	// fetched) and the total, as they change, from one goroutine at a time.
	Progress func(done, total int64)
}

// Restored says what a restore did.
type Restored struct {
	Manifest Manifest
	// Path is the restored checkpoint's folder (or file).
	Path string
	// Kept are files already in place with the manifest's size and SHA-256;
	// Fetched the files downloaded (Resumed of them continued from an
	// interrupted restore, ResumedBytes already there).
	Kept, Fetched, Resumed                int
	KeptBytes, FetchedBytes, ResumedBytes int64
	// Refetched counts files whose bytes did not match their SHA-256 and
	// were fetched again (a range corrupted on the way, a stale partial).
	Refetched int
	// Stray are files under Path that the checkpoint does not list (left
	// as they are).
	Stray []string
	Took  time.Duration
}

// RestoreInto downloads a committed checkpoint into dir. Every file is
// checked against the manifest's SHA-256 before it takes its name; a file
// already there with the right size and SHA-256 is kept. Large files come
// as many ranges at once, each written into place (pwrite) and hashed in
// order as the ranges before it land; a range that fails is asked for
// again, a file whose bytes do not match is fetched again whole. An
// interrupted restore leaves each unfinished file beside its name with a
// note of the ranges it holds, and the next restore continues from there.
// The layout's markers take their names last, so a restore that stops
// halfway never leaves a checkpoint that looks complete.
func (c *Committer) RestoreInto(ctx context.Context, dir string, o RestoreOptions) (Restored, error) {
	start := time.Now()
	var r Restored
	m, err := c.restoreManifest(ctx, o)
	r.Manifest = m
	if err != nil {
		return r, err
	}
	if o.Threads <= 0 {
		o.Threads = DefaultRestoreThreads
	}
	if o.PartSize <= 0 {
		o.PartSize = DefaultRestorePartSize
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return r, fmt.Errorf("restore: %w", err)
	}
	rs := &restore{c: c, m: m, dir: dir, o: o}
	for _, f := range m.Files {
		rs.total += f.Size
	}
	var fetch []*restoreFile
	for _, f := range m.Files {
		rf, err := rs.prepare(f)
		if err != nil {
			return r, err
		}
		fetch = append(fetch, rf)
	}
	// Files already in place: hashed a few at once (disk-bound).
	all := make([]int, len(fetch))
	for i := range all {
		all[i] = i
	}
	if err := eachOf(ctx, min(o.Threads, 4), all, func(_ context.Context, i int) error { return rs.check(fetch[i]) }); err != nil {
		return r, err
	}
	fetch = slices.DeleteFunc(fetch, func(rf *restoreFile) bool {
		if rf.kept {
			r.Kept++
			r.KeptBytes += rf.f.Size
		}
		return rf.kept
	})
	// A marker of other bytes (a torn save of the same name) goes now: the
	// folder must not look complete while its other files are replaced.
	for _, rf := range fetch {
		if slices.Contains(m.Markers, rf.f.Path) {
			if fi, err := os.Lstat(rf.dst); err == nil && fi.Mode().IsRegular() {
				if err := os.Remove(rf.dst); err != nil {
					return r, fmt.Errorf("restore: %w", err)
				}
			}
		}
	}
	rs.report()
	if err := rs.fetchAll(ctx, fetch); err != nil {
		return r, err
	}
	// Into place: the markers last.
	slices.SortStableFunc(fetch, func(a, b *restoreFile) int {
		return boolCmp(slices.Contains(m.Markers, a.f.Path), slices.Contains(m.Markers, b.f.Path))
	})
	for _, rf := range fetch {
		if err := rf.finish(); err != nil {
			return r, err
		}
		r.Fetched++
		r.FetchedBytes += rf.f.Size - rf.resumed
		if rf.resumed > 0 {
			r.Resumed++
			r.ResumedBytes += rf.resumed
		}
		r.Refetched += rf.refetched
	}
	r.Path = filepath.Join(dir, m.Name)
	r.Stray = stray(r.Path, m)
	r.Took = time.Since(start)
	return r, nil
}

func boolCmp(a, b bool) int {
	switch {
	case a == b:
		return 0
	case a:
		return 1
	}
	return -1
}

// restoreManifest is the manifest to restore: the named one or the newest,
// cut to one node's part when o.Node is set.
func (c *Committer) restoreManifest(ctx context.Context, o RestoreOptions) (Manifest, error) {
	var m Manifest
	var err error
	if o.Name == "" {
		m, err = c.newest(ctx)
	} else {
		m, err = c.manifest(ctx, o.Name)
		if errors.Is(err, storage.ErrNotFound) {
			return m, fmt.Errorf("checkpoint %q of run %q is not committed (no manifest)", o.Name, c.Run)
		}
	}
	if err != nil || o.Node == "" {
		return m, err
	}
	var nodes []string
	for _, p := range m.Parts {
		nodes = append(nodes, p.Node)
	}
	if !slices.Contains(nodes, o.Node) {
		return m, fmt.Errorf("restore --part: checkpoint %s has no part of node %q (its parts: %s)", m.Name, o.Node, strings.Join(nodes, ", "))
	}
	m.Files = slices.DeleteFunc(slices.Clone(m.Files), func(f ManifestFile) bool {
		return f.Node != o.Node && !slices.Contains(m.Markers, f.Path)
	})
	m.Bytes = 0
	for _, f := range m.Files {
		m.Bytes += f.Size
	}
	return m, nil
}

// restore is one RestoreInto under way.
type restore struct {
	c     *Committer
	m     Manifest
	dir   string
	o     RestoreOptions
	total int64
	done  atomic.Int64
	mu    sync.Mutex // serialises Progress
}

func (rs *restore) report() {
	if rs.o.Progress == nil {
		return
	}
	rs.mu.Lock()
	defer rs.mu.Unlock()
	rs.o.Progress(rs.done.Load(), rs.total)
}

// restoreFile is one file of a restore.
type restoreFile struct {
	rs        *restore
	f         ManifestFile
	key       string // its object
	dst       string
	kept      bool
	resumed   int64 // bytes already in the partial file when this restore began
	journal   journal
	parts     int
	out       *os.File
	mu        sync.Mutex
	landed    chan int // parts as they land, for the hasher
	hashed    chan error
	refetched int
}

// journal is the note beside a partial file: which of its ranges are in.
type journal struct {
	Object   string `json:"object"`
	Size     int64  `json:"size"`
	SHA256   string `json:"sha256"`
	PartSize int64  `json:"part_size"`
	Done     []bool `json:"done"`
}

// prepare checks f's path and makes its folder.
func (rs *restore) prepare(f ManifestFile) (*restoreFile, error) {
	if err := SafePath(f.Path); err != nil {
		return nil, err
	}
	dst := filepath.Join(rs.dir, filepath.FromSlash(f.Path))
	// Nothing of the checkpoint is written through a symbolic link that
	// the folder holds: it would land outside dir.
	for p := filepath.Dir(dst); len(p) > len(rs.dir); p = filepath.Dir(p) {
		if fi, err := os.Lstat(p); err == nil && fi.Mode()&fs.ModeSymlink != 0 {
			return nil, fmt.Errorf("restore: %s is a symbolic link; restore into a folder without one", p)
		}
	}
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return nil, fmt.Errorf("restore: %w", err)
	}
	parts := int((f.Size + rs.o.PartSize - 1) / rs.o.PartSize)
	return &restoreFile{rs: rs, f: f, key: runKey(rs.c.Run, rs.m.Name) + "/" + rs.m.Object(f), dst: dst, parts: parts}, nil
}

// check says whether the file in place is already the manifest's.
func (rs *restore) check(rf *restoreFile) error {
	fi, err := os.Lstat(rf.dst)
	if err != nil || !fi.Mode().IsRegular() || fi.Size() != rf.f.Size {
		return nil
	}
	sum, err := fileSHA256(rf.dst)
	if err != nil {
		return nil // unreadable: fetched again, and replaced
	}
	if sum == rf.f.SHA256 {
		rf.kept = true
		rs.done.Add(rf.f.Size)
	}
	return nil
}

func fileSHA256(p string) (string, error) {
	f, err := os.Open(p)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// open opens the partial file, continuing an interrupted restore of the
// same object where its journal says which ranges are in.
func (rf *restoreFile) open(fresh bool) error {
	part, note := rf.dst+partialSuffix, rf.dst+journalSuffix
	want := journal{Object: rf.key, Size: rf.f.Size, SHA256: rf.f.SHA256, PartSize: rf.rs.o.PartSize}
	if !fresh {
		var j journal
		b, err := os.ReadFile(note)
		if fi, serr := os.Lstat(part); err == nil && serr == nil && fi.Mode().IsRegular() && fi.Size() == rf.f.Size &&
			json.Unmarshal(b, &j) == nil && j.Object == want.Object && j.Size == want.Size && j.SHA256 == want.SHA256 &&
			j.PartSize == want.PartSize && len(j.Done) == rf.parts {
			if rf.out, err = os.OpenFile(part, os.O_RDWR, 0); err == nil {
				rf.journal = j
				for i, d := range j.Done {
					if d {
						rf.resumed += rf.partLen(i)
					}
				}
				return nil
			}
		}
	}
	os.Remove(note)
	out, err := os.OpenFile(part, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return fmt.Errorf("restore %s: %w", rf.f.Path, err)
	}
	if err := out.Truncate(rf.f.Size); err != nil {
		out.Close()
		return fmt.Errorf("restore %s: %w", rf.f.Path, err)
	}
	rf.out, rf.resumed = out, 0
	want.Done = make([]bool, rf.parts)
	rf.journal = want
	return nil
}

func (rf *restoreFile) partLen(i int) int64 {
	off := int64(i) * rf.rs.o.PartSize
	return min(rf.rs.o.PartSize, rf.f.Size-off)
}

// saveJournal writes the note of which ranges are in (the caller holds mu).
func (rf *restoreFile) saveJournal() error {
	b, _ := json.Marshal(rf.journal)
	tmp := rf.dst + journalSuffix + ".tmp"
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, rf.dst+journalSuffix)
}

// finish gives the verified file its name.
func (rf *restoreFile) finish() error {
	if err := os.Rename(rf.dst+partialSuffix, rf.dst); err != nil {
		return fmt.Errorf("restore %s: %w", rf.f.Path, err)
	}
	os.Remove(rf.dst + journalSuffix)
	return nil
}

// task is one range of one file.
type task struct {
	rf   *restoreFile
	part int
}

// fetchAll fetches every file, ranges of several files at once. A file
// whose bytes do not match its SHA-256 is fetched once more from scratch
// (twice when the first try continued an interrupted restore).
func (rs *restore) fetchAll(ctx context.Context, files []*restoreFile) error {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	tasks := make(chan task)
	var workers sync.WaitGroup
	for range rs.o.Threads {
		workers.Go(func() {
			for t := range tasks {
				if err := t.rf.fetchPart(ctx, t.part); err != nil {
					cancel(err)
				}
			}
		})
	}
	// One goroutine per file feeds its ranges and waits for its hash. The
	// files take turns to feed, in order, so that the workers finish one
	// file's ranges before most of the next's: its hash then runs while
	// the next file downloads, rather than all of them at the end. Small
	// files overlap: a file's turn ends once its ranges are handed out.
	var feeders sync.WaitGroup
	ahead := make(chan struct{}, 2*max(rs.o.Threads, 4))
	turn := make(chan struct{})
	close(turn)
	for _, rf := range files {
		select {
		case ahead <- struct{}{}:
		case <-ctx.Done():
		}
		if ctx.Err() != nil {
			break
		}
		mine, next := turn, make(chan struct{})
		turn = next
		feeders.Go(func() {
			defer func() { <-ahead }()
			if err := rf.fetch(ctx, tasks, mine, next); err != nil {
				cancel(err)
			}
		})
	}
	feeders.Wait()
	close(tasks)
	workers.Wait()
	if err := context.Cause(ctx); err != nil {
		for _, rf := range files {
			if rf.out != nil {
				rf.out.Close()
			}
		}
		return err
	}
	return nil
}

// fetch fetches rf's missing ranges (handing them to the workers on tasks)
// while a hasher reads the ranges back in order as they land.
func (rf *restoreFile) fetch(ctx context.Context, tasks chan<- task, turn <-chan struct{}, next chan<- struct{}) error {
	passed := false
	pass := func() {
		if !passed {
			close(next)
			passed = true
		}
	}
	defer pass()
	select {
	case <-turn:
	case <-ctx.Done():
		return context.Cause(ctx)
	}
	tries := 2
	fresh := false
	for try := 0; ; try++ {
		if err := rf.open(fresh); err != nil {
			return err
		}
		if rf.resumed > 0 {
			tries = 3 // a stale partial costs one more
		}
		rf.rs.done.Add(rf.resumed)
		rf.landed = make(chan int, rf.parts)
		rf.hashed = make(chan error, 1)
		go rf.hash(ctx)
		for i := range rf.parts {
			if rf.journal.Done[i] {
				rf.landed <- i
				continue
			}
			select {
			case tasks <- task{rf, i}:
			case <-ctx.Done():
				return context.Cause(ctx)
			}
		}
		pass()
		var err error
		select {
		case err = <-rf.hashed:
		case <-ctx.Done():
			return context.Cause(ctx)
		}
		cerr := rf.out.Close()
		if err == nil {
			return cerr
		}
		var mismatch checksumError
		if !errors.As(err, &mismatch) {
			return err
		}
		rf.rs.done.Add(-rf.f.Size)
		rf.rs.report()
		if try+1 >= tries {
			os.Remove(rf.dst + partialSuffix) // nothing in it is worth continuing from
			os.Remove(rf.dst + journalSuffix)
			return fmt.Errorf("restore %s: %w (fetched %d times; the store holds other bytes than the manifest names)", rf.f.Path, err, try+1)
		}
		rf.rs.c.log().Warn("restored bytes do not match the manifest; fetching the file again", "file", rf.f.Path, "err", err)
		rf.refetched++
		fresh = true
	}
}

type checksumError struct{ got, want string }

func (e checksumError) Error() string {
	return fmt.Sprintf("checksum mismatch (got sha256 %s, manifest says %s)", e.got, e.want)
}

// hash reads rf's ranges back in order as they land and checks the whole.
func (rf *restoreFile) hash(ctx context.Context) {
	h := sha256.New()
	in := make([]bool, rf.parts)
	next := 0
	for next < rf.parts {
		select {
		case i := <-rf.landed:
			in[i] = true
		case <-ctx.Done():
			rf.hashed <- context.Cause(ctx)
			return
		}
		for next < rf.parts && in[next] {
			off := int64(next) * rf.rs.o.PartSize
			if _, err := io.Copy(h, io.NewSectionReader(rf.out, off, rf.partLen(next))); err != nil {
				rf.hashed <- fmt.Errorf("restore %s: %w", rf.f.Path, err)
				return
			}
			next++
		}
	}
	if sum := hex.EncodeToString(h.Sum(nil)); sum != rf.f.SHA256 {
		rf.hashed <- checksumError{sum, rf.f.SHA256}
		return
	}
	rf.hashed <- nil
}

// fetchPart fetches range i into place, asking again when it fails (the
// store's client retries a request; this retries a body cut short too).
func (rf *restoreFile) fetchPart(ctx context.Context, i int) error {
	off, n := int64(i)*rf.rs.o.PartSize, rf.partLen(i)
	var err error
	for attempt := range 5 {
		if attempt > 0 {
			select {
			case <-time.After(time.Duration(1<<attempt) * 100 * time.Millisecond):
			case <-ctx.Done():
				return context.Cause(ctx)
			}
		}
		w := &placeWriter{f: rf.out, off: off, rs: rf.rs}
		err = rf.rs.c.Store.GetRange(ctx, rf.key, off, n, w)
		if err == nil {
			break
		}
		rf.rs.done.Add(-w.n)
		if ctx.Err() != nil || errors.Is(err, storage.ErrNotFound) {
			break
		}
		rf.rs.c.log().Warn("restore: a range failed; asking again", "file", rf.f.Path, "offset", off, "bytes", n, "attempt", attempt+1, "err", err)
	}
	if err != nil {
		return fmt.Errorf("restore %s: %w", rf.f.Path, err)
	}
	rf.mu.Lock()
	rf.journal.Done[i] = true
	jerr := rf.saveJournal()
	rf.mu.Unlock()
	if jerr != nil {
		return fmt.Errorf("restore %s: %w", rf.f.Path, jerr)
	}
	rf.landed <- i
	rf.rs.report()
	return nil
}

// placeWriter writes a range into place at its offset (pwrite), counting
// the bytes as they arrive.
type placeWriter struct {
	f   *os.File
	off int64
	n   int64
	rs  *restore
}

func (w *placeWriter) Write(p []byte) (int, error) {
	n, err := w.f.WriteAt(p, w.off+w.n)
	w.n += int64(n)
	w.rs.done.Add(int64(n))
	return n, err
}

// placeBufs are ReadFrom's buffers: one a worker at a time.
var placeBufs = sync.Pool{New: func() any { b := make([]byte, placeChunk); return &b }}

// placeChunk is what one pwrite writes. Measured on ext4 (Linux 6.18, a
// 1 GiB restore from MinIO on loopback): 32 KiB writes took 1.09–1.23 s
// whether the memory under the page cache was warm or had sat idle; 1 MiB
// writes 1.0 s warm but 1.7 s idle, and 64–256 KiB 1.4–1.7 s idle (the
// kernel backs larger writes with larger folios, costly to allocate from
// cold memory — and a new machine's memory is cold); 16 KiB 1.2 s.
const placeChunk = 32 << 10

// ReadFrom fills placeChunk before each pwrite, rather than writing
// whatever one read of the body returned (often less).
func (w *placeWriter) ReadFrom(r io.Reader) (int64, error) {
	bp := placeBufs.Get().(*[]byte)
	defer placeBufs.Put(bp)
	buf := *bp
	var total int64
	for {
		n, err := io.ReadFull(r, buf)
		if n > 0 {
			m, werr := w.Write(buf[:n])
			total += int64(m)
			if werr != nil {
				return total, werr
			}
		}
		switch {
		case errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF):
			return total, nil
		case err != nil:
			return total, err
		}
	}
}

// stray lists the files under path that m does not (a folder's only).
func stray(path string, m Manifest) []string {
	listed := map[string]bool{}
	for _, f := range m.Files {
		listed[f.Path] = true
	}
	var out []string
	root := filepath.Dir(path)
	filepath.WalkDir(path, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return nil
		}
		rel, _ := filepath.Rel(root, p)
		if rel = filepath.ToSlash(rel); !listed[rel] {
			out = append(out, rel)
		}
		return nil
	})
	return out
}
