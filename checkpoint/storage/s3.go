package storage

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"path"
	"strings"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"
)

// Upload tuning: S3 allows about 5 Gbps per connection, so large files go
// up as parallel parts read straight from the file (FPutObject reads parts
// concurrently unless SendContentMd5 is set, which preemptd never sets).
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
		&credentials.IAM{Endpoint: o.IMDSEndpoint},
	})
	c, err := minio.New(u.Host, &minio.Options{Creds: creds, Secure: u.Scheme == "https", Region: o.Region})
	if err != nil {
		return nil, fmt.Errorf("storage: %w", err)
	}
	s := &S3{c: c, bucket: bucket, prefix: prefix, scheme: scheme, endpoint: u.Host, partSize: o.PartSize, threads: o.Threads}
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
	if err := checkKey(k); err != nil {
		return "", err
	}
	return path.Join(s.prefix, k), nil
}

func notFound(err error, key string) error {
	var resp minio.ErrorResponse
	if errors.As(err, &resp) && (resp.Code == "NoSuchKey" || resp.StatusCode == 404) {
		return fmt.Errorf("%s: %w", key, ErrNotFound)
	}
	return err
}

// PutFile implements Store: parallel multipart from the file (minio-go reads
// parts with ReadAt, NumThreads at once); an error aborts the multipart
// upload.
func (s *S3) PutFile(ctx context.Context, key string, f *os.File, size int64) error {
	k, err := s.key(key)
	if err != nil {
		return err
	}
	_, err = s.c.PutObject(ctx, s.bucket, k, f, size, minio.PutObjectOptions{
		PartSize:             s.partSize,
		NumThreads:           s.threads,
		DisableContentSha256: true, // preemptd records its own SHA-256 of every file
		ContentType:          "application/octet-stream",
	})
	if err != nil {
		return fmt.Errorf("storage: put %s: %w", key, err)
	}
	return nil
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

// Copy implements Store with a server-side copy.
func (s *S3) Copy(ctx context.Context, dst, src string) error {
	dk, err := s.key(dst)
	if err != nil {
		return err
	}
	sk, err := s.key(src)
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
	p := s.prefix
	if prefix != "" {
		p = path.Join(s.prefix, prefix) + "/"
	} else if p != "" {
		p += "/"
	}
	var out []Object
	for o := range s.c.ListObjects(ctx, s.bucket, minio.ListObjectsOptions{Prefix: p, Recursive: true}) {
		if o.Err != nil {
			return nil, fmt.Errorf("storage: list %s: %w", prefix, o.Err)
		}
		out = append(out, Object{Key: strings.TrimPrefix(strings.TrimPrefix(o.Key, s.prefix), "/"), Size: o.Size})
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
