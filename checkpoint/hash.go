package checkpoint

import (
	"crypto/sha256"
	"encoding/hex"
	"hash"
	"io"
	"os"
	"sync"
	"syscall"
)

// hashWriter writes through to w while hashing.
type hashWriter struct {
	w io.Writer
	h hash.Hash
	n int64
}

func newHashWriter(w io.Writer) *hashWriter { return &hashWriter{w: w, h: sha256.New()} }

func (h *hashWriter) Write(p []byte) (int, error) {
	n, err := h.w.Write(p)
	h.h.Write(p[:n])
	h.n += int64(n)
	return n, err
}

func (h *hashWriter) sum() string { return hex.EncodeToString(h.h.Sum(nil)) }

// fileKey identifies one version of a file: rewritten, its time or size
// (or inode) changes.
type fileKey struct {
	dev, ino uint64
	size     int64
	mtime    int64
}

// versionOf is the version of a file the scan saw.
func versionOf(f File) fileKey {
	return fileKey{dev: f.Dev, ino: f.Ino, size: f.Size, mtime: f.ModTime.UnixNano()}
}

func keyOf(st os.FileInfo) (fileKey, bool) {
	sys, ok := st.Sys().(*syscall.Stat_t)
	if !ok || !st.Mode().IsRegular() {
		return fileKey{}, false
	}
	return fileKey{dev: uint64(sys.Dev), ino: sys.Ino, size: st.Size(), mtime: st.ModTime().UnixNano()}, true
}

type sumEntry struct {
	done chan struct{}
	sum  string
	err  error
}

// maxSums bounds the cache: a few checkpoints' files.
const maxSums = 4096

// sums caches files' SHA-256 by version, so that a checkpoint's files are
// hashed while the trainer still writes the rest of it (Prehash), not
// after it is complete; a version being hashed is waited for, never
// hashed twice.
type sums struct {
	mu sync.Mutex
	m  map[fileKey]*sumEntry
}

// peek returns k's sum when it is known already.
func (s *sums) peek(k fileKey) (string, bool) {
	s.mu.Lock()
	e, ok := s.m[k]
	s.mu.Unlock()
	if !ok {
		return "", false
	}
	select {
	case <-e.done:
		return e.sum, e.err == nil
	default:
		return "", false
	}
}

// get returns k's sum, computing it with compute unless it is known or
// being computed.
func (s *sums) get(k fileKey, compute func() (string, error)) (string, error) {
	s.mu.Lock()
	if s.m == nil {
		s.m = map[fileKey]*sumEntry{}
	}
	if e, ok := s.m[k]; ok {
		s.mu.Unlock()
		<-e.done
		return e.sum, e.err
	}
	if len(s.m) >= maxSums {
		for old, e := range s.m { // drop a finished one
			select {
			case <-e.done:
				delete(s.m, old)
			default:
				continue
			}
			break
		}
	}
	e := &sumEntry{done: make(chan struct{})}
	s.m[k] = e
	s.mu.Unlock()
	e.sum, e.err = compute()
	if e.err != nil {
		s.mu.Lock()
		delete(s.m, k)
		s.mu.Unlock()
	}
	close(e.done)
	return e.sum, e.err
}

// Prehash hashes the file at path (never through a symlink) into the
// cache the next commit reads; a file that changes while it is read is not
// cached.
func (c *Committer) Prehash(path string) error {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NOFOLLOW, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return err
	}
	k, ok := keyOf(st)
	if !ok {
		return nil
	}
	_, err = c.sums.get(k, func() (string, error) {
		h := sha256.New()
		n, err := io.Copy(h, io.NewSectionReader(f, 0, k.size+1))
		if err != nil {
			return "", err
		}
		if st2, err := f.Stat(); err != nil || n != k.size || st2.ModTime().UnixNano() != k.mtime || st2.Size() != k.size {
			return "", ErrChanged
		}
		return hex.EncodeToString(h.Sum(nil)), nil
	})
	return err
}
