package peers

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"encoding/xml"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/preemptd/preemptd/checkpoint/storage"
	"github.com/preemptd/preemptd/test/fakes"
)

// Pinned versions of the other stores' servers (scripts/tools.sh installs
// the same).
const (
	FakeGCSVersion = "v1.56.1"
	AzuriteVersion = "3.37.0"
	VersityVersion = "v1.8.0"
)

// Azurite's well-known development account (published in Microsoft's
// documentation; it opens nothing but the emulator).
const (
	AzuriteAccount = "devstoreaccount1"
	AzuriteKey     = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)

// peerHTTP is how the helpers here ask a server something: never for
// longer than 30 s (a stuck emulator fails the test instead of hanging it).
var peerHTTP = &http.Client{Timeout: 30 * time.Second}

// process runs a server until the test ends, its output shown if it fails;
// env nil is this process's environment.
func process(t testing.TB, name string, args []string, env []string) *exec.Cmd {
	t.Helper()
	cmd := exec.Command(args[0], args[1:]...)
	cmd.Env = env
	out := &bytes.Buffer{}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		if t.Failed() {
			t.Logf("%s output:\n%s", name, out)
		}
	})
	return cmd
}

// GCS is a running fake-gcs-server (the JSON API of Google Cloud Storage)
// with a bucket.
type GCS struct {
	Endpoint string // http://127.0.0.1:PORT
	Bucket   string
	Dir      string
}

// URL is the store URL of prefix in the bucket.
func (g *GCS) URL(prefix string) string { return "gs://" + g.Bucket + "/" + prefix }

// StartFakeGCS starts fake-gcs-server on 127.0.0.1 (filesystem backend)
// with a fresh bucket, stopped at the test's end.
func StartFakeGCS(t testing.TB) *GCS {
	t.Helper()
	bin := Require(t, "fake-gcs-server", FakeGCSVersion)
	dir := t.TempDir()
	port := FreePort(t)
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	g := &GCS{Endpoint: "http://" + addr, Bucket: "ckpt", Dir: dir}
	process(t, "fake-gcs-server", []string{bin, "-scheme", "http", "-host", "127.0.0.1", "-port", fmt.Sprint(port),
		"-backend", "filesystem", "-filesystem-root", filepath.Join(dir, "data"), "-public-host", addr,
		"-external-url", g.Endpoint, "-log-level", "warn"}, nil)
	WaitListening(t, addr, 30*time.Second)
	resp, err := peerHTTP.Post(g.Endpoint+"/storage/v1/b", "application/json", strings.NewReader(`{"name":"`+g.Bucket+`"}`))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("fake-gcs-server: create bucket: HTTP %d", resp.StatusCode)
	}
	return g
}

// Objects lists every object name in the bucket below prefix.
func (g *GCS) Objects(t testing.TB, prefix string) []string {
	t.Helper()
	resp, err := peerHTTP.Get(g.Endpoint + "/storage/v1/b/" + g.Bucket + "/o?prefix=" + prefix)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var page struct{ Items []struct{ Name string } }
	if err := json.NewDecoder(resp.Body).Decode(&page); err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, it := range page.Items {
		names = append(names, it.Name)
	}
	return names
}

// Uploads counts the uploads left unfinished below prefix (the folders of
// temporary parts under <prefix>/_preemptd/uploads/).
func (g *GCS) Uploads(t testing.TB, prefix string) int {
	t.Helper()
	folders := map[string]bool{}
	for _, o := range g.Objects(t, prefix+"/_preemptd/uploads/") {
		folders[path.Dir(o)] = true
	}
	return len(folders)
}

// Azurite is a running Azurite blob service with a container.
type Azurite struct {
	Endpoint  string // http://127.0.0.1:PORT/devstoreaccount1 (https with StartAzuriteOAuth)
	Container string
	Dir       string
	// HTTP is a client that trusts the server's certificate (nil: plain HTTP).
	HTTP *http.Client
}

// URL is the store URL of prefix in the container.
func (a *Azurite) URL(prefix string) string {
	return "azblob://" + AzuriteAccount + "/" + a.Container + "/" + prefix
}

// Env is the account key, as the Azure CLI's variables carry it.
func (a *Azurite) Env() []string { return []string{"AZURE_STORAGE_KEY=" + AzuriteKey} }

// Getenv is Env as a storage.Options.Getenv.
func (a *Azurite) Getenv(k string) string {
	if k == "AZURE_STORAGE_KEY" {
		return AzuriteKey
	}
	return ""
}

// Open is preemptd's store on prefix of the container, with the account
// key unless o says otherwise.
func (a *Azurite) Open(t testing.TB, prefix string, o storage.Options) storage.Store {
	t.Helper()
	if o.Endpoint == "" {
		o.Endpoint = a.Endpoint
	}
	if o.Getenv == nil {
		o.Getenv = a.Getenv
	}
	if o.HTTP == nil {
		o.HTTP = a.HTTP
	}
	st, err := storage.Open(a.URL(prefix), o)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// StartAzurite starts Azurite's blob service on 127.0.0.1 (node 20 runs
// it; --skipApiVersionCheck lets it answer clients newer than itself) with
// a container, made with preemptd's own client.
func StartAzurite(t testing.TB) *Azurite {
	t.Helper()
	return startAzurite(t, "http", nil)
}

// StartAzuriteOAuth starts Azurite over HTTPS (a certificate made for the
// test; Azurite.HTTP trusts it) with its OAuth mode on, so that it takes
// bearer tokens as well as the account key: --oauth basic checks a token's
// audience, issuer and times (not its signature).
func StartAzuriteOAuth(t testing.TB) *Azurite {
	t.Helper()
	cert, key, pool := selfSigned(t)
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	return startAzurite(t, "https", hc, "--oauth", "basic", "--cert", cert, "--key", key)
}

func startAzurite(t testing.TB, scheme string, hc *http.Client, extra ...string) *Azurite {
	t.Helper()
	bin := Require(t, "azurite", AzuriteVersion)
	blob := filepath.Join(filepath.Dir(bin), "node_modules", ".bin", "azurite-blob")
	dir := t.TempDir()
	port := FreePort(t)
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	a := &Azurite{Endpoint: scheme + "://" + addr + "/" + AzuriteAccount, Container: "ckpt", Dir: dir, HTTP: hc}
	process(t, "azurite", append([]string{blob, "--blobHost", "127.0.0.1", "--blobPort", fmt.Sprint(port),
		"--location", filepath.Join(dir, "data"), "--silent", "--skipApiVersionCheck"}, extra...), nil)
	WaitListening(t, addr, 60*time.Second)
	if err := a.Open(t, "x", storage.Options{}).(*storage.Azure).CreateContainer(context.Background()); err != nil {
		t.Fatalf("azurite: %v", err)
	}
	return a
}

// selfSigned writes a certificate for 127.0.0.1 and its key, and returns
// a pool that trusts it.
func selfSigned(t testing.TB) (certFile, keyFile string, pool *x509.CertPool) {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "127.0.0.1"},
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IsCA: true, BasicConstraintsValid: true}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	certFile, keyFile = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	kb, _ := x509.MarshalECPrivateKey(key)
	if os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600) != nil ||
		os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb}), 0o600) != nil {
		t.Fatal("write the test certificate")
	}
	cert, _ := x509.ParseCertificate(der)
	pool = x509.NewCertPool()
	pool.AddCert(cert)
	return certFile, keyFile, pool
}

// Open is preemptd's store on prefix of the bucket (at o.Endpoint if set,
// put in front of the server), its credentials in this test's environment.
func (s *S3) Open(t *testing.T, prefix string, o storage.Options) storage.Store {
	t.Helper()
	s.SetEnv(t)
	if o.Endpoint == "" {
		o.Endpoint = s.Endpoint
	}
	o.Region = "us-east-1"
	st, err := storage.Open("s3://"+s.Bucket+"/"+prefix, o)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// StartVersity starts versitygw (a second S3 implementation) with the
// posix backend on 127.0.0.1 and a fresh bucket, with MinIO's test
// credentials so that S3.Env serves both.
func StartVersity(t testing.TB) *S3 {
	t.Helper()
	bin := Require(t, "versitygw", VersityVersion)
	dir := t.TempDir()
	root := filepath.Join(dir, "gw")
	if err := os.MkdirAll(root, 0o755); err != nil {
		t.Fatal(err)
	}
	addr := fmt.Sprintf("127.0.0.1:%d", FreePort(t))
	process(t, "versitygw", []string{bin, "--access", MinIOUser, "--secret", MinIOPassword, "--port", addr, "posix", root}, nil)
	s := &S3{Endpoint: "http://" + addr, Bucket: "ckpt", Dir: dir}
	WaitListening(t, addr, 30*time.Second)
	s.connect(t)
	return s
}

// GCPMetadata serves fakes.GCP (with its service-account tokens) on
// 127.0.0.1 until the test ends; host is what gcp.endpoint takes.
func GCPMetadata(t testing.TB) (meta *fakes.GCP, host string) {
	t.Helper()
	meta = fakes.NewGCP()
	srv := httptest.NewServer(meta)
	t.Cleanup(srv.Close)
	return meta, strings.TrimPrefix(srv.URL, "http://")
}

// AzureIMDS serves fakes.Azure (with its managed-identity tokens) on
// 127.0.0.1 until the test ends; the URL is what azure.endpoint takes.
func AzureIMDS(t testing.TB) (imds *fakes.Azure, endpoint string) {
	t.Helper()
	imds = fakes.NewAzure("vm-test")
	srv := httptest.NewServer(imds)
	t.Cleanup(srv.Close)
	return imds, srv.URL
}

// GCSVM is fake-gcs-server as a GCP VM's preemptd meets it: a metadata
// server issuing the VM's tokens (Meta, at MetaHost: gcp.endpoint) and a
// gate in front of the server (Endpoint: storage.endpoint) that passes only
// those tokens.
type GCSVM struct {
	*GCS
	Meta     *fakes.GCP
	MetaHost string
	Endpoint string
	Refused  *atomic.Int64
}

// StartGCSVM starts fake-gcs-server, a GCP metadata fake and the gate.
func StartGCSVM(t testing.TB) *GCSVM {
	t.Helper()
	g := &GCSVM{GCS: StartFakeGCS(t)}
	g.Meta, g.MetaHost = GCPMetadata(t)
	g.Endpoint, g.Refused = g.RequireTokens(t, g.Meta.Valid)
	return g
}

// Open is preemptd's store on prefix of the bucket through the gate (or
// o.Endpoint, put in front of it), on the VM's token, with o's tuning.
func (g *GCSVM) Open(t testing.TB, prefix string, o storage.Options) storage.Store {
	t.Helper()
	if o.Endpoint == "" {
		o.Endpoint = g.Endpoint
	}
	o.GCPMetadata, o.Getenv = g.MetaHost, func(string) string { return "" }
	st, err := storage.Open(g.URL(prefix), o)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// RequireTokens puts a gate in front of the server that answers 401 to any
// request without "Authorization: Bearer T" where valid(T) (fake-gcs-server
// accepts anything; the real service does not), and returns the gate's
// endpoint. It counts the requests it refused.
func (g *GCS) RequireTokens(t testing.TB, valid func(string) bool) (endpoint string, refused *atomic.Int64) {
	t.Helper()
	u, _ := url.Parse(g.Endpoint)
	rp := httputil.NewSingleHostReverseProxy(u)
	refused = &atomic.Int64{}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		tok, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		if !ok || !valid(tok) {
			refused.Add(1)
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusUnauthorized)
			fmt.Fprint(w, `{"error":{"code":401,"message":"Invalid Credentials","errors":[{"reason":"authError"}]}}`)
			return
		}
		rp.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	return srv.URL, refused
}

// AzuriteSAS is an account SAS for Azurite's account (the Blob service,
// every resource type, read/write/delete/list/create, an hour), signed with
// its key as `az storage account generate-sas` does (signed version
// 2019-12-12).
func AzuriteSAS() string {
	key, _ := base64.StdEncoding.DecodeString(AzuriteKey)
	v := url.Values{"sv": {"2019-12-12"}, "ss": {"b"}, "srt": {"sco"}, "sp": {"rwdlc"},
		"se": {time.Now().Add(time.Hour).UTC().Format("2006-01-02T15:04:05Z")}, "spr": {"https,http"}}
	sts := strings.Join([]string{AzuriteAccount, v.Get("sp"), v.Get("ss"), v.Get("srt"), "", v.Get("se"), "", v.Get("spr"), v.Get("sv"), ""}, "\n")
	m := hmac.New(sha256.New, key)
	m.Write([]byte(sts))
	v.Set("sig", base64.StdEncoding.EncodeToString(m.Sum(nil)))
	return v.Encode()
}

// Uncommitted counts the blobs in the container that exist only as blocks
// not yet committed (an upload in flight, or one a crash left): those
// listed with include=uncommittedblobs and not without.
func (a *Azurite) Uncommitted(t testing.TB) int {
	t.Helper()
	return a.countBlobs(t, "&include=uncommittedblobs") - a.countBlobs(t, "")
}

func (a *Azurite) countBlobs(t testing.TB, include string) int {
	t.Helper()
	resp, err := peerHTTP.Get(a.Endpoint + "/" + a.Container + "?restype=container&comp=list" + include + "&" + AzuriteSAS())
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var page struct {
		Blobs []struct{ Name string } `xml:"Blobs>Blob"`
	}
	if err := xml.NewDecoder(resp.Body).Decode(&page); err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("azurite: list blobs: HTTP %d: %v", resp.StatusCode, err)
	}
	return len(page.Blobs)
}
