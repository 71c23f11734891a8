package storage_test

import (
	"bytes"
	"context"
	"crypto/md5"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/preemptd/preemptd/checkpoint/storage"
	"github.com/preemptd/preemptd/test/peers"
)

// env is a Getenv over a fixed map (the stores read their credentials
// through it, never this process's environment).
func env(kv ...string) func(string) string {
	m := map[string]string{}
	for i := 0; i+1 < len(kv); i += 2 {
		m[kv[i]] = kv[i+1]
	}
	return func(k string) string { return m[k] }
}

// backend is one store under test, reached through a proxy that can flip
// one byte of its second part.
type backend struct {
	name  string
	start func(t *testing.T, front func(string) string, o storage.Options) storage.Store
}

// backends are the real servers every store kind is tested against: GCS
// (fake-gcs-server behind a gate that wants the metadata server's tokens),
// Azure (Azurite, Shared Key), and S3 (MinIO and versitygw, whose parts
// carry CRC32C, and versitygw again with Content-MD5).
var backends = []backend{
	{"gcs", func(t *testing.T, front func(string) string, o storage.Options) storage.Store {
		g := peers.StartGCSVM(t)
		o.Endpoint = front(g.Endpoint)
		return g.Open(t, "runs", o)
	}},
	{"azurite", func(t *testing.T, front func(string) string, o storage.Options) storage.Store {
		a := peers.StartAzurite(t)
		o.Endpoint = front(a.Endpoint)
		return a.Open(t, "runs", o)
	}},
	{"minio", func(t *testing.T, front func(string) string, o storage.Options) storage.Store {
		s := peers.StartMinIO(t)
		o.Endpoint = front(s.Endpoint)
		return s.Open(t, "runs", o)
	}},
	{"versitygw", func(t *testing.T, front func(string) string, o storage.Options) storage.Store {
		s := peers.StartVersity(t)
		o.Endpoint = front(s.Endpoint)
		return s.Open(t, "runs", o)
	}},
	{"versitygw-md5", func(t *testing.T, front func(string) string, o storage.Options) storage.Store {
		s := peers.StartVersity(t)
		o.Endpoint, o.Checksum = front(s.Endpoint), "md5" // Content-MD5 instead of CRC32C
		return s.Open(t, "runs", o)
	}},
}

func open(t *testing.T, u string, o storage.Options) storage.Store {
	t.Helper()
	st, err := storage.Open(u, o)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

func direct(u string) string { return u }

func randomFile(t *testing.T, n int) (*os.File, []byte) {
	t.Helper()
	b := make([]byte, n)
	rand.Read(b)
	p := filepath.Join(t.TempDir(), "f")
	if err := os.WriteFile(p, b, 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f, b
}

func get(t *testing.T, st storage.Store, key string) []byte {
	t.Helper()
	var buf bytes.Buffer
	if err := st.Get(t.Context(), key, &buf); err != nil {
		t.Fatalf("get %s: %v", key, err)
	}
	return buf.Bytes()
}

// TestStoreContract: every store kind, against its real server, keeps
// Store's promises: a file of several parts and a small one read back
// byte for byte, a conditional create wins once, a server-side copy, a
// listing of exactly what was put (no upload temporaries), deletes, and
// ErrNotFound for what is not there.
func TestStoreContract(t *testing.T) {
	for _, b := range backends {
		t.Run(b.name, func(t *testing.T) {
			st := b.start(t, direct, storage.Options{PartSize: 5 << 20, Threads: 4})
			ctx := t.Context()
			big, bigBytes := randomFile(t, 21<<20+123) // 5 parts
			small, smallBytes := randomFile(t, 100<<10)
			if err := st.PutFile(ctx, "ck/step-1/shard", big, int64(len(bigBytes))); err != nil {
				t.Fatal(err)
			}
			if err := st.PutFile(ctx, "ck/step-1/.metadata", small, int64(len(smallBytes))); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(get(t, st, "ck/step-1/shard"), bigBytes) || !bytes.Equal(get(t, st, "ck/step-1/.metadata"), smallBytes) {
				t.Fatal("read back differs")
			}
			// An empty file, and a name with a space and non-ASCII letters.
			empty, _ := randomFile(t, 0)
			if err := st.PutFile(ctx, "odd/étape 1/empty", empty, 0); err != nil {
				t.Fatal(err)
			}
			if got := get(t, st, "odd/étape 1/empty"); len(got) != 0 {
				t.Fatalf("empty file read back as %d bytes", len(got))
			}
			if objs, err := st.List(ctx, "odd"); err != nil || len(objs) != 1 || objs[0].Key != "odd/étape 1/empty" || objs[0].Size != 0 {
				t.Fatalf("odd names listed as %+v (%v)", objs, err)
			}
			if err := st.Delete(ctx, "odd/étape 1/empty"); err != nil {
				t.Fatal(err)
			}
			if err := st.Create(ctx, "ck/lock", []byte(`{"a":1}`)); err != nil {
				t.Fatal(err)
			}
			if err := st.Create(ctx, "ck/lock", []byte(`{"b":2}`)); !errors.Is(err, storage.ErrExists) {
				t.Fatalf("second create: %v, want ErrExists", err)
			}
			if got := get(t, st, "ck/lock"); string(got) != `{"a":1}` {
				t.Fatalf("the first create lost: %s", got)
			}
			if err := st.PutBytes(ctx, "ck/latest", []byte("step-1")); err != nil {
				t.Fatal(err)
			}
			if err := st.Copy(ctx, "ck/step-2/shard", "ck/step-1/shard"); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(get(t, st, "ck/step-2/shard"), bigBytes) {
				t.Fatal("copy differs")
			}
			if err := st.Copy(ctx, "ck/step-3/shard", "ck/nothing"); !errors.Is(err, storage.ErrNotFound) {
				t.Fatalf("copy of a missing object: %v, want ErrNotFound", err)
			}
			objs, err := st.List(ctx, "ck")
			if err != nil {
				t.Fatal(err)
			}
			var keys []string
			for _, o := range objs {
				keys = append(keys, o.Key)
				if o.Key == "ck/step-2/shard" && o.Size != int64(len(bigBytes)) {
					t.Fatalf("listed size %d, want %d", o.Size, len(bigBytes))
				}
				if o.ModTime.IsZero() {
					t.Fatalf("%s listed without a time", o.Key)
				}
			}
			slices.Sort(keys)
			want := []string{"ck/latest", "ck/lock", "ck/step-1/.metadata", "ck/step-1/shard", "ck/step-2/shard"}
			if !slices.Equal(keys, want) {
				t.Fatalf("listed %v, want %v", keys, want)
			}
			if all, _ := st.List(ctx, ""); len(all) != len(want) {
				t.Fatalf("the whole prefix lists %d objects, want %d (temporaries left?)", len(all), len(want))
			}
			if err := st.Delete(ctx, "ck/step-1/shard", "ck/never-was"); err != nil {
				t.Fatal(err)
			}
			if err := st.Get(ctx, "ck/step-1/shard", io.Discard); !errors.Is(err, storage.ErrNotFound) {
				t.Fatalf("get after delete: %v, want ErrNotFound", err)
			}
			if n, err := st.AbortUploads(ctx, "ck/step-1/shard"); err != nil || n != 0 {
				t.Fatalf("abort after clean uploads: %d, %v", n, err)
			}
		})
	}
}

// flipper is a reverse proxy that flips one bit in the body of a file's
// second part on its way to the server (S3: partNumber=2; GCS: the
// temporary part 00001; Azure: the block ending -000001), and counts the
// part requests it saw.
type flipper struct {
	flip  atomic.Bool
	parts atomic.Int64
	done  atomic.Bool
}

func (f *flipper) front(t *testing.T) func(string) string {
	return proxied(t, func(w http.ResponseWriter, r *http.Request, rp http.Handler) {
		if r.ContentLength > 1<<20 {
			b, _ := io.ReadAll(r.Body)
			if secondPart(r, b) {
				f.parts.Add(1)
				if f.flip.Load() && !f.done.Swap(true) {
					b[len(b)/2] ^= 0x01
				}
			}
			r.Body = io.NopCloser(bytes.NewReader(b))
		}
		rp.ServeHTTP(w, r)
	})
}

// proxied returns a front for stores' endpoints: a server in front of
// each upstream whose requests serve handles, given the reverse proxy
// to the upstream.
func proxied(t *testing.T, serve func(w http.ResponseWriter, r *http.Request, upstream http.Handler)) func(string) string {
	return func(upstream string) string {
		u, _ := url.Parse(upstream)
		base := u.Path
		u.Path = ""
		rp := httputil.NewSingleHostReverseProxy(u)
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { serve(w, r, rp) }))
		t.Cleanup(srv.Close)
		return srv.URL + base
	}
}

func secondPart(r *http.Request, body []byte) bool { return isPart(r, body, 1) }

// isPart says whether r (its body read) uploads part n (from 0) of a file.
func isPart(r *http.Request, body []byte, n int) bool {
	q := r.URL.Query()
	if q.Get("partNumber") == strconv.Itoa(n+1) {
		return true
	}
	if id, err := base64.StdEncoding.DecodeString(q.Get("blockid")); err == nil && strings.HasSuffix(string(id), fmt.Sprintf("-%06d", n)) {
		return true
	}
	head := body[:min(len(body), 1024)]
	return strings.HasPrefix(r.URL.Path, "/upload/") && bytes.Contains(head, fmt.Appendf(nil, `/%05d"`, n))
}

// TestEveryPartRefusedWhenCorrupted: one bit of one part flipped on the
// wire makes each real server refuse the part (GCS: its CRC32C; Azure:
// the block's Content-MD5; S3: CRC32C or Content-MD5), so the upload
// fails and the key never appears; sent again intact, it goes up.
func TestEveryPartRefusedWhenCorrupted(t *testing.T) {
	for _, b := range backends {
		t.Run(b.name, func(t *testing.T) {
			f := &flipper{}
			st := b.start(t, f.front(t), storage.Options{PartSize: 5 << 20, Threads: 2})
			file, want := randomFile(t, 16<<20)
			f.flip.Store(true)
			err := st.PutFile(t.Context(), "ck/shard", file, int64(len(want)))
			if err == nil {
				t.Fatal("a part with a flipped bit was accepted")
			}
			if f.parts.Load() == 0 || !f.done.Load() {
				t.Fatalf("the proxy never saw the second part (%d)", f.parts.Load())
			}
			t.Logf("refused: %v", err)
			if err := st.Get(t.Context(), "ck/shard", io.Discard); !errors.Is(err, storage.ErrNotFound) {
				t.Fatalf("after a refused part the key reads %v, want ErrNotFound", err)
			}
			if objs, _ := st.List(t.Context(), ""); len(objs) != 0 {
				t.Fatalf("left behind: %v", objs)
			}
			if n, err := st.AbortUploads(t.Context(), "ck/shard"); err != nil || n != 0 {
				t.Fatalf("%d unfinished uploads left (%v)", n, err)
			}
			if err := st.PutFile(t.Context(), "ck/shard", file, int64(len(want))); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(get(t, st, "ck/shard"), want) {
				t.Fatal("read back differs")
			}
			peers.Chaos(t, "storage: one bit of one part flipped in flight ("+b.name+")",
				"the server refuses the part; the key never appears; nothing left; sent intact, it goes up")
		})
	}
}

// TestPartsInFlightLandBeforeCleanup: when one part is refused, the part
// going up beside it is not abandoned: a request the client cancels may
// still reach the server after the failed upload's clean-up, and leave a
// temporary part nobody deletes. The proxy makes that happen whenever it
// can: it holds the first part's bytes until the clean-up has begun (or
// 2 s), then delivers them even if the client has gone. Nothing may be
// left afterwards. (Azure's uncommitted blocks are invisible and
// discarded by the next commit, so there is nothing to leave.)
func TestPartsInFlightLandBeforeCleanup(t *testing.T) {
	for _, b := range backends {
		if b.name == "azurite" {
			continue
		}
		t.Run(b.name, func(t *testing.T) {
			refused := make(chan struct{})
			cleanup := make(chan struct{})
			var once, cleaning sync.Once
			var held atomic.Int64
			delivered := make(chan struct{}, 8)
			front := proxied(t, func(w http.ResponseWriter, r *http.Request, rp http.Handler) {
				if r.ContentLength <= 1<<20 {
					select {
					case <-refused: // a request after the refusal: the clean-up
						cleaning.Do(func() { close(cleanup) })
					default:
					}
					rp.ServeHTTP(w, r)
					return
				}
				body, _ := io.ReadAll(r.Body)
				r.Body = io.NopCloser(bytes.NewReader(body))
				switch {
				case isPart(r, body, 0):
					held.Add(1)
					select {
					case <-cleanup:
					case <-time.After(2 * time.Second):
					}
					// Delivered whole even if the client has gone: the
					// recorder does not tell the proxy it went.
					relay(w, rp, r.WithContext(context.WithoutCancel(r.Context())))
					delivered <- struct{}{}
					return
				case isPart(r, body, 1):
					body[len(body)/2] ^= 0x01
					relay(w, rp, r)
					once.Do(func() { close(refused) })
					return
				}
				rp.ServeHTTP(w, r)
			})
			st := b.start(t, front, storage.Options{PartSize: 5 << 20, Threads: 2})
			file, want := randomFile(t, 12<<20)
			if err := st.PutFile(t.Context(), "ck/shard", file, int64(len(want))); err == nil {
				t.Fatal("a part with a flipped bit was accepted")
			}
			if held.Load() == 0 {
				t.Fatal("the first part never went through the proxy")
			}
			select {
			case <-delivered: // (before PutFile returned, if it waited for it)
			case <-time.After(10 * time.Second):
				t.Fatal("the first part was never delivered")
			}
			if n, err := st.AbortUploads(t.Context(), "ck/shard"); err != nil || n != 0 {
				t.Fatalf("%d unfinished uploads left after the failed upload (%v)", n, err)
			}
			if objs, _ := st.List(t.Context(), ""); len(objs) != 0 {
				t.Fatalf("left behind: %v", objs)
			}
		})
	}
}

// relay has h answer r, then passes the answer on to w.
func relay(w http.ResponseWriter, h http.Handler, r *http.Request) {
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, r)
	for k, v := range rec.Header() {
		w.Header()[k] = v
	}
	w.WriteHeader(rec.Code)
	w.Write(rec.Body.Bytes())
}

// TestTransientErrorsRetried: GCS and Azure answer 503 to the first try of
// every request and drop one connection outright; uploads, copies, lists
// and reads still succeed (retried with backoff), and a conditional create
// is not repeated blindly.
func TestTransientErrorsRetried(t *testing.T) {
	for _, b := range backends[:2] { // minio-go retries S3's requests itself
		t.Run(b.name, func(t *testing.T) {
			var seen sync.Map
			var busy, firsts atomic.Int64
			front := proxied(t, func(w http.ResponseWriter, r *http.Request, rp http.Handler) {
				if _, again := seen.LoadOrStore(r.Method+" "+r.URL.String(), true); !again && r.Header.Get("If-None-Match") == "" &&
					!strings.Contains(r.URL.RawQuery, "ifGenerationMatch") {
					if firsts.Add(1) == 3 { // the third new request loses its connection
						c, _, _ := w.(http.Hijacker).Hijack()
						c.Close()
						return
					}
					busy.Add(1)
					w.WriteHeader(http.StatusServiceUnavailable)
					return
				}
				rp.ServeHTTP(w, r)
			})
			st := b.start(t, front, storage.Options{PartSize: 5 << 20, Threads: 4})
			ctx := t.Context()
			f, want := randomFile(t, 12<<20)
			if err := st.PutFile(ctx, "ck/shard", f, int64(len(want))); err != nil {
				t.Fatal(err)
			}
			if err := st.Copy(ctx, "ck/copy", "ck/shard"); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(get(t, st, "ck/copy"), want) {
				t.Fatal("read back differs")
			}
			if objs, err := st.List(ctx, "ck"); err != nil || len(objs) != 2 {
				t.Fatalf("list: %v %v", objs, err)
			}
			if busy.Load() < 6 || firsts.Load() < 3 {
				t.Fatalf("only %d 503s in %d new requests: the test did not exercise retries", busy.Load(), firsts.Load())
			}
			t.Logf("%d answers 503 and one dropped connection, all retried", busy.Load())
			peers.Chaos(t, "storage: 503 to every request's first try, one connection dropped ("+b.name+")",
				"retried with backoff; upload, copy, list and read succeed")
		})
	}
}

// TestGCSComposeAtMost32: a file of more parts than one compose takes is
// cut into exactly 32 larger ones, composed once, and reads back whole.
func TestGCSComposeAtMost32(t *testing.T) {
	var parts atomic.Int64
	count := func(upstream string) string {
		u, _ := url.Parse(upstream)
		rp := httputil.NewSingleHostReverseProxy(u)
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if strings.HasPrefix(r.URL.Path, "/upload/") {
				b, _ := io.ReadAll(r.Body)
				if bytes.Contains(b[:min(len(b), 1024)], []byte("_preemptd/uploads/")) {
					parts.Add(1)
				}
				r.Body = io.NopCloser(bytes.NewReader(b))
			}
			rp.ServeHTTP(w, r)
		}))
		t.Cleanup(srv.Close)
		return srv.URL
	}
	st := backends[0].start(t, count, storage.Options{PartSize: 1 << 20, Threads: 8})
	f, want := randomFile(t, 40<<20)
	if err := st.PutFile(t.Context(), "ck/shard", f, int64(len(want))); err != nil {
		t.Fatal(err)
	}
	if n := parts.Load(); n != 32 {
		t.Fatalf("%d parts for 40 MiB in 1 MiB parts, want 32 (one compose)", n)
	}
	if !bytes.Equal(get(t, st, "ck/shard"), want) {
		t.Fatal("read back differs")
	}
}

// TestSwapContract: every store replaces an object only if it is unchanged
// since it was read (what moves a run's latest pointer forward when nodes
// race): a stale version, or a create over an existing object, is
// ErrConflict and leaves the object as it was; of writers racing from one
// version, exactly one wins.
func TestSwapContract(t *testing.T) {
	all := append([]backend{{"dir", func(t *testing.T, _ func(string) string, _ storage.Options) storage.Store {
		d, err := storage.NewDir(t.TempDir())
		if err != nil {
			t.Fatal(err)
		}
		return d
	}}}, backends...)
	for _, b := range all {
		t.Run(b.name, func(t *testing.T) {
			sw, ok := b.start(t, direct, storage.Options{}).(storage.Swapper)
			if !ok {
				t.Fatal("not a Swapper")
			}
			st := sw.(storage.Store)
			ctx := t.Context()
			version := func() string {
				t.Helper()
				var buf bytes.Buffer
				v, err := sw.GetVersion(ctx, "run/latest", &buf)
				if err != nil {
					t.Fatal(err)
				}
				return v
			}
			if _, err := sw.GetVersion(ctx, "run/latest", io.Discard); !errors.Is(err, storage.ErrNotFound) {
				t.Fatalf("version of a missing key: %v", err)
			}
			if err := sw.PutIf(ctx, "run/latest", []byte(`{"name":"a"}`), ""); err != nil {
				t.Fatalf("put if absent: %v", err)
			}
			if err := sw.PutIf(ctx, "run/latest", []byte(`{"name":"x"}`), ""); !errors.Is(err, storage.ErrConflict) {
				t.Fatalf("put if absent over an object: %v", err)
			}
			v1 := version()
			listed := func() storage.Object {
				t.Helper()
				objs, err := st.List(ctx, "run")
				if err != nil || len(objs) != 1 {
					t.Fatalf("listing: %+v %v", objs, err)
				}
				return objs[0]
			}
			before := listed()
			if err := sw.PutIf(ctx, "run/latest", []byte(`{"name":"b"}`), v1); err != nil {
				t.Fatalf("put if unchanged: %v", err)
			}
			// A listing tells the write apart, even at the same size.
			if after := listed(); after.Same(before) || b.name != "dir" && after.ETag == "" {
				t.Fatalf("the listing shows the rewritten object as it was: %+v, %+v", before, after)
			}
			if err := sw.PutIf(ctx, "run/latest", []byte(`{"name":"x"}`), v1); !errors.Is(err, storage.ErrConflict) {
				t.Fatalf("put with a stale version: %v", err)
			}
			if got := string(get(t, st, "run/latest")); got != `{"name":"b"}` {
				t.Fatalf("after a refused put: %s", got)
			}
			// Writers racing from one version: one wins.
			v2 := version()
			var wg sync.WaitGroup
			var won, lost atomic.Int32
			for i := range 6 {
				wg.Go(func() {
					switch err := sw.PutIf(ctx, "run/latest", fmt.Appendf(nil, `{"name":"w%d"}`, i), v2); {
					case err == nil:
						won.Add(1)
					case errors.Is(err, storage.ErrConflict):
						lost.Add(1)
					default:
						t.Error(err)
					}
				})
			}
			wg.Wait()
			if won.Load() != 1 || lost.Load() != 5 {
				t.Fatalf("%d won, %d lost from one version; want 1 and 5", won.Load(), lost.Load())
			}
			if objs, err := st.List(ctx, "run"); err != nil || len(objs) != 1 {
				t.Fatalf("listing after the swaps: %+v %v (nothing but the object)", objs, err)
			}
		})
	}
}

// xmlMultipart is GCS's XML API multipart upload as Google documents it
// (start with POST ?uploads, parts by PUT ?partNumber&uploadId checked by
// their Content-MD5, POST ?uploadId to assemble, DELETE ?uploadId to
// abort, GET ?uploads to list), in front of fake-gcs-server, which has
// none: the assembled object goes to the emulator through its JSON API,
// and every other request passes through.
type xmlMultipart struct {
	t        *testing.T
	upstream *url.URL
	proxy    *httputil.ReverseProxy
	flip     atomic.Bool // flip one bit of the next part's body
	mu       sync.Mutex
	uploads  map[string]map[int][]byte // upload id → parts
	keys     map[string]string         // upload id → object
	starts   atomic.Int64
	parts    atomic.Int64
	aborts   atomic.Int64
	// objects counts objects created, temporaries named _preemptd/uploads/
	// among them; deletes counts objects deleted.
	objects, temporaries, deletes atomic.Int64
}

func (x *xmlMultipart) front(upstream string) string {
	x.upstream, _ = url.Parse(upstream)
	x.proxy = httputil.NewSingleHostReverseProxy(x.upstream)
	x.uploads, x.keys = map[string]map[int][]byte{}, map[string]string{}
	srv := httptest.NewServer(x)
	x.t.Cleanup(srv.Close)
	return srv.URL
}

func (x *xmlMultipart) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	bucket, object, _ := strings.Cut(strings.TrimPrefix(r.URL.Path, "/"), "/")
	switch {
	case strings.HasPrefix(r.URL.Path, "/upload/"):
		b, _ := io.ReadAll(r.Body)
		x.objects.Add(1)
		if bytes.Contains(b[:min(len(b), 1024)], []byte("_preemptd/uploads/")) {
			x.temporaries.Add(1)
		}
		r.Body = io.NopCloser(bytes.NewReader(b))
	case r.Method == http.MethodDelete && strings.HasPrefix(r.URL.Path, "/storage/v1/"):
		x.deletes.Add(1)
	case r.Method == http.MethodPost && q.Has("uploads"):
		x.starts.Add(1)
		id := fmt.Sprintf("upload-%d", x.starts.Load())
		x.mu.Lock()
		x.uploads[id], x.keys[id] = map[int][]byte{}, object
		x.mu.Unlock()
		fmt.Fprintf(w, "<InitiateMultipartUploadResult><Bucket>%s</Bucket><Key>%s</Key><UploadId>%s</UploadId></InitiateMultipartUploadResult>", bucket, object, id)
		return
	case r.Method == http.MethodPut && q.Has("uploadId"):
		b, _ := io.ReadAll(r.Body)
		if x.flip.CompareAndSwap(true, false) {
			b[len(b)/2] ^= 1
		}
		sum := md5.Sum(b)
		if r.Header.Get("Content-MD5") != base64.StdEncoding.EncodeToString(sum[:]) {
			w.WriteHeader(http.StatusBadRequest)
			fmt.Fprint(w, "<Error><Code>BadDigest</Code><Message>The Content-MD5 you specified did not match what we received.</Message></Error>")
			return
		}
		n, _ := strconv.Atoi(q.Get("partNumber"))
		x.mu.Lock()
		parts, ok := x.uploads[q.Get("uploadId")]
		if ok {
			parts[n] = b
		}
		x.mu.Unlock()
		if !ok {
			http.Error(w, "<Error><Code>NoSuchUpload</Code></Error>", http.StatusNotFound)
			return
		}
		x.parts.Add(1)
		w.Header().Set("ETag", fmt.Sprintf("%q", fmt.Sprintf("%x", sum)))
		return
	case r.Method == http.MethodPost && q.Has("uploadId"):
		id := q.Get("uploadId")
		x.mu.Lock()
		parts := x.uploads[id]
		delete(x.uploads, id)
		x.mu.Unlock()
		var whole []byte
		for n := 1; n <= len(parts); n++ {
			whole = append(whole, parts[n]...)
		}
		u := fmt.Sprintf("%s/upload/storage/v1/b/%s/o?uploadType=media&name=%s", x.upstream, bucket, url.QueryEscape(object))
		req, _ := http.NewRequest(http.MethodPost, u, bytes.NewReader(whole))
		req.Header.Set("Authorization", r.Header.Get("Authorization"))
		resp, err := http.DefaultClient.Do(req)
		if err != nil || resp.StatusCode != http.StatusOK {
			http.Error(w, fmt.Sprintf("<Error><Message>assembling: %v %v</Message></Error>", err, resp), http.StatusInternalServerError)
			return
		}
		resp.Body.Close()
		fmt.Fprintf(w, "<CompleteMultipartUploadResult><Key>%s</Key></CompleteMultipartUploadResult>", object)
		return
	case r.Method == http.MethodDelete && q.Has("uploadId"):
		x.mu.Lock()
		_, ok := x.uploads[q.Get("uploadId")]
		delete(x.uploads, q.Get("uploadId"))
		x.mu.Unlock()
		if !ok {
			http.Error(w, "<Error><Code>NoSuchUpload</Code></Error>", http.StatusNotFound)
			return
		}
		x.aborts.Add(1)
		w.WriteHeader(http.StatusNoContent)
		return
	case r.Method == http.MethodGet && q.Has("uploads"):
		x.mu.Lock()
		fmt.Fprint(w, "<ListMultipartUploadsResult>")
		for id, key := range x.keys {
			if _, open := x.uploads[id]; open && strings.HasPrefix(key, q.Get("prefix")) {
				fmt.Fprintf(w, "<Upload><Key>%s</Key><UploadId>%s</UploadId></Upload>", key, id)
			}
		}
		fmt.Fprint(w, "</ListMultipartUploadsResult>")
		x.mu.Unlock()
		return
	}
	x.proxy.ServeHTTP(w, r)
}

func (x *xmlMultipart) open() int {
	x.mu.Lock()
	defer x.mu.Unlock()
	return len(x.uploads)
}

// TestGCSXMLMultipartNoTemporaries: where GCS has its XML API multipart
// upload (Cloud Storage does), a file of several parts goes up as one:
// its parts are not objects, so no temporary object is created, and none
// deleted (with soft delete, the default, every deleted temporary would be
// kept and billed for a week). A part whose bytes do not match its
// Content-MD5 is refused and the upload aborted, nothing left; an upload a
// crash left is aborted by AbortUploads.
func TestGCSXMLMultipartNoTemporaries(t *testing.T) {
	x := &xmlMultipart{t: t}
	st := backends[0].start(t, x.front, storage.Options{PartSize: 5 << 20, Threads: 4})
	f, want := randomFile(t, 23<<20)
	if err := st.PutFile(t.Context(), "ck/shard", f, int64(len(want))); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(get(t, st, "ck/shard"), want) {
		t.Fatal("read back differs")
	}
	if x.starts.Load() != 1 || x.parts.Load() != 5 || x.temporaries.Load() != 0 || x.deletes.Load() != 0 {
		t.Fatalf("%d uploads, %d parts, %d temporary objects, %d deletes; want 1 upload of 5 parts, no temporary object, no delete",
			x.starts.Load(), x.parts.Load(), x.temporaries.Load(), x.deletes.Load())
	}
	// One bit of a part flipped on the way: refused, aborted, nothing there.
	x.flip.Store(true)
	err := st.PutFile(t.Context(), "ck/other", f, int64(len(want)))
	if err == nil {
		t.Fatal("a part with a flipped bit was accepted")
	}
	t.Logf("refused: %v", err)
	if x.aborts.Load() != 1 || x.open() != 0 {
		t.Fatalf("%d aborted, %d uploads open; want the failed one aborted", x.aborts.Load(), x.open())
	}
	if err := st.Get(t.Context(), "ck/other", io.Discard); !errors.Is(err, storage.ErrNotFound) {
		t.Fatalf("after a refused part the key reads %v, want ErrNotFound", err)
	}
	// An upload a crash left: AbortUploads finds and aborts it.
	x.mu.Lock()
	x.uploads["left-by-a-crash"], x.keys["left-by-a-crash"] = map[int][]byte{1: []byte("x")}, "runs/ck/left"
	x.mu.Unlock()
	if n, err := st.AbortUploads(t.Context(), "ck/left"); err != nil || n != 1 || x.open() != 0 {
		t.Fatalf("AbortUploads: %d, %v; %d uploads open; want the one a crash left aborted", n, err, x.open())
	}
}
