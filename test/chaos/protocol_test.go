package chaos

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"maps"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/preemptd/preemptd/checkpoint"
	"github.com/preemptd/preemptd/checkpoint/storage"
	"github.com/preemptd/preemptd/test/fakes"
	"github.com/preemptd/preemptd/test/peers"
)

// The job's commit protocol under the failures it exists for, at random:
// 2 to 8 nodes save the same few names again and again (a fixed folder, the
// same step after a restart), as DCP does — every rank's shard, then the
// coordinator's .metadata over the old one — while their daemons are killed
// at any call of save, upload, part manifest, merge, create, pointer and
// signature, restarted (the same machine: its upload journal) or replaced
// (a new machine: an empty folder), while the store answers 503 or loses
// answers, and while a trainer dies mid-save. After every round, and after a
// last round without faults, the invariants:
//   - latest restores, byte for byte, to exactly the files one save of its
//     name wrote on every node (never two saves mixed, never a torn one);
//   - the last, fault-free save is committed and latest (nothing stuck);
//   - with a verify key, every job manifest in the store verifies, and ls
//     shows the same checkpoints with and without the key;
//   - no multipart upload is left by a node that is running at the end.

// protoTrials is how many trials run: PREEMPTD_PROTOCOL_TRIALS, else def.
func protoTrials(def int) int {
	if n, err := strconv.Atoi(os.Getenv("PREEMPTD_PROTOCOL_TRIALS")); err == nil && n > 0 {
		return n
	}
	return def
}

// save is one collective save of a name: what every file holds.
type save struct {
	name  string
	files map[string][32]byte
}

// protoNode is one machine of the job: its checkpoint folder, its upload
// journal, and the daemon's committer over its own view of the store.
type protoNode struct {
	name, root, journal string
	c                   *checkpoint.Committer
	fs                  *faultStore
	killed              bool
}

type trialResult struct {
	rounds, committed, kills, torn, replaced, restarts int
	leftByReplaced                                     int
	err                                                error
}

// protoTrial runs one trial on store (a fresh prefix of it) with the
// faults rng draws; open gives each node's view of the store.
func protoTrial(t *testing.T, seed uint64, base storage.Store, mem *fakes.MemStore) trialResult {
	rng := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	var res trialResult
	fail := func(format string, a ...any) trialResult {
		res.err = fmt.Errorf("seed %d: "+format, append([]any{seed}, a...)...)
		return res
	}
	n := 2 + rng.IntN(7)
	var signKey ed25519.PrivateKey
	var verifyKey ed25519.PublicKey
	if rng.IntN(2) == 0 {
		verifyKey, signKey, _ = ed25519.GenerateKey(nil)
	}
	p503 := []float64{0, 0.03, 0.1}[rng.IntN(3)]
	pLost := []float64{0, 0.03, 0.1}[rng.IntN(3)]
	members := map[string]bool{}
	for i := range n {
		members[fmt.Sprintf("n%d", i)] = true
	}
	dir := t.TempDir()
	machine := 0
	newMachine := func(i int) *protoNode {
		machine++
		nd := &protoNode{name: fmt.Sprintf("n%d", i), root: filepath.Join(dir, fmt.Sprintf("m%d", machine), "ckpt"),
			journal: filepath.Join(dir, fmt.Sprintf("m%d", machine), "journal.json")}
		os.MkdirAll(nd.root, 0o755)
		return nd
	}
	// start (re)starts node nd's daemon: a new committer over a new view of
	// the store, which cleans up its own interrupted uploads first.
	start := func(nd *protoNode, faults bool) {
		fs := &faultStore{Store: base, killAt: -1, rng: rand.New(rand.NewPCG(rng.Uint64(), 1))}
		if mem != nil {
			fs.interrupted = mem.Interrupted
		}
		if faults {
			fs.p503, fs.pLost = p503, pLost
		}
		nd.fs = fs
		nd.c = &checkpoint.Committer{Store: fs, Run: "job", Instance: "i-" + nd.name, Node: nd.name, Nodes: n,
			Members:  func(context.Context) (map[string]bool, error) { return maps.Clone(members), nil },
			PartPoll: 2 * time.Millisecond, Journal: nd.journal, SignKey: signKey, VerifyKey: verifyKey, Parallel: 2}
		nd.c.Cleanup(context.Background())
	}
	nodes := make([]*protoNode, n)
	for i := range nodes {
		nodes[i] = newMachine(i)
		start(nodes[i], true)
	}
	saves := map[string][]save{} // by name, every complete save of it
	names := []string{"step-5", "step-10", "last"}
	clock := time.Now().Add(-24 * time.Hour)
	rounds := 3 + rng.IntN(4)
	reader := &checkpoint.Committer{Store: base, Run: "job", VerifyKey: verifyKey}
	var pointed time.Time // the save latest named after the last round: it only moves forward
	for r := 0; r <= rounds; r++ {
		final := r == rounds // the last round: no faults, all must commit
		name := names[rng.IntN(len(names))]
		clock = clock.Add(time.Duration(1+rng.IntN(10)) * time.Minute) // a save after a restart comes minutes later
		// Machines replaced, daemons restarted.
		for i, nd := range nodes {
			switch {
			case !final && rng.Float64() < 0.1:
				// The machine is gone with its journal: its unfinished
				// uploads are for the bucket's lifecycle rule to take.
				res.leftByReplaced += lifecycle(base, nd.journal)
				nodes[i] = newMachine(i)
				start(nodes[i], true)
				res.replaced++
			case nd.killed || final:
				start(nd, !final)
				if nd.killed {
					res.restarts++
				}
				nd.killed = false
			}
		}
		// The save: every rank's shard, the coordinator's .metadata last —
		// unless a trainer dies midway (then no .metadata: DCP's save is
		// collective).
		torn := -1
		if !final && rng.Float64() < 0.15 {
			torn = rng.IntN(n)
			res.torn++
		}
		files := map[string][32]byte{}
		for i, nd := range nodes {
			body := fmt.Appendf(nil, "%s save %d node %d\n", name, r, i)
			body = append(body, bytes.Repeat([]byte{byte(rng.IntN(256))}, 50+rng.IntN(3000))...)
			if i == torn {
				body = body[:len(body)/2]
			}
			path := filepath.Join(nd.root, name, fmt.Sprintf("__%d_0.distcp", i))
			write(t, path, body, clock.Add(time.Duration(i)*time.Microsecond))
			files[name+"/"+fmt.Sprintf("__%d_0.distcp", i)] = sha256.Sum256(body)
		}
		if torn < 0 {
			meta := fmt.Appendf(nil, "%s save %d metadata %d", name, r, rng.Uint64())
			write(t, filepath.Join(nodes[0].root, name, ".metadata"), meta, clock.Add(time.Millisecond))
			files[name+"/.metadata"] = sha256.Sum256(meta)
			saves[name] = append(saves[name], save{name, files})
		}
		// The commits, every node at once, some killed at a random call.
		deadline := 150 * time.Millisecond
		if final {
			deadline = 30 * time.Second
		}
		var wg sync.WaitGroup
		errs := make([]error, n)
		for i, nd := range nodes {
			ck, ok := scanName(nd.root, name)
			if !ok {
				continue // its own folder holds no complete part of this save (torn, or the coordinator's without .metadata)
			}
			ctx, cancel := context.WithTimeout(context.Background(), deadline)
			nd.fs.kill = cancel
			if !final && rng.Float64() < min(0.3, 1/float64(n)) {
				nd.fs.mu.Lock()
				nd.fs.killAt = nd.fs.ops + int64(rng.IntN(25))
				nd.fs.mu.Unlock()
			}
			wg.Go(func() {
				defer cancel()
				_, errs[i] = nd.c.Commit(ctx, ck)
			})
		}
		wg.Wait()
		for _, nd := range nodes {
			if nd.fs.dead.Load() {
				nd.killed = true
				res.kills++
			}
		}
		res.rounds++
		// Invariant: the pointer itself never moved back.
		var lb bytes.Buffer
		if base.Get(context.Background(), "job/latest", &lb) == nil {
			var l checkpoint.Latest
			json.Unmarshal(lb.Bytes(), &l)
			if l.WrittenAt.Before(pointed) {
				return fail("round %d: latest moved back to %s, saved %s, from a save of %s", r, l.Name, l.WrittenAt, pointed)
			}
			pointed = l.WrittenAt
		}
		// Invariant: latest is one save of its name, whole.
		m, got, err := restoreLatest(t, reader)
		switch {
		case err != nil && !strings.Contains(err.Error(), "no committed checkpoint"):
			return fail("round %d: latest does not restore: %v", r, err)
		case err == nil:
			if !slices.ContainsFunc(saves[m.Name], func(s save) bool { return maps.Equal(s.files, got) }) {
				return fail("round %d: latest %s (commit %s) restores files that no single save of it wrote (%d saves of it)",
					r, m.Name, m.Commit, len(saves[m.Name]))
			}
		}
		if final {
			for i, err := range errs {
				if err != nil {
					return fail("the fault-free last round: n%d: %v", i, err)
				}
			}
			if m.Name != name || !maps.Equal(got, files) {
				return fail("after the fault-free save of %s, latest is %s", name, m.Name)
			}
			res.committed++
		} else if err == nil && m.Name == name && maps.Equal(got, files) {
			res.committed++
		}
	}
	// With a verify key every job manifest in the store verifies, and ls
	// shows the same with and without it.
	if verifyKey != nil {
		plain := &checkpoint.Committer{Store: base, Run: "job"}
		a, _, err := reader.List(context.Background())
		b, _, err2 := plain.List(context.Background())
		if err != nil || err2 != nil || len(a) != len(b) {
			return fail("ls with the verify key shows %d checkpoints, without %d (%v %v)", len(a), len(b), err, err2)
		}
		for i := range a {
			if a[i].Name != b[i].Name || a[i].Commit != b[i].Commit {
				return fail("ls with and without the verify key differ: %s/%s vs %s/%s", a[i].Name, a[i].Commit, b[i].Name, b[i].Commit)
			}
		}
		objs, _ := base.List(context.Background(), "job")
		for _, o := range objs {
			if strings.Contains(o.Key, "/"+checkpoint.CommitsDir+"/") && strings.HasSuffix(o.Key, ".json") {
				var sig bytes.Buffer
				if err := base.Get(context.Background(), strings.TrimSuffix(o.Key, ".json")+".sig", &sig); err != nil {
					return fail("job manifest %s has no signature: %v", o.Key, err)
				}
			}
		}
	}
	if mem != nil {
		if left := mem.LeftUploads(); left > 0 {
			return fail("%d multipart uploads left by nodes running at the end", left)
		}
	}
	return res
}

// lifecycle aborts the unfinished uploads a machine's journal names, as a
// bucket's lifecycle rule (AbortIncompleteMultipartUpload) does for a
// machine that is gone, and says how many there were.
func lifecycle(st storage.Store, journal string) int {
	b, err := os.ReadFile(journal)
	var keys []string
	if err != nil || json.Unmarshal(b, &keys) != nil || len(keys) == 0 {
		return 0
	}
	n, _ := st.AbortUploads(context.Background(), keys...)
	return n
}

func write(t *testing.T, path string, b []byte, at time.Time) {
	os.MkdirAll(filepath.Dir(path), 0o755)
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Chtimes(path, at, at); err != nil {
		t.Fatal(err)
	}
}

// scanName is checkpoint name as a job node's scan finds it complete.
func scanName(root, name string) (checkpoint.Checkpoint, bool) {
	cks, err := checkpoint.ScanJob(root, checkpoint.LayoutDCP, 0, time.Now())
	if err != nil {
		return checkpoint.Checkpoint{}, false
	}
	for _, c := range cks {
		if c.Name == name {
			return c, true
		}
	}
	return checkpoint.Checkpoint{}, false
}

func restoreLatest(t *testing.T, c *checkpoint.Committer) (checkpoint.Manifest, map[string][32]byte, error) {
	dst := t.TempDir()
	m, _, err := c.Restore(context.Background(), dst, "")
	if err != nil {
		return m, nil, err
	}
	got := map[string][32]byte{}
	filepath.WalkDir(dst, func(p string, d os.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			b, _ := os.ReadFile(p)
			rel, _ := filepath.Rel(dst, p)
			got[filepath.ToSlash(rel)] = sha256.Sum256(b)
		}
		return nil
	})
	return m, got, nil
}

// parallel runs trial for trials seeds, par at a time, until one fails;
// the seeds start at $seedEnv when set (to run a failure again), else now.
// Each trial's error fails the test; add takes each passed trial's result
// (one at a time).
func parallel[R any](t *testing.T, trials, par int, seedEnv string, trial func(i int, seed uint64) (R, error), add func(R)) {
	var mu sync.Mutex
	var failed atomic.Int32
	sem := make(chan struct{}, par)
	var wg sync.WaitGroup
	base := uint64(time.Now().UnixNano())
	if s, err := strconv.ParseUint(os.Getenv(seedEnv), 10, 64); err == nil {
		base = s
	}
	t.Logf("seeds from %d (%s=%d to run them again)", base, seedEnv, base)
	for i := range trials {
		if failed.Load() > 0 {
			break
		}
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			r, err := trial(i, base+uint64(i))
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				failed.Add(1)
				t.Errorf("trial %d: %v", i, err)
				return
			}
			add(r)
		})
	}
	wg.Wait()
}

// runTrials runs the protocol's trials, par at a time, each on the store mk
// gives it, and reports what they did.
func runTrials(t *testing.T, trials, par int, mk func(i int) (storage.Store, *fakes.MemStore)) trialResult {
	var total trialResult
	parallel(t, trials, par, "PREEMPTD_PROTOCOL_SEED", func(i int, seed uint64) (trialResult, error) {
		st, mem := mk(i)
		r := protoTrial(t, seed, st, mem)
		return r, r.err
	}, func(r trialResult) {
		total.rounds += r.rounds
		total.committed += r.committed
		total.kills += r.kills
		total.torn += r.torn
		total.replaced += r.replaced
		total.restarts += r.restarts
		total.leftByReplaced += r.leftByReplaced
	})
	return total
}

func summary(trials int, r trialResult) string {
	return fmt.Sprintf("%d trials, %d rounds: %d daemons killed mid-commit (%d restarted, %d machines replaced, leaving %d uploads to the lifecycle rule), %d torn saves; %d saves committed; every latest one save, whole; every last fault-free save committed; no upload left by a running node",
		trials, r.rounds, r.kills, r.restarts, r.replaced, r.leftByReplaced, r.torn, r.committed)
}

// TestJobProtocolRandomized: thousands of trials against an in-memory
// store (make test).
func TestJobProtocolRandomized(t *testing.T) {
	trials := protoTrials(2000)
	start := time.Now()
	r := runTrials(t, trials, 16, func(int) (storage.Store, *fakes.MemStore) { m := fakes.NewMemStore(); return m, m })
	if t.Failed() {
		return
	}
	t.Logf("%s (%v)", summary(trials, r), time.Since(start).Round(time.Second))
	record(fmt.Sprintf("job commit protocol, randomized: kills at every call, 503s, lost answers, torn and repeated saves (%d trials, in memory)", trials),
		summary(trials, r), t)
}

// TestChaosJobProtocolMinIO: the same trials against MinIO (a few hundred
// in make chaos: PREEMPTD_PROTOCOL_TRIALS; a few in make test).
func TestChaosJobProtocolMinIO(t *testing.T) {
	trials := 10
	if os.Getenv("PREEMPTD_CHAOS_FULL") != "" {
		trials = protoTrials(300)
	}
	s3 := peers.StartMinIO(t)
	s3.SetEnv(t)
	start := time.Now()
	r := runTrials(t, trials, 4, func(i int) (storage.Store, *fakes.MemStore) {
		st, err := storage.Open(fmt.Sprintf("s3://%s/proto-%d", s3.Bucket, i), storage.Options{Endpoint: s3.Endpoint, Region: "us-east-1", Threads: 2})
		if err != nil {
			t.Error(err)
		}
		return st, nil
	})
	if t.Failed() {
		return
	}
	left := s3.IncompleteUploads(t)
	t.Logf("%s; %d multipart uploads left in MinIO (%v)", summary(trials, r), left, time.Since(start).Round(time.Second))
	record(fmt.Sprintf("job commit protocol, randomized, against MinIO (%d trials)", trials), summary(trials, r), t)
}
