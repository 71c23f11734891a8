package storage

import (
	"bytes"
	"cmp"
	"context"
	"crypto/hmac"
	"crypto/md5"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"golang.org/x/oauth2"

	"github.com/preemptd/preemptd/internal/direct"
)

// azVersion is the Blob service REST version preemptd speaks.
const azVersion = "2021-12-02"

// Azure is a store in an Azure Blob Storage container, spoken to through
// the Blob service's REST API. Credentials, first found wins:
// AZURE_STORAGE_SAS_TOKEN, AZURE_STORAGE_KEY (Shared Key), else the VM's
// managed identity (a token for https://storage.azure.com/ from IMDS at
// azure.endpoint; AZURE_CLIENT_ID picks a user-assigned identity).
//
// A file larger than one part is uploaded as a block blob: its blocks go
// up Threads at once (Put Block, each with the Content-MD5 of its bytes,
// which the service checks), then one Put Block List commits them, which
// is atomic: until then key shows nothing new. Blocks never committed need
// no cleanup: they are invisible (not listed, not readable), the next Put
// Block List of the blob discards them, and the service deletes them after
// a week; AbortUploads has nothing to do.
type Azure struct {
	hc        *http.Client
	base      string // https://account.blob.core.windows.net, or an emulator's URL with the account in its path
	account   string
	container string
	prefix    string
	key       []byte             // Shared Key
	sas       url.Values         // a SAS token's parameters
	tokens    oauth2.TokenSource // managed identity
	auth      string
	partSize  int64
	threads   uint
}

// azureBlobHost is the public cloud's blob host suffix.
const azureBlobHost = ".blob.core.windows.net"

// NewAzure builds the client for account's container below prefix.
func NewAzure(account, container, prefix string, o Options) (*Azure, error) {
	base := "https://" + account + azureBlobHost
	if o.Endpoint != "" {
		u, err := url.Parse(o.Endpoint)
		if err != nil || u.Host == "" || (u.Scheme != "http" && u.Scheme != "https") {
			return nil, fmt.Errorf("storage.endpoint: %q is not a URL like https://ACCOUNT.blob.core.windows.net (or an emulator's http://127.0.0.1:10000/devstoreaccount1)", o.Endpoint)
		}
		base = strings.TrimSuffix(o.Endpoint, "/")
	}
	a := &Azure{hc: o.httpClient(), base: base, account: account, container: container, prefix: prefix,
		partSize: int64(o.PartSize), threads: o.Threads}
	if a.partSize == 0 {
		a.partSize = DefaultPartSize
	}
	if a.threads == 0 {
		a.threads = DefaultThreads
	}
	getenv := o.getenv()
	switch {
	case getenv("AZURE_STORAGE_SAS_TOKEN") != "":
		q, err := url.ParseQuery(strings.TrimPrefix(getenv("AZURE_STORAGE_SAS_TOKEN"), "?"))
		if err != nil || q.Get("sig") == "" {
			return nil, fmt.Errorf("AZURE_STORAGE_SAS_TOKEN is not a SAS token (sv=…&sig=…)")
		}
		a.sas, a.auth = q, "SAS token"
	case getenv("AZURE_STORAGE_KEY") != "":
		k, err := base64.StdEncoding.DecodeString(getenv("AZURE_STORAGE_KEY"))
		if err != nil {
			return nil, fmt.Errorf("AZURE_STORAGE_KEY is not base64 (copy it from `az storage account keys list`)")
		}
		a.key, a.auth = k, "account key"
	default:
		ep := o.AzureIMDS
		if ep == "" {
			ep = "http://169.254.169.254"
		}
		id := &azureIdentity{endpoint: ep, clientID: getenv("AZURE_CLIENT_ID"), resource: "https://storage.azure.com/", hc: direct.Client(10 * time.Second)}
		a.tokens = newRefreshEarly(id)
		a.auth = "managed identity (" + ep + ")"
		if id.clientID != "" {
			a.auth = "managed identity " + id.clientID + " (" + ep + ")"
		}
	}
	return a, nil
}

func (a *Azure) String() string {
	return fmt.Sprintf("azblob://%s/%s/%s (endpoint %s, %s)", a.account, a.container, a.prefix, a.base, a.auth)
}

func (a *Azure) name(k string) (string, error) {
	return under(a.prefix, k)
}

// blobURL is name's URL (each path element escaped, slashes kept).
func (a *Azure) blobURL(name string) string {
	parts := strings.Split(name, "/")
	for i, p := range parts {
		parts[i] = url.PathEscape(p)
	}
	return a.base + "/" + url.PathEscape(a.container) + "/" + strings.Join(parts, "/")
}

// azError is the service's error document, with the credential that
// was refused.
type azError struct {
	Status  int
	Code    string
	Message string
	Auth    string // Azure.auth
}

func (e *azError) Error() string {
	msg := fmt.Sprintf("Azure Blob: HTTP %d %s: %s", e.Status, e.Code, e.Message)
	identity := strings.HasPrefix(e.Auth, "managed identity")
	switch {
	case e.Code == "AuthorizationPermissionMismatch":
		msg += " (assign the identity the role Storage Blob Data Contributor on the container, or give the SAS read, write, list and delete permissions)"
	case e.Code == "AuthorizationFailure":
		msg += " (the storage account refused the request: it may accept only some networks (allow this machine's virtual network or address), the identity may hold no data role on it (assign Storage Blob Data Contributor), or a SAS may exclude this address or service)"
	case e.Code == "KeyBasedAuthenticationNotPermitted":
		msg += " (the account disallows Shared Key: unset AZURE_STORAGE_KEY to use the machine's managed identity)"
	case e.Code == "AuthenticationFailed" && e.Auth == "account key":
		msg += " (the account key's signature was refused: check that AZURE_STORAGE_KEY is the account's current key (`az storage account keys list`) and this machine's clock)"
	case e.Code == "AuthenticationFailed" && e.Auth == "SAS token":
		msg += " (the SAS was refused: check its expiry (se=) and start (st=), that it is for this account, and this machine's clock)"
	case (e.Code == "AuthenticationFailed" || e.Code == "InvalidAuthenticationInfo") && identity:
		msg += fmt.Sprintf(" (the token of the %s was refused: check that the identity is assigned to this machine, that AZURE_CLIENT_ID names it, and this machine's clock)", e.Auth)
	}
	return msg
}

// do sends one request, authorized; a non-2xx answer is an *azError
// (404 wrapped as ErrNotFound, 409/412 of a conditional create as
// ErrExists). body makes the request's body afresh for each attempt (nil:
// none); failures worth it are retried (withRetries), but not a conditional
// create. The caller closes the body of the answer.
func (a *Azure) do(ctx context.Context, method, rawURL string, hdr http.Header, body func() io.Reader, size int64) (*http.Response, error) {
	attempts := maxAttempts
	if len(hdr["If-None-Match"]) > 0 {
		attempts = 1
	}
	var req *http.Request
	resp, err := withRetries(ctx, attempts, func() (*http.Response, error) {
		var r io.Reader
		if body != nil && size > 0 { // an empty body as none: Content-Length: 0, never chunked
			r = body()
		}
		var err error
		req, err = http.NewRequestWithContext(ctx, method, rawURL, r)
		if err != nil {
			return nil, err
		}
		for k, v := range hdr {
			req.Header[http.CanonicalHeaderKey(k)] = v // Get finds it, for the signature
		}
		req.ContentLength = size
		if r == nil {
			req.ContentLength = 0
		}
		req.Header.Set("x-ms-version", azVersion)
		req.Header.Set("x-ms-date", time.Now().UTC().Format(http.TimeFormat))
		if err := a.authorize(req); err != nil {
			return nil, final{err}
		}
		return a.hc.Do(req)
	})
	if err != nil {
		return nil, err
	}
	if resp.StatusCode/100 == 2 {
		return resp, nil
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	e := &azError{Status: resp.StatusCode, Code: resp.Header.Get("x-ms-error-code"), Auth: a.auth}
	var doc struct {
		Code    string
		Message string
	}
	if xml.Unmarshal(b, &doc) == nil {
		e.Message = strings.SplitN(strings.TrimSpace(doc.Message), "\n", 2)[0]
		if e.Code == "" {
			e.Code = doc.Code
		}
	}
	if e.Message == "" {
		e.Message = http.StatusText(resp.StatusCode)
	}
	switch {
	case resp.StatusCode == http.StatusNotFound:
		return nil, fmt.Errorf("%w (%w)", ErrNotFound, e)
	case req.Header.Get("If-None-Match") == "*" && (resp.StatusCode == http.StatusConflict || resp.StatusCode == http.StatusPreconditionFailed):
		return nil, fmt.Errorf("%w (%w)", ErrExists, e)
	}
	return nil, e
}

// authorize signs req with the store's credential.
func (a *Azure) authorize(req *http.Request) error {
	switch {
	case a.sas != nil:
		q := req.URL.Query()
		for k, v := range a.sas {
			q[k] = v
		}
		req.URL.RawQuery = q.Encode()
	case a.key != nil:
		req.Header.Set("Authorization", "SharedKey "+a.account+":"+a.sharedKey(req))
	case a.tokens != nil:
		tok, err := a.tokens.Token()
		if err != nil {
			return fmt.Errorf("Azure token from the %s: %w", a.auth, err)
		}
		tok.SetAuthHeader(req)
	}
	return nil
}

// sharedKey is the Shared Key signature of req, as the Blob service
// defines it (version 2009-09-19 and later).
func (a *Azure) sharedKey(req *http.Request) string {
	h := req.Header
	length := ""
	if req.ContentLength > 0 {
		length = strconv.FormatInt(req.ContentLength, 10)
	}
	var xms []string
	for k := range h {
		if lk := strings.ToLower(k); strings.HasPrefix(lk, "x-ms-") {
			xms = append(xms, lk)
		}
	}
	slices.Sort(xms)
	var b strings.Builder
	for _, v := range []string{req.Method, h.Get("Content-Encoding"), h.Get("Content-Language"), length, h.Get("Content-MD5"),
		h.Get("Content-Type"), "", h.Get("If-Modified-Since"), h.Get("If-Match"), h.Get("If-None-Match"),
		h.Get("If-Unmodified-Since"), h.Get("Range")} {
		b.WriteString(v + "\n")
	}
	for _, k := range xms {
		b.WriteString(k + ":" + strings.TrimSpace(h.Get(k)) + "\n")
	}
	b.WriteString("/" + a.account + req.URL.EscapedPath())
	q := req.URL.Query()
	keys := make([]string, 0, len(q))
	for k := range q {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		vs := slices.Clone(q[k])
		slices.Sort(vs)
		b.WriteString("\n" + strings.ToLower(k) + ":" + strings.Join(vs, ","))
	}
	m := hmac.New(sha256.New, a.key)
	m.Write([]byte(b.String()))
	return base64.StdEncoding.EncodeToString(m.Sum(nil))
}

// PutFile implements Store (see Azure).
func (a *Azure) PutFile(ctx context.Context, key string, f *os.File, size int64) error {
	n, err := a.name(key)
	if err != nil {
		return err
	}
	if size <= a.partSize {
		sum, err := md5Of(io.NewSectionReader(f, 0, size))
		if err == nil {
			err = a.putBlob(ctx, n, f, size, sum, "application/octet-stream", "")
		}
		if err != nil {
			return fmt.Errorf("storage: put %s: %w", key, err)
		}
		return nil
	}
	var id [8]byte
	rand.Read(id[:])
	upload := hex.EncodeToString(id[:])
	parts := splitParts(size, a.partSize)
	ids := make([]string, len(parts))
	err = eachPart(ctx, parts, a.threads, func(ctx context.Context, p part) error {
		sum, err := md5Of(section(f, p))
		if err != nil {
			return err
		}
		// Every block ID of a blob has the same length.
		bid := base64.StdEncoding.EncodeToString(fmt.Appendf(nil, "%s-%06d", upload, p.N))
		resp, err := a.do(ctx, http.MethodPut, a.blobURL(n)+"?comp=block&blockid="+url.QueryEscape(bid),
			http.Header{"Content-MD5": {sum}}, func() io.Reader { return section(f, p) }, p.Length)
		if err != nil {
			return err
		}
		drain(resp)
		ids[p.N] = bid
		return nil
	})
	if err == nil {
		var list bytes.Buffer
		list.WriteString(`<?xml version="1.0" encoding="utf-8"?><BlockList>`)
		for _, bid := range ids {
			list.WriteString("<Latest>" + bid + "</Latest>")
		}
		list.WriteString("</BlockList>")
		var resp *http.Response
		resp, err = a.do(ctx, http.MethodPut, a.blobURL(n)+"?comp=blocklist",
			http.Header{"Content-Type": {"application/xml"}, "x-ms-blob-content-type": {"application/octet-stream"}},
			func() io.Reader { return bytes.NewReader(list.Bytes()) }, int64(list.Len()))
		if err == nil {
			drain(resp)
		}
	}
	if err != nil {
		return fmt.Errorf("storage: put %s: %w", key, err)
	}
	return nil
}

func drain(resp *http.Response) {
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
}

// putBlob uploads a whole blob in one request, its Content-MD5 checked by
// the service; cond makes it conditional: ifNew (If-None-Match: *), else
// an ETag the blob must still have (If-Match).
func (a *Azure) putBlob(ctx context.Context, name string, r io.ReaderAt, size int64, sum, contentType, cond string) error {
	hdr := http.Header{"x-ms-blob-type": {"BlockBlob"}, "Content-MD5": {sum}, "Content-Type": {contentType}}
	switch cond {
	case "":
	case ifNew:
		hdr.Set("If-None-Match", "*")
	default:
		hdr.Set("If-Match", cond)
	}
	resp, err := a.do(ctx, http.MethodPut, a.blobURL(name), hdr, func() io.Reader { return io.NewSectionReader(r, 0, size) }, size)
	if err != nil {
		return err
	}
	drain(resp)
	return nil
}

// PutBytes implements Store.
func (a *Azure) PutBytes(ctx context.Context, key string, b []byte) error {
	if err := a.putSmall(ctx, key, b, ""); err != nil {
		return fmt.Errorf("storage: put %s: %w", key, err)
	}
	return nil
}

// ifNew is putBlob's condition that the blob does not exist.
const ifNew = "*new"

// Create implements Store with If-None-Match: *.
func (a *Azure) Create(ctx context.Context, key string, b []byte) error {
	return createErr(key, a.putSmall(ctx, key, b, ifNew))
}

// GetVersion implements Swapper: the blob's ETag.
func (a *Azure) GetVersion(ctx context.Context, key string, w io.Writer) (string, error) {
	n, err := a.name(key)
	if err != nil {
		return "", err
	}
	resp, err := a.do(ctx, http.MethodGet, a.blobURL(n), nil, nil, 0)
	if err != nil {
		return "", fmt.Errorf("storage: get %s: %w", key, err)
	}
	etag := resp.Header.Get("ETag")
	if err := readBody(w, resp); err != nil {
		return "", fmt.Errorf("storage: get %s: %w", key, err)
	}
	return etag, nil
}

// PutIf implements Swapper with If-Match on the ETag (If-None-Match: * for
// none): 412 ConditionNotMet, or a blob gone meanwhile, is ErrConflict.
func (a *Azure) PutIf(ctx context.Context, key string, b []byte, version string) error {
	cond := version
	if cond == "" {
		cond = ifNew
	}
	err := a.putSmall(ctx, key, b, cond)
	var ae *azError
	if errors.Is(err, ErrExists) || errors.Is(err, ErrNotFound) || errors.As(err, &ae) && ae.Status == http.StatusPreconditionFailed {
		err = ErrConflict
	}
	if err != nil {
		return fmt.Errorf("storage: put %s if unchanged: %w", key, err)
	}
	return nil
}

// putSmall puts b (a manifest, a pointer) under key in one request.
func (a *Azure) putSmall(ctx context.Context, key string, b []byte, cond string) error {
	n, err := a.name(key)
	if err != nil {
		return err
	}
	sum := md5.Sum(b)
	return a.putBlob(ctx, n, bytes.NewReader(b), int64(len(b)), base64.StdEncoding.EncodeToString(sum[:]), "application/json", cond)
}

// Copy implements Store with Copy Blob, server-side; a copy the service
// reports as pending is polled (Get Blob Properties) until it ends: a
// failed or aborted copy is an error with the service's reason, as is
// the destination taken over by another copy meanwhile.
func (a *Azure) Copy(ctx context.Context, dst, src string) error {
	dn, sn, err := copyKeys(a.prefix, dst, src)
	if err != nil {
		return err
	}
	source := a.blobURL(sn)
	if a.sas != nil {
		source += "?" + a.sas.Encode()
	}
	resp, err := a.do(ctx, http.MethodPut, a.blobURL(dn), http.Header{"x-ms-copy-source": {source}}, nil, 0)
	if err != nil {
		return fmt.Errorf("storage: copy %s: %w", src, err)
	}
	drain(resp)
	id := resp.Header.Get("x-ms-copy-id")
	for {
		switch status := resp.Header.Get("x-ms-copy-status"); {
		case id != "" && resp.Header.Get("x-ms-copy-id") != id:
			return fmt.Errorf("storage: copy %s: %s was taken over by another copy (%s) while this one was pending", src, dst, resp.Header.Get("x-ms-copy-id"))
		case status == "success":
			return nil
		case status != "pending":
			return fmt.Errorf("storage: copy %s: the copy %s: %s", src, cmp.Or(status, "has no status"), resp.Header.Get("x-ms-copy-status-description"))
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("storage: copy %s: still pending (%s copied): %w", src, resp.Header.Get("x-ms-copy-progress"), context.Cause(ctx))
		case <-time.After(200 * time.Millisecond):
		}
		if resp, err = a.do(ctx, http.MethodHead, a.blobURL(dn), nil, nil, 0); err != nil {
			return fmt.Errorf("storage: copy %s: %w", src, err)
		}
		drain(resp)
	}
}

// Get implements Store.
func (a *Azure) Get(ctx context.Context, key string, w io.Writer) error {
	n, err := a.name(key)
	if err != nil {
		return err
	}
	resp, err := a.do(ctx, http.MethodGet, a.blobURL(n), nil, nil, 0)
	if err == nil {
		err = readBody(w, resp)
	}
	if err != nil {
		return fmt.Errorf("storage: get %s: %w", key, err)
	}
	return nil
}

// List implements Store.
func (a *Azure) List(ctx context.Context, prefix string) ([]Object, error) {
	p := listPrefix(a.prefix, prefix)
	var out []Object
	marker := ""
	for {
		q := url.Values{"restype": {"container"}, "comp": {"list"}, "prefix": {p}}
		if marker != "" {
			q.Set("marker", marker)
		}
		resp, err := a.do(ctx, http.MethodGet, a.base+"/"+url.PathEscape(a.container)+"?"+q.Encode(), nil, nil, 0)
		if err != nil {
			return nil, fmt.Errorf("storage: list %s: %w", prefix, err)
		}
		var page struct {
			Blobs []struct {
				Name       string
				Properties struct {
					LastModified  string `xml:"Last-Modified"`
					ContentLength int64  `xml:"Content-Length"`
					Etag          string
				}
			} `xml:"Blobs>Blob"`
			NextMarker string
		}
		err = xml.NewDecoder(resp.Body).Decode(&page)
		resp.Body.Close()
		if err != nil {
			return nil, fmt.Errorf("storage: list %s: %w", prefix, err)
		}
		for _, b := range page.Blobs {
			mod, _ := http.ParseTime(b.Properties.LastModified)
			out = append(out, Object{Key: strings.TrimPrefix(strings.TrimPrefix(b.Name, a.prefix), "/"), Size: b.Properties.ContentLength, ModTime: mod, ETag: b.Properties.Etag})
		}
		if page.NextMarker == "" {
			return out, nil
		}
		marker = page.NextMarker
	}
}

// Delete implements Store, Threads blobs at once.
func (a *Azure) Delete(ctx context.Context, keys ...string) error {
	names := make([]string, len(keys))
	for i, key := range keys {
		var err error
		if names[i], err = a.name(key); err != nil {
			return err
		}
	}
	err := deleteEach(ctx, names, a.threads, func(ctx context.Context, n string) error {
		resp, err := a.do(ctx, http.MethodDelete, a.blobURL(n), nil, nil, 0)
		if errors.Is(err, ErrNotFound) {
			return nil
		}
		if err == nil {
			drain(resp)
		}
		return err
	})
	if err != nil {
		return fmt.Errorf("storage: %w", err)
	}
	return nil
}

// CreateContainer makes the store's container (for set-up scripts and
// tests; preemptd itself never creates one: it needs only the data role).
func (a *Azure) CreateContainer(ctx context.Context) error {
	resp, err := a.do(ctx, http.MethodPut, a.base+"/"+url.PathEscape(a.container)+"?restype=container", nil, nil, 0)
	if err != nil {
		return fmt.Errorf("storage: create container %s: %w", a.container, err)
	}
	drain(resp)
	return nil
}

// AbortUploads implements Store: uncommitted blocks need no cleanup (see Azure).
func (a *Azure) AbortUploads(ctx context.Context, keys ...string) (int, error) {
	for _, k := range keys {
		if err := checkKey(k); err != nil {
			return 0, err
		}
	}
	return 0, nil
}

// CheckAccess is the doctor's credential check: a token (managed
// identity) and a listing of the prefix.
func (a *Azure) CheckAccess(ctx context.Context) error {
	if a.tokens != nil {
		if _, err := a.tokens.Token(); err != nil {
			return err
		}
	}
	_, err := a.List(ctx, "_preemptd")
	return err
}
