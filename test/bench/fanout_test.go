package bench

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/preemptd/preemptd/agent"
	"github.com/preemptd/preemptd/checkpoint/storage"
	"github.com/preemptd/preemptd/job"
	"github.com/preemptd/preemptd/test/peers"
)

// fanNode is one node of the fan-out bench: a job.Job watching, the time
// each job notice arrived.
type fanNode struct {
	j    *job.Job
	mu   sync.Mutex
	got  map[string]time.Time // notice id → arrival (withdrawn ones removed)
	wake chan struct{}
}

// TestJobFanOut: 20 fatal notices, each on one node of a job of 2, 4 or 8
// nodes (the nodes in this process, each with its own store client and
// push listener), one MinIO: the time from the notice on its node to its job
// notice on every other node. Store only (each node lists the notices every
// job.poll, 500 ms, the default) and with the push path.
func TestJobFanOut(t *testing.T) {
	requireBench(t)
	s3 := peers.StartMinIO(t)
	s3.SetEnv(t)
	var b strings.Builder
	fmt.Fprintf(&b, "### Multi-node fan-out latency (%s)\n\n", time.Now().Format("2006-01-02"))
	fmt.Fprintf(&b, "Machine: %s. MinIO on 127.0.0.1; the nodes are job.Job instances in one process, each with its own store client "+
		"and (with push) its own HTTP listener on loopback. 20 notices per row, each on one node in turn, a random 0–500 ms apart; "+
		"measured from the notice on its node to the job notice on each other node (20 × (nodes − 1) samples). job.poll 500 ms (the default).\n\n", machine())
	b.WriteString("| nodes | path | p50 | p95 | max | samples | goal (p95) |\n|---|---|---|---|---|---|---|\n")
	for _, n := range []int{2, 4, 8} {
		for _, push := range []bool{false, true} {
			ds := fanOut(t, s3, n, push)
			path, goal := "store only", "≤ 1 s"
			if push {
				path, goal = "push (store too)", "≤ 100 ms"
			}
			fmt.Fprintf(&b, "| %d | %s | %v | %v | %v | %d | %s |\n", n, path, pct(ds, .5).Round(100*time.Microsecond),
				pct(ds, .95).Round(100*time.Microsecond), pct(ds, 1).Round(100*time.Microsecond), len(ds), goal)
		}
	}
	b.WriteString("\nStore only, the latency is the wait for the next listing (half a poll on average, a whole poll at worst) plus one GET. " +
		"Its cost: one LIST per node per job.poll — 172,800 a day per node at 500 ms (about $0.86 a day at S3's $0.005 per 1,000 LISTs), " +
		"plus one PUT per node every 30 s for the registry (2,880 a day).\n")
	appendResults(t, b.String())
}

func fanOut(t *testing.T, s3 *peers.S3, n int, push bool) []time.Duration {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	run := fmt.Sprintf("fanout-%d-%v-%d", n, push, time.Now().UnixNano())
	var nodes []*fanNode
	for i := range n {
		st, err := storage.Open("s3://"+s3.Bucket+"/bench", storage.Options{Endpoint: s3.Endpoint, Region: "us-east-1"})
		if err != nil {
			t.Fatal(err)
		}
		cfg := job.Config{Run: run, Node: fmt.Sprintf("n%d", i), Nodes: n}
		var l net.Listener
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
	time.Sleep(time.Second) // every watcher has listed once
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
	for _, fn := range nodes {
		fn.j.Wait()
	}
	return ds
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
