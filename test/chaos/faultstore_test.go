package chaos

import (
	"bytes"
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/preemptd/preemptd/checkpoint/storage"
)

// Faults a faultStore injects.
var (
	errSlowDown = errors.New("503 Slow Down (injected)")
	errLost     = errors.New("connection reset by peer after the request was sent (injected: the request took effect)")
	errKilled   = errors.New("the node is dead (injected)")
)

// faultStore is one node's view of a store: every call may fail before it
// takes effect (a 503) or after (a lost response), and at its killAt-th
// call the node dies — its context is cancelled, the call takes effect or
// not at random (an upload in flight is left unfinished), and every later
// call fails.
type faultStore struct {
	storage.Store
	p503, pLost float64
	killAt      int64 // the call that kills the node; <0: never
	kill        func()
	interrupted func(key string) // an upload left unfinished; nil when the store tracks its own

	mu   sync.Mutex
	rng  *rand.Rand
	ops  int64
	dead atomic.Bool
}

// roll says what happens to one call: the node dies at it (applied: it
// took effect anyway), fails before it, or loses its answer after.
func (f *faultStore) roll() (die, applied, fail503, lose bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	n := f.ops
	f.ops++
	if n == f.killAt {
		return true, f.rng.IntN(2) == 0, false, false
	}
	return false, false, f.rng.Float64() < f.p503, f.rng.Float64() < f.pLost
}

func (f *faultStore) do(ctx context.Context, key string, upload, mutates bool, op func(ctx context.Context) error) error {
	if f.dead.Load() {
		return errKilled
	}
	die, applied, fail, lose := f.roll()
	switch {
	case die:
		f.dead.Store(true)
		if f.kill != nil {
			f.kill()
		}
		switch {
		case upload && f.interrupted != nil:
			f.interrupted(key)
		case applied && mutates:
			op(context.WithoutCancel(ctx))
		}
		return errKilled
	case ctx.Err() != nil:
		return ctx.Err()
	case fail:
		return errSlowDown
	}
	err := op(ctx)
	if err == nil && lose && mutates {
		return errLost
	}
	return err
}

func (f *faultStore) PutFile(ctx context.Context, key string, file *os.File, size int64) error {
	return f.do(ctx, key, true, true, func(ctx context.Context) error { return f.Store.PutFile(ctx, key, file, size) })
}

func (f *faultStore) PutBytes(ctx context.Context, key string, b []byte) error {
	return f.do(ctx, key, false, true, func(ctx context.Context) error { return f.Store.PutBytes(ctx, key, b) })
}

func (f *faultStore) Create(ctx context.Context, key string, b []byte) error {
	return f.do(ctx, key, false, true, func(ctx context.Context) error { return f.Store.Create(ctx, key, b) })
}

func (f *faultStore) Copy(ctx context.Context, dst, src string) error {
	return f.do(ctx, dst, false, true, func(ctx context.Context) error { return f.Store.Copy(ctx, dst, src) })
}

func (f *faultStore) Get(ctx context.Context, key string, w io.Writer) error {
	var buf bytes.Buffer
	err := f.do(ctx, key, false, false, func(ctx context.Context) error { return f.Store.Get(ctx, key, &buf) })
	if err == nil {
		_, err = io.Copy(w, &buf)
	}
	return err
}

func (f *faultStore) List(ctx context.Context, prefix string) ([]storage.Object, error) {
	var out []storage.Object
	err := f.do(ctx, prefix, false, false, func(ctx context.Context) error {
		var err error
		out, err = f.Store.List(ctx, prefix)
		return err
	})
	return out, err
}

// GetVersion and PutIf pass the store's compare-and-swap through, with
// the faults.
func (f *faultStore) GetVersion(ctx context.Context, key string, w io.Writer) (string, error) {
	sw, ok := f.Store.(storage.Swapper)
	if !ok {
		return "", storage.ErrNoSwap
	}
	var buf bytes.Buffer
	var v string
	err := f.do(ctx, key, false, false, func(ctx context.Context) error {
		var err error
		v, err = sw.GetVersion(ctx, key, &buf)
		return err
	})
	if err == nil {
		_, err = io.Copy(w, &buf)
	}
	return v, err
}

func (f *faultStore) PutIf(ctx context.Context, key string, b []byte, version string) error {
	sw, ok := f.Store.(storage.Swapper)
	if !ok {
		return storage.ErrNoSwap
	}
	return f.do(ctx, key, false, true, func(ctx context.Context) error { return sw.PutIf(ctx, key, b, version) })
}

func (f *faultStore) Delete(ctx context.Context, keys ...string) error {
	return f.do(ctx, strings.Join(keys, ","), false, true, func(ctx context.Context) error { return f.Store.Delete(ctx, keys...) })
}

func (f *faultStore) AbortUploads(ctx context.Context, keys ...string) (int, error) {
	var n int
	err := f.do(ctx, strings.Join(keys, ","), false, true, func(ctx context.Context) error {
		var err error
		n, err = f.Store.AbortUploads(ctx, keys...)
		return err
	})
	return n, err
}
