package fakes

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/preemptd/preemptd/checkpoint/storage"
)

// MemStore is an object store in memory, with what preemptd relies on from
// a real one — objects appear whole, a conditional create and replace,
// listings by folder with sizes, times and ETags, multipart uploads an
// interrupted client leaves behind until aborted — for tests that run
// thousands of trials (test/chaos) or thousands of nodes (test/bench).
type MemStore struct {
	mu      sync.Mutex
	objs    map[string]memObj
	uploads map[string]int // key → interrupted multipart uploads
	clock   atomic.Int64
}

type memObj struct {
	b   []byte
	mod time.Time
}

func NewMemStore() *MemStore {
	return &MemStore{objs: map[string]memObj{}, uploads: map[string]int{}}
}

func (m *MemStore) String() string { return "mem://" }

func (m *MemStore) put(key string, b []byte) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.objs[key] = memObj{b: slices.Clone(b), mod: time.Unix(0, m.clock.Add(1))}
}

func (m *MemStore) PutFile(ctx context.Context, key string, f *os.File, size int64) error {
	b, err := io.ReadAll(io.NewSectionReader(f, 0, size))
	if err != nil {
		return err
	}
	if int64(len(b)) != size {
		return fmt.Errorf("mem: %s: %d bytes read, %d meant", key, len(b), size)
	}
	m.put(key, b)
	return nil
}

func (m *MemStore) PutBytes(ctx context.Context, key string, b []byte) error {
	m.put(key, b)
	return nil
}

func (m *MemStore) Create(ctx context.Context, key string, b []byte) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.objs[key]; ok {
		return fmt.Errorf("mem: create %s: %w", key, storage.ErrExists)
	}
	m.objs[key] = memObj{b: slices.Clone(b), mod: time.Unix(0, m.clock.Add(1))}
	return nil
}

func (m *MemStore) Copy(ctx context.Context, dst, src string) error {
	m.mu.Lock()
	o, ok := m.objs[src]
	m.mu.Unlock()
	if !ok {
		return fmt.Errorf("mem: copy %s: %w", src, storage.ErrNotFound)
	}
	m.put(dst, o.b)
	return nil
}

func (m *MemStore) Get(ctx context.Context, key string, w io.Writer) error {
	m.mu.Lock()
	o, ok := m.objs[key]
	m.mu.Unlock()
	if !ok {
		return fmt.Errorf("mem: %s: %w", key, storage.ErrNotFound)
	}
	_, err := io.Copy(w, bytes.NewReader(o.b))
	return err
}

func (m *MemStore) GetRange(ctx context.Context, key string, off, n int64, w io.Writer) error {
	m.mu.Lock()
	o, ok := m.objs[key]
	m.mu.Unlock()
	if !ok {
		return fmt.Errorf("mem: %s: %w", key, storage.ErrNotFound)
	}
	if off < 0 || n < 0 || off+n > int64(len(o.b)) {
		return fmt.Errorf("mem: %s bytes %d-%d of %d: %w", key, off, off+n-1, len(o.b), storage.ErrShortRange)
	}
	_, err := w.Write(o.b[off : off+n])
	return err
}

func (m *MemStore) List(ctx context.Context, prefix string) ([]storage.Object, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []storage.Object
	for k, o := range m.objs {
		if prefix == "" || strings.HasPrefix(k, prefix+"/") {
			out = append(out, storage.Object{Key: k, Size: int64(len(o.b)), ModTime: o.mod, ETag: fmt.Sprint(o.mod.UnixNano())})
		}
	}
	slices.SortFunc(out, func(a, b storage.Object) int { return strings.Compare(a.Key, b.Key) })
	return out, nil
}

func (m *MemStore) Delete(ctx context.Context, keys ...string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, k := range keys {
		delete(m.objs, k)
	}
	return nil
}

func (m *MemStore) AbortUploads(ctx context.Context, keys ...string) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	n := 0
	for _, k := range keys {
		n += m.uploads[k]
		delete(m.uploads, k)
	}
	return n, nil
}

// GetVersion implements storage.Swapper: the object's write number.
func (m *MemStore) GetVersion(ctx context.Context, key string, w io.Writer) (string, error) {
	m.mu.Lock()
	o, ok := m.objs[key]
	m.mu.Unlock()
	if !ok {
		return "", fmt.Errorf("mem: %s: %w", key, storage.ErrNotFound)
	}
	_, err := w.Write(o.b)
	return fmt.Sprint(o.mod.UnixNano()), err
}

// PutIf implements storage.Swapper.
func (m *MemStore) PutIf(ctx context.Context, key string, b []byte, version string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	o, ok := m.objs[key]
	if ok != (version != "") || ok && fmt.Sprint(o.mod.UnixNano()) != version {
		return fmt.Errorf("mem: put %s if unchanged: %w", key, storage.ErrConflict)
	}
	m.objs[key] = memObj{b: slices.Clone(b), mod: time.Unix(0, m.clock.Add(1))}
	return nil
}

// Interrupted leaves an unfinished multipart upload of key behind: what a
// client killed in the middle of one leaves.
func (m *MemStore) Interrupted(key string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.uploads[key]++
}

// LeftUploads is how many unfinished uploads there are.
func (m *MemStore) LeftUploads() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	n := 0
	for _, c := range m.uploads {
		n += c
	}
	return n
}

var _ storage.Swapper = (*MemStore)(nil)
