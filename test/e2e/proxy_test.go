package e2e

import (
	"errors"
	"net/http"
	"net/http/httptest"
	"os/exec"
	"sync/atomic"
	"testing"
	"time"
)

// TestMetadataNeverThroughProxy: with HTTP_PROXY and HTTPS_PROXY pointing at
// a recording proxy, a daemon watching the real link-local metadata address
// (nothing answers it here) sends none of its requests to the proxy, for
// each cloud and for detection.
func TestMetadataNeverThroughProxy(t *testing.T) {
	var hits atomic.Int32
	proxy := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		t.Logf("proxy got %s %s", r.Method, r.URL)
		w.WriteHeader(http.StatusBadGateway)
	}))
	defer proxy.Close()
	env := []string{"HTTP_PROXY=" + proxy.URL, "HTTPS_PROXY=" + proxy.URL, "http_proxy=" + proxy.URL, "NO_PROXY=", "no_proxy="}
	for _, provider := range []string{"aws", "gcp", "azure"} {
		d := startDaemon(t, "provider: "+provider+"\nmetrics: {listen: \"\"}\n", env...)
		time.Sleep(3 * time.Second) // several polls and identity requests
		d.status()
	}
	if out, code := runCLIEnv(t, env, "detect"); code != 0 {
		t.Logf("detect: %d %s", code, out)
	}
	if n := hits.Load(); n != 0 {
		t.Fatalf("%d metadata requests went through HTTP(S)_PROXY", n)
	}
}

// runCLIEnv is runCLI with env added.
func runCLIEnv(t *testing.T, env []string, args ...string) (string, int) {
	t.Helper()
	cmd := exec.Command(bin, args...)
	cmd.Env = append(cleanEnv(), env...)
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return string(out), ee.ExitCode()
	}
	if err != nil {
		t.Fatal(err)
	}
	return string(out), 0
}
