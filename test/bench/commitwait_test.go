package bench

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/preemptd/preemptd/checkpoint"
	"github.com/preemptd/preemptd/checkpoint/storage"
	"github.com/preemptd/preemptd/job"
	"github.com/preemptd/preemptd/test/fakes"
)

// counting is a store that counts the requests it is asked, as a service
// bills them: a listing of more than 1,000 keys is one request a page.
type counting struct {
	storage.Store
	lists, gets, puts atomic.Int64
	looks             atomic.Int64 // listings (one a look)
}

func (c *counting) List(ctx context.Context, prefix string) ([]storage.Object, error) {
	objs, err := c.Store.List(ctx, prefix)
	c.lists.Add(int64(max(1, (len(objs)+999)/1000)))
	c.looks.Add(1)
	return objs, err
}

func (c *counting) Get(ctx context.Context, key string, w io.Writer) error {
	c.gets.Add(1)
	return c.Store.Get(ctx, key, w)
}

func (c *counting) PutBytes(ctx context.Context, key string, b []byte) error {
	c.puts.Add(1)
	return c.Store.PutBytes(ctx, key, b)
}

func (c *counting) Create(ctx context.Context, key string, b []byte) error {
	c.puts.Add(1)
	return c.Store.Create(ctx, key, b)
}

func (c *counting) reset() { c.lists.Store(0); c.gets.Store(0); c.puts.Store(0); c.looks.Store(0) }

// TestJobCommitWaitRequests: the store requests of a job's commit while
// its nodes wait for the last part, at 8, 64 and 1,000 nodes: every node
// but one has its part of a DCP checkpoint in the store (the coordinator's
// with .metadata, the others paired with it) and looks for the last part;
// each node's live members come from its own job registry (job.Job) in the
// same store. Counted over that wait, in an in-memory store that counts as
// a service bills (LIST pages of 1,000 keys, GETs, PUTs): what one look
// asks, and the registry's reads a second. A thousand nodes in one process
// on two cores cannot each look twice a second, so there they look every
// 5 s: what one look asks is the same, and the pace at the default
// job.poll is the committer's own rule (a look that asks r requests is
// followed by max(500 ms, r ÷ 3.5 s)).
func TestJobCommitWaitRequests(t *testing.T) {
	requireBench(t)
	var b strings.Builder
	fmt.Fprintf(&b, "### Store requests while a job's nodes wait for the last part (%s)\n\n", time.Now().Format("2006-01-02"))
	fmt.Fprintf(&b, "Machine: %s. Every node but one has its part of a DCP checkpoint (1 KiB a node) in an in-memory store "+
		"that counts requests as a service bills them (a LIST page holds 1,000 keys); the waiting nodes look for the last part, "+
		"counted over 10 looks each; every node reads its live members from its own job registry in the same store (one "+
		"`job.Job` a node, registered). A look that asks r requests is followed by max(job.poll, r ÷ 3.5 s) (job.poll 500 ms, "+
		"the default): the requests a second of a look are r ÷ that pause. The registry's requests are counted over the same wall time: each node's "+
		"`job.Job` runs as in the daemon (its registration rewritten and the list read every 30 s), and the committer re-reads the members "+
		"when they are more than 5 s old (a listing page per 1,000 nodes; at 1,000 nodes and 5 s looks that is every other look, at 500 ms "+
		"looks it would be every 5 s: 0.2 a second).\n\n", machine())
	b.WriteString("| nodes | poll here | requests per look (LIST pages + GETs) | pause at 500 ms | looks: requests/s per waiting node | registry: requests/s per waiting node | in all per waiting node | all waiting nodes, requests/s | from the last part to every node done: LIST pages / GETs / PUTs (per node) |\n|---|---|---|---|---|---|---|---|---|\n")
	sizes := []int{8, 64, 1000}
	if env := os.Getenv("BENCH_NODES"); env != "" { // e.g. 8,64: some of the sizes
		sizes = nil
		for f := range strings.SplitSeq(env, ",") {
			n, err := strconv.Atoi(f)
			if err != nil || n < 2 {
				t.Fatalf("BENCH_NODES %q: want sizes of 2 or more, comma-separated", env)
			}
			sizes = append(sizes, n)
		}
	}
	for _, n := range sizes {
		poll := 500 * time.Millisecond
		if n > 100 {
			poll = 5 * time.Second
		}
		perLook, registry, done := commitWait(t, n, poll, 10)
		pause := max(500*time.Millisecond, time.Duration(perLook/3.5*float64(time.Second)))
		looks := perLook / pause.Seconds()
		fmt.Fprintf(&b, "| %d | %v | %.2f | %v | %.2f | %.2f | **%.2f** | %.0f | %d / %d / %d (%.1f) |\n", n, poll, perLook, pause.Round(time.Millisecond),
			looks, registry, looks+registry, (looks+registry)*float64(n-1), done.lists, done.gets, done.puts,
			float64(done.lists+done.gets+done.puts)/float64(n))
		if looks+registry > 4 {
			t.Errorf("%d nodes: %.2f requests a second per waiting node; the goal is at most 4", n, looks+registry)
		}
	}
	appendResults(t, b.String())
}

// commitWait runs one job commit of n nodes looking every poll, the last
// node's part held back for polls polls, and returns the requests (LIST
// pages, GETs, PUTs) each look of a waiting node asked of the store, and
// the requests a second each waiting node's registry asked meanwhile.
func commitWait(t *testing.T, n int, poll time.Duration, polls int) (perLook, registry float64, done completion) {
	mem := fakes.NewMemStore()
	st := &counting{Store: mem}
	reg := &counting{Store: mem}
	dir := t.TempDir()
	logf, err := os.Create(filepath.Join(dir, "committers.log"))
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	log := slog.New(slog.NewTextHandler(logf, &slog.HandlerOptions{Level: slog.LevelWarn}))
	defer func() { // what went wrong, if anything did
		logf.Sync()
		if b, _ := os.ReadFile(logf.Name()); len(b) > 0 {
			t.Logf("%d nodes: the committers warned:\n%s", n, b[:min(len(b), 4000)])
		}
	}()
	cks := make([]checkpoint.Checkpoint, n)
	cs := make([]*checkpoint.Committer, n)
	ctx, cancel := context.WithCancel(context.Background())
	var jobs sync.WaitGroup
	defer jobs.Wait()
	defer cancel()
	for i := range n {
		node := fmt.Sprintf("n%04d", i)
		root := filepath.Join(dir, node)
		os.MkdirAll(filepath.Join(root, "step-1"), 0o755)
		os.WriteFile(filepath.Join(root, "step-1", fmt.Sprintf("__%d_0.distcp", i)), make([]byte, 1024), 0o644)
		if i == 0 {
			os.WriteFile(filepath.Join(root, "step-1", ".metadata"), make([]byte, 256), 0o644)
		}
		found, err := checkpoint.ScanJob(root, checkpoint.LayoutDCP, 0, time.Now())
		if err != nil || len(found) != 1 {
			t.Fatalf("%s: %v %v", node, found, err)
		}
		cks[i] = found[0]
		jb := job.New(job.Config{Run: "job", Node: node, Nodes: n}, reg, nil)
		if err := jb.Register(context.Background()); err != nil {
			t.Fatal(err)
		}
		jobs.Go(func() { jb.Run(ctx) }) // refreshed every 30 s, as the daemon does
		cs[i] = &checkpoint.Committer{Store: st, Run: "job", Node: node, Nodes: n, PartPoll: poll, PartWait: 30 * time.Minute,
			Members: jb.Members, Log: log}
	}
	started := time.Now()
	var wg sync.WaitGroup
	errs := make([]error, n)
	commit := func(i int) { wg.Go(func() { _, errs[i] = cs[i].Commit(context.Background(), cks[i]) }) }
	for i := range n - 1 {
		commit(i)
	}
	deadline := time.Now().Add(20 * time.Minute)
	for {
		objs, _ := mem.List(context.Background(), "job/step-1/"+checkpoint.PartsDir)
		manifests := 0
		for _, o := range objs {
			if strings.HasSuffix(o.Key, ".json") {
				manifests++
			}
		}
		if manifests == n-1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d nodes: only %d parts up", n, manifests)
		}
		time.Sleep(50 * time.Millisecond)
	}
	time.Sleep(2 * poll) // every node in its wait, its first reads of the others' parts done
	// The registries in steady state: every node has read the whole list
	// once (until then each reads it every 5 s).
	time.Sleep(time.Until(started.Add(6 * time.Second)))
	st.reset()
	reg.reset()
	began := time.Now()
	time.Sleep(time.Duration(polls) * poll)
	took := time.Since(began)
	looks := float64(st.looks.Load()) // each look of a waiting node lists the checkpoint once
	if looks == 0 {
		t.Fatalf("%d nodes: no node looked in %d polls", n, polls)
	}
	t.Logf("%d nodes: %.0f looks in %v (%.0f%% of one a node a poll)", n, looks, took, 100*looks/float64(polls*(n-1)))
	perLook = float64(st.lists.Load()+st.gets.Load()+st.puts.Load()) / looks
	registry = float64(reg.lists.Load()+reg.gets.Load()+reg.puts.Load()) / float64(n-1) / took.Seconds()
	t.Logf("%d nodes: per look %.2f LIST pages, %.2f GETs, %.2f PUTs; registry %d LIST pages, %d GETs a %v",
		n, float64(st.lists.Load())/looks, float64(st.gets.Load())/looks, float64(st.puts.Load())/looks, reg.lists.Load(), reg.gets.Load(), took)
	// The last part: from its commit to every node's return, all requests.
	st.reset()
	began = time.Now()
	commit(n - 1)
	wg.Wait()
	done.took = time.Since(began)
	done.lists, done.gets, done.puts = st.lists.Load(), st.gets.Load(), st.puts.Load()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("%d nodes: node %d: %v", n, i, err)
		}
	}
	t.Logf("%d nodes: the last part to every node's return: %d LIST pages, %d GETs, %d PUTs in %v", n, done.lists, done.gets, done.puts, done.took)
	return perLook, registry, done
}

// completion is what a job commit asked of the store from the last part
// to every node's return.
type completion struct {
	lists, gets, puts int64
	took              time.Duration
}
