package storage

import (
	"bytes"
	"context"
	"crypto/md5"
	"encoding/base64"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"

	"github.com/preemptd/preemptd/internal/direct"
)

// Upload tuning: S3 allows about 5 Gbps per connection, so large files go
// up as parallel parts read straight from the file, each with a checksum
// the server checks (see PutFile).
const (
	DefaultPartSize = 64 << 20
	DefaultThreads  = 8
)

// S3 is a store in an S3-compatible bucket.
type S3 struct {
	c        *minio.Client
	bucket   string
	prefix   string
	scheme   string
	endpoint string
	partSize uint64
	threads  uint
	checksum string // "auto", "md5" or "crc32c"

	once sync.Once
	crc  bool // the server checks x-amz-checksum-crc32c (decided once)
}

// NewS3 builds the client: credentials from the AWS environment variables,
// the shared credentials file, then the instance role through IMDS.
func NewS3(scheme, bucket, prefix string, o Options) (*S3, error) {
	ep := o.Endpoint
	if ep == "" {
		ep = "https://s3.amazonaws.com"
		if scheme == "gs" {
			ep = "https://storage.googleapis.com"
		}
	}
	u, err := url.Parse(ep)
	if err != nil || u.Host == "" || (u.Scheme != "http" && u.Scheme != "https") {
		return nil, fmt.Errorf("storage.endpoint: %q is not a URL like https://s3.us-east-1.amazonaws.com", ep)
	}
	creds := credentials.NewChainCredentials([]credentials.Provider{
		&credentials.EnvAWS{},
		&credentials.FileAWSCredentials{},
		&credentials.IAM{Endpoint: o.IMDSEndpoint, Client: direct.Client(10 * time.Second)}, // never through a proxy
	})
	c, err := minio.New(u.Host, &minio.Options{Creds: creds, Secure: u.Scheme == "https", Region: o.Region})
	if err != nil {
		return nil, fmt.Errorf("storage: %w", err)
	}
	s := &S3{c: c, bucket: bucket, prefix: prefix, scheme: scheme, endpoint: u.Host, partSize: o.PartSize, threads: o.Threads,
		checksum: o.Checksum}
	switch s.checksum {
	case "", "auto":
		s.checksum = "auto"
	case "md5", "crc32c":
	default:
		return nil, fmt.Errorf("storage.checksum: %q is not auto, md5 or crc32c", o.Checksum)
	}
	if s.partSize == 0 {
		s.partSize = DefaultPartSize
	}
	if s.threads == 0 {
		s.threads = DefaultThreads
	}
	return s, nil
}

func (s *S3) String() string {
	return fmt.Sprintf("%s://%s/%s (endpoint %s)", s.scheme, s.bucket, s.prefix, s.endpoint)
}

func (s *S3) key(k string) (string, error) {
	return under(s.prefix, k)
}

func notFound(err error, key string) error {
	var resp minio.ErrorResponse
	if errors.As(err, &resp) && (resp.Code == "NoSuchKey" || resp.StatusCode == 404) {
		return fmt.Errorf("%s: %w", key, ErrNotFound)
	}
	return err
}

// PutFile implements Store. Every part carries a checksum of its bytes
// that the server checks (a part that does not match is refused, the
// upload aborted): CRC32C in x-amz-checksum-crc32c where the server checks
// it (cheap to compute), else Content-MD5, which every
// S3-compatible server checks (storage.checksum chooses; auto asks the
// server once, see crc32cChecked). A file no larger than one part goes up in
// a single PUT, a larger one as a multipart upload whose parts (PartSize)
// are read with ReadAt and sent Threads at once, each hashed just before it
// is sent. Nothing is visible under key until every part is there.
func (s *S3) PutFile(ctx context.Context, key string, f *os.File, size int64) error {
	k, err := s.key(key)
	if err != nil {
		return err
	}
	s.once.Do(func() { s.crc = s.checksum == "crc32c" || (s.checksum == "auto" && s.crc32cChecked(ctx)) })
	core := minio.Core{Client: s.c}
	opts := minio.PutObjectOptions{ContentType: "application/octet-stream", DisableContentSha256: true}
	if size <= int64(s.partSize) {
		md5sum, hdr, err := s.partSum(io.NewSectionReader(f, 0, size))
		if err != nil {
			return fmt.Errorf("storage: put %s: %w", key, err)
		}
		if hdr != nil {
			opts.UserMetadata = map[string]string{}
			for h := range hdr {
				opts.UserMetadata[h] = hdr.Get(h)
			}
		}
		if _, err := core.PutObject(ctx, s.bucket, k, io.NewSectionReader(f, 0, size), size, md5sum, "", opts); err != nil {
			return fmt.Errorf("storage: put %s: %w", key, err)
		}
		return nil
	}
	create := opts
	if s.crc {
		create.UserMetadata = map[string]string{"X-Amz-Checksum-Algorithm": "CRC32C"}
	}
	id, err := core.NewMultipartUpload(ctx, s.bucket, k, create)
	if err != nil {
		return fmt.Errorf("storage: put %s: %w", key, err)
	}
	parts, err := s.putParts(ctx, core, k, id, f, size)
	if err == nil {
		_, err = core.CompleteMultipartUpload(ctx, s.bucket, k, id, parts, opts)
	}
	if err != nil {
		actx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		defer cancel()
		_ = core.AbortMultipartUpload(actx, s.bucket, k, id)
		return fmt.Errorf("storage: put %s: %w", key, err)
	}
	return nil
}

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// partSum hashes a part: its Content-MD5, or its CRC32C headers.
func (s *S3) partSum(r io.Reader) (md5sum string, hdr http.Header, err error) {
	if !s.crc {
		md5sum, err = md5Of(r)
		return md5sum, nil, err
	}
	h := crc32.New(castagnoli)
	if _, err := io.Copy(h, r); err != nil {
		return "", nil, err
	}
	hdr = http.Header{}
	hdr.Set("X-Amz-Checksum-Crc32c", base64.StdEncoding.EncodeToString(h.Sum(nil)))
	hdr.Set("X-Amz-Sdk-Checksum-Algorithm", "CRC32C")
	return "", hdr, nil
}

// crc32cChecked asks the server, once, whether it checks
// x-amz-checksum-crc32c: a tiny object sent with a deliberately wrong one
// must be refused. A server that stores it anyway ignores the header, and
// Content-MD5 is used instead.
func (s *S3) crc32cChecked(ctx context.Context) bool {
	k, err := s.key(fmt.Sprintf("_preemptd/checksum-probe-%d", time.Now().UnixNano()))
	if err != nil {
		return false
	}
	body := []byte("preemptd checksum probe")
	core := minio.Core{Client: s.c}
	_, err = core.PutObject(ctx, s.bucket, k, bytes.NewReader(body), int64(len(body)), "", "", minio.PutObjectOptions{
		DisableContentSha256: true,
		UserMetadata:         map[string]string{"X-Amz-Checksum-Crc32c": "AAAAAA==", "X-Amz-Sdk-Checksum-Algorithm": "CRC32C"},
	})
	if err == nil { // stored despite a wrong checksum: the server ignores it
		_ = s.c.RemoveObject(ctx, s.bucket, k, minio.RemoveObjectOptions{})
		return false
	}
	// Only a refusal for the checksum itself says the server checks it (an
	// AccessDenied or a network error says nothing, and MD5 is kept).
	var resp minio.ErrorResponse
	return errors.As(err, &resp) && slices.Contains(checksumRefusals, resp.Code)
}

// checksumRefusals are the error codes of a PUT refused for its checksum:
// MinIO's (seen in its tests here) and S3's documented BadDigest.
var checksumRefusals = []string{"XAmzContentChecksumMismatch", "BadDigest", "InvalidDigest"}

// putParts uploads f's parts, Threads at once, each with its checksum.
func (s *S3) putParts(ctx context.Context, core minio.Core, k, id string, f *os.File, size int64) ([]minio.CompletePart, error) {
	ps := splitParts(size, int64(s.partSize))
	parts := make([]minio.CompletePart, len(ps))
	err := eachPart(ctx, ps, s.threads, func(ctx context.Context, p part) error {
		sum, hdr, err := s.partSum(section(f, p))
		if err != nil {
			return err
		}
		op, err := core.PutObjectPart(ctx, s.bucket, k, id, p.N+1, section(f, p), p.Length,
			minio.PutObjectPartOptions{Md5Base64: sum, CustomHeader: hdr, DisableContentSha256: true})
		if err != nil {
			return err
		}
		parts[p.N] = minio.CompletePart{PartNumber: p.N + 1, ETag: op.ETag}
		if hdr != nil {
			parts[p.N].ChecksumCRC32C = hdr.Get("X-Amz-Checksum-Crc32c")
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return parts, nil
}

// md5Of is the base64 MD5 of r, as Content-MD5 wants it.
func md5Of(r io.Reader) (string, error) {
	h := md5.New()
	if _, err := io.Copy(h, r); err != nil {
		return "", err
	}
	return base64.StdEncoding.EncodeToString(h.Sum(nil)), nil
}

// PutBytes implements Store.
func (s *S3) PutBytes(ctx context.Context, key string, b []byte) error {
	k, err := s.key(key)
	if err != nil {
		return err
	}
	_, err = s.c.PutObject(ctx, s.bucket, k, bytes.NewReader(b), int64(len(b)),
		minio.PutObjectOptions{ContentType: "application/json", DisableMultipart: true})
	if err != nil {
		return fmt.Errorf("storage: put %s: %w", key, err)
	}
	return nil
}

// Create implements Store with If-None-Match: * (S3 since 2024, MinIO):
// 412 Precondition Failed means the key exists.
func (s *S3) Create(ctx context.Context, key string, b []byte) error {
	opts := minio.PutObjectOptions{ContentType: "application/json", DisableMultipart: true}
	opts.SetMatchETagExcept("*")
	err := s.conditional(ctx, key, b, opts)
	if errors.Is(err, ErrConflict) {
		err = ErrExists
	}
	return createErr(key, err)
}

// GetVersion implements Swapper: the object's ETag.
func (s *S3) GetVersion(ctx context.Context, key string, w io.Writer) (string, error) {
	k, err := s.key(key)
	if err != nil {
		return "", err
	}
	obj, err := s.c.GetObject(ctx, s.bucket, k, minio.GetObjectOptions{})
	if err != nil {
		return "", notFound(err, key)
	}
	defer obj.Close()
	st, err := obj.Stat() // the answer the bytes below come from
	if err != nil {
		return "", notFound(err, key)
	}
	if _, err := io.Copy(w, obj); err != nil {
		return "", notFound(err, key)
	}
	return st.ETag, nil
}

// PutIf implements Swapper with If-Match on the ETag (If-None-Match: *
// for none): 412, or 404 for an object gone meanwhile, is ErrConflict.
// GCS's S3-interoperable XML API honours If-Match only on reads (its
// conditional write is x-goog-if-generation-match): ErrNoSwap.
func (s *S3) PutIf(ctx context.Context, key string, b []byte, version string) error {
	if s.scheme == "gs" {
		return ErrNoSwap
	}
	opts := minio.PutObjectOptions{ContentType: "application/json", DisableMultipart: true}
	if version == "" {
		opts.SetMatchETagExcept("*")
	} else {
		opts.SetMatchETag(version)
	}
	if err := s.conditional(ctx, key, b, opts); err != nil {
		return fmt.Errorf("storage: put %s if unchanged: %w", key, err)
	}
	return nil
}

// conditional puts b at key under opts' condition: a condition that does
// not hold (412, or 404 for an object gone) is ErrConflict. 409
// ConditionalRequestConflict is another write of the key in flight, which
// AWS documents as "retry the request": it is sent again after a pause (up
// to maxAttempts in all), never reported as a conflict — the other write
// may yet fail.
func (s *S3) conditional(ctx context.Context, key string, b []byte, opts minio.PutObjectOptions) error {
	k, err := s.key(key)
	if err != nil {
		return err
	}
	pause := 250 * time.Millisecond
	for n := 1; ; n++ {
		_, err = s.c.PutObject(ctx, s.bucket, k, bytes.NewReader(b), int64(len(b)), opts)
		var resp minio.ErrorResponse
		switch {
		case errors.As(err, &resp) && (resp.StatusCode == http.StatusPreconditionFailed || resp.StatusCode == http.StatusNotFound && resp.Code == "NoSuchKey"):
			return ErrConflict
		case errors.As(err, &resp) && resp.StatusCode == http.StatusConflict && n < maxAttempts:
			select {
			case <-ctx.Done():
				return fmt.Errorf("%w (after %s)", ctx.Err(), resp.Code)
			case <-time.After(pause):
			}
			pause = min(2*pause, 4*time.Second)
			continue
		}
		return err
	}
}

// Copy implements Store with a server-side copy.
func (s *S3) Copy(ctx context.Context, dst, src string) error {
	dk, sk, err := copyKeys(s.prefix, dst, src)
	if err != nil {
		return err
	}
	_, err = s.c.ComposeObject(ctx, minio.CopyDestOptions{Bucket: s.bucket, Object: dk},
		minio.CopySrcOptions{Bucket: s.bucket, Object: sk})
	if err != nil {
		return fmt.Errorf("storage: copy %s: %w", src, notFound(err, src))
	}
	return nil
}

// Get implements Store.
func (s *S3) Get(ctx context.Context, key string, w io.Writer) error {
	k, err := s.key(key)
	if err != nil {
		return err
	}
	obj, err := s.c.GetObject(ctx, s.bucket, k, minio.GetObjectOptions{})
	if err != nil {
		return notFound(err, key)
	}
	defer obj.Close()
	if _, err := io.Copy(w, obj); err != nil {
		return notFound(err, key)
	}
	return nil
}

// List implements Store.
func (s *S3) List(ctx context.Context, prefix string) ([]Object, error) {
	p := listPrefix(s.prefix, prefix)
	var out []Object
	for o := range s.c.ListObjects(ctx, s.bucket, minio.ListObjectsOptions{Prefix: p, Recursive: true}) {
		if o.Err != nil {
			return nil, fmt.Errorf("storage: list %s: %w", prefix, o.Err)
		}
		out = append(out, Object{Key: strings.TrimPrefix(strings.TrimPrefix(o.Key, s.prefix), "/"), Size: o.Size, ModTime: o.LastModified, ETag: o.ETag})
	}
	return out, nil
}

// Delete implements Store.
func (s *S3) Delete(ctx context.Context, keys ...string) error {
	for _, key := range keys {
		k, err := s.key(key)
		if err != nil {
			return err
		}
		if err := s.c.RemoveObject(ctx, s.bucket, k, minio.RemoveObjectOptions{}); err != nil {
			if !errors.Is(notFound(err, key), ErrNotFound) {
				return fmt.Errorf("storage: delete %s: %w", key, err)
			}
		}
	}
	return nil
}

// AbortUploads implements Store: the multipart uploads left to these keys
// by a crash or a cancelled upload, each listed by its exact key.
func (s *S3) AbortUploads(ctx context.Context, keys ...string) (int, error) {
	n := 0
	for _, key := range keys {
		k, err := s.key(key)
		if err != nil {
			return n, err
		}
		found := false
		for u := range s.c.ListIncompleteUploads(ctx, s.bucket, k, false) {
			if u.Err != nil {
				return n, fmt.Errorf("storage: list incomplete uploads of %s: %w", key, u.Err)
			}
			if u.Key == k {
				found = true
				n++
			}
		}
		if !found {
			continue
		}
		if err := s.c.RemoveIncompleteUpload(ctx, s.bucket, k); err != nil {
			return n, fmt.Errorf("storage: abort %s: %w", key, err)
		}
	}
	return n, nil
}

// Check says whether the bucket exists and answers (for doctor and start-up).
func (s *S3) Check(ctx context.Context) error {
	ok, err := s.c.BucketExists(ctx, s.bucket)
	if err != nil {
		return fmt.Errorf("storage: bucket %s: %w", s.bucket, err)
	}
	if !ok {
		return fmt.Errorf("storage: bucket %s does not exist (create it, or fix storage.url)", s.bucket)
	}
	return nil
}
