// Package bench measures preemptd against its peers on this machine; `make
// bench` runs it and writes RESULTS.md. Figures are ratios against a peer
// measured in the same run, never assertions.
package bench

import (
	"crypto/rand"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/preemptd/preemptd/test/peers"
)

func requireBench(t *testing.T) {
	if os.Getenv("PREEMPTD_BENCH") == "" {
		t.Skip("benchmarks run with `make bench` (PREEMPTD_BENCH=1)")
	}
}

func machine() string {
	cpu := "unknown CPU"
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if strings.HasPrefix(l, "model name") {
				cpu = strings.TrimSpace(strings.SplitN(l, ":", 2)[1])
				break
			}
		}
	}
	mem := ""
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		mem = strings.Fields(strings.SplitN(string(b), "\n", 2)[0])[1] + " kB RAM"
	}
	return fmt.Sprintf("%d cores (%s), %s, %s, %s/%s", runtime.NumCPU(), cpu, mem, runtime.Version(), runtime.GOOS, runtime.GOARCH)
}

func timeIt(t *testing.T, env []string, name string, args ...string) time.Duration {
	t.Helper()
	d, _ := timeCPU(t, env, name, args...)
	return d
}

// timeCPU runs the command and returns its wall time and the CPU time
// (user and system) it used.
func timeCPU(t *testing.T, env []string, name string, args ...string) (wall, cpu time.Duration) {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Env = append(os.Environ(), env...)
	start := time.Now()
	out, err := cmd.CombinedOutput()
	d := time.Since(start)
	if err != nil {
		t.Fatalf("%s %v: %v\n%s", filepath.Base(name), args, err, out)
	}
	return d, cmd.ProcessState.UserTime() + cmd.ProcessState.SystemTime()
}

func median(ds []time.Duration) time.Duration {
	s := slices.Clone(ds)
	slices.Sort(s)
	return s[len(s)/2]
}

// TestUploadThroughput: preemptd's upload path (hash, parallel multipart,
// manifest, latest) against s5cmd, mc and `aws s3 cp` on the same 1 GiB and
// 8 GiB files and the same MinIO, interleaved rounds.
func TestUploadThroughput(t *testing.T) {
	requireBench(t)
	sizes := []int{1, 8}
	if v := os.Getenv("BENCH_GIB"); v != "" {
		var n int
		fmt.Sscan(v, &n)
		sizes = []int{n}
	}
	for _, gib := range sizes {
		rounds := 3
		t.Run(fmt.Sprintf("%dGiB", gib), func(t *testing.T) { uploadBench(t, gib, rounds) })
	}
}

func uploadBench(t *testing.T, sizeGiB, rounds int) {
	s5cmd := peers.Require(t, "s5cmd", "v2.3.0")
	mc := peers.Require(t, "mc", "v0.0.0-20250313080218-cf909e1063a9")
	bin, _ := binaries(t)

	work := t.TempDir()
	root := filepath.Join(work, "ckpt")
	file := filepath.Join(root, "bench", "data.bin")
	os.MkdirAll(filepath.Dir(file), 0o755)
	f, _ := os.Create(file)
	buf := make([]byte, 16<<20)
	for range sizeGiB * 64 {
		rand.Read(buf)
		f.Write(buf)
	}
	f.Close()
	size := int64(sizeGiB) << 30

	times := map[string][]time.Duration{}
	tools := []string{"preemptd", "s5cmd", "mc", "aws"}
	awsCLI := "/usr/bin/aws" // Debian's awscli (scripts/tools.sh bench)
	if _, err := os.Stat(awsCLI); err != nil {
		t.Fatalf("%s: %v (scripts/tools.sh bench installs it)", awsCLI, err)
	}
	for r := range rounds {
		// A fresh MinIO each round: deleted objects linger in its trash, and
		// 8 GiB rounds would otherwise fill the disk.
		t.Run(fmt.Sprintf("round%d", r+1), func(t *testing.T) {
			s3 := peers.StartMinIO(t)
			env := append(s3.Env(), "MC_HOST_bench="+strings.Replace(s3.Endpoint, "http://", "http://"+peers.MinIOUser+":"+peers.MinIOPassword+"@", 1),
				"MC_CONFIG_DIR="+filepath.Join(work, "mc"))
			for _, tool := range tools {
				key := fmt.Sprintf("%s-%d", tool, r)
				var d time.Duration
				switch tool {
				case "preemptd":
					cfg := filepath.Join(work, key+".yaml")
					os.WriteFile(cfg, []byte(fmt.Sprintf("run_id: %s\ncheckpoint: {layout: files}\nstorage: {url: \"s3://%s/bench\", endpoint: %q, region: us-east-1}\nrun_dir: %s\nstate_dir: %s\n",
						key, s3.Bucket, s3.Endpoint, filepath.Join(work, "run"), filepath.Join(work, "state"))), 0o644)
					d = timeIt(t, env, bin, "upload", "--config", cfg, filepath.Join(root, "bench"))
				case "s5cmd":
					d = timeIt(t, env, s5cmd, "--endpoint-url", s3.Endpoint, "cp", file, "s3://"+s3.Bucket+"/bench/"+key+"/data.bin")
				case "mc":
					d = timeIt(t, env, mc, "--quiet", "cp", file, "bench/"+s3.Bucket+"/bench/"+key+"/data.bin")
				case "aws":
					d = timeIt(t, append(env, "AWS_CONFIG_FILE=/dev/null", "AWS_SHARED_CREDENTIALS_FILE=/dev/null"), awsCLI,
						"--endpoint-url", s3.Endpoint, "s3", "cp", "--only-show-errors", file, "s3://"+s3.Bucket+"/bench/"+key+"/data.bin")
				}
				times[tool] = append(times[tool], d)
				t.Logf("round %d %-8s %v (%.0f MB/s)", r+1, tool, d.Round(time.Millisecond), float64(size)/d.Seconds()/1e6)
				exec.Command(mc, "--quiet", "rm", "--recursive", "--force", "bench/"+s3.Bucket+"/bench/"+key).Run()
			}
		})
	}
	var b strings.Builder
	fmt.Fprintf(&b, "### Upload of a %d GiB checkpoint to MinIO (%s)\n\n", sizeGiB, time.Now().UTC().Format("2006-01-02"))
	fmt.Fprintf(&b, "Machine: %s. MinIO %s on 127.0.0.1 (a fresh server each round), the same file for every tool, %d interleaved rounds, median wall time of the whole command.\n\n",
		machine(), peers.MinIOVersion, rounds)
	fmt.Fprintf(&b, "| tool | median | MB/s | time ÷ preemptd's | rounds |\n|---|---|---|---|---|\n")
	base := median(times["preemptd"])
	for _, tool := range tools {
		m := median(times[tool])
		var rs []string
		for _, d := range times[tool] {
			rs = append(rs, d.Round(time.Millisecond).String())
		}
		fmt.Fprintf(&b, "| %s | %v | %.0f | %.2f | %s |\n", tool, m.Round(time.Millisecond), float64(size)/m.Seconds()/1e6,
			m.Seconds()/base.Seconds(), strings.Join(rs, ", "))
	}
	fmt.Fprintf(&b, "\npreemptd's time includes what the others do not do: a SHA-256 of every byte (recorded in the manifest and checked on restore), a CRC32C of every part sent for the server to check (storage.checksum auto, which MinIO takes), the manifest and the run's latest pointer. Parts: 64 MiB, 8 threads. Peers at their defaults: s5cmd v2.3.0, mc %s, aws-cli 2.9.19 (Debian).\n", "v0.0.0-20250313080218-cf909e1063a9")
	appendResults(t, b.String())
}
