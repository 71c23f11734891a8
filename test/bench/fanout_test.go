package bench

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/preemptd/preemptd/agent"
	"github.com/preemptd/preemptd/checkpoint/storage"
	"github.com/preemptd/preemptd/job"
	"github.com/preemptd/preemptd/test/fakes"
	"github.com/preemptd/preemptd/test/peers"
)

// quietFor is how long the fan-out bench counts a job's requests with no
// notice (its steady state).
const quietFor = 60 * time.Second

// steady is what a job's nodes asked of the store in quietFor.
type steady struct {
	counts *counting
	took   time.Duration
}

// fanNode is one node of the fan-out bench: a job.Job watching, the time
// each job notice arrived.
type fanNode struct {
	j    *job.Job
	mu   sync.Mutex
	got  map[string]time.Time // notice id → arrival (withdrawn ones removed)
	wake chan struct{}
}

// TestJobFanOut: 20 fatal notices, each on one node of a job of 2 to 1,024
// nodes (the nodes in this process, each with its own store client and
// push listener): the time from the notice on its node to its job notice
// on every other node. Store only (each node lists the notices every
// job.poll, 500 ms, the default) and with the push path. Up to 64 nodes
// against one MinIO; 256 and 1,024 against an in-memory store that counts
// the requests (a MinIO on two cores would be the bottleneck, not the
// protocol), whose counts give the cost at S3's prices.
func TestJobFanOut(t *testing.T) {
	requireBench(t)
	s3 := peers.StartMinIO(t)
	s3.SetEnv(t)
	var b strings.Builder
	fmt.Fprintf(&b, "### Multi-node fan-out latency (%s)\n\n", time.Now().Format("2006-01-02"))
	fmt.Fprintf(&b, "Machine: %s. MinIO on 127.0.0.1; the nodes are job.Job instances in one process, each with its own store client "+
		"and (with push) its own HTTP listener on loopback. 20 notices per row, each on one node in turn, a random 0–500 ms apart; "+
		"measured from the notice on its node to the job notice on each other node (20 × (nodes − 1) samples). job.poll 500 ms (the default).\n\n", machine())
	b.WriteString("| nodes | store | path | p50 | p95 | max | samples | goal (p95) | store requests per node a second (LIST pages / GETs / PUTs) |\n|---|---|---|---|---|---|---|---|---|\n")
	sizes := []int{2, 4, 8, 64, 256, 1024}
	if env := os.Getenv("BENCH_NODES"); env != "" {
		sizes = nil
		for f := range strings.SplitSeq(env, ",") {
			n, _ := strconv.Atoi(f)
			sizes = append(sizes, n)
		}
	}
	var steadyRows []string
	for _, n := range sizes {
		for _, push := range []bool{false, true} {
			minio := func() storage.Store {
				st, err := storage.Open("s3://"+s3.Bucket+"/bench", storage.Options{Endpoint: s3.Endpoint, Region: "us-east-1"})
				if err != nil {
					t.Fatal(err)
				}
				return st
			}
			where, open := "MinIO", minio
			if n > 64 {
				mem := fakes.NewMemStore()
				where, open = "in memory", func() storage.Store { return mem }
			}
			var quiet *steady
			if !push {
				quiet = &steady{}
			}
			ds, took, counted := fanOut(t, open, n, push, quiet)
			if quiet != nil {
				day := func(v int64) float64 { return float64(v) / float64(n) / quiet.took.Seconds() * 86400 }
				l, g, p := day(quiet.counts.lists.Load()), day(quiet.counts.gets.Load()), day(quiet.counts.puts.Load())
				steadyRows = append(steadyRows, fmt.Sprintf("| %d | %s | %.0f | %.0f | %.0f | $%.3f |", n, where, l, g, p, (l+p)*5e-6+g*0.4e-6))
			}
			path, goal := "store only", "≤ 1 s"
			if push {
				path, goal = "push (store too)", "≤ 100 ms"
			}
			per := func(v int64) float64 { return float64(v) / float64(n) / took.Seconds() }
			cost := fmt.Sprintf("%.3f / %.2f / %.3f", per(counted.lists.Load()), per(counted.gets.Load()), per(counted.puts.Load()))
			limit := time.Second
			if push {
				limit = 100 * time.Millisecond
			}
			if pct(ds, .95) <= limit {
				goal += ": met"
			} else {
				goal += ": **not met**"
			}
			fmt.Fprintf(&b, "| %d | %s | %s | %v | %v | %v | %d | %s | %s |\n", n, where, path, pct(ds, .5).Round(100*time.Microsecond),
				pct(ds, .95).Round(100*time.Microsecond), pct(ds, 1).Round(100*time.Microsecond), len(ds), goal, cost)
		}
	}
	fmt.Fprintf(&b, "\nSteady state (%v with no notice, counted before the notices of the store-only row): what one node asks of the store a day "+
		"for the job (reading the notices' change stamp every poll, listing the notices every 20 polls, its registration and one listing of the registry every 30 s), "+
		"and its price at S3 Standard's (us-east-1: LIST and PUT $0.005 per 1,000, GET $0.0004 per 1,000).\n\n", quietFor)
	b.WriteString("| nodes | store | LIST pages a day per node | GETs | PUTs | $ a day per node |\n|---|---|---|---|---|---|\n")
	b.WriteString(strings.Join(steadyRows, "\n") + "\n")
	b.WriteString("\nStore only, the latency is the wait for the next read of the notices' change stamp (half a poll on average, a whole poll at worst), " +
		"then one LIST and one GET. The requests are counted per node while the 20 notices go out (each node's registry kept as the daemon keeps it): " +
		"a GET of the stamp every poll, a LIST when it changed (each notice and each withdrawal) and every 20 polls, the notices' GETs, " +
		"the registry's PUT and listing every 30 s; the publishing nodes' creates, stamps and tombstones are the PUTs.\n")
	appendResults(t, b.String())
}

// fanOut runs the 20 notices over a job of n nodes, each with the store
// open gives it and its registry kept as the daemon does (job.Job.Run),
// and returns the latencies, and the store requests of every node during
// the notices and the time they took.
func fanOut(t *testing.T, open func() storage.Store, n int, push bool, quiet *steady) ([]time.Duration, time.Duration, *counting) {
	t.Helper()
	var stores []*counting
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	run := fmt.Sprintf("fanout-%d-%v-%d", n, push, time.Now().UnixNano())
	var nodes []*fanNode
	for i := range n {
		st := &counting{Store: open()}
		stores = append(stores, st)
		cfg := job.Config{Run: run, Node: fmt.Sprintf("n%d", i), Nodes: n}
		var l net.Listener
		var err error
		if push {
			l, err = net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			cfg.Advertise, cfg.Token = l.Addr().String(), "bench-job-token-0123456789"
		}
		fn := &fanNode{j: job.New(cfg, st, nil), got: map[string]time.Time{}, wake: make(chan struct{}, 1)}
		if l != nil {
			srv := &http.Server{Handler: fn.j.Handler()}
			go srv.Serve(l)
			defer srv.Close()
		}
		if err := fn.j.Register(ctx); err != nil {
			t.Fatal(err)
		}
		nodes = append(nodes, fn)
	}
	for _, fn := range nodes {
		if _, err := fn.j.Members(ctx); err != nil { // the peers to push to
			t.Fatal(err)
		}
		out := make(chan agent.Notice, 16)
		go fn.j.Watch(ctx, out)
		go fn.j.Run(ctx)
		go func() {
			for nt := range out {
				fn.mu.Lock()
				if nt.Withdrawn {
					delete(fn.got, nt.ID)
				} else if _, ok := fn.got[nt.ID]; !ok {
					fn.got[nt.ID] = time.Now()
				}
				fn.mu.Unlock()
				select {
				case fn.wake <- struct{}{}:
				default:
				}
			}
		}()
	}
	time.Sleep(6 * time.Second) // every watcher has listed once, every registry read the others
	sum := func() *counting {
		all := &counting{}
		for _, st := range stores {
			all.lists.Add(st.lists.Load())
			all.gets.Add(st.gets.Load())
			all.puts.Add(st.puts.Load())
		}
		return all
	}
	reset := func() {
		for _, st := range stores {
			st.reset()
		}
	}
	if quiet != nil { // no notice: what a node asks of the store in steady state
		reset()
		began := time.Now()
		time.Sleep(quietFor)
		*quiet = steady{counts: sum(), took: time.Since(began)}
	}
	reset()
	began := time.Now()
	var ds []time.Duration
	for r := range 20 {
		origin := nodes[r%n]
		time.Sleep(time.Duration(rand.IntN(500)) * time.Millisecond)
		at := time.Now()
		nt := agent.Notice{Provider: "aws", Kind: agent.KindTerminate, ID: fmt.Sprintf("i-%d", r), NoticedAt: at, Deadline: at.Add(2 * time.Minute)}
		origin.j.Fatal(nt)
		for _, fn := range nodes {
			if fn == origin {
				continue
			}
			arrived := waitArrival(t, fn, true)
			ds = append(ds, arrived.Sub(at))
		}
		origin.j.Withdrawn(nt)
		for _, fn := range nodes {
			if fn != origin {
				waitArrival(t, fn, false)
			}
		}
	}
	took := time.Since(began)
	all := sum()
	for _, fn := range nodes {
		fn.j.Wait()
	}
	return ds, took, all
}

// waitArrival waits until fn holds a job notice (present) or none, and
// returns when the one it holds arrived.
func waitArrival(t *testing.T, fn *fanNode, present bool) time.Time {
	t.Helper()
	deadline := time.After(30 * time.Second)
	for {
		fn.mu.Lock()
		var at time.Time
		for _, v := range fn.got {
			at = v
		}
		have := len(fn.got) > 0
		fn.mu.Unlock()
		if have == present {
			return at
		}
		select {
		case <-fn.wake:
		case <-deadline:
			t.Fatalf("no job notice change within 30 s (want present %v)", present)
		}
	}
}
