package bench

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/preemptd/preemptd/checkpoint"
	"github.com/preemptd/preemptd/checkpoint/storage"
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

func (c *counting) reset() { c.lists.Store(0); c.gets.Store(0); c.puts.Store(0); c.looks.Store(0) }

// TestJobCommitWaitRequests: the store requests of a job's commit while
// its nodes wait for the last part, at 8, 64 and 1,000 nodes: every node
// but one has its part of a DCP checkpoint in the store (the coordinator's
// with .metadata, the others paired with it) and looks for the last part
// every job.poll; counted over that wait, in an in-memory store that counts
// as a service bills (LIST pages of 1,000 keys, GETs, PUTs), per waiting
// node and poll, and per second at the default job.poll of 500 ms. A
// thousand nodes in one process on two cores cannot each look twice a
// second, so there they look every 5 s: what one look asks is the same.
// The job's registry is left out (a fixed member list): its reads are not
// counted here.
func TestJobCommitWaitRequests(t *testing.T) {
	requireBench(t)
	var b strings.Builder
	fmt.Fprintf(&b, "### Store requests while a job's nodes wait for the last part (%s)\n\n", time.Now().Format("2006-01-02"))
	fmt.Fprintf(&b, "Machine: %s. Every node but one has its part of a DCP checkpoint (1 KiB a node) in an in-memory store "+
		"that counts requests as a service bills them (a LIST page holds 1,000 keys); the waiting nodes look for the last part "+
		"every poll, counted over 10 polls. The registry is a fixed list here (its reads are not in these figures). "+
		"Per second at the default job.poll (500 ms) = per poll × 2.\n\n", machine())
	b.WriteString("| nodes | poll here | LIST pages per waiting node and poll | GETs | PUTs | requests/s per waiting node at 500 ms | in all, requests/s at 500 ms |\n|---|---|---|---|---|---|---|\n")
	for _, n := range []int{8, 64, 1000} {
		poll := 500 * time.Millisecond
		if n > 100 {
			poll = 5 * time.Second
		}
		lists, gets, puts := commitWait(t, n, poll, 10)
		per := lists + gets + puts
		fmt.Fprintf(&b, "| %d | %v | %.2f | %.2f | %.2f | %.1f | %.0f |\n", n, poll, lists, gets, puts, 2*per, 2*per*float64(n-1))
	}
	appendResults(t, b.String())
}

// commitWait runs one job commit of n nodes looking every poll, the last
// node's part held back for polls polls, and returns the LIST pages, GETs
// and PUTs each waiting node asked of the store a poll during the wait.
func commitWait(t *testing.T, n int, poll time.Duration, polls int) (lists, gets, puts float64) {
	st := &counting{Store: fakes.NewMemStore()}
	members := map[string]bool{}
	for i := range n {
		members[fmt.Sprintf("n%04d", i)] = true
	}
	dir := t.TempDir()
	cks := make([]checkpoint.Checkpoint, n)
	cs := make([]*checkpoint.Committer, n)
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
		cs[i] = &checkpoint.Committer{Store: st, Run: "job", Node: node, Nodes: n, PartPoll: poll, PartWait: 30 * time.Minute,
			Members: func(context.Context) (map[string]bool, error) { return members, nil }}
	}
	var wg sync.WaitGroup
	errs := make([]error, n)
	commit := func(i int) { wg.Go(func() { _, errs[i] = cs[i].Commit(context.Background(), cks[i]) }) }
	for i := range n - 1 {
		commit(i)
	}
	deadline := time.Now().Add(20 * time.Minute)
	for {
		objs, _ := st.Store.List(context.Background(), "job/step-1/"+checkpoint.PartsDir)
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
	time.Sleep(2 * poll) // every node in its wait
	st.reset()
	time.Sleep(time.Duration(polls) * poll)
	looks := float64(st.looks.Load()) // each look of a waiting node lists the checkpoint once
	if looks == 0 {
		t.Fatalf("%d nodes: no node looked in %d polls", n, polls)
	}
	t.Logf("%d nodes: %.0f looks in %v (%.0f%% of one a node a poll)", n, looks, time.Duration(polls)*poll, 100*looks/float64(polls*(n-1)))
	lists, gets, puts = float64(st.lists.Load())/looks, float64(st.gets.Load())/looks, float64(st.puts.Load())/looks
	commit(n - 1)
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("%d nodes: node %d: %v", n, i, err)
		}
	}
	t.Logf("%d nodes: per waiting node and poll %.2f LIST pages, %.2f GETs, %.2f PUTs", n, lists, gets, puts)
	return lists, gets, puts
}
