package storage

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"net/http"
	"net/url"
	"os"
	"path"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"golang.org/x/oauth2"
)

// GCS is a store in a Google Cloud Storage bucket, spoken to through its
// JSON API with an OAuth token: the VM's service account (from the
// metadata server) or a service-account key (GOOGLE_APPLICATION_CREDENTIALS).
//
// A file larger than one part goes up as an XML API multipart upload, its
// parts Threads at once (see gcsxml.go: no temporary objects), or, on a
// server without one, as a parallel composite upload: its
// parts are uploaded Threads at once as temporary objects under
// <prefix>/_preemptd/uploads/<key>/<upload>/, each with the CRC32C of its
// bytes in its metadata (GCS refuses a part whose bytes do not match), then
// composed into key in one request (at most 32 parts: a larger file gets
// larger parts) and deleted. Nothing is visible under key until the
// compose, which is atomic. AbortUploads deletes the temporaries a crash
// left.
type GCS struct {
	hc       *http.Client
	base     string // https://storage.googleapis.com, or an emulator
	bucket   string
	prefix   string
	tokens   oauth2.TokenSource // nil: no Authorization header (an emulator)
	auth     string             // how the token is got, for String and doctor
	meta     *gceMeta           // the metadata server, when the token comes from it
	partSize int64
	threads  uint
	noXML    atomic.Bool // the server has no XML API multipart upload (see gcsxml.go)
}

// gcsScope is what preemptd asks for: read and write objects, nothing else.
const gcsScope = "https://www.googleapis.com/auth/devstorage.read_write"

// maxCompose is the most sources one compose request takes.
const maxCompose = 32

// NewGCS builds the client. Credentials, first found wins:
// GOOGLE_APPLICATION_CREDENTIALS (a service-account key file), else the
// VM's service account through the metadata server (o.GCPMetadata, else
// GCE_METADATA_HOST, else 169.254.169.254). With o.Endpoint set and
// o.Anonymous, no token is sent (an emulator).
func NewGCS(bucket, prefix string, o Options) (*GCS, error) {
	base := "https://storage.googleapis.com"
	if o.Endpoint != "" {
		u, err := url.Parse(o.Endpoint)
		if err != nil || u.Host == "" || (u.Scheme != "http" && u.Scheme != "https") {
			return nil, fmt.Errorf("storage.endpoint: %q is not a URL like https://storage.googleapis.com", o.Endpoint)
		}
		base = strings.TrimSuffix(o.Endpoint, "/")
	}
	g := &GCS{hc: o.httpClient(), base: base, bucket: bucket, prefix: prefix, partSize: int64(o.PartSize), threads: o.Threads}
	if g.partSize == 0 {
		g.partSize = DefaultPartSize
	}
	if g.threads == 0 {
		g.threads = DefaultThreads
	}
	getenv := o.getenv()
	switch {
	case getenv("GOOGLE_APPLICATION_CREDENTIALS") != "":
		p := getenv("GOOGLE_APPLICATION_CREDENTIALS")
		ts, err := serviceAccountTokens(p, g.hc)
		if err != nil {
			return nil, fmt.Errorf("GOOGLE_APPLICATION_CREDENTIALS: %w", err)
		}
		g.tokens, g.auth = ts, "service-account key "+p
	default:
		g.meta = newGCEMeta(o.GCPMetadata, getenv)
		g.tokens, g.auth = newRefreshEarly(g.meta), "the VM's service account (metadata server "+g.meta.host+")"
	}
	return g, nil
}

func (g *GCS) String() string {
	return fmt.Sprintf("gs://%s/%s (endpoint %s, token from %s)", g.bucket, g.prefix, g.base, g.auth)
}

func (g *GCS) key(k string) (string, error) {
	return under(g.prefix, k)
}

// gcsError is the JSON API's error document.
type gcsError struct {
	Status  int
	Message string
	Reason  string
	Bucket  string // for the fix of a refusal
	Auth    string // where the token came from (GCS.auth)
}

func (e *gcsError) Error() string {
	msg := fmt.Sprintf("GCS: HTTP %d: %s", e.Status, e.Message)
	switch {
	case e.Status == http.StatusForbidden && (e.Reason == "insufficientPermissions" || strings.Contains(e.Message, "scope")):
		msg += " (the VM's access scopes allow only reading Cloud Storage: stop the VM and run `gcloud compute instances set-service-account VM --service-account SA --scopes cloud-platform` (or storage-rw), then start it)"
	case e.Status == http.StatusForbidden:
		msg += fmt.Sprintf(" (grant the service account write access to the bucket: `gcloud storage buckets add-iam-policy-binding gs://%s --member serviceAccount:SA --role roles/storage.objectUser`)", e.Bucket)
	case e.Status == http.StatusUnauthorized:
		msg += fmt.Sprintf(" (the token from %s was refused: check that the service account exists and is enabled, and this machine's clock)", e.Auth)
	}
	return msg
}

// do sends one request with the token and decodes a JSON answer into out
// (nil: the body is discarded). 404 is ErrNotFound, 412 ErrExists. body
// makes the request's body afresh for each attempt (nil: none).
func (g *GCS) do(ctx context.Context, method, rawURL string, hdr http.Header, body func() io.Reader, size int64, out any) error {
	resp, err := g.send(ctx, method, rawURL, hdr, body, size)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if out == nil {
		_, err = io.Copy(io.Discard, resp.Body)
		return err
	}
	return json.NewDecoder(resp.Body).Decode(out)
}

// send is do without decoding: the caller closes the body of a 2xx answer.
// Failures worth it are retried (withRetries), but not a conditional create.
func (g *GCS) send(ctx context.Context, method, rawURL string, hdr http.Header, body func() io.Reader, size int64) (*http.Response, error) {
	attempts := maxAttempts
	if strings.Contains(rawURL, "ifGenerationMatch=") {
		attempts = 1
	}
	resp, err := withRetries(ctx, attempts, func() (*http.Response, error) {
		var r io.Reader
		if body != nil {
			r = body()
		}
		req, err := http.NewRequestWithContext(ctx, method, rawURL, r)
		if err != nil {
			return nil, err
		}
		for k, v := range hdr {
			req.Header[k] = v
		}
		if r != nil {
			req.ContentLength = size
		}
		if g.tokens != nil {
			tok, err := g.tokens.Token()
			if err != nil {
				return nil, final{fmt.Errorf("GCS token from %s: %w", g.auth, err)}
			}
			tok.SetAuthHeader(req)
		}
		return g.hc.Do(req)
	})
	if err != nil {
		return nil, err
	}
	if resp.StatusCode/100 == 2 {
		return resp, nil
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	var doc struct {
		Error struct {
			Message string
			Errors  []struct{ Reason string }
		}
	}
	e := &gcsError{Status: resp.StatusCode, Bucket: g.bucket, Auth: g.auth}
	if json.Unmarshal(b, &doc) == nil && doc.Error.Message != "" {
		e.Message = doc.Error.Message
		if len(doc.Error.Errors) > 0 {
			e.Reason = doc.Error.Errors[0].Reason
		}
	} else {
		e.Message = strings.TrimSpace(string(b))
	}
	switch resp.StatusCode {
	case http.StatusNotFound:
		return nil, fmt.Errorf("%w (%w)", ErrNotFound, e)
	case http.StatusPreconditionFailed:
		return nil, fmt.Errorf("%w (%w)", ErrExists, e)
	}
	return nil, e
}

func (g *GCS) objectURL(name string) string {
	return fmt.Sprintf("%s/storage/v1/b/%s/o/%s", g.base, url.PathEscape(g.bucket), url.PathEscape(name))
}

// crc32cOf is GCS's encoding of the CRC32C of r: base64 of its big-endian bytes.
func crc32cOf(r io.Reader) (string, error) {
	h := crc32.New(castagnoli)
	if _, err := io.Copy(h, r); err != nil {
		return "", err
	}
	return base64.StdEncoding.EncodeToString(binary.BigEndian.AppendUint32(nil, h.Sum32())), nil
}

// insert uploads size bytes of r as object name in one multipart/related
// request whose metadata carries crc32c: GCS checks it against the bytes
// and refuses the object if they differ. ifGen makes it conditional
// (ifGenerationMatch: "0", only if the object does not exist; else only if
// it is that generation): ErrExists when the condition does not hold.
func (g *GCS) insert(ctx context.Context, name string, r io.ReaderAt, size int64, crc, contentType, ifGen string) error {
	meta, _ := json.Marshal(map[string]string{"name": name, "crc32c": crc, "contentType": contentType})
	var rnd [12]byte
	rand.Read(rnd[:])
	boundary := "preemptd-" + hex.EncodeToString(rnd[:])
	head := fmt.Sprintf("--%s\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n%s\r\n--%s\r\nContent-Type: %s\r\n\r\n", boundary, meta, boundary, contentType)
	tail := "\r\n--" + boundary + "--\r\n"
	body := func() io.Reader {
		return io.MultiReader(strings.NewReader(head), io.NewSectionReader(r, 0, size), strings.NewReader(tail))
	}
	q := url.Values{"uploadType": {"multipart"}, "fields": {"name"}}
	if ifGen != "" {
		q.Set("ifGenerationMatch", ifGen)
	}
	u := fmt.Sprintf("%s/upload/storage/v1/b/%s/o?%s", g.base, url.PathEscape(g.bucket), q.Encode())
	hdr := http.Header{"Content-Type": {"multipart/related; boundary=" + boundary}}
	return g.do(ctx, http.MethodPost, u, hdr, body, int64(len(head))+size+int64(len(tail)), nil)
}

// PutFile implements Store (see GCS).
func (g *GCS) PutFile(ctx context.Context, key string, f *os.File, size int64) error {
	k, err := g.key(key)
	if err != nil {
		return err
	}
	ps := max(g.partSize, (size+maxCompose-1)/maxCompose)
	if size <= ps {
		crc, err := crc32cOf(io.NewSectionReader(f, 0, size))
		if err == nil {
			err = g.insert(ctx, k, f, size, crc, "application/octet-stream", "")
		}
		if err != nil {
			return fmt.Errorf("storage: put %s: %w", key, err)
		}
		return nil
	}
	if !g.noXML.Load() {
		err := g.putXML(ctx, k, f, size, max(g.partSize, (size+maxXMLParts-1)/maxXMLParts))
		if !errors.Is(err, errNoXMLMultipart) {
			if err != nil {
				return fmt.Errorf("storage: put %s: %w", key, err)
			}
			return nil
		}
		g.noXML.Store(true) // an emulator: composite, below
	}
	var id [8]byte
	rand.Read(id[:])
	tmp := path.Join(g.uploads(key), hex.EncodeToString(id[:]))
	parts := splitParts(size, ps)
	names := make([]string, len(parts))
	err = eachPart(ctx, parts, g.threads, func(ctx context.Context, p part) error {
		crc, err := crc32cOf(section(f, p))
		if err != nil {
			return err
		}
		name := fmt.Sprintf("%s/%05d", tmp, p.N)
		if err := g.insert(ctx, name, section(f, p), p.Length, crc, "application/octet-stream", ""); err != nil {
			return err
		}
		names[p.N] = name
		return nil
	})
	if err == nil {
		err = g.compose(ctx, k, names)
	}
	// The temporaries go whatever happened: those this upload made, and
	// those it made without hearing so (an answer lost on the way back, a
	// request the caller's cancelling cut after it was sent; one of those
	// may land later still, and a crash leaves its parts: both are for
	// AbortUploads at the next start or the key's next upload). Once key is
	// complete, every earlier upload's parts for it are garbage too: a
	// request a killed daemon had fully sent can land after the next
	// start's AbortUploads.
	dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
	defer cancel()
	folder := tmp + "/"
	if err == nil {
		folder = g.uploads(key) + "/"
	}
	left, lerr := g.list(dctx, folder, false)
	for _, o := range left {
		names = append(names, path.Join(g.prefix, o.Key))
	}
	slices.Sort(names)
	names = slices.DeleteFunc(slices.Compact(names), func(n string) bool { return n == "" })
	if derr := deleteEach(dctx, names, g.threads, g.deleteObject); derr != nil && err == nil {
		err = fmt.Errorf("temporary parts: %w", derr)
	}
	if lerr != nil && err == nil {
		err = fmt.Errorf("list temporary parts: %w", lerr)
	}
	if err != nil {
		return fmt.Errorf("storage: put %s: %w", key, err)
	}
	return nil
}

// uploads is where the temporary parts of uploads to key live (one
// folder per upload below it).
func (g *GCS) uploads(key string) string { return path.Join(g.uploadsRoot(), key) }

func (g *GCS) uploadsRoot() string { return path.Join(g.prefix, "_preemptd", "uploads") }

// compose makes dst of srcs, in order, in one request.
func (g *GCS) compose(ctx context.Context, dst string, srcs []string) error {
	req := struct {
		SourceObjects []struct {
			Name string `json:"name"`
		} `json:"sourceObjects"`
		Destination struct {
			ContentType string `json:"contentType"`
		} `json:"destination"`
	}{}
	for _, s := range srcs {
		req.SourceObjects = append(req.SourceObjects, struct {
			Name string `json:"name"`
		}{s})
	}
	req.Destination.ContentType = "application/octet-stream"
	b, _ := json.Marshal(req)
	return g.do(ctx, http.MethodPost, g.objectURL(dst)+"/compose?fields=name", http.Header{"Content-Type": {"application/json"}},
		func() io.Reader { return bytes.NewReader(b) }, int64(len(b)), nil)
}

// PutBytes implements Store.
func (g *GCS) PutBytes(ctx context.Context, key string, b []byte) error {
	if err := g.putSmall(ctx, key, b, ""); err != nil {
		return fmt.Errorf("storage: put %s: %w", key, err)
	}
	return nil
}

// Create implements Store with ifGenerationMatch=0.
func (g *GCS) Create(ctx context.Context, key string, b []byte) error {
	return createErr(key, g.putSmall(ctx, key, b, "0"))
}

// GetVersion implements Swapper: the object's generation.
func (g *GCS) GetVersion(ctx context.Context, key string, w io.Writer) (string, error) {
	k, err := g.key(key)
	if err != nil {
		return "", err
	}
	resp, err := g.send(ctx, http.MethodGet, g.objectURL(k)+"?alt=media", nil, nil, 0)
	if err != nil {
		return "", fmt.Errorf("storage: get %s: %w", key, err)
	}
	gen := resp.Header.Get("X-Goog-Generation")
	if err := readBody(w, resp); err != nil {
		return "", fmt.Errorf("storage: get %s: %w", key, err)
	}
	if gen == "" {
		return "", fmt.Errorf("storage: get %s: the answer names no generation", key)
	}
	return gen, nil
}

// PutIf implements Swapper with ifGenerationMatch (0 for none).
func (g *GCS) PutIf(ctx context.Context, key string, b []byte, version string) error {
	if version == "" {
		version = "0"
	}
	err := g.putSmall(ctx, key, b, version)
	if errors.Is(err, ErrExists) || errors.Is(err, ErrNotFound) {
		err = ErrConflict
	}
	if err != nil {
		return fmt.Errorf("storage: put %s if unchanged: %w", key, err)
	}
	return nil
}

// putSmall puts b (a manifest, a pointer) under key in one request.
func (g *GCS) putSmall(ctx context.Context, key string, b []byte, ifGen string) error {
	k, err := g.key(key)
	if err != nil {
		return err
	}
	crc, _ := crc32cOf(bytes.NewReader(b))
	return g.insert(ctx, k, bytes.NewReader(b), int64(len(b)), crc, "application/json", ifGen)
}

// Copy implements Store with rewrite, server-side (one call for an object
// in the same bucket and class; repeated with its token otherwise).
func (g *GCS) Copy(ctx context.Context, dst, src string) error {
	dk, sk, err := copyKeys(g.prefix, dst, src)
	if err != nil {
		return err
	}
	u := g.objectURL(sk) + "/rewriteTo/b/" + url.PathEscape(g.bucket) + "/o/" + url.PathEscape(dk)
	token := ""
	for {
		q := url.Values{"fields": {"done,rewriteToken"}}
		if token != "" {
			q.Set("rewriteToken", token)
		}
		var out struct {
			Done         bool
			RewriteToken string
		}
		if err := g.do(ctx, http.MethodPost, u+"?"+q.Encode(), http.Header{"Content-Type": {"application/json"}},
			func() io.Reader { return strings.NewReader("{}") }, 2, &out); err != nil {
			return fmt.Errorf("storage: copy %s: %w", src, err)
		}
		if out.Done {
			return nil
		}
		if out.RewriteToken == "" {
			return fmt.Errorf("storage: copy %s: rewrite not done and no token to continue", src)
		}
		token = out.RewriteToken
	}
}

// Get implements Store.
func (g *GCS) Get(ctx context.Context, key string, w io.Writer) error {
	k, err := g.key(key)
	if err != nil {
		return err
	}
	resp, err := g.send(ctx, http.MethodGet, g.objectURL(k)+"?alt=media", nil, nil, 0)
	if err == nil {
		err = readBody(w, resp)
	}
	if err != nil {
		return fmt.Errorf("storage: get %s: %w", key, err)
	}
	return nil
}

// List implements Store (the temporaries of uploads are not listed).
func (g *GCS) List(ctx context.Context, prefix string) ([]Object, error) {
	p := listPrefix(g.prefix, prefix)
	return g.list(ctx, p, true)
}

func (g *GCS) list(ctx context.Context, p string, skipUploads bool) ([]Object, error) {
	var out []Object
	uploads := g.uploadsRoot() + "/"
	token := ""
	for {
		q := url.Values{"prefix": {p}, "fields": {"items(name,size,updated,generation),nextPageToken"}}
		if token != "" {
			q.Set("pageToken", token)
		}
		var page struct {
			Items []struct {
				Name       string
				Size       string
				Updated    time.Time
				Generation string
			}
			NextPageToken string
		}
		u := fmt.Sprintf("%s/storage/v1/b/%s/o?%s", g.base, url.PathEscape(g.bucket), q.Encode())
		if err := g.do(ctx, http.MethodGet, u, nil, nil, 0, &page); err != nil {
			return nil, fmt.Errorf("storage: list %s: %w", p, err)
		}
		for _, it := range page.Items {
			if skipUploads && strings.HasPrefix(it.Name, uploads) {
				continue
			}
			size, _ := strconv.ParseInt(it.Size, 10, 64)
			out = append(out, Object{Key: strings.TrimPrefix(strings.TrimPrefix(it.Name, g.prefix), "/"), Size: size, ModTime: it.Updated, ETag: it.Generation})
		}
		if page.NextPageToken == "" {
			return out, nil
		}
		token = page.NextPageToken
	}
}

func (g *GCS) deleteObject(ctx context.Context, name string) error {
	err := g.do(ctx, http.MethodDelete, g.objectURL(name), nil, nil, 0, nil)
	if errors.Is(err, ErrNotFound) {
		return nil
	}
	return err
}

// Delete implements Store, Threads objects at once.
func (g *GCS) Delete(ctx context.Context, keys ...string) error {
	names := make([]string, len(keys))
	for i, key := range keys {
		var err error
		if names[i], err = g.key(key); err != nil {
			return err
		}
	}
	if err := deleteEach(ctx, names, g.threads, g.deleteObject); err != nil {
		return fmt.Errorf("storage: %w", err)
	}
	return nil
}

// AbortUploads implements Store: the temporary parts a crash left under
// these keys' upload folders (each upload's parts are deleted by PutFile
// itself otherwise), found with one listing of every upload in flight.
func (g *GCS) AbortUploads(ctx context.Context, keys ...string) (int, error) {
	mine := map[string]bool{}
	var names []string
	for _, key := range keys {
		k, err := g.key(key)
		if err != nil {
			return 0, err
		}
		mine[g.uploads(key)] = true
		names = append(names, k)
	}
	aborted, err := g.abortXMLUnder(ctx, names)
	if err != nil {
		return aborted, fmt.Errorf("storage: abort: %w", err)
	}
	objs, err := g.list(ctx, g.uploadsRoot()+"/", false)
	if err != nil {
		return 0, err
	}
	names = nil
	uploads := map[string]bool{}
	for _, o := range objs {
		name := path.Join(g.prefix, o.Key)
		if upload := path.Dir(name); mine[path.Dir(upload)] { // <key>/<upload>/<part>
			names = append(names, name)
			uploads[upload] = true
		}
	}
	if err := deleteEach(ctx, names, g.threads, g.deleteObject); err != nil {
		return aborted, fmt.Errorf("storage: abort: %w", err)
	}
	return aborted + len(uploads), nil
}

// CheckAccess is the doctor's credential check: a token, the VM's
// access scopes when the token is the VM's, and a listing of the prefix.
func (g *GCS) CheckAccess(ctx context.Context) error {
	if g.tokens != nil {
		if _, err := g.tokens.Token(); err != nil {
			return fmt.Errorf("no token from %s: %w", g.auth, err)
		}
	}
	if g.meta != nil {
		scopes, err := g.meta.get(ctx, "instance/service-accounts/default/scopes")
		if err != nil {
			return fmt.Errorf("read the VM's access scopes: %w", err)
		}
		if !writableScope(scopes) {
			return fmt.Errorf("the VM's service account has the access scopes %q, which cannot write Cloud Storage: stop the VM and run `gcloud compute instances set-service-account VM --service-account SA --scopes cloud-platform` (or add storage-rw), then start it; grant SA roles/storage.objectUser on the bucket",
				strings.Join(strings.Fields(scopes), ", "))
		}
	}
	_, err := g.list(ctx, g.prefix+"/_preemptd/", false)
	return err
}

// writableScope says whether one of the scopes (one per line, as the
// metadata server lists them) lets the token write objects.
func writableScope(scopes string) bool {
	for _, s := range strings.Fields(scopes) {
		switch s {
		case "https://www.googleapis.com/auth/cloud-platform", gcsScope,
			"https://www.googleapis.com/auth/devstorage.full_control":
			return true
		}
	}
	return false
}
