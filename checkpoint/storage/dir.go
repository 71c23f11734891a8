package storage

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// tmpPrefix marks files being written; AbortUploads removes them.
const tmpPrefix = ".preemptd-tmp-"

// Dir is a store in a local directory: every object is a file written to a
// temporary name, synced and renamed into place.
type Dir struct{ root string }

// NewDir opens (and creates) the directory store at root.
func NewDir(root string) (*Dir, error) {
	if err := os.MkdirAll(root, 0o755); err != nil {
		return nil, fmt.Errorf("storage: %w", err)
	}
	return &Dir{root: root}, nil
}

func (d *Dir) String() string { return "file://" + d.root }

func (d *Dir) path(key string) (string, error) {
	if err := checkKey(key); err != nil {
		return "", err
	}
	return filepath.Join(d.root, filepath.FromSlash(key)), nil
}

// write streams r to key through a temporary file, renamed into place.
func (d *Dir) write(ctx context.Context, key string, r io.Reader) error {
	return d.through(ctx, key, r, "write", os.Rename)
}

// through writes r to a temporary file of its own beside key's path,
// synced, then hands it to place (rename, or link for a create); the
// temporary name is removed either way.
func (d *Dir) through(ctx context.Context, key string, r io.Reader, verb string, place func(tmp, p string) error) error {
	p, err := d.path(key)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		return err
	}
	tmp, err := os.CreateTemp(filepath.Dir(p), tmpName(filepath.Base(p))+"*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	_, err = io.Copy(tmp, ctxReader{ctx, r})
	if err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = place(tmp.Name(), p)
	}
	if err != nil {
		return fmt.Errorf("storage: %s %s: %w", verb, key, err)
	}
	return nil
}

type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (c ctxReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.Read(p)
}

// PutFile implements Store.
func (d *Dir) PutFile(ctx context.Context, key string, f *os.File, size int64) error {
	return d.write(ctx, key, io.NewSectionReader(f, 0, size))
}

// PutBytes implements Store.
func (d *Dir) PutBytes(ctx context.Context, key string, b []byte) error {
	return d.write(ctx, key, bytes.NewReader(b))
}

// Create implements Store: the bytes go to a temporary file of this call's
// own, which is then hard-linked to key (link(2) fails when key exists, so
// one writer wins).
func (d *Dir) Create(ctx context.Context, key string, b []byte) error {
	err := d.through(ctx, key, bytes.NewReader(b), "create", os.Link)
	if errors.Is(err, fs.ErrExist) {
		return createErr(key, ErrExists)
	}
	return err
}

// GetVersion implements Swapper: the SHA-256 of the file's bytes.
func (d *Dir) GetVersion(ctx context.Context, key string, w io.Writer) (string, error) {
	var buf bytes.Buffer
	if err := d.Get(ctx, key, &buf); err != nil {
		return "", err
	}
	sum := sha256.Sum256(buf.Bytes())
	_, err := w.Write(buf.Bytes())
	return hex.EncodeToString(sum[:]), err
}

// PutIf implements Swapper: under an exclusive lock (flock) on the folder
// that holds key's file, for every process of this machine (and no file of
// its own left behind), the file is replaced only if its bytes are still
// the version read.
func (d *Dir) PutIf(ctx context.Context, key string, b []byte, version string) error {
	p, err := d.path(key)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		return err
	}
	lf, err := os.Open(filepath.Dir(p))
	if err != nil {
		return fmt.Errorf("storage: put %s if unchanged: %w", key, err)
	}
	defer lf.Close()
	if err := unix.Flock(int(lf.Fd()), unix.LOCK_EX); err != nil {
		return fmt.Errorf("storage: put %s if unchanged: lock: %w", key, err)
	}
	defer unix.Flock(int(lf.Fd()), unix.LOCK_UN)
	cur, err := os.ReadFile(p)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		if version != "" {
			return fmt.Errorf("storage: put %s if unchanged: %w", key, ErrConflict)
		}
	case err != nil:
		return err
	default:
		sum := sha256.Sum256(cur)
		if version != hex.EncodeToString(sum[:]) {
			return fmt.Errorf("storage: put %s if unchanged: %w", key, ErrConflict)
		}
	}
	return d.write(ctx, key, bytes.NewReader(b))
}

// Copy implements Store: a hard link where it can, else a copy.
func (d *Dir) Copy(ctx context.Context, dst, src string) error {
	sp, err := d.path(src)
	if err != nil {
		return err
	}
	dp, err := d.path(dst)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(dp), 0o755); err != nil {
		return err
	}
	tmp := filepath.Join(filepath.Dir(dp), tmpName(filepath.Base(dp))+"link")
	os.Remove(tmp)
	if err := os.Link(sp, tmp); err == nil {
		return os.Rename(tmp, dp)
	}
	f, err := os.Open(sp)
	if err != nil {
		return err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return err
	}
	return d.PutFile(ctx, dst, f, st.Size())
}

// Get implements Store.
func (d *Dir) Get(ctx context.Context, key string, w io.Writer) error {
	f, err := d.open(key)
	if err != nil {
		return err
	}
	defer f.Close()
	_, err = io.Copy(w, ctxReader{ctx, f})
	return err
}

// open opens key's file (ErrNotFound when there is none).
func (d *Dir) open(key string) (*os.File, error) {
	p, err := d.path(key)
	if err != nil {
		return nil, err
	}
	f, err := os.Open(p)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%s: %w", key, ErrNotFound)
	}
	return f, err
}

// List implements Store.
func (d *Dir) List(ctx context.Context, prefix string) ([]Object, error) {
	base := d.root
	if prefix != "" {
		var err error
		if base, err = d.path(strings.TrimSuffix(prefix, "/")); err != nil {
			return nil, err
		}
	}
	var out []Object
	err := filepath.WalkDir(base, func(p string, e fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil
			}
			return err
		}
		if e.IsDir() || strings.HasPrefix(e.Name(), tmpPrefix) {
			return ctx.Err()
		}
		info, err := e.Info()
		if err != nil {
			return nil
		}
		rel, _ := filepath.Rel(d.root, p)
		out = append(out, Object{Key: filepath.ToSlash(rel), Size: info.Size(), ModTime: info.ModTime()})
		return nil
	})
	return out, err
}

// Delete implements Store.
func (d *Dir) Delete(_ context.Context, keys ...string) error {
	for _, k := range keys {
		p, err := d.path(k)
		if err != nil {
			return err
		}
		if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return err
		}
		// Tidy emptied folders up to the root.
		for dir := filepath.Dir(p); dir != d.root && strings.HasPrefix(dir, d.root); dir = filepath.Dir(dir) {
			if os.Remove(dir) != nil {
				break
			}
		}
	}
	return nil
}

// AbortUploads implements Store: the temporary files a crash left for
// these keys (named after the key's file, see write).
func (d *Dir) AbortUploads(_ context.Context, keys ...string) (int, error) {
	n := 0
	for _, key := range keys {
		p, err := d.path(key)
		if err != nil {
			return n, err
		}
		left, _ := filepath.Glob(filepath.Join(filepath.Dir(p), tmpName(filepath.Base(p))+"*"))
		for _, f := range left {
			if os.Remove(f) == nil {
				n++
			}
		}
	}
	return n, nil
}

// tmpName is the prefix of a temporary file written for an object named
// base: the key's own name, so that AbortUploads finds it by key.
func tmpName(base string) string {
	return tmpPrefix + strings.NewReplacer("*", "_", "?", "_", "[", "_").Replace(base) + "."
}
