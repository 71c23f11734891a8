package chaos

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
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

// The job's notices under the same faults, at random: 2 to 5 nodes raise,
// withdraw and raise again notices with the same few ids (a trigger file
// rewritten, GCP's preempted, AWS's instance-action), at random moments,
// while the store answers 503 or loses answers and pushes are lost. Once the
// nodes are quiet, every node holds a job notice exactly when another node
// has a notice raised (none misses a raised one); once every notice is
// withdrawn, no node holds one, and none is raised again (no node is
// stopped by a withdrawn notice).

// peerView is what one node's agent has been told: its job notices.
type peerView struct {
	mu     sync.Mutex
	active map[string]bool // by agent key: job notices raised and not withdrawn
	raises int
}

func (v *peerView) take(n agent.Notice) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if n.Withdrawn {
		delete(v.active, n.Key())
		return
	}
	if !v.active[n.Key()] {
		v.raises++
	}
	v.active[n.Key()] = true
}

func (v *peerView) state() (bool, int) {
	v.mu.Lock()
	defer v.mu.Unlock()
	return len(v.active) > 0, v.raises
}

type noticeResult struct {
	events, raised, withdrawn int
	err                       error
}

func noticeTrial(t *testing.T, seed uint64, base storage.Store, run string) noticeResult {
	rng := rand.New(rand.NewPCG(seed, seed^0x5851f42d4c957f2d))
	var res noticeResult
	fail := func(format string, a ...any) noticeResult {
		res.err = fmt.Errorf("seed %d: "+format, append([]any{seed}, a...)...)
		return res
	}
	n := 2 + rng.IntN(4)
	push := rng.IntN(2) == 0
	p503 := []float64{0, 0.05, 0.15}[rng.IntN(3)]
	pLost := []float64{0, 0.05, 0.15}[rng.IntN(3)]
	pDrop := []float64{0, 0.3}[rng.IntN(2)]
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var jobs []*job.Job
	views := make([]*peerView, n)
	var rmu sync.Mutex // the trial's truth
	var dmu sync.Mutex // the pushes' dice, thrown by the servers' goroutines
	drops := rand.New(rand.NewPCG(rng.Uint64(), 3))
	for i := range n {
		fs := &faultStore{Store: base, killAt: -1, p503: p503, pLost: pLost, rng: rand.New(rand.NewPCG(rng.Uint64(), 2))}
		cfg := job.Config{Run: run, Node: fmt.Sprintf("n%d", i), Nodes: n, Poll: 10 * time.Millisecond}
		if push {
			cfg.Token = "chaos-job-token-0123456789"
		}
		var h http.Handler
		if push {
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				dmu.Lock()
				drop := drops.Float64() < pDrop
				dmu.Unlock()
				if drop {
					http.Error(w, "lost (injected)", http.StatusServiceUnavailable)
					return
				}
				h.ServeHTTP(w, r)
			}))
			defer srv.Close()
			cfg.Advertise = strings.TrimPrefix(srv.URL, "http://")
		}
		j := job.New(cfg, fs, nil)
		h = j.Handler()
		for j.Register(ctx) != nil {
			time.Sleep(time.Millisecond)
		}
		jobs = append(jobs, j)
	}
	for i, j := range jobs {
		for _, err := j.Members(ctx); err != nil; _, err = j.Members(ctx) {
			time.Sleep(time.Millisecond)
		}
		views[i] = &peerView{active: map[string]bool{}}
		out := make(chan agent.Notice, 64)
		go j.Watch(ctx, out)
		go func() {
			for {
				select {
				case nt := <-out:
					views[i].take(nt)
				case <-ctx.Done():
					return
				}
			}
		}()
	}
	ids := []string{"preempted", "instance-action"}
	raised := make([]map[string]agent.Notice, n) // the truth: each node's notices raised
	for i := range raised {
		raised[i] = map[string]agent.Notice{}
	}
	toggle := func(i int, id string) {
		rmu.Lock()
		defer rmu.Unlock()
		if nt, ok := raised[i][id]; ok {
			delete(raised[i], id)
			jobs[i].Withdrawn(nt)
			res.withdrawn++
			return
		}
		now := time.Now()
		nt := agent.Notice{Provider: "gcp", Kind: agent.KindPreempt, ID: id, NoticedAt: now, Deadline: now.Add(time.Minute)}
		raised[i][id] = nt
		jobs[i].Fatal(nt)
		res.raised++
	}
	expect := func() []bool { // node i should hold a job notice: another node has one raised
		rmu.Lock()
		defer rmu.Unlock()
		out := make([]bool, n)
		for i := range n {
			for k := range n {
				out[i] = out[i] || k != i && len(raised[k]) > 0
			}
		}
		return out
	}
	converge := func(what string) error {
		want := expect()
		var got []bool
		for end := time.Now().Add(10 * time.Second); time.Now().Before(end); time.Sleep(20 * time.Millisecond) {
			got = got[:0]
			for _, v := range views {
				a, _ := v.state()
				got = append(got, a)
			}
			if fmt.Sprint(got) == fmt.Sprint(want) {
				return nil
			}
		}
		return fmt.Errorf("%s: nodes hold job notices %v, want %v", what, got, want)
	}
	events := 3 + rng.IntN(6)
	for range events {
		toggle(rng.IntN(n), ids[rng.IntN(len(ids))])
		if rng.IntN(3) > 0 {
			time.Sleep(time.Duration(rng.IntN(40)) * time.Millisecond)
		}
		res.events++
	}
	if err := converge("after the last change"); err != nil {
		return fail("%v", err)
	}
	for i := range n { // every notice withdrawn
		for _, id := range ids {
			rmu.Lock()
			_, ok := raised[i][id]
			rmu.Unlock()
			if ok {
				toggle(i, id)
			}
		}
	}
	for _, j := range jobs {
		j.Wait() // every withdrawal in the store (the tombstone, the delete)
	}
	if err := converge("after every notice was withdrawn"); err != nil {
		return fail("%v", err)
	}
	before := make([]int, n)
	for i, v := range views {
		_, before[i] = v.state()
	}
	time.Sleep(300 * time.Millisecond)
	for i, v := range views {
		if a, r := v.state(); a || r != before[i] {
			return fail("n%d raised a job notice again after every notice was withdrawn", i)
		}
	}
	cancel()
	for _, j := range jobs {
		j.Wait()
	}
	return res
}

func runNoticeTrials(t *testing.T, trials, par int, mk func(i int) storage.Store) noticeResult {
	var total noticeResult
	parallel(t, trials, par, "PREEMPTD_NOTICE_SEED", func(i int, seed uint64) (noticeResult, error) {
		r := noticeTrial(t, seed, mk(i), fmt.Sprintf("run-%d", i))
		return r, r.err
	}, func(r noticeResult) {
		total.events += r.events
		total.raised += r.raised
		total.withdrawn += r.withdrawn
	})
	return total
}

// TestJobNoticesRandomized: the notice protocol's trials against an
// in-memory store (make test).
func TestJobNoticesRandomized(t *testing.T) {
	trials := 200
	if s := os.Getenv("PREEMPTD_NOTICE_TRIALS"); s != "" {
		fmt.Sscan(s, &trials)
	}
	start := time.Now()
	r := runNoticeTrials(t, trials, 16, func(int) storage.Store { return fakes.NewMemStore() })
	if t.Failed() {
		return
	}
	out := fmt.Sprintf("%d trials: %d notices raised, %d withdrawn (the same ids again and again); every node converged to the truth, none raised one again after the withdrawals",
		trials, r.raised, r.withdrawn)
	t.Logf("%s (%v)", out, time.Since(start).Round(time.Second))
	record(fmt.Sprintf("job notices, randomized: raise, withdraw, raise the same id; 503s, lost answers, lost pushes (%d trials, in memory)", trials), out, t)
}

// TestChaosJobNoticesMinIO: the same against MinIO.
func TestChaosJobNoticesMinIO(t *testing.T) {
	trials := 10
	if os.Getenv("PREEMPTD_CHAOS_FULL") != "" {
		trials = 200
	}
	s3 := peers.StartMinIO(t)
	s3.SetEnv(t)
	st, err := storage.Open("s3://"+s3.Bucket+"/notices", storage.Options{Endpoint: s3.Endpoint, Region: "us-east-1"})
	if err != nil {
		t.Fatal(err)
	}
	r := runNoticeTrials(t, trials, 8, func(int) storage.Store { return st })
	if t.Failed() {
		return
	}
	record(fmt.Sprintf("job notices, randomized, against MinIO (%d trials)", trials),
		fmt.Sprintf("%d raised, %d withdrawn; every node converged, none raised one again", r.raised, r.withdrawn), t)
}
