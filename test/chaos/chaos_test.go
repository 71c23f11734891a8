// Package chaos injects faults into preemptd's storage, processes and disk
// and checks that nothing is lost: every run ends with either the new
// checkpoint committed intact or the previous one still latest, never a
// torn commit, never an orphaned multipart upload. `make chaos` runs it in
// full and prints a summary table; `make test` runs the short form.
// (Metadata faults are in test/e2e: TestMetadataFaults.)
package chaos

import (
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/preemptd/preemptd/checkpoint"
	"github.com/preemptd/preemptd/checkpoint/storage"
	"github.com/preemptd/preemptd/test/peers"
)

func record(fault, outcome string, t *testing.T) { peers.Chaos(t, fault, outcome) }

func randomFile(t *testing.T, p string, n int) {
	t.Helper()
	os.MkdirAll(filepath.Dir(p), 0o755)
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 1<<20)
	for left := n; left > 0; left -= len(buf) {
		rand.Read(buf)
		f.Write(buf[:min(left, len(buf))])
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
}

// dcp writes a complete DCP checkpoint of size bytes and returns it.
func dcp(t *testing.T, root, name string, size int) checkpoint.Checkpoint {
	t.Helper()
	randomFile(t, filepath.Join(root, name, "__0_0.distcp"), size)
	randomFile(t, filepath.Join(root, name, ".metadata"), 256)
	return scanned(t, checkpoint.Scan, checkpoint.LayoutDCP, root, name)
}

// scanned is checkpoint name as scan finds it complete in root.
func scanned(t *testing.T, scan func(string, string, time.Duration, time.Time) ([]checkpoint.Checkpoint, error), layout, root, name string) checkpoint.Checkpoint {
	t.Helper()
	cks, err := scan(root, layout, 0, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range cks {
		if c.Name == name {
			return c
		}
	}
	t.Fatalf("%s not complete", name)
	return checkpoint.Checkpoint{}
}

func s3Store(t *testing.T, s3 *peers.S3, endpoint string) storage.Store {
	t.Helper()
	s3.SetEnv(t)
	st, err := storage.Open("s3://"+s3.Bucket+"/chaos", storage.Options{Endpoint: endpoint, Region: "us-east-1",
		PartSize: 16 << 20, Threads: 2})
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// intact restores the run's latest and checks it is want, every checksum
// verified by Restore itself.
func intact(t *testing.T, c *checkpoint.Committer, want string) {
	t.Helper()
	m, _, err := c.Restore(context.Background(), t.TempDir(), "")
	if err != nil {
		t.Fatalf("restore latest: %v", err)
	}
	if m.Name != want {
		t.Fatalf("latest is %s, want %s", m.Name, want)
	}
}

// TestConnectionResetsMidUpload: toxiproxy cuts every connection after
// 4 MiB: the commit fails, latest stays, the multipart uploads are aborted;
// once the network heals the same checkpoint commits.
func TestConnectionResetsMidUpload(t *testing.T) {
	s3 := peers.StartMinIO(t)
	x := peers.StartToxiproxy(t)
	proxy := x.Front(t, "minio", s3, 0)
	st := s3Store(t, s3, "http://"+proxy)
	root := t.TempDir()
	c := &checkpoint.Committer{Store: st, Run: "reset"}
	ctx := context.Background()
	if _, err := c.Commit(ctx, dcp(t, root, "step-1", 1<<20)); err != nil {
		t.Fatal(err)
	}
	x.Toxic(t, "minio", "cut", "limit_data", map[string]any{"bytes": 4 << 20})
	big := dcp(t, root, "step-2", 48<<20)
	cctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	_, err := c.Commit(cctx, big)
	cancel()
	x.Remove(t, "minio", "cut")
	if err == nil {
		t.Fatal("the commit succeeded through a connection that is cut every 4 MiB")
	}
	n, cerr := c.Cleanup(ctx)
	if cerr != nil {
		t.Fatal(cerr)
	}
	intact(t, c, "step-1")
	if left := s3.IncompleteUploads(t); left != 0 {
		t.Fatalf("%d multipart uploads left after cleanup", left)
	}
	if _, err := c.Commit(ctx, big); err != nil {
		t.Fatalf("after the network healed: %v", err)
	}
	intact(t, c, "step-2")
	record("storage: connection reset every 4 MiB (toxiproxy limit_data)",
		fmt.Sprintf("commit refused, step-1 stays latest, %d multipart upload(s) aborted; commits once healed", n), t)
}

// TestBandwidthCap: a 16 MB/s cap slows the upload; it still commits intact.
func TestBandwidthCap(t *testing.T) {
	s3 := peers.StartMinIO(t)
	x := peers.StartToxiproxy(t)
	proxy := x.Front(t, "minio", s3, 16*1024)
	c := &checkpoint.Committer{Store: s3Store(t, s3, "http://"+proxy), Run: "slow"}
	res, err := c.Commit(context.Background(), dcp(t, t.TempDir(), "step-1", 24<<20))
	if err != nil {
		t.Fatal(err)
	}
	intact(t, c, "step-1")
	record("storage: bandwidth capped at 16 MB/s per connection (toxiproxy)", fmt.Sprintf("committed intact in %s", res.Took.Round(time.Millisecond)), t)
}

// TestSlowDown503: S3 answers 503 SlowDown to every third part upload; the
// client's retries carry the commit through.
func TestSlowDown503(t *testing.T) {
	s3 := peers.StartMinIO(t)
	u, _ := url.Parse(s3.Endpoint)
	rp := httputil.NewSingleHostReverseProxy(u)
	var parts, refused atomic.Int32
	front := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodPut && r.URL.Query().Get("partNumber") != "" && parts.Add(1)%3 == 0 {
			refused.Add(1)
			// Read the part first: answering before the body is consumed
			// trips a data race inside minio-go's retry (it seeks the part
			// while the transport may still be sending it).
			io.Copy(io.Discard, r.Body)
			w.Header().Set("Content-Type", "application/xml")
			w.WriteHeader(http.StatusServiceUnavailable)
			fmt.Fprint(w, `<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>`)
			return
		}
		rp.ServeHTTP(w, r)
	})}
	addr := fmt.Sprintf("127.0.0.1:%d", peers.FreePort(t))
	l, err := netListen(addr)
	if err != nil {
		t.Fatal(err)
	}
	go front.Serve(l)
	t.Cleanup(func() { front.Close() })
	c := &checkpoint.Committer{Store: s3Store(t, s3, "http://"+addr), Run: "slowdown"}
	if _, err := c.Commit(context.Background(), dcp(t, t.TempDir(), "step-1", 64<<20)); err != nil {
		t.Fatal(err)
	}
	intact(t, c, "step-1")
	if refused.Load() == 0 {
		t.Fatal("no part was refused: the fault was not injected")
	}
	record("storage: 503 SlowDown on every third part", fmt.Sprintf("%d parts refused and retried; committed intact", refused.Load()), t)
}

// TestDiskFull: the directory store on a full filesystem (an 8 MiB tmpfs)
// fails with a clear error and corrupts nothing.
func TestDiskFull(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("mounting a tmpfs needs root")
	}
	mnt := t.TempDir()
	if out, err := runCmd("mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", mnt); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("mount tmpfs: %v %s", err, out)
		}
		t.Skipf("cannot mount a tmpfs here: %s", out)
	}
	t.Cleanup(func() { runCmd("umount", mnt) })
	st, err := storage.NewDir(filepath.Join(mnt, "store"))
	if err != nil {
		t.Fatal(err)
	}
	root := t.TempDir()
	c := &checkpoint.Committer{Store: st, Run: "full"}
	ctx := context.Background()
	if _, err := c.Commit(ctx, dcp(t, root, "step-1", 1<<20)); err != nil {
		t.Fatal(err)
	}
	_, err = c.Commit(ctx, dcp(t, root, "step-2", 16<<20))
	if err == nil || !strings.Contains(err.Error(), "no space left on device") {
		t.Fatalf("commit on a full disk: %v; want a clear no-space error", err)
	}
	intact(t, c, "step-1")
	var tmp []string
	filepath.Walk(mnt, func(p string, info os.FileInfo, err error) error {
		if err == nil && strings.Contains(filepath.Base(p), ".preemptd-tmp-") {
			tmp = append(tmp, p)
		}
		return nil
	})
	if len(tmp) != 0 {
		t.Fatalf("temporary files left on the full disk: %v", tmp)
	}
	record("disk: store filesystem full (8 MiB tmpfs)", "clear error (no space left on device); step-1 intact and latest; no temporary files", t)
}
