package bench

import (
	"crypto/rand"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/preemptd/preemptd/checkpoint/storage"
	"github.com/preemptd/preemptd/test/peers"
)

// cloudStore starts one store kind's server and opens preemptd's store on
// it through endpoint(upstream) (a capped proxy, or the server itself).
type cloudStore struct {
	name, server string
	open         func(t *testing.T, endpoint func(string) string, threads uint, partSize uint64) storage.Store
}

var cloudStores = []cloudStore{
	{"GCS", "fake-gcs-server " + peers.FakeGCSVersion, func(t *testing.T, endpoint func(string) string, threads uint, partSize uint64) storage.Store {
		g := peers.StartGCSVM(t) // the VM's token; the server itself, not its token gate, behind endpoint
		return g.Open(t, "bench", storage.Options{Endpoint: endpoint(g.GCS.Endpoint), Threads: threads, PartSize: partSize})
	}},
	{"Azure Blob", "Azurite " + peers.AzuriteVersion, func(t *testing.T, endpoint func(string) string, threads uint, partSize uint64) storage.Store {
		a := peers.StartAzurite(t)
		return a.Open(t, "bench", storage.Options{Endpoint: endpoint(a.Endpoint), Threads: threads, PartSize: partSize})
	}},
	{"S3", "MinIO " + peers.MinIOVersion, func(t *testing.T, endpoint func(string) string, threads uint, partSize uint64) storage.Store {
		s3 := peers.StartMinIO(t)
		return s3.Open(t, "bench", storage.Options{Endpoint: endpoint(s3.Endpoint), Threads: threads, PartSize: partSize})
	}},
}

// TestCloudStoreParallelUpload: preemptd's upload of one 128 MiB file to
// each cloud's store (emulated), as a single stream (one request) against
// in parallel parts (8 MiB, 8 at once), first through toxiproxy capping
// every connection at 4 MB/s (a stand-in for a cloud's per-stream limit),
// then straight to the emulator (its own ingest limit).
func TestCloudStoreParallelUpload(t *testing.T) {
	requireBench(t)
	const size = 128 << 20
	const capKBs = 4096
	const rounds = 3
	p := filepath.Join(t.TempDir(), "shard")
	f, _ := os.Create(p)
	buf := make([]byte, 16<<20)
	for range size / len(buf) {
		rand.Read(buf)
		f.Write(buf)
	}
	f.Close()
	file, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer file.Close()

	type mode struct {
		name     string
		threads  uint
		partSize uint64
		capped   bool
	}
	modes := []mode{{"single stream, capped", 1, size, true}, {"parallel, capped", 8, 8 << 20, true},
		{"single stream, uncapped", 1, size, false}, {"parallel, uncapped", 8, 8 << 20, false}}
	var b strings.Builder
	fmt.Fprintf(&b, "### Parallel upload to GCS and Azure Blob (emulated) (%s)\n\n", time.Now().UTC().Format("2006-01-02"))
	fmt.Fprintf(&b, "Machine: %s. One 128 MiB file through preemptd's store (storage.PutFile, CRC32C or Content-MD5 of every part included), %d rounds, median. Capped: toxiproxy %s in front of the emulator, every connection held to %d KB/s (a cloud's per-stream limit stands in); uncapped: straight to the emulator, whose own ingest is then the limit. Single stream: one request; parallel: 8 MiB parts, 8 at once (GCS: composed into the object; Azure: Put Block List; S3: multipart).\n\n",
		machine(), rounds, peers.ToxiproxyVersion, capKBs)
	fmt.Fprintf(&b, "| store | server | single, capped | parallel, capped | ÷ | single, uncapped | parallel, uncapped | ÷ |\n|---|---|---|---|---|---|---|---|\n")
	for _, cs := range cloudStores {
		med := map[string]time.Duration{}
		for _, m := range modes {
			var ds []time.Duration
			for r := range rounds {
				t.Run(fmt.Sprintf("%s/%s/%d", cs.name, m.name, r), func(t *testing.T) {
					endpoint := func(u string) string { return u }
					if m.capped {
						x := peers.StartToxiproxy(t)
						endpoint = func(upstream string) string {
							u, _ := url.Parse(upstream)
							u.Host = x.Proxy(t, "store", u.Host)
							x.Toxic(t, "store", "cap", "bandwidth", map[string]any{"rate": capKBs})
							return u.String()
						}
					}
					st := cs.open(t, endpoint, m.threads, m.partSize)
					start := time.Now()
					if err := st.PutFile(t.Context(), "r/shard", file, size); err != nil {
						t.Fatal(err)
					}
					d := time.Since(start)
					ds = append(ds, d)
					t.Logf("%s %s: %v (%.1f MB/s)", cs.name, m.name, d.Round(time.Millisecond), size/d.Seconds()/1e6)
				})
			}
			med[m.name] = median(ds)
		}
		mbs := func(d time.Duration) string {
			return fmt.Sprintf("%.2f s (%.0f MB/s)", d.Seconds(), size/d.Seconds()/1e6)
		}
		fmt.Fprintf(&b, "| %s | %s | %s | %s | **%.1f×** | %s | %s | %.1f× |\n", cs.name, cs.server,
			mbs(med[modes[0].name]), mbs(med[modes[1].name]), med[modes[0].name].Seconds()/med[modes[1].name].Seconds(),
			mbs(med[modes[2].name]), mbs(med[modes[3].name]), med[modes[2].name].Seconds()/med[modes[3].name].Seconds())
	}
	fmt.Fprintf(&b, "\n÷ is the single stream's time over the parallel upload's. Capped, parallel parts multiply the per-connection limit; uncapped, the emulator's own ingest on this machine bounds both, so the ratio there says how much of the emulator a single stream leaves unused, not what a cloud would give (fake-gcs-server writes every part as an object and then the composed object again, so there a composite upload costs more than one request).\n")
	appendResults(t, b.String())
}
