package chaos

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/preemptd/preemptd/agent"
	"github.com/preemptd/preemptd/checkpoint"
	"github.com/preemptd/preemptd/job"
	"github.com/preemptd/preemptd/test/peers"
)

// TestChaosJobStoreDownPushDelivers: the store hangs for one node of a
// three-node job (toxiproxy holds every byte) while another node is
// noticed: the push reaches it anyway; the third node has it both ways.
func TestChaosJobStoreDownPushDelivers(t *testing.T) {
	s3 := peers.StartMinIO(t)
	x := peers.StartToxiproxy(t)
	proxy := x.Front(t, "minio", s3, 0)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var nodes []*job.Job
	var outs []chan agent.Notice
	for i := range 3 {
		endpoint := s3.Endpoint
		if i == 0 {
			endpoint = "http://" + proxy
		}
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		j := job.New(job.Config{Run: "fan", Node: fmt.Sprintf("n%d", i), Nodes: 3, Advertise: l.Addr().String(),
			Token: "chaos-job-token-0123456789"}, s3Store(t, s3, endpoint), nil)
		srv := &http.Server{Handler: j.Handler()}
		go srv.Serve(l)
		t.Cleanup(func() { srv.Close() })
		if err := j.Register(ctx); err != nil {
			t.Fatal(err)
		}
		nodes = append(nodes, j)
	}
	for _, j := range nodes {
		if _, err := j.Members(ctx); err != nil {
			t.Fatal(err)
		}
		out := make(chan agent.Notice, 8)
		go j.Watch(ctx, out)
		outs = append(outs, out)
	}
	x.Toxic(t, "minio", "hold", "timeout", map[string]any{"timeout": 0}) // node 0's store: nothing gets through
	time.Sleep(time.Second)
	at := time.Now()
	nodes[2].Fatal(agent.Notice{Provider: "gcp", Kind: agent.KindPreempt, ID: "preempted", NoticedAt: at, Deadline: at.Add(30 * time.Second)})
	took := make([]time.Duration, 2)
	var wg sync.WaitGroup
	for _, i := range []int{0, 1} {
		wg.Go(func() {
			select {
			case n := <-outs[i]:
				took[i] = time.Since(at)
				if n.Kind != agent.KindJob || n.Withdrawn {
					t.Errorf("n%d: %+v", i, n)
				}
			case <-time.After(5 * time.Second):
				t.Errorf("n%d: no job notice (its store is down for n0: the push must carry it)", i)
			}
		})
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	select {
	case n := <-outs[0]:
		t.Fatalf("n0 (store down) changed its job notice: %+v", n)
	case <-time.After(2 * time.Second):
	}
	x.Remove(t, "minio", "hold")
	record("job: the store unreachable for one node while another is noticed (toxiproxy timeout 0)",
		fmt.Sprintf("the push delivered the job notice in %v (the other node: %v); no false withdrawal while its store hung",
			took[0].Round(time.Millisecond), took[1].Round(time.Millisecond)), t)
}

// TestChaosJobNodeKilledMidCommit: rounds of a three-node job checkpoint
// (4 MiB a node through a 4 MB/s-per-connection link) in which one node, at
// random, is cut off at a random moment of its commit (its context
// cancelled: requests cut mid-flight, nothing cleaned up), the others
// waiting for it to their deadline. After every round, whatever is
// committed restores whole with every part; what is not, is not latest.
func TestChaosJobNodeKilledMidCommit(t *testing.T) {
	s3 := peers.StartMinIO(t)
	x := peers.StartToxiproxy(t)
	proxy := x.Front(t, "minio", s3, 4096)
	st := s3Store(t, s3, "http://"+proxy)
	members := func(context.Context) (map[string]bool, error) {
		return map[string]bool{"n0": true, "n1": true, "n2": true}, nil
	}
	var cs []*checkpoint.Committer
	var roots []string
	for i := range 3 {
		cs = append(cs, &checkpoint.Committer{Store: st, Run: "kill", Node: fmt.Sprintf("n%d", i), Nodes: 3, Members: members,
			PartPoll: 50 * time.Millisecond, Journal: filepath.Join(t.TempDir(), "journal.json")})
		roots = append(roots, t.TempDir())
	}
	rounds := 10
	if testing.Short() {
		rounds = 4
	}
	committed, refused := 0, 0
	for r := range rounds {
		name := fmt.Sprintf("step-%d", r+1)
		for i, root := range roots {
			randomFile(t, filepath.Join(root, name, fmt.Sprintf("__%d_0.distcp", i)), 4<<20)
			if i == 0 {
				randomFile(t, filepath.Join(root, name, ".metadata"), 512)
			}
		}
		victim := rand.IntN(3)
		killAt := time.Duration(rand.IntN(1500)) * time.Millisecond
		var wg sync.WaitGroup
		errs := make([]error, 3)
		for i, c := range cs {
			ck := scanPart(t, roots[i], name)
			ctx, cancel := context.WithTimeout(context.Background(), 4*time.Second)
			if i == victim {
				time.AfterFunc(killAt, cancel)
			}
			wg.Go(func() { defer cancel(); _, errs[i] = c.Commit(ctx, ck) })
		}
		wg.Wait()
		// The truth is in the store: a manifest means whole, every part.
		ms, _, err := cs[1].List(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		if slices.ContainsFunc(ms, func(m checkpoint.Manifest) bool { return m.Name == name }) {
			m, _, err := cs[1].Restore(context.Background(), t.TempDir(), name)
			if err != nil || len(m.Parts) != 3 || len(m.Files) != 4 {
				t.Fatalf("round %d: %s committed but restores %d parts, %d files: %v", r, name, len(m.Parts), len(m.Files), err)
			}
			committed++
		} else {
			if other := errs[(victim+1)%3]; !errors.Is(other, checkpoint.ErrPartsMissing) {
				t.Fatalf("round %d: %s not committed, and n%d says %v (want its part missing)", r, name, (victim+1)%3, other)
			}
			refused++
		}
		t.Logf("round %d: n%d cut at %v → %v / %v / %v", r, victim, killAt, errs[0], errs[1], errs[2])
		if l, _, err := cs[0].Restore(context.Background(), t.TempDir(), ""); err != nil && committed > 0 {
			t.Fatalf("round %d: latest does not restore: %v", r, err)
		} else if err == nil && len(l.Parts) != 3 {
			t.Fatalf("round %d: latest %s has %d parts", r, l.Name, len(l.Parts))
		}
		for _, c := range cs {
			c.Cleanup(context.Background()) // the node back: its own leftovers only
		}
	}
	if left := s3.IncompleteUploads(t); left != 0 {
		t.Fatalf("%d multipart uploads left", left)
	}
	record("job: one node of three cut off at a random point of a multi-node commit (10 rounds; 4 in -short)",
		fmt.Sprintf("%d committed whole (every part, every checksum), %d not committed; never a checkpoint with a part missing", committed, refused), t)
}

func scanPart(t *testing.T, root, name string) checkpoint.Checkpoint {
	t.Helper()
	return scanned(t, checkpoint.ScanJob, checkpoint.LayoutAuto, root, name)
}
