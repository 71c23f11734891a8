// Package peers finds and starts the real programs preemptd's tests run
// against — amazon-ec2-metadata-mock, MinIO, versitygw, fake-gcs-server,
// Azurite and toxiproxy — installed at pinned versions by scripts/tools.sh
// into a cache outside the clone.
package peers

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"
)

// Pinned versions (scripts/tools.sh installs the same).
const (
	AEMMVersion  = "v1.13.0"
	MinIOVersion = "v0.0.0-20260212201848-7aac2a2c5b7c"
)

// MinIO's test credentials.
const (
	MinIOUser     = "preemptd-test"
	MinIOPassword = "preemptd-test-secret"
	// HelmVersion is scripts/tools.sh's HELM_VERSION.
	HelmVersion = "v3.22.0"
)

// Tool returns the cached binary name@version, or "" when not installed.
func Tool(name, version string) string {
	if p := os.Getenv("PREEMPTD_" + map[string]string{"ec2-metadata-mock": "AEMM", "minio": "MINIO"}[name]); p != "" {
		return p
	}
	cache := os.Getenv("PREEMPTD_TOOLS")
	if cache == "" {
		base, err := os.UserCacheDir()
		if err != nil {
			return ""
		}
		cache = filepath.Join(base, "preemptd", "tools")
	}
	p := filepath.Join(cache, name+"-"+version, name)
	if _, err := os.Stat(p); err != nil {
		return ""
	}
	return p
}

// Require returns the tool's path; without it the test fails under CI and
// is skipped elsewhere.
func Require(t testing.TB, name, version string) string {
	t.Helper()
	p := Tool(name, version)
	if p != "" {
		return p
	}
	if os.Getenv("CI") != "" {
		t.Fatalf("%s %s is not installed; `make tools` installs it (CI must run it)", name, version)
	}
	t.Skipf("%s not installed; run `make tools`", name)
	return ""
}

// FreePort returns a free TCP port on 127.0.0.1.
func FreePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// WaitListening waits until addr accepts connections.
func WaitListening(t testing.TB, addr string, d time.Duration) {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		c, err := net.Dial("tcp", addr)
		if err == nil {
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s not listening after %v", addr, d)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// S3 is a running MinIO server with a bucket.
type S3 struct {
	Endpoint string // http://127.0.0.1:PORT
	Bucket   string
	Client   *minio.Client
	Dir      string
}

// Env returns the AWS credential variables for the server.
func (s *S3) Env() []string {
	return []string{"AWS_ACCESS_KEY_ID=" + MinIOUser, "AWS_SECRET_ACCESS_KEY=" + MinIOPassword, "AWS_REGION=us-east-1"}
}

// SetEnv sets the credentials in this process's environment for the test.
func (s *S3) SetEnv(t *testing.T) {
	t.Setenv("AWS_ACCESS_KEY_ID", MinIOUser)
	t.Setenv("AWS_SECRET_ACCESS_KEY", MinIOPassword)
}

// StartMinIO starts a MinIO server on 127.0.0.1 with a fresh bucket,
// stopped at the test's end.
func StartMinIO(t testing.TB) *S3 {
	t.Helper()
	return startMinIO(t, "127.0.0.1", nil)
}

// StartMinIOBehind starts MinIO in the network namespace of link, reached
// over its veth pair (whose upload direction link caps).
func StartMinIOBehind(t testing.TB, link *Link) *S3 {
	t.Helper()
	return startMinIO(t, link.Far, []string{"ip", "netns", "exec", link.NS})
}

func startMinIO(t testing.TB, host string, wrap []string) *S3 {
	t.Helper()
	bin := Require(t, "minio", MinIOVersion)
	dir := t.TempDir()
	port, console := FreePort(t), FreePort(t)
	addr := fmt.Sprintf("%s:%d", host, port)
	args := append(append([]string{}, wrap...), bin, "server", "--quiet", "--address", addr, "--console-address",
		fmt.Sprintf("127.0.0.1:%d", console), filepath.Join(dir, "data"))
	process(t, "minio", args, append(os.Environ(), "MINIO_ROOT_USER="+MinIOUser, "MINIO_ROOT_PASSWORD="+MinIOPassword,
		"MINIO_BROWSER=off", "MINIO_UPDATE=off", "HOME="+dir))
	s := &S3{Endpoint: "http://" + addr, Bucket: "ckpt", Dir: dir}
	WaitListening(t, addr, 30*time.Second)
	s.connect(t) // MinIO answers 503 while it initialises: connect retries
	return s
}

// connect makes the client and the bucket, retrying for 30 s while the
// server starts.
func (s *S3) connect(t testing.TB) {
	t.Helper()
	c, err := minio.New(strings.TrimPrefix(s.Endpoint, "http://"), &minio.Options{Creds: credentials.NewStaticV4(MinIOUser, MinIOPassword, ""), Region: "us-east-1"})
	if err != nil {
		t.Fatal(err)
	}
	s.Client = c
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for {
		err = c.MakeBucket(ctx, s.Bucket, minio.MakeBucketOptions{})
		if err == nil {
			return
		}
		if ctx.Err() != nil {
			t.Fatalf("%s: make bucket: %v", s.Endpoint, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// Link is a network namespace reached from this one over a veth pair whose
// near end's egress (this machine's uploads) is shaped by a tbf qdisc: a
// real capped link, unlike a per-connection cap, for benchmarks.
type Link struct {
	NS, Dev  string
	Near     string // this side's address
	Far      string // the namespace's address
	linkRate string
	downRate string
}

var links atomic.Int32

// NewLink makes a namespace and veth pair, removed at the test's end; it
// skips unless this process may (root, iproute2).
func NewLink(t testing.TB, rate string) *Link {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("a capped link needs root (network namespaces, tc)")
	}
	if _, err := exec.LookPath("tc"); err != nil {
		t.Skip("a capped link needs iproute2 (ip, tc)")
	}
	n := links.Add(1)
	id := fmt.Sprintf("pd%d%d", os.Getpid()%10000, n)
	net := (os.Getpid() + int(n)) % 250 // another process's link (one left by a killed run) has another
	l := &Link{NS: id, Dev: id + "h", Near: fmt.Sprintf("10.231.%d.1", net), Far: fmt.Sprintf("10.231.%d.2", net)}
	run := func(args ...string) {
		t.Helper()
		if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	t.Cleanup(func() {
		exec.Command("ip", "netns", "del", l.NS).Run()
		exec.Command("ip", "link", "del", l.Dev).Run()
	})
	run("ip", "netns", "add", l.NS)
	run("ip", "link", "add", l.Dev, "type", "veth", "peer", "name", id+"n")
	run("ip", "link", "set", id+"n", "netns", l.NS)
	run("ip", "addr", "add", l.Near+"/30", "dev", l.Dev)
	run("ip", "link", "set", l.Dev, "up")
	run("ip", "netns", "exec", l.NS, "ip", "addr", "add", l.Far+"/30", "dev", id+"n")
	run("ip", "netns", "exec", l.NS, "ip", "link", "set", id+"n", "up")
	run("ip", "netns", "exec", l.NS, "ip", "link", "set", "lo", "up")
	l.SetRate(t, rate)
	return l
}

// SetRate caps this side's egress to rate (tc units: 400mbit, 1gbit) with
// a token bucket of 1 ms of traffic at least, as a provider's shaper does.
func (l *Link) SetRate(t testing.TB, rate string) {
	t.Helper()
	verb := "add"
	if l.linkRate != "" {
		verb = "change"
	}
	out, err := exec.Command("tc", "qdisc", verb, "dev", l.Dev, "root", "tbf", "rate", rate, "burst", "256kb", "latency", "50ms").CombinedOutput()
	if err != nil {
		t.Fatalf("tc: %v\n%s", err, out)
	}
	l.linkRate = rate
}

// SetDownRate caps the far side's egress (what the server sends: a
// download's direction) to rate, as SetRate caps the near side's.
func (l *Link) SetDownRate(t testing.TB, rate string) {
	t.Helper()
	verb := "add"
	if l.downRate != "" {
		verb = "change"
	}
	out, err := exec.Command("ip", "netns", "exec", l.NS, "tc", "qdisc", verb, "dev", strings.TrimSuffix(l.Dev, "h")+"n", "root", "tbf",
		"rate", rate, "burst", "256kb", "latency", "50ms").CombinedOutput()
	if err != nil {
		t.Fatalf("tc: %v\n%s", err, out)
	}
	l.downRate = rate
}

// IncompleteUploads counts the multipart uploads left in the bucket.
func (s *S3) IncompleteUploads(t testing.TB) int {
	t.Helper()
	n := 0
	for u := range s.Client.ListIncompleteUploads(context.Background(), s.Bucket, "", true) {
		if u.Err != nil {
			t.Fatal(u.Err)
		}
		n++
	}
	return n
}

// Chaos logs one row of the fault suite's summary ("CHAOS|fault|outcome|
// verdict") when the test ends; scripts/chaos.sh gathers them into a table.
func Chaos(t *testing.T, fault, outcome string) {
	t.Cleanup(func() {
		verdict := "ok"
		if t.Failed() {
			verdict = "FAILED"
		}
		t.Logf("CHAOS|%s|%s|%s", fault, outcome, verdict)
	})
}

// Python is the interpreter Debian's python3-torch installs for.
const Python = "/usr/bin/python3"

// RequireTorch skips (fails under CI) unless Python imports torch.
func RequireTorch(t testing.TB) {
	t.Helper()
	if err := exec.Command(Python, "-c", "import torch").Run(); err == nil {
		return
	}
	if os.Getenv("CI") != "" {
		t.Fatalf("%s cannot import torch; `make tools` (as root) installs Debian's python3-torch", Python)
	}
	t.Skipf("%s cannot import torch; run `make tools` as root", Python)
}

// Frameworks is the python of the frameworks' venv scripts/tools.sh
// installs (torch 2.x, Lightning, Transformers, Accelerate, JAX and Orbax,
// DeepSpeed; pinned by test/frameworks/requirements*.txt, in a folder
// named by their hash); the test is skipped without it (fails under CI).
func Frameworks(t testing.TB) string {
	t.Helper()
	root, err := filepath.Abs(filepath.Join(moduleRoot(), "test", "frameworks"))
	if err != nil {
		t.Fatal(err)
	}
	h := sha256.New()
	for _, f := range []string{"requirements.txt", "requirements-build.txt"} {
		b, err := os.ReadFile(filepath.Join(root, f))
		if err != nil {
			t.Fatal(err)
		}
		h.Write(b)
	}
	cache := os.Getenv("PREEMPTD_TOOLS")
	if cache == "" {
		base, _ := os.UserCacheDir()
		cache = filepath.Join(base, "preemptd", "tools")
	}
	dir := filepath.Join(cache, "frameworks-"+hex.EncodeToString(h.Sum(nil))[:12])
	if _, err := os.Stat(filepath.Join(dir, "installed")); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("the frameworks' venv %s is not installed: scripts/tools.sh installs it", dir)
		}
		t.Skipf("the frameworks' venv %s is not installed: run scripts/tools.sh", dir)
	}
	return filepath.Join(dir, "bin", "python")
}

// moduleRoot is the repository's root: the folder of go.mod above this
// test's working directory.
func moduleRoot() string {
	d, _ := os.Getwd()
	for {
		if _, err := os.Stat(filepath.Join(d, "go.mod")); err == nil {
			return d
		}
		up := filepath.Dir(d)
		if up == d {
			return "."
		}
		d = up
	}
}
