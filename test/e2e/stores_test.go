package e2e

import (
	"fmt"
	"net/url"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/preemptd/preemptd/test/peers"
)

// storePeer is one store kind's real server as the daemon is pointed at
// it: the config's storage section (and the metadata endpoint its token
// comes from), the credential variables, what an interrupted upload leaves
// on the server while it runs, and an outage.
type storePeer struct {
	name string
	// config is the storage section for run with threads upload threads.
	config func(run string, threads int) string
	env    []string
	// inFlight counts the uploads under way or left unfinished (S3:
	// multipart uploads; GCS: folders of temporary parts; Azure: blobs
	// with only uncommitted blocks).
	inFlight func(t *testing.T) int
	// down makes the store unreachable (true) or reachable again.
	down func(t *testing.T, down bool)
	// slow caps every connection to the store at kbs KB/s.
	slow func(t *testing.T, kbs int)
}

// forEachStore runs f against MinIO, fake-gcs-server (the VM's token from
// a GCP metadata fake, checked by a gate) and Azurite (account key), each
// reached through toxiproxy so that it can be made unreachable.
func forEachStore(t *testing.T, f func(t *testing.T, sp storePeer)) {
	front := func(t *testing.T, upstream string) (endpoint string, down func(*testing.T, bool), slow func(*testing.T, int)) {
		x := peers.StartToxiproxy(t)
		u, err := url.Parse(upstream)
		if err != nil {
			t.Fatal(err)
		}
		addr := x.Proxy(t, "store", u.Host)
		u.Host = addr
		return u.String(), func(t *testing.T, down bool) { x.SetEnabled(t, "store", !down) },
			func(t *testing.T, kbs int) { x.Toxic(t, "store", "slow", "bandwidth", map[string]any{"rate": kbs}) }
	}
	t.Run("minio", func(t *testing.T) {
		s3 := peers.StartMinIO(t)
		ep, down, slow := front(t, s3.Endpoint)
		f(t, storePeer{name: "minio",
			config: func(run string, threads int) string {
				return fmt.Sprintf("run_id: %s\nstorage: {url: \"s3://%s/runs\", endpoint: %q, region: us-east-1, threads: %d}\n",
					run, s3.Bucket, ep, threads)
			},
			env: s3.Env(), inFlight: func(t *testing.T) int { return s3.IncompleteUploads(t) }, down: down, slow: slow})
	})
	t.Run("gcs", func(t *testing.T) {
		g := peers.StartGCSVM(t)
		ep, down, slow := front(t, g.Endpoint)
		f(t, storePeer{name: "gcs",
			config: func(run string, threads int) string {
				return fmt.Sprintf("run_id: %s\ngcp: {endpoint: %q}\nstorage: {url: %q, endpoint: %q, threads: %d}\n",
					run, g.MetaHost, g.URL("runs"), ep, threads)
			},
			inFlight: func(t *testing.T) int { return g.Uploads(t, "runs") }, down: down, slow: slow})
	})
	t.Run("azurite", func(t *testing.T) {
		a := peers.StartAzurite(t)
		ep, down, slow := front(t, a.Endpoint)
		f(t, storePeer{name: "azurite",
			config: func(run string, threads int) string {
				return fmt.Sprintf("run_id: %s\nstorage: {url: %q, endpoint: %q, threads: %d}\n", run, a.URL("runs"), ep, threads)
			},
			env: a.Env(), inFlight: func(t *testing.T) int { return a.Uncommitted(t) }, down: down, slow: slow})
	})
}

// TestDoctorCloudIdentity: `preemptd doctor` on a GCP VM whose access
// scopes only read Cloud Storage says so and how to fix it; with a
// writable scope it passes with the VM's token; on Azure, a user-assigned
// identity the VM lacks fails with the reason, the VM's own passes (the
// token is asked of IMDS; Azurite itself takes the account key here).
func TestDoctorCloudIdentity(t *testing.T) {
	dir := shortDir(t)
	doctor := func(cfg string, env ...string) (string, int) {
		p := filepath.Join(dir, "doctor.yaml")
		writeFile(t, p, fmt.Sprintf("provider: local\nrun_dir: %s\nstate_dir: %s\n%s", filepath.Join(dir, "run"), dir, cfg))
		cmd := exec.Command(bin, "doctor", "--config", p)
		cmd.Env = append(cleanEnv(), env...)
		out, err := cmd.CombinedOutput()
		code := 0
		if ee, ok := err.(*exec.ExitError); ok {
			code = ee.ExitCode()
		}
		return string(out), code
	}
	g := peers.StartGCSVM(t)
	gcs := fmt.Sprintf("gcp: {endpoint: %q}\nstorage: {url: %q, endpoint: %q}\n", g.MetaHost, g.URL("runs"), g.Endpoint)
	out, code := doctor(gcs)
	if code != 0 || !strings.Contains(out, "OK    store access") || !strings.Contains(out, "write, read back and delete work") {
		t.Fatalf("writable scope: exit %d\n%s", code, out)
	}
	g.Meta.Set("instance/service-accounts/default/scopes", "https://www.googleapis.com/auth/devstorage.read_only\n")
	out, code = doctor(gcs)
	if code != 1 || !strings.Contains(out, "FAIL  store access") || !strings.Contains(out, "gcloud compute instances set-service-account") {
		t.Fatalf("read-only scope: exit %d\n%s", code, out)
	}

	imds, imdsURL := peers.AzureIMDS(t)
	imds.ClientIDs = []string{"11111111-2222-3333-4444-555555555555"}
	a := peers.StartAzurite(t)
	az := fmt.Sprintf("azure: {endpoint: %q}\nstorage: {url: %q, endpoint: %q}\n", imdsURL, a.URL("runs"), a.Endpoint)
	out, code = doctor(az, "AZURE_CLIENT_ID=99999999-0000-0000-0000-000000000000")
	if code != 1 || !strings.Contains(out, "FAIL  store access") || !strings.Contains(out, "AZURE_CLIENT_ID") {
		t.Fatalf("an identity the VM lacks: exit %d\n%s", code, out)
	}
	out, code = doctor(az, a.Env()...)
	if code != 0 || !strings.Contains(out, "OK    store access") {
		t.Fatalf("account key: exit %d\n%s", code, out)
	}
	chaos(t, "storage: the VM's GCS scope read-only; an Azure identity the VM lacks", "preemptd doctor: FAIL store access with the fix, exit 1")
}
