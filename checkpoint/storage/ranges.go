package storage

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"

	"github.com/minio/minio-go/v7"
)

// ErrShortRange is returned by GetRange when the store sent fewer bytes
// than the range holds (a connection cut mid-body, an object shorter than
// the caller believed): the caller asks again, never keeps the bytes.
var ErrShortRange = errors.New("fewer bytes than the range holds")

// rangeHeader is the HTTP Range of n bytes from off.
func rangeHeader(off, n int64) string { return fmt.Sprintf("bytes=%d-%d", off, off+n-1) }

// copyRange copies exactly n bytes from r into w.
func copyRange(w io.Writer, r io.Reader, key string, off, n int64) error {
	got, err := io.CopyN(w, r, n)
	switch {
	case errors.Is(err, io.EOF) || (err == nil && got < n):
		return fmt.Errorf("storage: get %s bytes %d-%d: %d of %d bytes: %w", key, off, off+n-1, got, n, ErrShortRange)
	case err != nil:
		return fmt.Errorf("storage: get %s bytes %d-%d: %w", key, off, off+n-1, err)
	}
	return nil
}

// readRange copies the body of a ranged GET's answer: a 206 with the
// range, or a 200 with exactly the object when the range was all of it. A
// server that ignored the Range header (a 200 with more) is refused: its
// first bytes are not the range's.
func readRange(w io.Writer, resp *http.Response, key string, off, n int64) error {
	defer resp.Body.Close()
	whole := resp.StatusCode == http.StatusOK && off == 0 && resp.ContentLength == n
	if resp.StatusCode != http.StatusPartialContent && !whole {
		return fmt.Errorf("storage: get %s bytes %d-%d: the server answered %s (%d bytes) instead of the range",
			key, off, off+n-1, resp.Status, resp.ContentLength)
	}
	return copyRange(w, resp.Body, key, off, n)
}

// GetRange implements Store: a slice of the file.
func (d *Dir) GetRange(ctx context.Context, key string, off, n int64, w io.Writer) error {
	if n == 0 {
		return nil
	}
	f, err := d.open(key)
	if err != nil {
		return err
	}
	defer f.Close()
	return copyRange(w, ctxReader{ctx, io.NewSectionReader(f, off, n)}, key, off, n)
}

// GetRange implements Store: a GET with a Range header (minio-go retries
// what fails before the body starts).
func (s *S3) GetRange(ctx context.Context, key string, off, n int64, w io.Writer) error {
	if n == 0 {
		return nil
	}
	k, err := s.key(key)
	if err != nil {
		return err
	}
	var o minio.GetObjectOptions
	if err := o.SetRange(off, off+n-1); err != nil {
		return err
	}
	// Core's GetObject hands over the response's body itself (the
	// Client's wraps every Read in a goroutine's round trip).
	body, _, hdr, err := minio.Core{Client: s.c}.GetObject(ctx, s.bucket, k, o)
	if err != nil {
		return notFound(err, key)
	}
	defer body.Close()
	if hdr.Get("Content-Range") == "" && (off != 0 || hdr.Get("Content-Length") != strconv.FormatInt(n, 10)) {
		return fmt.Errorf("storage: get %s bytes %d-%d: the server sent no Content-Range: not the range", key, off, off+n-1)
	}
	return notFound(copyRange(w, body, key, off, n), key)
}

// GetRange implements Store: the JSON API's media download with a Range
// header.
func (g *GCS) GetRange(ctx context.Context, key string, off, n int64, w io.Writer) error {
	if n == 0 {
		return nil
	}
	k, err := g.key(key)
	if err != nil {
		return err
	}
	resp, err := g.send(ctx, http.MethodGet, g.objectURL(k)+"?alt=media", http.Header{"Range": {rangeHeader(off, n)}}, nil, 0)
	if err != nil {
		return fmt.Errorf("storage: get %s: %w", key, err)
	}
	return readRange(w, resp, key, off, n)
}

// GetRange implements Store: Get Blob with x-ms-range.
func (a *Azure) GetRange(ctx context.Context, key string, off, n int64, w io.Writer) error {
	if n == 0 {
		return nil
	}
	b, err := a.name(key)
	if err != nil {
		return err
	}
	resp, err := a.do(ctx, http.MethodGet, a.blobURL(b), http.Header{"x-ms-range": {rangeHeader(off, n)}}, nil, 0)
	if err != nil {
		return fmt.Errorf("storage: get %s: %w", key, err)
	}
	return readRange(w, resp, key, off, n)
}
