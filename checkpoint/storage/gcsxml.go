package storage

import (
	"bytes"
	"context"
	"crypto/md5"
	"encoding/base64"
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
)

// A file of several parts goes to GCS as an XML API multipart upload
// where the server has one (Cloud Storage does; emulators may not): its
// parts are not objects, so nothing is deleted after the upload and no
// soft-deleted temporary is kept (and billed) for the bucket's soft-delete
// retention — 7 days by default — nor charged an early deletion outside
// Standard. Google's own guidance for parallel composite uploads points to
// XML API multipart uploads for these reasons. A server that answers the
// upload's start with anything but an upload id (an emulator without the
// XML API's multipart upload) gets the parallel composite upload instead.

// maxXMLParts is the most parts one XML API multipart upload takes.
const maxXMLParts = 10000

// errNoXMLMultipart is putXML's answer from a server without XML API
// multipart uploads.
var errNoXMLMultipart = errors.New("no XML API multipart upload")

// xmlURL is object name's address in the XML API (path style), with q.
func (g *GCS) xmlURL(name string, q string) string {
	segs := strings.Split(name, "/")
	for i, s := range segs {
		segs[i] = url.PathEscape(s)
	}
	u := g.base + "/" + url.PathEscape(g.bucket) + "/" + strings.Join(segs, "/")
	if q != "" {
		u += "?" + q
	}
	return u
}

// putXML uploads size bytes of f to object name as an XML API multipart
// upload of parts of ps bytes, each checked by its Content-MD5; an upload
// that fails is aborted.
func (g *GCS) putXML(ctx context.Context, name string, f *os.File, size, ps int64) error {
	id, err := g.startXML(ctx, name)
	if err != nil {
		return err
	}
	parts := splitParts(size, ps)
	etags := make([]string, len(parts))
	err = eachPart(ctx, parts, g.threads, func(ctx context.Context, p part) error {
		h := md5.New()
		if _, err := io.Copy(h, section(f, p)); err != nil {
			return err
		}
		hdr := http.Header{"Content-Md5": {base64.StdEncoding.EncodeToString(h.Sum(nil))}}
		q := url.Values{"partNumber": {strconv.Itoa(p.N + 1)}, "uploadId": {id}}
		resp, err := g.send(ctx, http.MethodPut, g.xmlURL(name, q.Encode()), hdr, func() io.Reader { return section(f, p) }, p.Length)
		if err != nil {
			return err
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if etags[p.N] = resp.Header.Get("ETag"); etags[p.N] == "" {
			return fmt.Errorf("GCS gave part %d no ETag", p.N+1)
		}
		return nil
	})
	if err == nil {
		err = g.completeXML(ctx, name, id, etags)
	}
	if err != nil {
		actx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer cancel()
		if aerr := g.abortXML(actx, name, id); aerr != nil && !errors.Is(aerr, ErrNotFound) {
			err = fmt.Errorf("%w (and the upload was not aborted: %v)", err, aerr)
		}
	}
	return err
}

// startXML starts an XML API multipart upload of object name and returns
// its id; errNoXMLMultipart when the server has no such upload.
func (g *GCS) startXML(ctx context.Context, name string) (string, error) {
	resp, err := g.send(ctx, http.MethodPost, g.xmlURL(name, "uploads"), http.Header{"Content-Type": {"application/octet-stream"}},
		func() io.Reader { return http.NoBody }, 0)
	if err != nil {
		if lacksXML(err) {
			return "", fmt.Errorf("%w: %w", errNoXMLMultipart, err)
		}
		return "", err
	}
	defer resp.Body.Close()
	var doc struct {
		UploadID string `xml:"UploadId"`
	}
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if xml.Unmarshal(b, &doc) != nil || doc.UploadID == "" {
		return "", fmt.Errorf("%w: the answer to its start holds no upload id", errNoXMLMultipart)
	}
	return doc.UploadID, nil
}

// completeXML assembles upload id of object name from its parts' ETags.
func (g *GCS) completeXML(ctx context.Context, name, id string, etags []string) error {
	type xpart struct {
		PartNumber int
		ETag       string
	}
	var doc struct {
		XMLName xml.Name `xml:"CompleteMultipartUpload"`
		Parts   []xpart  `xml:"Part"`
	}
	for i, e := range etags {
		doc.Parts = append(doc.Parts, xpart{PartNumber: i + 1, ETag: e})
	}
	body, _ := xml.Marshal(doc)
	resp, err := g.send(ctx, http.MethodPost, g.xmlURL(name, url.Values{"uploadId": {id}}.Encode()),
		http.Header{"Content-Type": {"application/xml"}}, func() io.Reader { return bytes.NewReader(body) }, int64(len(body)))
	if err != nil {
		return fmt.Errorf("complete: %w", err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	var answer struct {
		XMLName xml.Name
		Message string
	}
	if xml.Unmarshal(b, &answer) == nil && answer.XMLName.Local == "Error" {
		return fmt.Errorf("complete: GCS: %s", answer.Message)
	}
	return nil
}

// abortXML ends upload id of object name, its parts gone.
func (g *GCS) abortXML(ctx context.Context, name, id string) error {
	return g.do(ctx, http.MethodDelete, g.xmlURL(name, url.Values{"uploadId": {id}}.Encode()), nil, nil, 0, nil)
}

// lacksXML says whether err is a server's answer that it has no XML API
// multipart upload (an emulator): 400, 404, 405 or 501.
func lacksXML(err error) bool {
	var ge *gcsError
	return errors.Is(err, ErrNotFound) ||
		errors.As(err, &ge) && (ge.Status == http.StatusBadRequest || ge.Status == http.StatusMethodNotAllowed || ge.Status == http.StatusNotImplemented)
}

// abortXMLUnder aborts the XML API multipart uploads in flight to the
// objects named, found with one listing of the uploads below the store's
// prefix, and returns how many it aborted; none on a server without them.
func (g *GCS) abortXMLUnder(ctx context.Context, names []string) (int, error) {
	if g.noXML.Load() || len(names) == 0 {
		return 0, nil
	}
	q := url.Values{"uploads": {""}, "prefix": {g.prefix + "/"}}
	resp, err := g.send(ctx, http.MethodGet, g.base+"/"+url.PathEscape(g.bucket)+"?"+q.Encode(), nil, nil, 0)
	if err != nil {
		if lacksXML(err) {
			g.noXML.Store(true)
			return 0, nil
		}
		return 0, err
	}
	var doc struct {
		Uploads []struct {
			Key      string
			UploadID string `xml:"UploadId"`
		} `xml:"Upload"`
	}
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 8<<20))
	resp.Body.Close()
	if xml.Unmarshal(b, &doc) != nil {
		g.noXML.Store(true) // not the XML API's answer
		return 0, nil
	}
	n := 0
	for _, u := range doc.Uploads {
		if !slices.Contains(names, u.Key) {
			continue
		}
		if err := g.abortXML(ctx, u.Key, u.UploadID); err != nil && !errors.Is(err, ErrNotFound) {
			return n, err
		}
		n++
	}
	return n, nil
}
