package storage

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/preemptd/preemptd/internal/redact"
)

// part is one slice of a file uploaded on its own.
type part struct {
	N           int // from 0
	Off, Length int64
}

// splitParts cuts size bytes into parts of partSize (the last shorter).
func splitParts(size, partSize int64) []part {
	n := int((size + partSize - 1) / partSize)
	parts := make([]part, n)
	for i := range parts {
		off := int64(i) * partSize
		parts[i] = part{N: i, Off: off, Length: min(partSize, size-off)}
	}
	return parts
}

// eachPart runs put for every part, threads at once; the first error
// stops the rest (see each) and is returned naming its part.
func eachPart(ctx context.Context, parts []part, threads uint, put func(ctx context.Context, p part) error) error {
	return each(ctx, len(parts), threads, func(ctx context.Context, i int) error {
		if err := put(ctx, parts[i]); err != nil {
			return fmt.Errorf("part %d: %w", parts[i].N+1, err)
		}
		return nil
	})
}

// each runs f for 0..n-1, threads at once, and returns the first error.
// After an error no f starts and no request is sent again (withRetries),
// but the requests already sent are left to finish rather than
// cancelled: a request cancelled on the client may still land on the
// server after the caller has listed and deleted what the failed upload
// left (a GCS part, an S3 part after its upload was aborted). Only ctx
// itself ending cancels them.
func each(ctx context.Context, n int, threads uint, f func(ctx context.Context, i int) error) error {
	h := &halt{}
	ctx = context.WithValue(ctx, haltKey{}, h)
	next := make(chan int)
	go func() {
		defer close(next)
		for i := range n {
			if h.Load() {
				return
			}
			select {
			case next <- i:
			case <-ctx.Done():
				return
			}
		}
	}()
	var (
		wg    sync.WaitGroup
		once  sync.Once
		first error
		done  atomic.Int64
	)
	for range min(int(max(threads, 1)), n) {
		wg.Go(func() {
			for i := range next {
				if h.Load() {
					continue
				}
				if err := f(ctx, i); err != nil {
					once.Do(func() { first = err })
					h.Store(true)
					continue
				}
				done.Add(1)
			}
		})
	}
	wg.Wait()
	if first == nil && done.Load() < int64(n) {
		first = context.Cause(ctx) // ended before every f ran
	}
	return first
}

// halt is set once one of each's calls has failed.
type halt struct{ atomic.Bool }

type haltKey struct{}

// halted says whether the each that ctx came from has failed already.
func halted(ctx context.Context) bool {
	h, ok := ctx.Value(haltKey{}).(*halt)
	return ok && h.Load()
}

// deleteEach deletes the named objects with del, threads at once (GCS and
// Azure delete one object a request).
func deleteEach(ctx context.Context, names []string, threads uint, del func(ctx context.Context, name string) error) error {
	return each(ctx, len(names), threads, func(ctx context.Context, i int) error {
		if err := del(ctx, names[i]); err != nil {
			return fmt.Errorf("delete %s: %w", names[i], err)
		}
		return nil
	})
}

// readBody streams an answer's body into w and closes it.
func readBody(w io.Writer, resp *http.Response) error {
	defer resp.Body.Close()
	_, err := io.Copy(w, resp.Body)
	return err
}

// section reads p of f.
func section(f *os.File, p part) *io.SectionReader { return io.NewSectionReader(f, p.Off, p.Length) }

// Retries of one request to GCS or Azure (minio-go retries S3's itself):
// a network error, 408, 429 or 5xx is tried again after a growing pause,
// up to maxAttempts in all, while ctx lasts. A conditional create is sent
// once: had its first attempt landed, a second would report the key taken.
const maxAttempts = 5

// retryable says whether an answer with this status may succeed if sent again.
func retryable(status int) bool {
	return status == http.StatusRequestTimeout || status == http.StatusTooManyRequests || status >= 500
}

// final marks an error that sending again cannot cure (no token: the
// token source has retried already).
type final struct{ error }

func (f final) Unwrap() error { return f.error }

// withRetries runs attempt (which sends the request afresh, its body made
// anew) until it gets an answer not worth retrying; attempts is 1 for a
// request that must not be repeated.
func withRetries(ctx context.Context, attempts int, attempt func() (*http.Response, error)) (*http.Response, error) {
	pause := 250 * time.Millisecond
	for n := 1; ; n++ {
		resp, err := attempt()
		// A request's URL may carry a SAS: no *url.Error leaves a store whole.
		redact.URLError(err)
		var fin final
		switch {
		case errors.As(err, &fin):
			return nil, fin.error
		case err == nil && !retryable(resp.StatusCode), n >= attempts, ctx.Err() != nil, halted(ctx):
			return resp, err
		case err == nil:
			io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
			resp.Body.Close()
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(pause + rand.N(pause/2)):
		}
		pause = min(2*pause, 4*time.Second)
	}
}
