package storage

import (
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/oauth2"
)

// imdsAnswering serves Azure's token endpoint: the codes in order, then a
// token; it counts the requests.
func imdsAnswering(t *testing.T, codes ...int) (url string, asked *atomic.Int64) {
	asked = new(atomic.Int64)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n := int(asked.Add(1))
		if r.Header.Get("Metadata") != "true" {
			http.Error(w, "Required metadata header not specified", http.StatusBadRequest)
			return
		}
		if n <= len(codes) {
			w.WriteHeader(codes[n-1])
			fmt.Fprintf(w, `{"error":"code %d"}`, codes[n-1])
			return
		}
		fmt.Fprintf(w, `{"access_token":"tok-%d","expires_on":"%d","token_type":"Bearer"}`, n, time.Now().Add(time.Hour).Unix())
	}))
	t.Cleanup(srv.Close)
	return srv.URL, asked
}

// TestAzureIdentityRetriesAsDocumented: 404, 410, 429 and 5xx are tried
// again (Azure's guidance for IMDS), 400 is final at once.
func TestAzureIdentityRetriesAsDocumented(t *testing.T) {
	u, asked := imdsAnswering(t, 404, 410, 429, 500, 503)
	id := &azureIdentity{endpoint: u, resource: "https://storage.azure.com/", hc: http.DefaultClient, budget: time.Minute, pause: 10 * time.Millisecond}
	tok, err := id.Token()
	if err != nil || tok.AccessToken != "tok-6" || asked.Load() != 6 {
		t.Fatalf("token %v, err %v after %d requests; want tok-6 after 6", tok, err, asked.Load())
	}
	u, asked = imdsAnswering(t, 400)
	id = &azureIdentity{endpoint: u, resource: "https://storage.azure.com/", hc: http.DefaultClient, budget: time.Minute, pause: 10 * time.Millisecond}
	if _, err := id.Token(); err == nil || asked.Load() != 1 || !strings.Contains(err.Error(), "HTTP 400") {
		t.Fatalf("400: err %v after %d requests, want one request", err, asked.Load())
	}
	u, asked = imdsAnswering(t, 503, 503, 503, 503, 503, 503, 503, 503)
	id = &azureIdentity{endpoint: u, resource: "https://storage.azure.com/", hc: http.DefaultClient, budget: 300 * time.Millisecond, pause: 10 * time.Millisecond}
	if _, err := id.Token(); err == nil || !strings.Contains(err.Error(), "tried") || asked.Load() < 2 {
		t.Fatalf("a lasting 503: err %v after %d requests", err, asked.Load())
	}
}

type scriptedTokens struct {
	calls int
	errs  []error
	next  func() *oauth2.Token
}

func (s *scriptedTokens) Token() (*oauth2.Token, error) {
	s.calls++
	if len(s.errs) > 0 {
		err := s.errs[0]
		s.errs = s.errs[1:]
		if err != nil {
			return nil, err
		}
	}
	return s.next(), nil
}

// TestRefreshEarlyKeepsAGoodToken: in a token's last five minutes a failed
// refresh hands out the cached token (and is not tried again for
// retryAfter); a fresh token replaces it when a refresh works; with nothing
// usable cached the error is returned.
func TestRefreshEarlyKeepsAGoodToken(t *testing.T) {
	now := time.Date(2026, 12, 6, 12, 0, 0, 0, time.UTC)
	outage := errors.New("imds: 503")
	src := &scriptedTokens{next: func() *oauth2.Token { return &oauth2.Token{AccessToken: "a", Expiry: now.Add(time.Hour)} }}
	r := newRefreshEarly(src)
	r.now = func() time.Time { return now }
	if tok, err := r.Token(); err != nil || tok.AccessToken != "a" {
		t.Fatal(tok, err)
	}
	now = now.Add(57 * time.Minute) // three minutes left: refresh early
	src.errs = []error{outage, outage}
	src.next = func() *oauth2.Token { return &oauth2.Token{AccessToken: "b", Expiry: now.Add(time.Hour)} }
	if tok, err := r.Token(); err != nil || tok.AccessToken != "a" || src.calls != 2 {
		t.Fatalf("refresh failed with 3 minutes left: %v %v (calls %d)", tok, err, src.calls)
	}
	if tok, _ := r.Token(); tok.AccessToken != "a" || src.calls != 2 {
		t.Fatalf("asked again within retryAfter: calls %d", src.calls)
	}
	now = now.Add(11 * time.Second)
	if tok, _ := r.Token(); tok.AccessToken != "a" || src.calls != 3 {
		t.Fatalf("not asked again after retryAfter: calls %d", src.calls)
	}
	now = now.Add(11 * time.Second)
	if tok, err := r.Token(); err != nil || tok.AccessToken != "b" {
		t.Fatalf("after the outage: %v %v", tok, err)
	}
	now = now.Add(time.Hour - 30*time.Second) // 30 s left: not usable
	src.errs = []error{outage}
	if _, err := r.Token(); !errors.Is(err, outage) {
		t.Fatalf("nothing usable cached: %v", err)
	}
}

// TestAzureSASNotInErrors: a request that fails in transport (connection
// refused) is an error whose URL has no SAS left in it.
func TestAzureSASNotInErrors(t *testing.T) {
	const sas = "sv=2019-12-12&ss=b&srt=sco&sp=rwdlc&se=2030-01-01T00%3A00%3A00Z&sig=c2VjcmV0LXNpZ25hdHVyZQ%3D%3D"
	st, err := Open("azblob://acct/ckpt/runs", Options{Endpoint: "http://127.0.0.1:1/acct",
		Getenv: func(k string) string {
			if k == "AZURE_STORAGE_SAS_TOKEN" {
				return sas
			}
			return ""
		}})
	if err != nil {
		t.Fatal(err)
	}
	err = st.PutBytes(t.Context(), "step-1/x", []byte("x"))
	if err == nil || strings.Contains(err.Error(), "c2VjcmV0") || !strings.Contains(err.Error(), "?REDACTED") {
		t.Fatalf("PutBytes to a refused endpoint: %v", err)
	}
}
