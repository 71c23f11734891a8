package storage_test

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/preemptd/preemptd/checkpoint/storage"
	"github.com/preemptd/preemptd/test/peers"
)

// TestGCSTokenFromMetadata: with no other credential, every request carries
// the VM's service-account token from the metadata server (a gate in front
// of fake-gcs-server refuses anything else), fetched once and fetched
// again before it expires; without a metadata server the error says where
// the token was sought.
func TestGCSTokenFromMetadata(t *testing.T) {
	g := peers.StartGCSVM(t)
	meta, host, refused := g.Meta, g.MetaHost, g.Refused
	meta.TokenTTL = 5*time.Minute + 1500*time.Millisecond // refreshed 5 minutes early: in 1.5 s
	st := g.Open(t, "runs", storage.Options{})
	ctx := t.Context()
	for i := range 3 {
		if err := st.PutBytes(ctx, fmt.Sprintf("k%d", i), []byte("x")); err != nil {
			t.Fatal(err)
		}
	}
	if n := meta.Issued(); n != 1 {
		t.Fatalf("%d tokens fetched for 3 requests within the token's life, want 1", n)
	}
	time.Sleep(1600 * time.Millisecond)
	if err := st.PutBytes(ctx, "k3", []byte("x")); err != nil {
		t.Fatal(err)
	}
	if n := meta.Issued(); n != 2 {
		t.Fatalf("%d tokens fetched; the token within 5 minutes of expiry was not refreshed", n)
	}
	if n := refused.Load(); n != 0 {
		t.Fatalf("the gate refused %d requests", n)
	}
	if s := fmt.Sprint(st); !strings.Contains(s, "service account") || !strings.Contains(s, host) {
		t.Fatalf("String() = %q: it must say where the token comes from", s)
	}

	dead := open(t, g.URL("runs"), storage.Options{Endpoint: g.Endpoint, GCPMetadata: "127.0.0.1:1", Getenv: env()})
	err := dead.PutBytes(ctx, "k", []byte("x"))
	if err == nil || !strings.Contains(err.Error(), "service-account token") {
		t.Fatalf("without a metadata server: %v", err)
	}
}

// TestGCSReadOnlyScope: a VM whose access scopes only read Cloud Storage
// (Compute Engine's default) fails the doctor's check with the fix.
func TestGCSReadOnlyScope(t *testing.T) {
	g := peers.StartGCSVM(t)
	meta := g.Meta
	check := g.Open(t, "runs", storage.Options{}).(interface{ CheckAccess(context.Context) error })
	if err := check.CheckAccess(t.Context()); err != nil {
		t.Fatalf("cloud-platform scope: %v", err)
	}
	meta.Set("instance/service-accounts/default/scopes", "https://www.googleapis.com/auth/devstorage.read_only\nhttps://www.googleapis.com/auth/logging.write\n")
	err := check.CheckAccess(t.Context())
	if err == nil || !strings.Contains(err.Error(), "set-service-account") || !strings.Contains(err.Error(), "--scopes") {
		t.Fatalf("read-only scope: %v, want the gcloud fix", err)
	}
}

// TestGCSServiceAccountKey: GOOGLE_APPLICATION_CREDENTIALS names a key
// file; preemptd signs a JWT with its key for the token endpoint (checked
// here as Google's does: RS256 over the key, the key's email as issuer,
// the storage scope, the endpoint as audience) and sends the token it gets.
func TestGCSServiceAccountKey(t *testing.T) {
	key, _ := rsa.GenerateKey(rand.Reader, 2048)
	der, _ := x509.MarshalPKCS8PrivateKey(key)
	const email = "ckpt@proj.iam.gserviceaccount.com"
	var tokenURL string
	tokens := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		r.ParseForm()
		if r.Form.Get("grant_type") != "urn:ietf:params:oauth:grant-type:jwt-bearer" {
			http.Error(w, "grant_type", http.StatusBadRequest)
			return
		}
		parts := strings.Split(r.Form.Get("assertion"), ".")
		if len(parts) != 3 {
			http.Error(w, "assertion", http.StatusBadRequest)
			return
		}
		sig, _ := base64.RawURLEncoding.DecodeString(parts[2])
		sum := sha256.Sum256([]byte(parts[0] + "." + parts[1]))
		if rsa.VerifyPKCS1v15(&key.PublicKey, crypto.SHA256, sum[:], sig) != nil {
			http.Error(w, `{"error":"invalid_grant"}`, http.StatusBadRequest)
			return
		}
		var claims struct{ Iss, Scope, Aud string }
		b, _ := base64.RawURLEncoding.DecodeString(parts[1])
		json.Unmarshal(b, &claims)
		if claims.Iss != email || claims.Scope != "https://www.googleapis.com/auth/devstorage.read_write" || claims.Aud != tokenURL {
			http.Error(w, fmt.Sprintf("claims %+v", claims), http.StatusBadRequest)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprint(w, `{"access_token":"sa-token","expires_in":3600,"token_type":"Bearer"}`)
	}))
	t.Cleanup(tokens.Close)
	tokenURL = tokens.URL + "/token"
	keyFile := filepath.Join(t.TempDir(), "key.json")
	doc, _ := json.Marshal(map[string]string{"type": "service_account", "client_email": email, "private_key_id": "k1",
		"private_key": string(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})), "token_uri": tokenURL})
	os.WriteFile(keyFile, doc, 0o600)

	g := peers.StartFakeGCS(t)
	gate, refused := g.RequireTokens(t, func(tok string) bool { return tok == "sa-token" })
	st := open(t, g.URL("runs"), storage.Options{Endpoint: gate, Getenv: env("GOOGLE_APPLICATION_CREDENTIALS", keyFile)})
	f, b := randomFile(t, 11<<20)
	if err := st.PutFile(t.Context(), "ck/shard", f, int64(len(b))); err != nil {
		t.Fatal(err)
	}
	if refused.Load() != 0 {
		t.Fatalf("the gate refused %d requests", refused.Load())
	}

	user := filepath.Join(t.TempDir(), "adc.json")
	os.WriteFile(user, []byte(`{"type":"authorized_user","client_id":"x","refresh_token":"y"}`), 0o600)
	_, err := storage.Open(g.URL("runs"), storage.Options{Getenv: env("GOOGLE_APPLICATION_CREDENTIALS", user)})
	if err == nil || !strings.Contains(err.Error(), "service_account") {
		t.Fatalf("a user's credentials file: %v, want a clear refusal", err)
	}
}

// TestGCSAbortUploads: the temporary parts a crash left under one key are
// deleted at the next start; another key's are not.
func TestGCSAbortUploads(t *testing.T) {
	g := peers.StartGCSVM(t)
	plant := func(name string) { // straight to the server, past the gate
		u := g.GCS.Endpoint + "/upload/storage/v1/b/" + g.Bucket + "/o?uploadType=media&name=" + url.QueryEscape(name)
		resp, err := http.Post(u, "application/octet-stream", strings.NewReader("part"))
		if err != nil || resp.StatusCode != http.StatusOK {
			t.Fatalf("plant %s: %v %v", name, err, resp)
		}
		resp.Body.Close()
	}
	for _, n := range []string{"runs/_preemptd/uploads/ck/a/0011/00000", "runs/_preemptd/uploads/ck/a/0011/00001",
		"runs/_preemptd/uploads/ck/a/0022/00000", "runs/_preemptd/uploads/ck/ab/0033/00000"} {
		plant(n)
	}
	st := g.Open(t, "runs", storage.Options{})
	if objs, _ := st.List(t.Context(), ""); len(objs) != 0 {
		t.Fatalf("temporaries listed as objects: %v", objs)
	}
	n, err := st.AbortUploads(t.Context(), "ck/a")
	if err != nil || n != 2 {
		t.Fatalf("aborted %d uploads (%v), want the 2 of ck/a", n, err)
	}
	left := g.Objects(t, "runs/_preemptd/uploads/")
	if len(left) != 1 || left[0] != "runs/_preemptd/uploads/ck/ab/0033/00000" {
		t.Fatalf("left %v, want only ck/ab's part", left)
	}
}

// TestAzureManagedIdentity: with no key or SAS, the store asks IMDS for a
// token for https://storage.azure.com/ (fakes.Azure answers as IMDS does)
// and Azurite, in its OAuth mode, takes it: a file of several blocks, a
// copy, a listing and a read all go through on the token. A client id the
// VM lacks is refused with the reason.
func TestAzureManagedIdentity(t *testing.T) {
	a := peers.StartAzuriteOAuth(t)
	imds, imdsURL := peers.AzureIMDS(t)
	imds.ClientIDs = []string{"11111111-2222-3333-4444-555555555555"}
	for _, clientID := range []string{"", "11111111-2222-3333-4444-555555555555"} {
		st := a.Open(t, "runs", storage.Options{AzureIMDS: imdsURL, PartSize: 4 << 20, Getenv: env("AZURE_CLIENT_ID", clientID)})
		f, b := randomFile(t, 10<<20)
		ctx := t.Context()
		if err := st.PutFile(ctx, "ck/shard", f, int64(len(b))); err != nil {
			t.Fatalf("client id %q: %v", clientID, err)
		}
		if err := st.Copy(ctx, "ck/copy", "ck/shard"); err != nil {
			t.Fatal(err)
		}
		if got := get(t, st, "ck/copy"); string(got) != string(b) {
			t.Fatal("copy read back differs")
		}
		if objs, err := st.List(ctx, "ck"); err != nil || len(objs) != 2 {
			t.Fatalf("list: %v %v", objs, err)
		}
		if err := st.(interface{ CheckAccess(context.Context) error }).CheckAccess(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if imds.Issued() != 2 {
		t.Fatalf("%d tokens fetched for two stores, want one each", imds.Issued())
	}
	// Azurite checks the token: one that is not a JWT for storage is refused.
	bogus := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, `{"access_token":"not-a-jwt","expires_on":"%d","token_type":"Bearer"}`, time.Now().Add(time.Hour).Unix())
	}))
	t.Cleanup(bogus.Close)
	st := a.Open(t, "runs", storage.Options{AzureIMDS: bogus.URL, Getenv: env()})
	if err := st.PutBytes(t.Context(), "k", []byte("x")); err == nil {
		t.Fatal("Azurite took a token that is not one: the test would prove nothing")
	}
	st = a.Open(t, "runs", storage.Options{AzureIMDS: imdsURL, Getenv: env("AZURE_CLIENT_ID", "99999999-0000-0000-0000-000000000000")})
	err := st.PutBytes(t.Context(), "k", []byte("x"))
	if err == nil || !strings.Contains(err.Error(), "Identity not found") || !strings.Contains(err.Error(), "AZURE_CLIENT_ID") {
		t.Fatalf("an identity the VM lacks: %v", err)
	}
}

// TestAzureSAS: AZURE_STORAGE_SAS_TOKEN alone is enough: blocks, a copy
// (its source carries the SAS too), a listing and a read.
func TestAzureSAS(t *testing.T) {
	a := peers.StartAzurite(t)
	st := a.Open(t, "runs", storage.Options{PartSize: 4 << 20, Getenv: env("AZURE_STORAGE_SAS_TOKEN", "?"+peers.AzuriteSAS())})
	f, b := randomFile(t, 9<<20)
	ctx := t.Context()
	if err := st.PutFile(ctx, "ck/shard", f, int64(len(b))); err != nil {
		t.Fatal(err)
	}
	if err := st.Copy(ctx, "ck/copy", "ck/shard"); err != nil {
		t.Fatal(err)
	}
	if got := get(t, st, "ck/copy"); string(got) != string(b) {
		t.Fatal("copy read back differs")
	}
	if s := fmt.Sprint(st); strings.Contains(s, "sig=") {
		t.Fatalf("String() shows the SAS: %s", s)
	}
	if _, err := storage.Open(a.URL("runs"), storage.Options{Getenv: env("AZURE_STORAGE_SAS_TOKEN", "not-a-sas")}); err == nil {
		t.Fatal("a SAS token without sig accepted")
	}
}

// TestOpenCloudURLs: the URL forms each cloud's store takes, and clear
// errors for names the service would refuse.
func TestOpenCloudURLs(t *testing.T) {
	for _, tc := range []struct{ url, want string }{
		{"azblob://acct/ckpt/runs/a", "azblob://acct/ckpt/runs/a (endpoint https://acct.blob.core.windows.net"},
		{"https://acct.blob.core.windows.net/ckpt/runs", "azblob://acct/ckpt/runs (endpoint https://acct.blob.core.windows.net"},
		{"https://acct.blob.core.usgovcloudapi.net/ckpt", "azblob://acct/ckpt/ (endpoint https://acct.blob.core.usgovcloudapi.net,"},
		{"gs://bucket/runs", "gs://bucket/runs (endpoint https://storage.googleapis.com, token from the VM's service account (metadata server 169.254.169.254)"},
		{"azblob://Acct_1/ckpt/runs", "not a storage account name"},
		{"azblob://acct/Ckpt/runs", "not a container name"},
		{"azblob://acct", "not a container name"},
		{"https://example.com/ckpt", "must be a blob endpoint"},
	} {
		st, err := storage.Open(tc.url, storage.Options{Getenv: env()})
		got := fmt.Sprint(err)
		if err == nil {
			got = st.String()
		}
		if !strings.Contains(got, tc.want) {
			t.Errorf("%s: %s, want %q", tc.url, got, tc.want)
		}
	}
	// gs:// with an HMAC key (and no key file) keeps GCS's S3-interoperable endpoint.
	st, err := storage.Open("gs://bucket/runs", storage.Options{Getenv: env("AWS_ACCESS_KEY_ID", "GOOG1E", "AWS_SECRET_ACCESS_KEY", "s")})
	if err != nil || !strings.Contains(st.String(), "gs://bucket/runs (endpoint storage.googleapis.com)") {
		t.Fatalf("gs:// with an HMAC key: %v %v", st, err)
	}
}
