// Package direct is HTTP to the cloud's instance metadata services: never
// through HTTP(S)_PROXY. A proxy cannot reach 169.254.169.254 (or answers
// for it with its own page), and Go's environment proxy exempts only
// loopback and NO_PROXY names, so every metadata client in preemptd uses
// this transport.
package direct

import (
	"net"
	"net/http"
	"net/url"
	"strings"
	"time"
)

// Transport returns a transport that ignores the proxy environment, with a
// short dial timeout (the metadata service is one hop away).
func Transport() *http.Transport {
	t := http.DefaultTransport.(*http.Transport).Clone()
	t.Proxy = nil
	t.DialContext = (&net.Dialer{Timeout: 2 * time.Second, KeepAlive: 30 * time.Second}).DialContext
	t.MaxIdleConns, t.MaxIdleConnsPerHost = 4, 4
	return t
}

// Client returns an http.Client over Transport, with the given overall
// timeout (0: none, for long-polls that carry their own).
func Client(timeout time.Duration) *http.Client {
	return &http.Client{Transport: Transport(), Timeout: timeout}
}

// HostOf is the host[:port] of endpoint, written either as a URL or as a
// bare host (GCE_METADATA_HOST's form).
func HostOf(endpoint string) string {
	if strings.Contains(endpoint, "://") {
		if u, err := url.Parse(endpoint); err == nil {
			return u.Host
		}
	}
	return strings.TrimSuffix(endpoint, "/")
}

// ToHost sends every request through next to host instead of the one it
// names (a metadata client that asks for 169.254.169.254 or
// GCE_METADATA_HOST, where the configuration names another endpoint).
func ToHost(next http.RoundTripper, host string) http.RoundTripper {
	return &toHost{next: next, host: host}
}

type toHost struct {
	next http.RoundTripper
	host string
}

func (r *toHost) RoundTrip(req *http.Request) (*http.Response, error) {
	req = req.Clone(req.Context())
	req.URL.Host, req.Host = r.host, r.host
	return r.next.RoundTrip(req)
}
