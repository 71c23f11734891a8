package checkpoint

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/fsnotify/fsnotify"

	"github.com/preemptd/preemptd/agent"
)

// Syncer watches checkpoint.dir and keeps the newest complete checkpoint
// committed in the background (continuous sync); its Emergency step makes
// the one the trainer writes after the signal durable before the deadline.
type Syncer struct {
	Dir       string
	Layout    string
	Quiet     time.Duration
	Committer *Committer
	// Background enables continuous sync (checkpoint.sync).
	Background bool
	// Margin is kept free before the deadline after the estimated upload.
	Margin time.Duration
	Log    *slog.Logger
	// OnComplete, if set, is told of each checkpoint found complete, once
	// per version of it, with its save time: from the first write seen
	// under its folder (or to its file) to its newest file's time; 0 when
	// not measured (found complete at start, or written while unwatched).
	OnComplete func(ck Checkpoint, save time.Duration)

	mu sync.Mutex
	// firstWrite is when the first write under each top-level entry of the
	// folder was seen since its last completion; reported holds the
	// signatures already told to OnComplete (nil before the first scan).
	firstWrite map[string]time.Time
	reported   map[string]string
	seen       []Checkpoint      // complete ones, oldest first, from the last scan
	committed  map[string]string // name → signature committed
	changed    chan struct{}     // closed and replaced after each scan
	loaded     chan struct{}     // closed once Run has cleaned up and read what is committed
	emergency  bool
	bgCancel   context.CancelFunc
	bgDone     chan struct{}
	bgCkpt     *Checkpoint // the background commit's checkpoint
	kick       chan struct{}
	// lastCommit is when the newest commit happened; emergencyResult is
	// what the emergency step committed.
	lastCommit      time.Time
	emergencyResult *agent.CheckpointResult
}

// scanDir scans the folder: a job node's scan includes its parts.
func (s *Syncer) scanDir() ([]Checkpoint, error) {
	if s.Committer.job() {
		return ScanJob(s.Dir, s.Layout, s.Quiet, time.Now())
	}
	return Scan(s.Dir, s.Layout, s.Quiet, time.Now())
}

func (s *Syncer) log() *slog.Logger {
	if s.Log == nil {
		return slog.New(slog.DiscardHandler)
	}
	return s.Log
}

func (s *Syncer) init() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.changed == nil {
		s.changed = make(chan struct{})
		s.loaded = make(chan struct{})
		s.committed = map[string]string{}
		s.kick = make(chan struct{}, 1)
	}
}

// Run watches until ctx ends: fsnotify on the folder and every folder below
// it, and a rescan every half quiet period (which also serves when inotify
// watches run out).
func (s *Syncer) Run(ctx context.Context) error {
	s.init()
	if err := os.MkdirAll(s.Dir, 0o755); err != nil {
		return fmt.Errorf("checkpoint.dir: %w", err)
	}
	if n, err := s.Committer.Cleanup(ctx); err != nil {
		s.log().Warn("could not clean interrupted uploads", "err", err)
	} else if n > 0 {
		s.log().Info("aborted interrupted uploads left by an earlier run", "count", n)
	}
	if name, err := s.Committer.Repair(ctx); err != nil {
		s.log().Warn("could not check the latest pointer", "err", err)
	} else if name != "" {
		s.log().Warn("latest pointed at an older checkpoint than the newest committed one (a crash between manifest and pointer); repaired", "latest", name)
	}
	s.loadCommitted(ctx)
	close(s.loaded)

	w, err := fsnotify.NewWatcher()
	if err != nil {
		return fmt.Errorf("checkpoint watch: %w", err)
	}
	defer w.Close()
	s.addTree(w, s.Dir)
	every := max(s.Quiet/2, 500*time.Millisecond)
	tick := time.NewTicker(every)
	defer tick.Stop()
	settle := time.NewTimer(0)
	// Files that stopped being written are hashed at once, one at a time,
	// while the trainer writes the rest of its checkpoint: the commit then
	// finds their sums ready (Committer.Prehash).
	written := map[string]time.Time{}
	var quietC <-chan time.Time
	var quiet *time.Ticker
	defer func() {
		if quiet != nil {
			quiet.Stop()
		}
	}()
	hashq := make(chan string, 256)
	defer close(hashq)
	go func() {
		for p := range hashq {
			if ctx.Err() == nil {
				_ = s.Committer.Prehash(p) // a failure only means the commit hashes it
			}
		}
	}()
	s.log().Info("watching checkpoints", "dir", s.Dir, "layout", s.Layout, "store", s.Committer.Store.String(),
		"run", s.Committer.Run, "sync", s.Background)
	for {
		select {
		case <-ctx.Done():
			s.stopBackground()
			return ctx.Err()
		case ev, ok := <-w.Events:
			if !ok {
				return errors.New("checkpoint watch closed")
			}
			if ev.Has(fsnotify.Create) {
				if st, err := os.Stat(ev.Name); err == nil && st.IsDir() {
					s.addTree(w, ev.Name)
				}
			}
			if ev.Has(fsnotify.Create) || ev.Has(fsnotify.Write) {
				s.wrote(ev.Name, time.Now())
				written[ev.Name] = time.Now()
				if quiet == nil {
					quiet = time.NewTicker(prehashQuiet / 2)
					quietC = quiet.C
				}
			}
			settle.Reset(settleDelay)
		case now := <-quietC:
			for p, at := range written {
				if now.Sub(at) < prehashQuiet {
					continue
				}
				delete(written, p)
				if st, err := os.Lstat(p); err == nil && st.Mode().IsRegular() {
					select {
					case hashq <- p:
					default: // behind: the commit hashes what is left
					}
				}
			}
			if len(written) == 0 {
				quiet.Stop()
				quiet, quietC = nil, nil
			}
		case err := <-w.Errors:
			s.log().Warn("checkpoint watch error; rescans continue", "err", err)
		case <-settle.C:
			s.scan(ctx)
		case <-tick.C:
			s.scan(ctx)
		case <-s.kick:
			s.scan(ctx)
		}
	}
}

// settleDelay is how long the folder must be still after an event before
// it is scanned: short, since a completion marker is often the last write.
const settleDelay = 25 * time.Millisecond

// prehashQuiet is how long a file goes unwritten before it is hashed ahead
// of its commit.
const prehashQuiet = 50 * time.Millisecond

var warnedWatches sync.Once

func (s *Syncer) addTree(w *fsnotify.Watcher, dir string) {
	_ = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || !d.IsDir() {
			return nil
		}
		if err := w.Add(p); err != nil {
			if errors.Is(err, syscall.ENOSPC) {
				warnedWatches.Do(func() {
					s.log().Warn("inotify watches exhausted; relying on periodic rescans (raise fs.inotify.max_user_watches)")
				})
				return fs.SkipAll
			}
		}
		return nil
	})
}

// loadCommitted marks the checkpoints already committed (by an earlier run
// of preemptd) whose files match what is on disk, so they are not sent again.
func (s *Syncer) loadCommitted(ctx context.Context) {
	ms, _, err := s.Committer.List(ctx)
	if err != nil {
		s.log().Warn("listing committed checkpoints", "err", err)
		return
	}
	cks, err := s.scanDir()
	if err != nil {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, ck := range cks {
		for _, m := range ms {
			if m.Name != ck.Name {
				continue
			}
			saved := m.WrittenAt
			if s.Committer.job() { // this node's part of it
				m.Files = slices.DeleteFunc(m.Files, func(f ManifestFile) bool { return f.Node != s.Committer.Node })
				saved = time.Time{}
				for _, p := range m.Parts {
					if p.Node == s.Committer.Node {
						saved = p.WrittenAt
					}
				}
			}
			// The same files, saved at the same time (a name saved again
			// since its commit is not committed); manifests of earlier
			// releases' jobs say no time for a part.
			if sameFiles(m, ck) && (saved.IsZero() || saved.Equal(ck.ModTime)) {
				s.committed[ck.Name] = ck.Signature()
			}
		}
	}
}

func sameFiles(m Manifest, ck Checkpoint) bool {
	if len(m.Files) != len(ck.Files) {
		return false
	}
	for i, f := range ck.Files {
		if m.Files[i].Path != f.Path || m.Files[i].Size != f.Size {
			return false
		}
	}
	return true
}

// scan looks for complete checkpoints and starts a background commit of
// the newest when it is not committed yet.
func (s *Syncer) scan(ctx context.Context) {
	cks, err := s.scanDir()
	if err != nil {
		s.log().Warn("scanning checkpoints", "err", err)
		return
	}
	s.completed(cks)
	s.mu.Lock()
	s.seen = cks
	close(s.changed)
	s.changed = make(chan struct{})
	if s.bgDone != nil && s.bgCkpt != nil && len(cks) > 0 && newerThan(cks[len(cks)-1], *s.bgCkpt) &&
		s.Committer.WaitingOn(s.bgCkpt.Name) {
		// A job's background commit waiting on the other nodes for an
		// older checkpoint: they move to the newest, and so does this one.
		s.log().Info("a newer checkpoint replaces the one waiting on the job's other nodes", "waiting", s.bgCkpt.Name,
			"newer", cks[len(cks)-1].Name)
		s.bgCancel()
	}
	start := s.Background && !s.emergency && s.bgDone == nil && len(cks) > 0 &&
		s.committed[cks[len(cks)-1].Name] != cks[len(cks)-1].Signature()
	var ck Checkpoint
	if start {
		ck = cks[len(cks)-1]
		bctx, cancel := context.WithCancel(ctx)
		s.bgCancel, s.bgDone, s.bgCkpt = cancel, make(chan struct{}), &ck
		done := s.bgDone
		s.mu.Unlock()
		go func() {
			defer close(done)
			defer cancel()
			s.commit(bctx, ck, "background")
			s.mu.Lock()
			s.bgDone, s.bgCancel, s.bgCkpt = nil, nil, nil
			s.mu.Unlock()
			select {
			case s.kick <- struct{}{}: // a newer one may have come meanwhile
			default:
			}
		}()
		return
	}
	s.mu.Unlock()
}

func (s *Syncer) commit(ctx context.Context, ck Checkpoint, why string) error {
	res, err := s.Committer.Commit(ctx, ck)
	if err != nil {
		if ctx.Err() == nil {
			s.log().Error("checkpoint not committed", "name", ck.Name, "why", why, "err", err)
		}
		return err
	}
	s.mu.Lock()
	s.committed[ck.Name] = ck.Signature()
	s.lastCommit = res.Manifest.CommittedAt
	// What an emergency path commits is its result; so is what a background
	// upload under way at the notice commits while the path runs.
	if why == "emergency" || s.emergency {
		s.emergencyResult = &agent.CheckpointResult{Name: ck.Name, Step: ck.Step, Bytes: res.Manifest.Bytes,
			SentBytes: res.Manifest.SentBytes, CompleteAt: ck.ModTime, CommittedAt: res.Manifest.CommittedAt, Upload: res.Took}
	}
	s.mu.Unlock()
	return nil
}

func (s *Syncer) stopBackground() {
	s.mu.Lock()
	cancel, done := s.bgCancel, s.bgDone
	s.mu.Unlock()
	if cancel != nil {
		cancel()
		<-done
	}
}

// Emergency is the emergency path's checkpoint step.
func (s *Syncer) Emergency() agent.Step { return emergencyStep{s} }

type emergencyStep struct{ s *Syncer }

func (emergencyStep) Name() string { return "checkpoint" }

// Committed implements agent.CheckpointReporter: what this step committed.
func (e emergencyStep) Committed() *agent.CheckpointResult {
	e.s.mu.Lock()
	defer e.s.mu.Unlock()
	return e.s.emergencyResult
}

// LastCommitBefore implements agent.CheckpointReporter.
func (e emergencyStep) LastCommitBefore() time.Time {
	e.s.mu.Lock()
	defer e.s.mu.Unlock()
	return e.s.lastCommit
}

// Run makes the trainer's last checkpoint durable. First, the newest
// complete checkpoint at the signal, when it is not committed and no
// background upload has it (a restart of preemptd during the notice finds
// what its crash left mid-upload; a save completed just before it): it is
// committed at once, ahead of everything. Then, until the trainer has
// exited (or the deadline less the estimated upload and a margin), the
// newest complete checkpoint wins: it commits each checkpoint that
// completes after the signal, ahead of any background upload, and when a
// newer one completes while an older one uploads it lets the older finish
// if there is time for both, else switches to the newer. Without a
// signalled trainer (nothing says when its saves are over) the first new
// checkpoint ends the wait. If no new checkpoint completes, it makes sure
// the newest complete one is durable. The error says why when the
// trainer's new checkpoint did not become durable.
func (e emergencyStep) Run(ctx context.Context, _ agent.Notice) error {
	s := e.s
	s.init()
	s.mu.Lock()
	s.emergency = true // no new background upload from here on
	s.emergencyResult = nil
	s.mu.Unlock()
	defer func() {
		// A background upload cut short leaves a multipart upload behind:
		// abort this node's leftovers once nothing else uploads; then
		// re-arm continuous sync (the path may have been a drill).
		if n, err := s.Committer.Cleanup(context.WithoutCancel(ctx)); err == nil && n > 0 {
			s.log().Info("aborted interrupted uploads", "count", n)
		}
		s.mu.Lock()
		s.emergency = false
		s.mu.Unlock()
		s.poke()
	}()
	// What is complete now (the trainer was signalled just before) is old;
	// scan here rather than trust the watcher, which may not have looked yet.
	before := map[string]string{}
	var atSignal []Checkpoint
	var lastSize int64
	if cks, err := s.scanDir(); err == nil {
		atSignal = cks
		for _, ck := range cks {
			before[ck.Name] = ck.Signature()
			lastSize = ck.Size()
		}
	}
	isNew := func(ck Checkpoint) bool { sig, was := before[ck.Name]; return !was || sig != ck.Signature() }
	exited := agent.TrainerExited(ctx)
	trainerKnown := exited != nil // exited is set to nil once it has fired
	waitUntil := func() time.Time {
		deadline, ok := ctx.Deadline()
		if !ok {
			deadline = time.Now().Add(2 * time.Minute)
		}
		return deadline.Add(-s.estimate(lastSize) - s.Margin)
	}
	// Run's start-up first (the clean-up of an earlier life's uploads, and
	// what is committed): a daemon started during the notice must neither
	// upload beside that clean-up nor send again what is committed.
	select {
	case <-s.loaded:
	case <-time.After(time.Until(waitUntil())):
	case <-ctx.Done():
	}
	var pending *Checkpoint
	s.mu.Lock()
	if n := len(atSignal); n > 0 {
		ck := atSignal[n-1]
		inBackground := s.bgCkpt != nil && s.bgCkpt.Name == ck.Name && s.bgCkpt.Signature() == ck.Signature()
		if s.committed[ck.Name] != ck.Signature() && !inBackground {
			pending = &ck
		}
	}
	s.mu.Unlock()
	s.log().Info("waiting for the trainer's checkpoints", "until", waitUntil(), "trainer_known", exited != nil,
		"uncommitted_first", pending != nil)
	s.poke()

	var done *Checkpoint // the newest committed by this step
	newDone := false     // done completed after the signal
	var failed error
	trainerGone, settled := false, false
	var settle, exitedAt time.Time
	for ctx.Err() == nil {
		fresh, changed := s.newest(before, done)
		if fresh == nil && pending != nil {
			fresh, pending = pending, nil
		}
		if fresh != nil {
			s.stopBackground() // the trainer's new checkpoint goes first
			ck, err := s.commitNewest(ctx, *fresh, before, waitUntil)
			if err != nil {
				failed = fmt.Errorf("checkpoint %s not committed: %w", ck.Name, err)
			} else {
				done, failed = &ck, nil
				newDone = newDone || isNew(ck)
			}
			lastSize = max(lastSize, ck.Size())
			continue // look again at once: a newer one may have completed meanwhile
		}
		if done != nil && newDone && !trainerKnown {
			break // no trainer to wait for: its first new checkpoint is the one
		}
		until := waitUntil()
		if trainerGone {
			if !time.Now().Before(settle) {
				if !settled {
					// One last look once the quiet period has passed.
					settled = true
					s.scan(ctx)
					continue
				}
				break // nothing newer completed after its exit
			}
			if settle.Before(until) {
				until = settle
			}
		}
		if !time.Now().Before(until) {
			break
		}
		select {
		case <-changed:
		case <-exited:
			// The trainer is gone: look again now at what it left, and for
			// the layouts completed by a quiet period, until that has passed.
			trainerGone, exited = true, nil
			exitedAt = time.Now()
			settle = exitedAt
			if s.needsQuiet() {
				settle = settle.Add(s.Quiet + 250*time.Millisecond)
			}
			s.scan(ctx)
		case <-time.After(time.Until(until)):
		case <-ctx.Done():
		}
	}
	deadline, _ := ctx.Deadline()
	noNewer := func(name string) error {
		if trainerGone {
			return fmt.Errorf("the trainer exited at %s without a checkpoint newer than %s; %s is committed and stays latest",
				exitedAt.UTC().Format(time.RFC3339), name, name)
		}
		return fmt.Errorf("no checkpoint newer than %s completed by %s (the deadline %s less %s estimated upload and %s margin); %s is committed and stays latest",
			name, waitUntil().UTC().Format(time.RFC3339), deadline.UTC().Format(time.RFC3339), s.estimate(lastSize).Round(time.Millisecond), s.Margin, name)
	}
	switch {
	case done != nil && newDone:
		if failed != nil {
			s.log().Warn("a newer checkpoint was not committed; the newest committed one stays latest", "latest", done.Name, "err", failed)
		}
		return nil
	case done != nil:
		if failed != nil {
			return fmt.Errorf("%w; %s, complete at the signal, is committed and stays latest", failed, done.Name)
		}
		return noNewer(done.Name)
	case failed != nil:
		return fmt.Errorf("%w; the previous committed checkpoint stays latest", failed)
	}
	// No new checkpoint: make sure the newest complete one is durable.
	s.mu.Lock()
	bg := s.bgDone
	var newest *Checkpoint
	if n := len(s.seen); n > 0 {
		ck := s.seen[n-1]
		newest = &ck
	}
	s.mu.Unlock()
	if bg != nil {
		select {
		case <-bg:
		case <-ctx.Done():
		}
	}
	if newest == nil {
		if trainerGone {
			return fmt.Errorf("the trainer exited at %s and no checkpoint is complete; nothing to commit", exitedAt.UTC().Format(time.RFC3339))
		}
		return fmt.Errorf("no complete checkpoint by %s (the deadline %s less %s estimated upload and %s margin); nothing to commit",
			waitUntil().UTC().Format(time.RFC3339), deadline.UTC().Format(time.RFC3339), s.estimate(lastSize).Round(time.Millisecond), s.Margin)
	}
	s.mu.Lock()
	committed := s.committed[newest.Name] == newest.Signature()
	s.mu.Unlock()
	if !committed {
		if err := s.commit(ctx, *newest, "emergency"); err != nil {
			return fmt.Errorf("no new checkpoint, and the newest complete one, %s, not committed: %w", newest.Name, err)
		}
	}
	return noNewer(newest.Name)
}

// commitNewest commits ck; when a newer checkpoint completes meanwhile and
// there is not time for both before waitUntil, it abandons ck for the newer
// one (the newest wins). It returns the checkpoint it ended with.
func (s *Syncer) commitNewest(ctx context.Context, ck Checkpoint, before map[string]string, waitUntil func() time.Time) (Checkpoint, error) {
	for {
		cctx, cancel := context.WithCancel(ctx)
		res := make(chan error, 1)
		go func() { res <- s.commit(cctx, ck, "emergency") }()
		var superseded *Checkpoint
	wait:
		for {
			_, changed := s.newest(before, &ck)
			select {
			case err := <-res:
				cancel()
				return ck, err
			case <-changed:
				newer, _ := s.newest(before, &ck) // newer than ck, or nil
				if newer == nil {
					continue
				}
				// Both fit? Let this one finish; the newer follows — unless
				// it waits on the job's other nodes, which go to the newer.
				if !s.Committer.WaitingOn(ck.Name) && time.Now().Add(s.estimate(ck.Size())+s.estimate(newer.Size())).Before(waitUntil()) {
					continue
				}
				superseded = newer
				break wait
			}
		}
		cancel()
		<-res
		s.log().Warn("a newer checkpoint completed and there is no time for both; uploading the newer instead",
			"abandoned", ck.Name, "newer", superseded.Name)
		ck = *superseded
	}
}

// needsQuiet says whether checkpoints may be complete only after the quiet
// period (layouts without a completion marker).
func (s *Syncer) needsQuiet() bool {
	if s.Committer.job() {
		return s.Quiet > 0 // a part has no marker of its own
	}
	switch s.Layout {
	case LayoutDCP, LayoutOrbax, LayoutDeepSpeed, LayoutMegatron:
		return false
	}
	return s.Quiet > 0
}

// saveKey is the top-level entry of the folder a path below it belongs to,
// with the temporary names writers use before a rename taken off (Orbax's
// "100.orbax-checkpoint-tmp" or "100.orbax-checkpoint-tmp-…", Hugging Face's "tmp-checkpoint-100",
// ".tmp" and ".partial"), so that the rename keeps the save's start.
func saveKey(rel string) string {
	first, _, _ := strings.Cut(filepath.ToSlash(rel), "/")
	if i := strings.Index(first, ".orbax-checkpoint-tmp"); i >= 0 {
		first = first[:i]
	}
	first = strings.TrimPrefix(first, "tmp-")
	first = strings.TrimSuffix(strings.TrimSuffix(first, ".tmp"), ".partial")
	return first
}

// wrote notes a write at path (an fsnotify event) at time at.
func (s *Syncer) wrote(path string, at time.Time) {
	rel, err := filepath.Rel(s.Dir, path)
	if err != nil || rel == "." || strings.HasPrefix(rel, "..") {
		return
	}
	key := saveKey(rel)
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.firstWrite == nil {
		s.firstWrite = map[string]time.Time{}
	}
	if _, ok := s.firstWrite[key]; !ok {
		s.firstWrite[key] = at
	}
}

// completed tells OnComplete of the checkpoints in cks not told before, the
// newest last; those complete at the first scan only set the start.
func (s *Syncer) completed(cks []Checkpoint) {
	if s.OnComplete == nil {
		return
	}
	type done struct {
		ck   Checkpoint
		save time.Duration
	}
	var tell []done
	s.mu.Lock()
	first := s.reported == nil
	if first {
		s.reported = map[string]string{}
	}
	for _, ck := range cks {
		sig := ck.Signature()
		if s.reported[ck.Name] == sig {
			continue
		}
		s.reported[ck.Name] = sig
		var save time.Duration
		if len(ck.Files) > 0 {
			key := saveKey(ck.Files[0].Path)
			if at, ok := s.firstWrite[key]; ok && !first {
				save = max(ck.ModTime.Sub(at), 0)
			}
			delete(s.firstWrite, key)
		}
		tell = append(tell, done{ck, save})
	}
	s.mu.Unlock()
	if first && len(tell) > 0 {
		tell = tell[len(tell)-1:] // only when the newest was written
	}
	for _, d := range tell {
		s.OnComplete(d.ck, d.save)
	}
}

// poke asks the watcher to scan now.
func (s *Syncer) poke() {
	select {
	case s.kick <- struct{}{}:
	default:
	}
}

// estimate is the time to upload size bytes at the last measured rate
// (100 MB/s before any measurement), with a fifth more for safety.
func (s *Syncer) estimate(size int64) time.Duration {
	rate := s.Committer.Throughput()
	if rate <= 0 {
		rate = 100e6
	}
	return time.Duration(float64(size) / rate * 1.2 * float64(time.Second))
}

// newest returns the newest complete checkpoint (as the watcher's scans
// see them) that was not complete, or was different, at the signal and is
// newer than done (nil for none yet), and the channel closed at the next
// scan.
func (s *Syncer) newest(before map[string]string, done *Checkpoint) (*Checkpoint, <-chan struct{}) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for i := len(s.seen) - 1; i >= 0; i-- {
		ck := s.seen[i]
		if sig, was := before[ck.Name]; was && sig == ck.Signature() {
			continue
		}
		if done != nil && (ck.Signature() == done.Signature() || (ck.Name != done.Name && !newerThan(ck, *done))) {
			return nil, s.changed
		}
		return &ck, s.changed
	}
	return nil, s.changed
}

// newerThan orders checkpoints by step, then by time.
func newerThan(a, b Checkpoint) bool {
	if a.Step != b.Step && a.Step >= 0 && b.Step >= 0 {
		return a.Step > b.Step
	}
	return a.ModTime.After(b.ModTime)
}
