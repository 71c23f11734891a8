package peers

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"os/exec"
	"testing"
	"time"
)

// ToxiproxyVersion is the pinned toxiproxy (scripts/tools.sh installs it).
const ToxiproxyVersion = "v2.5.0"

// Toxiproxy is a running toxiproxy server.
type Toxiproxy struct {
	api string
}

// StartToxiproxy starts toxiproxy-server on 127.0.0.1, stopped at the end.
func StartToxiproxy(t testing.TB) *Toxiproxy {
	t.Helper()
	bin := Require(t, "toxiproxy-server", ToxiproxyVersion)
	port := FreePort(t)
	cmd := exec.Command(bin, "-host", "127.0.0.1", "-port", fmt.Sprint(port))
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	WaitListening(t, fmt.Sprintf("127.0.0.1:%d", port), 10*time.Second)
	return &Toxiproxy{api: fmt.Sprintf("http://127.0.0.1:%d", port)}
}

func (x *Toxiproxy) call(t testing.TB, method, path string, body any) {
	t.Helper()
	var b []byte
	if body != nil {
		b, _ = json.Marshal(body)
	}
	req, _ := http.NewRequest(method, x.api+path, bytes.NewReader(b))
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("toxiproxy %s %s: %v", method, path, err)
	}
	resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		t.Fatalf("toxiproxy %s %s: HTTP %d", method, path, resp.StatusCode)
	}
}

// Proxy creates a proxy to upstream and returns its address.
func (x *Toxiproxy) Proxy(t testing.TB, name, upstream string) string {
	t.Helper()
	listen := fmt.Sprintf("127.0.0.1:%d", FreePort(t))
	x.call(t, http.MethodPost, "/proxies", map[string]any{"name": name, "listen": listen, "upstream": upstream, "enabled": true})
	return listen
}

// Front is a proxy named name in front of the S3 server, for faults on
// the way to it; with rate > 0 its upload direction is capped at rate KB/s
// per connection (a bandwidth toxic named "slow", which Remove takes off).
func (x *Toxiproxy) Front(t testing.TB, name string, s3 *S3, rate int) string {
	t.Helper()
	u, err := url.Parse(s3.Endpoint)
	if err != nil {
		t.Fatal(err)
	}
	proxy := x.Proxy(t, name, u.Host)
	if rate > 0 {
		x.Toxic(t, name, "slow", "bandwidth", map[string]any{"rate": rate})
	}
	return proxy
}

// Toxic adds a toxic (e.g. "limit_data" with bytes, "bandwidth" with rate
// in KB/s) to the upstream direction of a proxy.
func (x *Toxiproxy) Toxic(t testing.TB, proxy, name, kind string, attrs map[string]any) {
	t.Helper()
	x.ToxicOn(t, proxy, "upstream", name, kind, attrs)
}

// ToxicOn adds a toxic to one direction of a proxy: "upstream" (what the
// client sends: uploads) or "downstream" (what the server answers:
// downloads).
func (x *Toxiproxy) ToxicOn(t testing.TB, proxy, stream, name, kind string, attrs map[string]any) {
	t.Helper()
	x.call(t, http.MethodPost, "/proxies/"+proxy+"/toxics", map[string]any{"name": name, "type": kind,
		"stream": stream, "toxicity": 1.0, "attributes": attrs})
}

// Remove deletes a toxic.
func (x *Toxiproxy) Remove(t testing.TB, proxy, name string) {
	t.Helper()
	x.call(t, http.MethodDelete, "/proxies/"+proxy+"/toxics/"+name, nil)
}

// SetEnabled turns a proxy off (it closes every connection and refuses new
// ones: the server is unreachable) or on again.
func (x *Toxiproxy) SetEnabled(t testing.TB, proxy string, on bool) {
	t.Helper()
	x.call(t, http.MethodPost, "/proxies/"+proxy, map[string]any{"enabled": on})
}
