package e2e

import (
	"bytes"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/preemptd/preemptd/test/peers"
)

// restoreOut is the part of `restore --json` these tests read.
type restoreOut struct {
	Restored     bool   `json:"restored"`
	Checkpoint   string `json:"checkpoint"`
	Path         string `json:"path"`
	Files        int    `json:"files"`
	FilesKept    int    `json:"files_kept"`
	FilesResumed int    `json:"files_resumed"`
	Bytes        int64  `json:"bytes"`
	FetchedBytes int64  `json:"fetched_bytes"`
	KeptBytes    int64  `json:"kept_bytes"`
	ResumedBytes int64  `json:"resumed_bytes"`
	Error        string `json:"error"`
}

// restoreCmd runs `preemptd restore` with args and returns its exit code,
// its --json answer (when asked for) and its stderr.
func restoreCmd(t *testing.T, env []string, args ...string) (int, restoreOut, string) {
	t.Helper()
	cmd := exec.Command(bin, append([]string{"restore"}, args...)...)
	cmd.Env = append(cleanEnv(), env...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	code := 0
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	var out restoreOut
	if strings.Contains(strings.Join(args, " "), "--json") {
		if jerr := json.Unmarshal(stdout.Bytes(), &out); jerr != nil {
			t.Fatalf("restore --json printed %q: %v (stderr %s)", stdout.String(), jerr, stderr.String())
		}
	}
	return code, out, stderr.String()
}

// shardedCheckpoint writes a DCP checkpoint step-7 of 4 shards of size
// bytes each and commits it with `preemptd upload`.
func shardedCheckpoint(t *testing.T, cfg string, env []string, root string, size int) string {
	t.Helper()
	dir := filepath.Join(root, "step-7")
	os.MkdirAll(dir, 0o755)
	for i := range 4 {
		b := make([]byte, size)
		rand.Read(b)
		os.WriteFile(filepath.Join(dir, fmt.Sprintf("__%d_0.distcp", i)), b, 0o644)
	}
	os.WriteFile(filepath.Join(dir, ".metadata"), []byte("metadata"), 0o644)
	cmd := exec.Command(bin, "upload", "--config", cfg, dir)
	cmd.Env = append(cleanEnv(), env...)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("upload: %v\n%s", err, out)
	}
	return dir
}

func sameFiles(t *testing.T, want, got string) {
	t.Helper()
	ents, _ := os.ReadDir(want)
	for _, e := range ents {
		a, _ := os.ReadFile(filepath.Join(want, e.Name()))
		b, err := os.ReadFile(filepath.Join(got, e.Name()))
		if err != nil || !bytes.Equal(a, b) {
			t.Fatalf("%s differs after restore (%v)", e.Name(), err)
		}
	}
}

// TestRestoreKilledHalfwayContinues: the real binary, fetching through a
// slow link, is killed (SIGKILL) halfway; no file of the checkpoint has its
// name yet and its marker is absent; a second restore continues where the
// first stopped — it fetches less than the checkpoint holds and says how
// much was there — and the result is byte for byte the checkpoint.
func TestRestoreKilledHalfwayContinues(t *testing.T) {
	s3 := peers.StartMinIO(t)
	x := peers.StartToxiproxy(t)
	u, _ := url.Parse(s3.Endpoint)
	proxy := x.Proxy(t, "s3", u.Host)
	x.ToxicOn(t, "s3", "downstream", "slow", "bandwidth", map[string]any{"rate": 1000}) // 1 MB/s a connection
	dir := t.TempDir()
	cfg := filepath.Join(dir, "preemptd.yaml")
	write := func(endpoint string) {
		os.WriteFile(cfg, []byte(fmt.Sprintf("run_id: resume\ncheckpoint: {layout: dcp}\nstorage: {url: \"s3://%s/r\", endpoint: %q, region: us-east-1}\nrestore: {threads: 4, part_size_mib: 1}\nrun_dir: %s\nstate_dir: %s\n",
			s3.Bucket, endpoint, filepath.Join(dir, "run"), filepath.Join(dir, "state"))), 0o644)
	}
	write(s3.Endpoint)
	src := shardedCheckpoint(t, cfg, s3.Env(), filepath.Join(dir, "src"), 6<<20)
	write("http://" + proxy)
	to := filepath.Join(dir, "new")
	cmd := exec.Command(bin, "restore", "--config", cfg, "--to", to)
	cmd.Env = append(cleanEnv(), s3.Env()...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	// 24 MiB at 4 MB/s: about 6 s. Kill once a third of it is in.
	waitFor(t, 30*time.Second, "a third of the checkpoint fetched", func() bool {
		var n int64
		filepath.Walk(to, func(p string, fi os.FileInfo, err error) error {
			if err == nil && strings.HasSuffix(p, ".preemptd-partial.json") {
				var j struct {
					Size int64
					Done []bool
				}
				b, _ := os.ReadFile(p)
				json.Unmarshal(b, &j)
				for i, d := range j.Done {
					if d { // a part is 1 MiB, the file's last one what is left (.metadata's is 8 bytes)
						n += min(1<<20, j.Size-int64(i)<<20)
					}
				}
			}
			return nil
		})
		return n >= 8<<20
	})
	cmd.Process.Signal(syscall.SIGKILL)
	cmd.Wait()
	if _, err := os.Stat(filepath.Join(to, "step-7", ".metadata")); err == nil {
		t.Fatal("the marker is in place after a restore killed halfway: the folder looks complete")
	}
	for i := range 4 {
		if _, err := os.Stat(filepath.Join(to, "step-7", fmt.Sprintf("__%d_0.distcp", i))); err == nil {
			t.Fatalf("shard %d has its name although the restore was killed before it was verified", i)
		}
	}
	x.Remove(t, "s3", "slow")
	code, out, errText := restoreCmd(t, s3.Env(), "--config", cfg, "--to", to, "--json")
	if code != 0 || !out.Restored {
		t.Fatalf("second restore: exit %d %+v\n%s", code, out, errText)
	}
	sameFiles(t, src, filepath.Join(to, "step-7"))
	if out.ResumedBytes < 8<<20 || out.FilesResumed == 0 || out.FetchedBytes+out.ResumedBytes != out.Bytes {
		t.Fatalf("second restore did not continue the first: %+v", out)
	}
	if !strings.Contains(errText, "continued from an interrupted restore") {
		t.Fatalf("the output does not say what was continued:\n%s", errText)
	}
	// Once more: everything is in place, nothing fetched.
	code, out, errText = restoreCmd(t, s3.Env(), "--config", cfg, "--to", to, "--json")
	if code != 0 || out.FilesKept != out.Files || out.FetchedBytes != 0 || !strings.Contains(errText, "already in place and kept") {
		t.Fatalf("third restore: exit %d %+v\n%s", code, out, errText)
	}
	leftovers, _ := filepath.Glob(filepath.Join(to, "step-7", "*.preemptd-partial*"))
	if len(leftovers) > 0 {
		t.Fatalf("left behind: %v", leftovers)
	}
}

// TestRestoreWaitsForTheStore: a boot script's restore with --wait keeps
// trying while the store cannot be reached and restores once it can;
// without --wait it fails at once with exit 1 (never 4, the fresh start).
func TestRestoreWaitsForTheStore(t *testing.T) {
	s3 := peers.StartMinIO(t)
	x := peers.StartToxiproxy(t)
	u, _ := url.Parse(s3.Endpoint)
	proxy := x.Proxy(t, "s3", u.Host)
	dir := t.TempDir()
	cfg := filepath.Join(dir, "preemptd.yaml")
	os.WriteFile(cfg, []byte(fmt.Sprintf("run_id: boot\ncheckpoint: {layout: dcp}\nstorage: {url: \"s3://%s/r\", endpoint: \"http://%s\", region: us-east-1}\nrun_dir: %s\nstate_dir: %s\n",
		s3.Bucket, proxy, filepath.Join(dir, "run"), filepath.Join(dir, "state"))), 0o644)
	src := shardedCheckpoint(t, cfg, s3.Env(), filepath.Join(dir, "src"), 1<<20)
	x.SetEnabled(t, "s3", false)
	env := s3.Env()
	start := time.Now()
	if code, _, errText := restoreCmd(t, env, "--config", cfg, "--to", filepath.Join(dir, "a")); code != 1 {
		t.Fatalf("restore with the store down, no --wait: exit %d, want 1\n%s", code, errText)
	}
	// Down for longer than the S3 client's own retries took to give up.
	down := time.Since(start) + 5*time.Second
	t.Logf("without --wait the restore gave up after %v; the store stays down %v", time.Since(start).Round(time.Millisecond), down.Round(time.Second))
	go func() {
		time.Sleep(down)
		x.SetEnabled(t, "s3", true)
	}()
	code, out, errText := restoreCmd(t, env, "--config", cfg, "--to", filepath.Join(dir, "b"), "--wait", "2m", "--json")
	if code != 0 || !out.Restored || !strings.Contains(errText, "trying again") {
		t.Fatalf("restore --wait: exit %d %+v\n%s", code, out, errText)
	}
	sameFiles(t, src, out.Path)
}

// TestRestoreExitCodes: nothing committed yet is exit 4 (--json says
// restored: false), or 0 with --none-ok; checkpoints signed by another key
// are neither: ls says it hides them and why, and restore fails (exit 1)
// saying so, rather than a boot script starting from scratch.
func TestRestoreExitCodes(t *testing.T) {
	dir := t.TempDir()
	cfg := filepath.Join(dir, "preemptd.yaml")
	base := fmt.Sprintf("run_id: codes\ncheckpoint: {layout: dcp}\nrun_dir: %s\nstate_dir: %s\n", filepath.Join(dir, "run"), filepath.Join(dir, "state"))
	os.WriteFile(cfg, []byte(base), 0o644)
	os.MkdirAll(filepath.Join(dir, "state"), 0o755)
	code, out, errText := restoreCmd(t, nil, "--config", cfg, "--to", filepath.Join(dir, "a"), "--json")
	if code != 4 || out.Restored || !strings.Contains(errText, "nothing to restore") {
		t.Fatalf("nothing committed: exit %d %+v\n%s", code, out, errText)
	}
	if code, _, errText := restoreCmd(t, nil, "--config", cfg, "--to", filepath.Join(dir, "a"), "--none-ok"); code != 0 {
		t.Fatalf("nothing committed, --none-ok: exit %d\n%s", code, errText)
	}

	keys := func(name string) string {
		out := filepath.Join(dir, name)
		os.MkdirAll(out, 0o700)
		if b, err := exec.Command(bin, "keygen", "--out", out).CombinedOutput(); err != nil {
			t.Fatalf("keygen: %v\n%s", err, b)
		}
		return out
	}
	a, b := keys("a-keys"), keys("b-keys")
	os.WriteFile(cfg, []byte(base+fmt.Sprintf("storage: {sign_key: %s}\n", filepath.Join(a, "sign.key"))), 0o644)
	shardedCheckpoint(t, cfg, nil, filepath.Join(dir, "src"), 4096)
	// A restore host with the other key's public half only.
	os.WriteFile(cfg, []byte(base+fmt.Sprintf("storage: {verify_key: %s}\n", filepath.Join(b, "verify.pub"))), 0o644)
	lsOut, _ := exec.Command(bin, "ls", "--config", cfg).CombinedOutput()
	if !strings.Contains(string(lsOut), "hidden because they fail verification") {
		t.Fatalf("ls with the wrong verify key does not say it hides a checkpoint:\n%s", lsOut)
	}
	code, _, errText = restoreCmd(t, nil, "--config", cfg, "--to", filepath.Join(dir, "b"))
	if code != 1 || !strings.Contains(errText, "verif") {
		t.Fatalf("restore with the wrong verify key: exit %d, want 1 saying why\n%s", code, errText)
	}
	// The right public half, and no sign key, restores.
	os.WriteFile(cfg, []byte(base+fmt.Sprintf("storage: {verify_key: %s}\n", filepath.Join(a, "verify.pub"))), 0o644)
	if code, out, errText := restoreCmd(t, nil, "--config", cfg, "--to", filepath.Join(dir, "c"), "--json"); code != 0 || !out.Restored {
		t.Fatalf("restore with the right verify key: exit %d %+v\n%s", code, out, errText)
	}
}
