// Package storage is preemptd's object store: one interface, a local
// directory (file://, the embedded default), S3-compatible servers through
// minio-go (s3://), Google Cloud Storage (gs://: its JSON API with the VM's
// service account, or its S3-interoperable endpoint with an HMAC key) and
// Azure Blob Storage (azblob://, its REST API with the VM's managed
// identity, a SAS token or the account key). Keys are slash-separated
// paths below the URL's prefix.
package storage

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"net/url"
	"os"
	"path"
	"regexp"
	"strings"
	"time"
)

// ErrNotFound is returned for a key that does not exist.
var ErrNotFound = errors.New("not found")

// ErrExists is returned by Create for a key that already exists.
var ErrExists = errors.New("already exists")

// ErrConflict is returned by PutIf when the object changed (or appeared,
// or went) since the version the caller read.
var ErrConflict = errors.New("changed since it was read")

// ErrNoSwap is returned by PutIf where the service takes no condition on a
// replacement (GCS through its S3-interoperable API): the caller writes as
// it would without one.
var ErrNoSwap = errors.New("no conditional replace on this service")

// Swapper is a Store that replaces an object only if it is unchanged since
// it was read — compare-and-swap: S3's If-Match on the ETag, GCS's
// ifGenerationMatch, Azure Blob's If-Match, a lock in a directory. Every
// store here is one.
type Swapper interface {
	// GetVersion streams key into w and returns its version (ErrNotFound
	// when there is none).
	GetVersion(ctx context.Context, key string, w io.Writer) (string, error)
	// PutIf stores b at key only if key still has version ("": only if
	// there is no key), else returns ErrConflict.
	PutIf(ctx context.Context, key string, b []byte, version string) error
}

// createErr is Create's error for key from what the store's conditional
// write returned: ErrExists alone when the key was taken (not the server's
// words about it), else err.
func createErr(key string, err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, ErrExists):
		return fmt.Errorf("storage: create %s: %w", key, ErrExists)
	}
	return fmt.Errorf("storage: create %s: %w", key, err)
}

// Object is one stored object.
type Object struct {
	Key  string
	Size int64
	// ModTime is when the object was last written, as the store says.
	ModTime time.Time
	// ETag changes whenever the object is written (S3's and Azure's ETag,
	// GCS's generation); "" where the store has none (a directory: its
	// ModTime has nanoseconds).
	ETag string
}

// Same says whether a and b are one write of one object, as listings show
// it (a reader caches what it read from an object while it is the same).
func (a Object) Same(b Object) bool {
	return a.Key == b.Key && a.Size == b.Size && a.ModTime.Equal(b.ModTime) && a.ETag == b.ETag
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
	// GetRange streams the n bytes of key from offset off into w: exactly
	// those bytes, or an error (ErrShortRange when fewer came).
	GetRange(ctx context.Context, key string, off, n int64, w io.Writer) error
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
	// Endpoint is the service URL (default: AWS S3 for s3://, GCS for
	// gs://, https://ACCOUNT.blob.core.windows.net for azblob://).
	Endpoint string
	Region   string
	// IMDSEndpoint is where AWS instance-role credentials are fetched.
	IMDSEndpoint string
	// GCPMetadata is GCP's metadata server (gcp.endpoint: host or URL;
	// default GCE_METADATA_HOST, else 169.254.169.254), for the VM's token.
	GCPMetadata string
	// AzureIMDS is Azure's instance metadata service (azure.endpoint), for
	// the managed identity's token.
	AzureIMDS string
	// Getenv reads the credential variables (default os.Getenv).
	Getenv func(string) string
	// HTTP is the client for GCS and Azure (default: one sized for Threads).
	HTTP *http.Client
	// PartSize and Threads tune multipart uploads.
	PartSize uint64
	Threads  uint
	// Checksum is the per-part check the server makes: auto (CRC32C where
	// the server checks it, else Content-MD5), md5 or crc32c.
	Checksum string
	// ReadOnly opens a store only to read it: a local directory that does
	// not exist is ErrNoStore instead of being created.
	ReadOnly bool
}

// ErrNoStore is Open's answer, with ReadOnly, for a local store whose
// folder does not exist: nothing was ever written there.
var ErrNoStore = errors.New("no store there")

func (o Options) getenv() func(string) string {
	if o.Getenv != nil {
		return o.Getenv
	}
	return os.Getenv
}

// httpClient is o.HTTP, else a client that keeps a connection per upload
// thread (and no overall timeout: a part may take minutes on a slow link).
func (o Options) httpClient() *http.Client {
	if o.HTTP != nil {
		return o.HTTP
	}
	t := http.DefaultTransport.(*http.Transport).Clone()
	t.MaxIdleConnsPerHost = int(max(o.Threads, DefaultThreads)) + 4
	return &http.Client{Transport: t}
}

// Open returns the store named by rawURL: file:///path, s3://bucket/prefix,
// gs://bucket/prefix, azblob://account/container/prefix or
// https://ACCOUNT.blob.core.windows.net/container/prefix.
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
		if o.ReadOnly {
			if _, err := os.Stat(u.Path); errors.Is(err, fs.ErrNotExist) {
				return nil, fmt.Errorf("%w: %s does not exist", ErrNoStore, u.Path)
			}
			return &Dir{root: u.Path}, nil
		}
		return NewDir(u.Path)
	case "s3", "gs":
		if u.Host == "" {
			return nil, fmt.Errorf("storage.url: %q names no bucket; write %s://bucket/prefix", rawURL, u.Scheme)
		}
		getenv := o.getenv()
		if u.Scheme == "gs" && (getenv("GOOGLE_APPLICATION_CREDENTIALS") != "" ||
			getenv("AWS_ACCESS_KEY_ID") == "" || getenv("AWS_SECRET_ACCESS_KEY") == "") {
			return NewGCS(u.Host, strings.Trim(u.Path, "/"), o)
		}
		// s3://, or gs:// with an HMAC key in AWS_ACCESS_KEY_ID and
		// AWS_SECRET_ACCESS_KEY: GCS's S3-interoperable XML API.
		return NewS3(u.Scheme, u.Host, strings.Trim(u.Path, "/"), o)
	case "azblob", "https":
		account, rest, err := azureLocation(u)
		if err != nil {
			return nil, fmt.Errorf("storage.url: %q: %w", rawURL, err)
		}
		container, prefix, _ := strings.Cut(rest, "/")
		if u.Scheme == "https" && o.Endpoint == "" {
			o.Endpoint = "https://" + u.Host // another cloud's blob host (usgovcloudapi.net, chinacloudapi.cn)
		}
		return NewAzure(account, container, prefix, o)
	}
	return nil, fmt.Errorf("storage.url: %q: scheme must be file, s3, gs or azblob", rawURL)
}

var (
	azureAccount   = regexp.MustCompile(`^[a-z0-9]{3,24}$`)
	azureContainer = regexp.MustCompile(`^[a-z0-9](?:[a-z0-9]|-[a-z0-9]){2,62}$`)
)

// azureLocation reads azblob://account/container/prefix or
// https://account.blob.core.windows.net/container/prefix (any cloud's
// blob.* host) into the account and container/prefix.
func azureLocation(u *url.URL) (account, rest string, err error) {
	switch u.Scheme {
	case "azblob":
		account, rest = u.Host, strings.Trim(u.Path, "/")
	default:
		var ok bool
		account, _, ok = strings.Cut(u.Hostname(), ".blob.")
		if !ok {
			return "", "", fmt.Errorf("an https URL must be a blob endpoint, https://ACCOUNT.blob.core.windows.net/container/prefix")
		}
		rest = strings.Trim(u.Path, "/")
	}
	container, _, _ := strings.Cut(rest, "/")
	switch {
	case !azureAccount.MatchString(account):
		return "", "", fmt.Errorf("%q is not a storage account name (3 to 24 lowercase letters and digits); write azblob://account/container/prefix", account)
	case !azureContainer.MatchString(container):
		return "", "", fmt.Errorf("%q is not a container name (3 to 63 lowercase letters, digits and single hyphens); write azblob://account/container/prefix", container)
	}
	return account, rest, nil
}

var unsafeElement = regexp.MustCompile(`[^A-Za-z0-9._-]+`)

// SafeElement makes s usable as one element of a key: every run of
// characters other than letters, digits, '.', '_' and '-' becomes '_'.
func SafeElement(s string) string { return unsafeElement.ReplaceAllString(s, "_") }

// under is key below the store's prefix, refused if it would leave it.
func under(prefix, key string) (string, error) {
	if err := checkKey(key); err != nil {
		return "", err
	}
	return path.Join(prefix, key), nil
}

// copyKeys is under for both ends of a copy.
func copyKeys(prefix, dst, src string) (dk, sk string, err error) {
	if dk, err = under(prefix, dst); err == nil {
		sk, err = under(prefix, src)
	}
	return dk, sk, err
}

// listPrefix is what a listing of prefix below the store's asks the
// server for: a folder, so that runs/a does not list runs/ab.
func listPrefix(storePrefix, prefix string) string {
	switch {
	case prefix != "":
		return path.Join(storePrefix, prefix) + "/"
	case storePrefix != "":
		return storePrefix + "/"
	}
	return ""
}

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

var (
	_ Swapper = (*Dir)(nil)
	_ Swapper = (*S3)(nil)
	_ Swapper = (*GCS)(nil)
	_ Swapper = (*Azure)(nil)
)
