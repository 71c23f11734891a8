package storage_test

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/preemptd/preemptd/checkpoint/storage"
	"github.com/preemptd/preemptd/test/peers"
)

// The services' answers below are written from their documentation
// (Azure Blob's REST reference for Copy Blob and Get Blob Properties and
// its error codes; Cloud Storage's JSON API error documents): the
// emulators never give them.

// fakeAzure serves one account "acct" with handle, and returns preemptd's
// store on container "ctr", prefix "runs", with the credential cred names:
// "key" (Shared Key; the signature is not checked: Azurite checks it in the
// other tests), "sas", or "identity" (a token from test/fakes' IMDS).
func fakeAzure(t *testing.T, cred string, handle http.HandlerFunc) storage.Store {
	t.Helper()
	srv := httptest.NewServer(handle)
	t.Cleanup(srv.Close)
	o := storage.Options{Endpoint: srv.URL + "/acct"}
	switch cred {
	case "key":
		o.Getenv = env("AZURE_STORAGE_KEY", base64.StdEncoding.EncodeToString([]byte("not-a-real-account-key")))
	case "sas":
		o.Getenv = env("AZURE_STORAGE_SAS_TOKEN", "sv=2021-12-02&ss=b&srt=co&sp=rwdlc&se=2026-01-01T00:00:00Z&sig=bm90LWEtc2ln")
	case "identity":
		_, o.AzureIMDS = peers.AzureIMDS(t)
		o.Getenv = env()
	}
	return open(t, "azblob://acct/ctr/runs", o)
}

// TestAzurePendingCopy: Copy Blob may answer "pending" (large blobs, other
// accounts); the copy is then done only when Get Blob Properties says
// success. A failed or aborted copy, one taken over by another copy, and
// one still pending when the caller gives up are errors that say so.
func TestAzurePendingCopy(t *testing.T) {
	var mu sync.Mutex
	polls := map[string]int{}
	st := fakeAzure(t, "key", func(w http.ResponseWriter, r *http.Request) {
		dst := strings.TrimPrefix(r.URL.Path, "/acct/ctr/runs/")
		mu.Lock()
		defer mu.Unlock()
		h := w.Header()
		switch r.Method {
		case http.MethodPut:
			if !strings.HasSuffix(r.Header.Get("x-ms-copy-source"), "/acct/ctr/runs/ck/src") {
				http.Error(w, "bad copy source "+r.Header.Get("x-ms-copy-source"), http.StatusBadRequest)
				return
			}
			h.Set("x-ms-copy-id", "id-"+dst)
			h.Set("x-ms-copy-status", "pending")
			w.WriteHeader(http.StatusAccepted)
		case http.MethodHead:
			polls[dst]++
			h.Set("x-ms-copy-id", "id-"+dst)
			h.Set("x-ms-copy-progress", fmt.Sprintf("%d/4096", 1024*polls[dst]))
			h.Set("x-ms-copy-status", "pending")
			switch {
			case dst == "ck/ok" && polls[dst] == 3:
				h.Set("x-ms-copy-status", "success")
			case dst == "ck/failed":
				h.Set("x-ms-copy-status", "failed")
				h.Set("x-ms-copy-status-description", `500 InternalError "Copy failed when reading the source."`)
			case dst == "ck/aborted":
				h.Set("x-ms-copy-status", "aborted")
			case dst == "ck/taken":
				h.Set("x-ms-copy-id", "someone-else")
			}
			w.WriteHeader(http.StatusOK)
		default:
			http.Error(w, r.Method, http.StatusMethodNotAllowed)
		}
	})
	ctx := t.Context()
	if err := st.Copy(ctx, "ck/ok", "ck/src"); err != nil {
		t.Fatalf("a copy pending twice, then done: %v", err)
	}
	if polls["ck/ok"] != 3 {
		t.Fatalf("polled %d times, want 3 (pending, pending, success)", polls["ck/ok"])
	}
	for dst, want := range map[string]string{
		"ck/failed":  "failed: 500 InternalError",
		"ck/aborted": "aborted",
		"ck/taken":   "taken over by another copy (someone-else)",
	} {
		bounded, cancel := context.WithTimeout(ctx, 5*time.Second) // (a copy that never ends fails the test)
		if err := st.Copy(bounded, dst, "ck/src"); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("copy to %s: %v, want an error saying %q", dst, err, want)
		}
		cancel()
	}
	short, cancel := context.WithTimeout(ctx, 700*time.Millisecond)
	defer cancel()
	err := st.Copy(short, "ck/forever", "ck/src")
	if err == nil || !strings.Contains(err.Error(), "still pending") || !strings.Contains(err.Error(), "/4096 copied") {
		t.Fatalf("a copy pending past the caller's deadline: %v", err)
	}
}

// TestRefusalsSayTheFix: each refusal the clouds document for a missing
// permission, a machine the account's network rules exclude, a bad
// signature or a refused token comes back once (it is not retried) with
// what to change.
func TestRefusalsSayTheFix(t *testing.T) {
	gcsDoc := func(code int, reason, msg string) string {
		return fmt.Sprintf(`{"error":{"code":%d,"message":%q,"errors":[{"message":%q,"domain":"global","reason":%q}]}}`, code, msg, msg, reason)
	}
	azDoc := func(code, msg string) string {
		return fmt.Sprintf("\ufeff<?xml version=\"1.0\" encoding=\"utf-8\"?><Error><Code>%s</Code><Message>%s\nRequestId:0f1e\nTime:2026-11-30T10:00:00.0000000Z</Message></Error>", code, msg)
	}
	for _, tc := range []struct {
		name, cloud string // cloud: gcs, or azure's credential: key, sas, identity
		status      int
		code, body  string
		want        []string
	}{
		{"gcs IAM", "gcs", 403, "", gcsDoc(403, "forbidden", "ckpt@proj.iam.gserviceaccount.com does not have storage.objects.create access to the Google Cloud Storage object. Permission 'storage.objects.create' denied on resource (or it may not exist)."),
			[]string{"storage.objects.create", "add-iam-policy-binding gs://bkt", "roles/storage.objectUser"}},
		{"gcs scope", "gcs", 403, "", gcsDoc(403, "insufficientPermissions", "Request had insufficient authentication scopes."),
			[]string{"--scopes cloud-platform"}},
		{"gcs token", "gcs", 401, "", gcsDoc(401, "authError", "Invalid Credentials"),
			[]string{"the token from the VM's service account (metadata server", "was refused", "enabled"}},
		{"azure role", "identity", 403, "AuthorizationPermissionMismatch", azDoc("AuthorizationPermissionMismatch", "This request is not authorized to perform this operation using this permission."),
			[]string{"Storage Blob Data Contributor"}},
		{"azure network", "identity", 403, "AuthorizationFailure", azDoc("AuthorizationFailure", "This request is not authorized to perform this operation."),
			[]string{"virtual network", "Storage Blob Data Contributor"}},
		{"azure key signature", "key", 403, "AuthenticationFailed", azDoc("AuthenticationFailed", "Server failed to authenticate the request. Make sure the value of Authorization header is formed correctly including the signature."),
			[]string{"AZURE_STORAGE_KEY", "keys list", "clock"}},
		{"azure SAS expired", "sas", 403, "AuthenticationFailed", azDoc("AuthenticationFailed", "Signed expiry time [Wed, 01 Jan 2026 00:00:00 GMT] must be after signed start time [Mon, 30 Nov 2026 10:00:00 GMT]"),
			[]string{"the SAS was refused", "se="}},
		{"azure no shared key", "key", 403, "KeyBasedAuthenticationNotPermitted", azDoc("KeyBasedAuthenticationNotPermitted", "Key based authentication is not permitted on this storage account."),
			[]string{"unset AZURE_STORAGE_KEY"}},
		{"azure token", "identity", 401, "InvalidAuthenticationInfo", azDoc("InvalidAuthenticationInfo", "Server failed to authenticate the request. Please refer to the information in the www-authenticate header."),
			[]string{"the token of the managed identity", "AZURE_CLIENT_ID"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var hits atomic.Int64
			refuse := func(w http.ResponseWriter, r *http.Request) {
				hits.Add(1)
				if tc.code != "" {
					w.Header().Set("x-ms-error-code", tc.code)
					w.Header().Set("Content-Type", "application/xml")
				} else {
					w.Header().Set("Content-Type", "application/json; charset=UTF-8")
				}
				w.WriteHeader(tc.status)
				fmt.Fprint(w, tc.body)
			}
			var st storage.Store
			if tc.cloud == "gcs" {
				srv := httptest.NewServer(http.HandlerFunc(refuse))
				t.Cleanup(srv.Close)
				_, host := peers.GCPMetadata(t)
				st = open(t, "gs://bkt/runs", storage.Options{Endpoint: srv.URL, GCPMetadata: host, Getenv: env()})
			} else {
				st = fakeAzure(t, tc.cloud, refuse)
			}
			err := st.PutBytes(t.Context(), "ck/step-1/.metadata", []byte("x"))
			if err == nil {
				t.Fatal("a refusal was taken for success")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not say %q", err, w)
				}
			}
			if n := hits.Load(); n != 1 {
				t.Errorf("the refusal was sent %d times: a refusal is not worth retrying", n)
			}
		})
	}
}

// TestS3CreateConflictIsNotExists: S3 answers a conditional create that
// races another write of the key with 409 ConditionalRequestConflict, which
// AWS documents as "retry the request" — not as the key existing. Create
// retries it; only 412 PreconditionFailed means the key is taken.
func TestS3CreateConflictIsNotExists(t *testing.T) {
	var puts atomic.Int32
	conflicts := int32(2)
	var stored atomic.Bool
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPut || r.Header.Get("If-None-Match") != "*" {
			http.Error(w, "unexpected "+r.Method, http.StatusBadRequest)
			return
		}
		w.Header().Set("Content-Type", "application/xml")
		switch n := puts.Add(1); {
		case n <= conflicts:
			w.WriteHeader(http.StatusConflict)
			fmt.Fprint(w, `<?xml version="1.0" encoding="UTF-8"?><Error><Code>ConditionalRequestConflict</Code>`+
				`<Message>A conflicting operation occurred. If using PutObject you can retry the request.</Message></Error>`)
		case stored.Load():
			w.WriteHeader(http.StatusPreconditionFailed)
			fmt.Fprint(w, `<?xml version="1.0" encoding="UTF-8"?><Error><Code>PreconditionFailed</Code>`+
				`<Message>At least one of the pre-conditions you specified did not hold</Message></Error>`)
		default:
			stored.Store(true)
			w.Header().Set("ETag", `"d41d8cd98f00b204e9800998ecf8427e"`)
		}
	}))
	defer srv.Close()
	st := open(t, "s3://bkt/runs", storage.Options{Endpoint: srv.URL, Region: "us-east-1",
		Getenv: env("AWS_ACCESS_KEY_ID", "AKIA0000", "AWS_SECRET_ACCESS_KEY", "secret")})
	t.Setenv("AWS_ACCESS_KEY_ID", "AKIA0000")
	t.Setenv("AWS_SECRET_ACCESS_KEY", "secret")
	if err := st.Create(context.Background(), "run/_job/notices/x.json", []byte("{}")); err != nil {
		t.Fatalf("create after two 409s: %v; want it retried and made", err)
	}
	if !stored.Load() || puts.Load() != conflicts+1 {
		t.Fatalf("%d PUTs, stored %v; want %d", puts.Load(), stored.Load(), conflicts+1)
	}
	if err := st.Create(context.Background(), "run/_job/notices/x.json", []byte("{}")); !errors.Is(err, storage.ErrExists) {
		t.Fatalf("create over the key: %v; want ErrExists (412)", err)
	}
}
