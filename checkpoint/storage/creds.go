package storage

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"cloud.google.com/go/compute/metadata"
	"golang.org/x/oauth2"
	"golang.org/x/oauth2/jwt"

	"github.com/preemptd/preemptd/internal/direct"
)

// The machine's own identity, for the clouds' stores: an OAuth token from
// the instance metadata service, refreshed five minutes before it expires
// (refreshEarly), never through a proxy.

// refreshEarly caches a token and refreshes it early before it expires;
// a refresh that fails while the cached token is still good for more than
// a minute is not an error: the cached one is used, and the next refresh
// is tried no sooner than retryAfter later, so that a metadata service's
// hiccup in a token's last minutes neither fails a request nor makes every
// request wait on it.
type refreshEarly struct {
	src        oauth2.TokenSource
	early      time.Duration
	retryAfter time.Duration
	now        func() time.Time

	mu       sync.Mutex
	tok      *oauth2.Token
	failedAt time.Time
}

func newRefreshEarly(src oauth2.TokenSource) *refreshEarly {
	return &refreshEarly{src: src, early: 5 * time.Minute, retryAfter: 10 * time.Second, now: time.Now}
}

// Token implements oauth2.TokenSource.
func (r *refreshEarly) Token() (*oauth2.Token, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	now := r.now()
	usable := r.tok != nil && (r.tok.Expiry.IsZero() || r.tok.Expiry.Sub(now) > time.Minute)
	if usable && (r.tok.Expiry.IsZero() || r.tok.Expiry.Sub(now) > r.early) {
		return r.tok, nil
	}
	if usable && !r.failedAt.IsZero() && now.Sub(r.failedAt) < r.retryAfter {
		return r.tok, nil // refreshed and failed a moment ago: keep using the good one
	}
	t, err := r.src.Token()
	if err != nil {
		if usable {
			r.failedAt = now
			return r.tok, nil
		}
		return nil, err
	}
	r.tok, r.failedAt = t, time.Time{}
	return t, nil
}

// gceMeta is GCP's metadata server, for the VM's service-account token.
type gceMeta struct {
	host string
	c    *metadata.Client
}

// newGCEMeta reaches the metadata server at endpoint (gcp.endpoint: host
// or URL), else GCE_METADATA_HOST, else 169.254.169.254.
func newGCEMeta(endpoint string, getenv func(string) string) *gceMeta {
	host := direct.HostOf(endpoint)
	if host == "" {
		host = getenv("GCE_METADATA_HOST")
	}
	if host == "" {
		host = "169.254.169.254"
	}
	rt := direct.ToHost(direct.Transport(), host)
	return &gceMeta{host: host, c: metadata.NewWithOptions(&metadata.Options{Client: &http.Client{Transport: rt, Timeout: 10 * time.Second}})}
}

func (m *gceMeta) get(ctx context.Context, suffix string) (string, error) {
	return m.c.GetWithContext(ctx, suffix)
}

// Token implements oauth2.TokenSource: the default service account's
// access token.
func (m *gceMeta) Token() (*oauth2.Token, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	v, err := m.get(ctx, "instance/service-accounts/default/token")
	if err != nil {
		return nil, fmt.Errorf("the VM's service-account token (does the VM have a service account?): %w", err)
	}
	var doc struct {
		AccessToken string `json:"access_token"`
		ExpiresIn   int64  `json:"expires_in"`
		TokenType   string `json:"token_type"`
	}
	if err := json.Unmarshal([]byte(v), &doc); err != nil || doc.AccessToken == "" {
		return nil, fmt.Errorf("the metadata server's token is not a token document")
	}
	return &oauth2.Token{AccessToken: doc.AccessToken, TokenType: doc.TokenType,
		Expiry: time.Now().Add(time.Duration(doc.ExpiresIn) * time.Second)}, nil
}

// serviceAccountTokens reads a service-account key file (the JSON that
// `gcloud iam service-accounts keys create` writes) and signs its own
// token requests with it.
func serviceAccountTokens(p string, hc *http.Client) (oauth2.TokenSource, error) {
	b, err := os.ReadFile(p)
	if err != nil {
		return nil, err
	}
	var key struct {
		Type         string `json:"type"`
		ClientEmail  string `json:"client_email"`
		PrivateKey   string `json:"private_key"`
		PrivateKeyID string `json:"private_key_id"`
		TokenURI     string `json:"token_uri"`
	}
	if err := json.Unmarshal(b, &key); err != nil {
		return nil, fmt.Errorf("%s: not a key file: %w", p, err)
	}
	if key.Type != "service_account" || key.ClientEmail == "" || key.PrivateKey == "" {
		return nil, fmt.Errorf("%s: type %q; preemptd takes a service-account key (type service_account) here, or nothing on a VM to use its own service account", p, key.Type)
	}
	if key.TokenURI == "" {
		key.TokenURI = "https://oauth2.googleapis.com/token"
	}
	cfg := &jwt.Config{Email: key.ClientEmail, PrivateKey: []byte(key.PrivateKey), PrivateKeyID: key.PrivateKeyID,
		Scopes: []string{gcsScope}, TokenURL: key.TokenURI}
	ctx := context.WithValue(context.Background(), oauth2.HTTPClient, hc)
	return newRefreshEarly(cfg.TokenSource(ctx)), nil
}

// azureIdentity is an Azure VM's managed identity: a token for resource
// from the instance metadata service.
type azureIdentity struct {
	endpoint string // http://169.254.169.254
	clientID string // a user-assigned identity; "" for the system-assigned one
	resource string
	hc       *http.Client
	budget   time.Duration // for the retries of one Token (default 30 s)
	pause    time.Duration // the first retry's wait (default 0.5 s), doubling
}

// Token implements oauth2.TokenSource, with the retries Azure documents
// for managed identities: 404 and 410 (IMDS is updating), 429 (throttled),
// 5xx and failed connections are tried again with exponential backoff
// (0.5 s doubling, within a.budget, 30 s by default); any other answer
// (400: no such identity) is final at once.
func (a *azureIdentity) Token() (*oauth2.Token, error) {
	budget := a.budget
	if budget == 0 {
		budget = 30 * time.Second
	}
	ctx, cancel := context.WithTimeout(context.Background(), budget)
	defer cancel()
	pause := a.pause
	if pause == 0 {
		pause = 500 * time.Millisecond
	}
	for try := 1; ; try++ {
		tok, again, err := a.fetch(ctx)
		if err == nil || !again {
			return tok, err
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("%w (tried %d times in %s)", err, try, budget)
		case <-time.After(pause):
		}
		pause = min(2*pause, 8*time.Second)
	}
}

// fetch asks IMDS once; again says whether Azure's guidance is to retry.
func (a *azureIdentity) fetch(ctx context.Context) (tok *oauth2.Token, again bool, err error) {
	q := url.Values{"api-version": {"2018-02-01"}, "resource": {a.resource}}
	if a.clientID != "" {
		q.Set("client_id", a.clientID)
	}
	rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(rctx, http.MethodGet, strings.TrimSuffix(a.endpoint, "/")+"/metadata/identity/oauth2/token?"+q.Encode(), nil)
	if err != nil {
		return nil, false, err
	}
	req.Header.Set("Metadata", "true")
	resp, err := a.hc.Do(req)
	if err != nil {
		return nil, true, fmt.Errorf("managed identity token: %w", err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if resp.StatusCode != http.StatusOK {
		code := resp.StatusCode
		again = code == http.StatusNotFound || code == http.StatusGone || code == http.StatusTooManyRequests || code >= 500
		hint := ""
		if code == http.StatusBadRequest || code == http.StatusNotFound {
			hint = " (does the VM have a managed identity? for a user-assigned one set AZURE_CLIENT_ID)"
		}
		return nil, again, fmt.Errorf("managed identity token: HTTP %d: %s%s", code, strings.TrimSpace(string(b)), hint)
	}
	// The numbers are strings in IMDS's answer.
	var doc struct {
		AccessToken string `json:"access_token"`
		ExpiresOn   string `json:"expires_on"`
		ExpiresIn   string `json:"expires_in"`
		TokenType   string `json:"token_type"`
	}
	if err := json.Unmarshal(b, &doc); err != nil || doc.AccessToken == "" {
		return nil, false, fmt.Errorf("managed identity token: not a token document")
	}
	tok = &oauth2.Token{AccessToken: doc.AccessToken, TokenType: "Bearer"}
	if on, err := strconv.ParseInt(doc.ExpiresOn, 10, 64); err == nil {
		tok.Expiry = time.Unix(on, 0)
	} else if in, err := strconv.ParseInt(doc.ExpiresIn, 10, 64); err == nil {
		tok.Expiry = time.Now().Add(time.Duration(in) * time.Second)
	}
	return tok, false, nil
}
