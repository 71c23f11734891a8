package storage

import (
	"context"
	"fmt"
	"io"
	"os"
	"sync"
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
// cancels the rest and is returned naming its part.
func eachPart(ctx context.Context, parts []part, threads uint, put func(ctx context.Context, p part) error) error {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	next := make(chan part)
	go func() {
		defer close(next)
		for _, p := range parts {
			select {
			case next <- p:
			case <-ctx.Done():
				return
			}
		}
	}()
	var wg sync.WaitGroup
	for range min(int(max(threads, 1)), len(parts)) {
		wg.Go(func() {
			for p := range next {
				if err := put(ctx, p); err != nil {
					cancel(fmt.Errorf("part %d: %w", p.N+1, err))
					return
				}
			}
		})
	}
	wg.Wait()
	return context.Cause(ctx)
}

// section reads p of f.
func section(f *os.File, p part) *io.SectionReader { return io.NewSectionReader(f, p.Off, p.Length) }
