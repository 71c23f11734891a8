package e2e

import (
	"bytes"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/preemptd/preemptd/agent"
	"github.com/preemptd/preemptd/checkpoint/storage"
	"github.com/preemptd/preemptd/test/peers"
)

// asNobody runs preemptd as uid/gid 65534.
func asNobody(t *testing.T, args ...string) (string, error) {
	t.Helper()
	cmd := exec.Command(bin, args...)
	cmd.Env = cleanEnv()
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// TestLocalAPIReadsOpenChangesGuarded: a non-root trainer user can read the
// status and long-poll its notice over the socket; only root (or the
// daemon's user, or api.simulate_group) may simulate a notice.
func TestLocalAPIReadsOpenChangesGuarded(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root to act as another user")
	}
	dir := shortDir(t)
	os.Chmod(dir, 0o755) // the trainer's user must reach run_dir
	d := startDaemonIn(t, dir, "provider: local\n")
	if st, err := os.Stat(filepath.Join(d.runDir, "preemptd.sock")); err != nil || st.Mode().Perm() != 0o666 {
		t.Fatalf("socket: %v %v", st, err)
	}
	if st, _ := os.Stat(d.runDir); st.Mode().Perm() != 0o755 {
		t.Fatalf("run_dir mode %04o, want 0755", st.Mode().Perm())
	}
	os.Chmod(d.config, 0o644)
	if out, err := asNobody(t, "status", "--config", d.config); err != nil {
		t.Fatalf("status as nobody: %v\n%s", err, out)
	}
	out, err := asNobody(t, "simulate", "--config", d.config, "--kind", "terminate", "--in", "30s")
	if err == nil || !strings.Contains(out, "may not simulate") {
		t.Fatalf("simulate as nobody: %v\n%s", err, out)
	}
	if st := d.status(); st.Emergency != nil || len(st.Notices) != 0 {
		t.Fatalf("a refused simulation acted: %+v", st)
	}
	if out, code := runCLI(t, "simulate", "--config", d.config, "--kind", "rebalance"); code != 0 {
		t.Fatalf("simulate as root: %d %s", code, out)
	}
}

// TestRunDirMustNotBeWritableByOthers: a world-writable run_dir (anyone
// could replace notice.json or the socket) is refused at start, naming the
// fix.
func TestRunDirMustNotBeWritableByOthers(t *testing.T) {
	dir := shortDir(t)
	run := filepath.Join(dir, "run")
	os.MkdirAll(run, 0o755)
	os.Chmod(run, 0o777)
	cfg := filepath.Join(dir, "preemptd.yaml")
	writeFile(t, cfg, "provider: local\nrun_dir: "+run+"\nstate_dir: "+filepath.Join(dir, "state")+"\nmetrics: {listen: \"\"}\n")
	out, code := runCLI(t, "run", "--config", cfg)
	if code == 0 || !strings.Contains(out, "world-writable") || !strings.Contains(out, "chmod 755") {
		t.Fatalf("run with a world-writable run_dir: exit %d\n%s", code, out)
	}
}

// TestWebhookSecretNowhere: a webhook URL's path (its secret) reaches
// neither the log, nor the status, nor the event record in the store, when
// the webhook fails and when it succeeds.
func TestWebhookSecretNowhere(t *testing.T) {
	const token = "T0/B0/webhook-secret-path"
	dir := shortDir(t)
	d := startDaemonIn(t, dir, "provider: local\nnotify: {webhooks: [{url: \"http://127.0.0.1:1/services/"+token+"\", format: slack}]}\n")
	if out, code := runCLI(t, "simulate", "--config", d.config, "--kind", "terminate", "--in", "8s", "--wait"); code != 0 {
		t.Fatal(out)
	}
	waitFor(t, 20*time.Second, "the webhook's failure to be logged", func() bool {
		b, _ := os.ReadFile(d.logf)
		return strings.Count(string(b), "webhook not delivered") >= 2 // notice and outcome
	})
	status, _ := runCLI(t, "status", "--config", d.config, "--json")
	log, _ := os.ReadFile(d.logf)
	if strings.Contains(status, "webhook-secret") || strings.Contains(string(log), "webhook-secret") {
		t.Fatal("the webhook's secret path is in the status or the log")
	}
	records := 0
	filepath.WalkDir(filepath.Join(dir, "state"), func(p string, e os.DirEntry, err error) error {
		if err == nil && !e.IsDir() {
			b, _ := os.ReadFile(p)
			if strings.Contains(string(b), "webhook-secret") {
				t.Errorf("the webhook's secret path is in %s", p)
			}
			if strings.Contains(p, "_events") {
				records++
			}
		}
		return nil
	})
	if records == 0 {
		t.Fatal("no event record written: nothing was checked")
	}
	if !strings.Contains(string(log), "webhook not delivered") {
		t.Fatal("the webhook failure was not exercised")
	}
}

// TestAzureSASNowhere: with an Azure SAS as the store's credential and
// every checkpoint upload cut off mid-request (so that Go's *url.Error,
// which prints the request's URL and with it the SAS, is what fails), the
// SAS's signature reaches neither the log, nor the status, nor the event
// records in the store, nor `report`; the failures did happen.
func TestAzureSASNowhere(t *testing.T) {
	a := peers.StartAzurite(t)
	sas := peers.AzuriteSAS()
	q, _ := url.ParseQuery(sas)
	sig := q.Get("sig")
	target, _ := url.Parse(a.Endpoint)
	rp := httputil.NewSingleHostReverseProxy(&url.URL{Scheme: target.Scheme, Host: target.Host})
	var cut atomic.Int64
	proxy := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodPut && strings.Contains(r.URL.Path, "/step-") {
			cut.Add(1)
			if c, _, err := w.(http.Hijacker).Hijack(); err == nil {
				c.Close() // the connection dies mid-request
			}
			return
		}
		rp.ServeHTTP(w, r)
	}))
	t.Cleanup(proxy.Close)

	dir := shortDir(t)
	ckpt := filepath.Join(dir, "ckpt")
	tr := startTrainer(t, filepath.Join(dir, "run", agent.NoticeFileName), "--ckpt-dir", ckpt, "--ckpt-bytes", "65536")
	d := startDaemonIn(t, dir, fmt.Sprintf(`provider: local
log_level: debug
trainer: {pid_file: %q}
checkpoint: {dir: %q, layout: dcp}
storage: {url: %q, endpoint: %q}
`, tr.pidFile, ckpt, a.URL("runs"), proxy.URL+target.Path), "AZURE_STORAGE_SAS_TOKEN="+sas)
	runCLI(t, "simulate", "--config", d.config, "--kind", "terminate", "--in", "20s", "--wait")
	status, _ := runCLI(t, "status", "--config", d.config, "--json")
	report, _ := runCLIEnv(t, []string{"AZURE_STORAGE_SAS_TOKEN=" + sas}, "report", "--config", d.config)
	time.Sleep(500 * time.Millisecond)
	log, _ := os.ReadFile(d.logf)
	for _, s := range []string{sig, url.QueryEscape(sig)} {
		for what, text := range map[string]string{"log": string(log), "status": status, "report": report} {
			if strings.Contains(text, s) {
				t.Errorf("the SAS signature is in the %s", what)
			}
		}
	}
	st := a.Open(t, "runs", storage.Options{})
	objs, err := st.List(t.Context(), "_events")
	if err != nil || len(objs) == 0 {
		t.Fatalf("no event record in the store (%v): nothing was checked", err)
	}
	for _, o := range objs {
		var b bytes.Buffer
		if err := st.Get(t.Context(), o.Key, &b); err != nil {
			t.Fatal(err)
		}
		if strings.Contains(b.String(), sig) || strings.Contains(b.String(), url.QueryEscape(sig)) {
			t.Errorf("the SAS signature is in the event record %s", o.Key)
		}
	}
	// And nothing the store keeps on disk (Azurite's blobs and metadata).
	filepath.WalkDir(a.Dir, func(p string, e os.DirEntry, err error) error {
		if err == nil && !e.IsDir() {
			if b, _ := os.ReadFile(p); bytes.Contains(b, []byte(sig)) || bytes.Contains(b, []byte(url.QueryEscape(sig))) {
				t.Errorf("the SAS signature is in the store's file %s", p)
			}
		}
		return nil
	})
	if cut.Load() == 0 || !strings.Contains(string(log), "?REDACTED") {
		t.Fatalf("the upload failures were not exercised (%d cut):\n%s", cut.Load(), log)
	}
}
