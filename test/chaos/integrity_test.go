package chaos

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/preemptd/preemptd/checkpoint"
	"github.com/preemptd/preemptd/checkpoint/storage"
	"github.com/preemptd/preemptd/test/peers"
)

// recorder is a reverse proxy in front of MinIO that records every upload
// request's Content-MD5 and can flip one byte of one part on its way.
type recorder struct {
	mu      sync.Mutex
	uploads []string // "PUT <query> md5=<Content-MD5>"
	flip    atomic.Bool
}

func (r *recorder) start(t *testing.T, upstream string) string {
	u, _ := url.Parse(upstream)
	rp := httputil.NewSingleHostReverseProxy(u)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		if req.Method == http.MethodPut && !strings.HasSuffix(req.URL.Path, ".json") && req.ContentLength > 1024 {
			r.mu.Lock()
			r.uploads = append(r.uploads, req.URL.RawQuery+" md5="+req.Header.Get("Content-MD5")+" crc32c="+req.Header.Get("X-Amz-Checksum-Crc32c"))
			r.mu.Unlock()
			if req.URL.Query().Get("partNumber") == "2" && r.flip.Load() {
				b, _ := io.ReadAll(req.Body)
				b[len(b)/2] ^= 0x01 // one bit, in flight
				req.Body = io.NopCloser(bytes.NewReader(b))
			}
		}
		rp.ServeHTTP(w, req)
	}))
	t.Cleanup(srv.Close)
	return srv.URL
}

// TestEveryPartIntegrityChecked: each part of a multipart upload (and a
// small file's single PUT) carries its Content-MD5, and a part corrupted
// in flight is refused by the server: the commit fails, the previous
// checkpoint stays latest, nothing half-written is left.
func TestEveryPartIntegrityChecked(t *testing.T) {
	for _, mode := range []struct{ checksum, header string }{{"md5", "md5="}, {"auto", "crc32c="}} {
		t.Run(mode.checksum, func(t *testing.T) {
			s3 := peers.StartMinIO(t)
			rec := &recorder{}
			s3.SetEnv(t)
			st, err := storage.Open("s3://"+s3.Bucket+"/chaos", storage.Options{Endpoint: rec.start(t, s3.Endpoint), Region: "us-east-1",
				PartSize: 16 << 20, Threads: 2, Checksum: mode.checksum})
			if err != nil {
				t.Fatal(err)
			}
			root := t.TempDir()
			c := &checkpoint.Committer{Store: st, Run: "sum"}
			ctx := context.Background()
			if _, err := c.Commit(ctx, dcp(t, root, "step-1", 40<<20)); err != nil {
				t.Fatal(err)
			}
			rec.mu.Lock()
			uploads := append([]string(nil), rec.uploads...)
			rec.mu.Unlock()
			parts := 0
			for _, u := range uploads {
				i := strings.Index(u, mode.header)
				if i < 0 || strings.HasPrefix(u[i+len(mode.header):], " ") || strings.HasSuffix(u, mode.header) {
					t.Errorf("upload without its %s checksum: %s", mode.checksum, u)
				}
				if strings.Contains(u, "partNumber=") {
					parts++
				}
			}
			if parts != 3 {
				t.Fatalf("%d parts recorded for a 40 MiB file in 16 MiB parts, want 3: %v", parts, uploads)
			}
			rec.flip.Store(true)
			_, err = c.Commit(ctx, dcp(t, root, "step-2", 40<<20))
			rec.flip.Store(false)
			if err == nil || errors.Is(err, checkpoint.ErrChanged) {
				t.Fatalf("a part with a flipped bit: %v, want the server's refusal", err)
			}
			t.Logf("refused: %v", err)
			intact(t, c, "step-1")
			if left := s3.IncompleteUploads(t); left != 0 {
				t.Fatalf("%d multipart uploads left", left)
			}
			record("storage: one bit of one part flipped in flight (proxy), storage.checksum "+mode.checksum,
				"MinIO refuses the part (its "+strings.TrimSuffix(mode.header, "=")+" does not match); step-1 stays latest; no upload left", t)
		})
	}
}
