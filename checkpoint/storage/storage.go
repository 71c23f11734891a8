// Package storage is preemptd's object store: one interface, a local
// directory (file://, the embedded default) and S3-compatible servers
// through minio-go (s3://, and gs:// through GCS's S3-interoperable
// endpoint). Keys are slash-separated paths below the URL's prefix.
package storage

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"regexp"
	"strings"
	"time"
)

// ErrNotFound is returned for a key that does not exist.
var ErrNotFound = errors.New("not found")

// ErrExists is returned by Create for a key that already exists.
var ErrExists = errors.New("already exists")

// Object is one stored object.
type Object struct {
	Key  string
	Size int64
	// ModTime is when the object was last written, as the store says.
	ModTime time.Time
}

// Store is an object store.
type Store interface {
	// PutFile uploads size bytes of the open file f (read with ReadAt, so
	// in parallel where the store can) to key; the object appears only once
	// every byte is there. The caller opened f (never through a symlink)
	// and checked it is the file it means.
	PutFile(ctx context.Context, key string, f *os.File, size int64) error
	// PutBytes stores b at key, replacing what was there.
	PutBytes(ctx context.Context, key string, b []byte) error
	// Create stores b at key only if nothing is there (a conditional
	// create: S3's If-None-Match: *), else returns ErrExists: of nodes
	// racing to write one key, exactly one wins.
	Create(ctx context.Context, key string, b []byte) error
	// Copy copies src to dst inside the store (server-side where it can).
	Copy(ctx context.Context, dst, src string) error
	// Get streams key into w.
	Get(ctx context.Context, key string, w io.Writer) error
	// List returns every object below prefix.
	List(ctx context.Context, prefix string) ([]Object, error)
	// Delete removes keys; missing ones are not an error.
	Delete(ctx context.Context, keys ...string) error
	// AbortUploads removes the leftovers of interrupted uploads to exactly
	// these keys (multipart uploads, temporary files) and says how many. It
	// never touches another key's upload: nodes of one run share a prefix.
	AbortUploads(ctx context.Context, keys ...string) (int, error)
	// String names the store for logs (never with credentials).
	String() string
}

// Options configure Open.
type Options struct {
	// Endpoint is the S3 endpoint URL (default: AWS S3 for s3://, GCS for gs://).
	Endpoint string
	Region   string
	// IMDSEndpoint is where instance-role credentials are fetched.
	IMDSEndpoint string
	// PartSize and Threads tune multipart uploads.
	PartSize uint64
	Threads  uint
	// Checksum is the per-part check the server makes: auto (CRC32C where
	// the server checks it, else Content-MD5), md5 or crc32c.
	Checksum string
}

// Open returns the store named by rawURL: file:///path, s3://bucket/prefix
// or gs://bucket/prefix.
func Open(rawURL string, o Options) (Store, error) {
	u, err := url.Parse(rawURL)
	if err != nil {
		return nil, fmt.Errorf("storage.url: %w", err)
	}
	switch u.Scheme {
	case "file":
		if u.Host != "" && u.Host != "localhost" {
			return nil, fmt.Errorf("storage.url: %q: a file URL has no host; write file:///path", rawURL)
		}
		if u.Path == "" {
			return nil, fmt.Errorf("storage.url: %q names no directory", rawURL)
		}
		return NewDir(u.Path)
	case "s3", "gs":
		if u.Host == "" {
			return nil, fmt.Errorf("storage.url: %q names no bucket; write %s://bucket/prefix", rawURL, u.Scheme)
		}
		return NewS3(u.Scheme, u.Host, strings.Trim(u.Path, "/"), o)
	}
	return nil, fmt.Errorf("storage.url: %q: scheme must be file, s3 or gs", rawURL)
}

var unsafeElement = regexp.MustCompile(`[^A-Za-z0-9._-]+`)

// SafeElement makes s usable as one element of a key: every run of
// characters other than letters, digits, '.', '_' and '-' becomes '_'.
func SafeElement(s string) string { return unsafeElement.ReplaceAllString(s, "_") }

// checkKey refuses keys that would leave the store's prefix.
func checkKey(key string) error {
	if key == "" || strings.HasPrefix(key, "/") || strings.Contains(key, "\\") || strings.ContainsRune(key, 0) {
		return fmt.Errorf("bad key %q", key)
	}
	for _, part := range strings.Split(key, "/") {
		if part == ".." || part == "." || part == "" {
			return fmt.Errorf("bad key %q", key)
		}
	}
	return nil
}
