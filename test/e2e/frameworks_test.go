package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/preemptd/preemptd/agent"
	trainerpkg "github.com/preemptd/preemptd/agent/trainer"
	"github.com/preemptd/preemptd/test/peers"
)

// framework is one framework's trial: a script of test/frameworks that
// trains for real on the CPU, saves the framework's own checkpoints, stops
// on preemptd's signal with a final one, and in check mode loads a
// checkpoint with the framework itself (the lines it prints are in
// test/frameworks/common.py).
type framework struct {
	name   string   // the table's row
	pkgs   []string // the distributions whose versions the table gives
	script string   // in test/frameworks
	ranks  int      // > 0: under torchrun (gloo) with that many ranks
	layout string   // checkpoint.layout
	sub    string   // checkpoint.dir below the script's CKPT_DIR
	env    []string // for every run
	rounds []fwRound
	// rotates: the framework removes older checkpoints (keeps 2) while it trains.
	rotates bool
	// incomplete says, from the files, that the save of name is not
	// complete yet (nil: the script's lines alone tell).
	incomplete func(dir, name string) bool
}

// fwRound is one life of the trainer: how it saves, said in the table.
type fwRound struct {
	label string
	env   []string
}

func missing(p string) bool { _, err := os.Stat(p); return err != nil }

var frameworks = []framework{
	{name: "PyTorch DCP (torchrun, 2 ranks, gloo)", pkgs: []string{"torch"}, script: "dcp_train.py", ranks: 2,
		layout: "dcp", env: []string{"WIDTH=512", "SAVE_EVERY=40"},
		rounds:     []fwRound{{"dcp.save", []string{"MODE=sync"}}, {"dcp.async_save", []string{"MODE=async"}}},
		incomplete: func(dir, name string) bool { return missing(filepath.Join(dir, name, ".metadata")) }},
	{name: "Lightning ModelCheckpoint + preemptd.lightning", pkgs: []string{"lightning", "torch"}, script: "lightning_train.py",
		layout: "lightning", env: []string{"WIDTH=512", "SAVE_EVERY=80"}, rotates: true,
		rounds: []fwRound{{`save_last=True`, []string{"SAVE_LAST=true"}}, {`save_last="link"`, []string{"SAVE_LAST=link"}}}},
	{name: "Hugging Face Trainer + preemptd.hf", pkgs: []string{"transformers", "torch"}, script: "hf_train.py",
		layout: "hf", env: []string{"HIDDEN=128", "SAVE_EVERY=60"}, rotates: true,
		rounds: []fwRound{{"PreemptdCallback", []string{"JIT=0"}}, {"enable_jit_checkpoint", []string{"JIT=1"}}},
		incomplete: func(dir, name string) bool {
			return missing(filepath.Join(dir, name, "trainer_state.json")) || !missing(filepath.Join(dir, name, "checkpoint-is-incomplete.txt"))
		}},
	{name: "Accelerate save_state", pkgs: []string{"accelerate", "torch"}, script: "accelerate_train.py", sub: "checkpoints",
		layout: "files", env: []string{"WIDTH=512", "SAVE_EVERY=50"}, rotates: true,
		rounds: []fwRound{{"automatic naming, total_limit=2", nil}, {"resumed by load_state", nil}}},
	{name: "JAX + Orbax CheckpointManager (async)", pkgs: []string{"jax", "orbax-checkpoint"}, script: "orbax_train.py",
		layout: "orbax", env: []string{"WIDTH=512", "SAVE_EVERY=100"}, rotates: true,
		rounds:     []fwRound{{"max_to_keep=2", nil}, {"resumed by Orbax", nil}},
		incomplete: func(dir, name string) bool { return missing(filepath.Join(dir, name)) }},
	{name: "DeepSpeed ZeRO-1 (torchrun, 2 ranks, CPU)", pkgs: []string{"deepspeed", "torch"}, script: "deepspeed_train.py", ranks: 2,
		layout: "deepspeed", env: []string{"WIDTH=512", "SAVE_EVERY=40"},
		rounds: []fwRound{{"save_checkpoint", nil}, {"resumed by load_checkpoint", nil}},
		incomplete: func(dir, name string) bool {
			b, _ := os.ReadFile(filepath.Join(dir, "latest"))
			return strings.TrimSpace(string(b)) != name
		}},
}

// fwResult is what one framework's trial showed, for the README's table.
type fwResult struct {
	Framework string
	Versions  string
	Rounds    []fwRoundResult
	Failed    bool
}

type fwRoundResult struct {
	Label    string
	Periodic []string // periodic checkpoints committed while it trained
	MidSave  string   // the save in progress when the notice was sent
	// MidSaveLoaded: that save was committed too, and the framework loaded it.
	MidSaveLoaded bool
	Rotated       []string // checkpoints the framework removed while preemptd synced
	Final         string
	Restored      bool // the final checkpoint, restored, loaded by the framework to the same weights
	NoticeToS     float64
}

var (
	fwMu      sync.Mutex
	fwResults []fwResult
)

// TestFrameworks: each framework of the table above, installed from PyPI
// (scripts/tools.sh), trains for real on the CPU beside a real preemptd
// whose store is MinIO behind a link capped at 2 MB/s per connection (so
// that uploads are in flight). Twice on the same daemon — two trainer lives,
// the second resumed from what the first restored: while it trains, its
// periodic checkpoints are synced (at least two committed); once the
// framework has begun removing old ones (rotation), a notice is sent while
// a save is in progress; the trainer saves its final checkpoint and exits;
// that checkpoint is committed and latest, and restored into a fresh
// folder it is loaded by the framework itself to the same weights.
// PREEMPTD_FRAMEWORK_TABLE=FILE writes the table of what was shown into
// FILE between its frameworks-table markers (make frameworks-table).
func TestFrameworks(t *testing.T) {
	python := peers.Frameworks(t)
	versions := fwVersions(t, python)
	for _, fw := range frameworks {
		t.Run(strings.Fields(fw.script)[0], func(t *testing.T) {
			res := fwResult{Framework: fw.name}
			for _, p := range fw.pkgs {
				res.Versions += fmt.Sprintf("%s %s, ", p, versions[p])
			}
			res.Versions = strings.TrimSuffix(res.Versions, ", ")
			defer func() {
				res.Failed = t.Failed()
				fwMu.Lock()
				fwResults = append(fwResults, res)
				fwMu.Unlock()
			}()
			runFramework(t, python, fw, &res)
		})
	}
	t.Logf("what was shown:\n%s", fwTable())
}

// fwVersions asks the venv for the installed versions of the table's packages.
func fwVersions(t *testing.T, python string) map[string]string {
	t.Helper()
	var names []string
	for _, fw := range frameworks {
		names = append(names, fw.pkgs...)
	}
	b, _ := json.Marshal(names)
	out, err := exec.Command(python, "-c", "import json, sys, importlib.metadata as m; "+
		"print(json.dumps({p: m.version(p) for p in json.loads(sys.argv[1])}))", string(b)).Output()
	if err != nil {
		t.Fatalf("versions: %v", err)
	}
	v := map[string]string{}
	if err := json.Unmarshal(out, &v); err != nil {
		t.Fatal(err)
	}
	return v
}

var (
	fwSaving   = regexp.MustCompile(`(?m)^saving (\S+)$`)
	fwSaved    = regexp.MustCompile(`(?m)^saved (\S+)$`)
	fwFinal    = regexp.MustCompile(`(?m)^final (\S+) checksum (-?[0-9.]+)$`)
	fwChecksum = regexp.MustCompile(`(?m)^checksum (-?[0-9.]+)$`)
)

// fwRun runs the framework's script (under torchrun when it has ranks),
// in its own process group, its output in a buffer.
func fwRun(t *testing.T, python string, fw framework, label string, env []string) (*syncBuffer, chan struct{}) {
	t.Helper()
	script, _ := filepath.Abs(filepath.Join("..", "frameworks", fw.script))
	args := []string{"-u", script}
	if fw.ranks > 0 {
		args = []string{"-m", "torch.distributed.run", "--nproc_per_node", fmt.Sprint(fw.ranks),
			"--master_port", fmt.Sprint(peers.FreePort(t)), "--redirects", "2", "--tee", "2", script}
	}
	out := &syncBuffer{}
	_, done := startGroup(t, label, out, out.String, python, args, append([]string{"PYTHONDONTWRITEBYTECODE=1", "OMP_NUM_THREADS=1",
		"TOKENIZERS_PARALLELISM=false", "HF_HUB_OFFLINE=1", "JAX_PLATFORMS=cpu", "DS_ACCELERATOR=cpu"}, append(fw.env, env...)...))
	return out, done
}

// syncBuffer is a bytes.Buffer written by a process and read by the test.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// lines are the names in every match of re's first group.
func lines(re *regexp.Regexp, s string) []string {
	var out []string
	for _, m := range re.FindAllStringSubmatch(s, -1) {
		out = append(out, m[1])
	}
	return out
}

func runFramework(t *testing.T, python string, fw framework, res *fwResult) {
	s3 := peers.StartMinIO(t)
	x := peers.StartToxiproxy(t)
	ep := x.Front(t, "store", s3, 2048) // KB/s per connection
	dir := shortDir(t)
	ckptRoot := filepath.Join(dir, "ckpt")
	ckpt := filepath.Join(ckptRoot, fw.sub)
	if err := os.MkdirAll(ckpt, 0o755); err != nil {
		t.Fatal(err)
	}
	cfg := fmt.Sprintf("provider: local\ntrainer: {match: %q, kill_after: 60s}\nmetrics: {listen: \"\"}\n"+
		"checkpoint: {dir: %q, layout: auto, quiet_period: 1s, keep: 0}\n"+
		"run_id: %s\nstorage: {url: \"s3://%s/runs\", endpoint: %q, region: us-east-1, threads: 8}\n",
		trainerpkg.WorkersPattern(fw.script), ckpt, strings.TrimSuffix(fw.script, ".py"), s3.Bucket, "http://"+ep)
	d := startDaemonIn(t, dir, cfg, s3.Env()...)
	resume := ""
	for round, r := range fw.rounds {
		rr := fwRoundResult{Label: r.label}
		env := append([]string{"CKPT_DIR=" + ckptRoot, "PREEMPTD_RUN_DIR=" + d.runDir}, r.env...)
		if resume != "" {
			env = append(env, "RESUME="+resume)
		}
		out, done := fwRun(t, python, fw, fmt.Sprintf("%s round %d", fw.script, round), env)
		exited := func() bool {
			select {
			case <-done:
				return true
			default:
				return false
			}
		}
		// Periodic checkpoints synced while it trains.
		waitFor(t, 240*time.Second, "two periodic checkpoints of this life committed", func() bool {
			if exited() {
				t.Fatalf("round %d: the trainer exited early", round)
			}
			_, names := lsJSON(t, d.config, s3.Env())
			rr.Periodic = nil
			for _, n := range lines(fwSaved, out.String()) {
				if slices.Contains(names, n) && !slices.Contains(rr.Periodic, n) {
					rr.Periodic = append(rr.Periodic, n)
				}
			}
			return len(rr.Periodic) >= 2
		})
		// A notice while a save is in progress, once the framework has
		// begun removing older checkpoints.
		var saving string
		waitFor(t, 240*time.Second, "a save in progress (after a rotation, where the framework rotates)", func() bool {
			if exited() {
				t.Fatalf("round %d: the trainer exited early", round)
			}
			s := out.String()
			all := lines(fwSaving, s)
			if len(all) == 0 {
				return false
			}
			saving = all[len(all)-1]
			if slices.Contains(lines(fwSaved, s), saving) || (fw.incomplete != nil && !fw.incomplete(ckpt, saving)) {
				return false
			}
			return !fw.rotates || len(fwRotated(ckpt, lines(fwSaved, s))) > 0
		})
		st, noticed := d.drill(agent.SimulateRequest{Kind: "terminate", In: "20s"})
		rr.MidSave = saving
		select {
		case <-done:
		case <-time.After(90 * time.Second):
			t.Fatalf("round %d: the trainer did not exit after preemptd's signal", round)
		}
		m := fwFinal.FindStringSubmatch(out.String())
		if m == nil {
			t.Fatalf("round %d: no final checkpoint line", round)
		}
		rr.Final = m[1]
		sum := m[2]
		rr.Rotated = fwRotated(ckpt, lines(fwSaved, out.String()))
		if fw.rotates && len(rr.Rotated) == 0 {
			t.Fatalf("round %d: the framework removed no checkpoint while it trained", round)
		}
		e := st.Emergency
		rr.NoticeToS = e.FinishedAt.Sub(noticed).Seconds()
		t.Logf("round %d (%s): periodic %v committed; notice during the save of %s; the framework removed %v; final %s; path done in %.1fs: %s %+v",
			round, r.label, rr.Periodic, saving, rr.Rotated, rr.Final, rr.NoticeToS, e.Outcome, e.Checkpoint)
		if e.Outcome != "completed" || e.Checkpoint == nil || e.Checkpoint.Name != rr.Final {
			t.Fatalf("round %d: outcome %s, committed %+v; want the final %s", round, e.Outcome, e.Checkpoint, rr.Final)
		}
		latest, ms := manifests(t, d.config, s3.Env())
		if latest != rr.Final {
			t.Fatalf("round %d: latest %s, want %s", round, latest, rr.Final)
		}
		for _, m := range ms {
			if m.Layout != fw.layout {
				t.Fatalf("round %d: %s was committed as layout %s, want %s (detected from the folder)", round, m.Name, m.Layout, fw.layout)
			}
		}
		// A new machine: restore into a fresh folder; the framework loads it.
		restored := filepath.Join(dir, fmt.Sprintf("restored-%d", round))
		cmd := exec.Command(bin, "restore", "--config", d.config, "--to", restored)
		cmd.Env = append(cleanEnv(), s3.Env()...)
		if b, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("restore: %v\n%s", err, b)
		}
		path := filepath.Join(restored, rr.Final)
		check, checked := fwRun(t, python, fw, fmt.Sprintf("%s check %d", fw.script, round), []string{"CHECK=" + path})
		select {
		case <-checked:
		case <-time.After(120 * time.Second):
			t.Fatal("the framework's load did not finish")
		}
		got := fwChecksum.FindStringSubmatch(check.String())
		if got == nil || got[1] != sum {
			t.Fatalf("round %d: the framework loaded other weights from the restored %s: want checksum %s\n%s", round, rr.Final, sum, check.String())
		}
		rr.Restored = true
		// The save the notice interrupted finished after it: committed whole
		// (the framework loads it) or not at all.
		if _, names := lsJSON(t, d.config, s3.Env()); slices.Contains(names, saving) {
			mid := filepath.Join(dir, fmt.Sprintf("restored-mid-%d", round))
			cmd := exec.Command(bin, "restore", "--config", d.config, "--to", mid, "--name", saving)
			cmd.Env = append(cleanEnv(), s3.Env()...)
			if b, err := cmd.CombinedOutput(); err != nil {
				t.Fatalf("restore --name %s: %v\n%s", saving, err, b)
			}
			check, checked := fwRun(t, python, fw, fmt.Sprintf("%s check mid-save %d", fw.script, round), []string{"CHECK=" + filepath.Join(mid, saving)})
			select {
			case <-checked:
			case <-time.After(120 * time.Second):
				t.Fatal("the framework's load did not finish")
			}
			if fwChecksum.FindStringSubmatch(check.String()) == nil {
				t.Fatalf("round %d: the framework could not load %s, the save the notice interrupted, as committed:\n%s", round, saving, check.String())
			}
			rr.MidSaveLoaded = true
		}
		res.Rounds = append(res.Rounds, rr)
		resume = path
		// The drill's machine "goes" at its deadline: until then notice.json
		// holds the fatal notice, and a trainer started again would stop at
		// once (as it should on a machine that is going away).
		waitFor(t, 60*time.Second, "the drill's notice to expire", func() bool { _, ok := d.noticeFile(); return !ok })
	}
}

// fwRotated are the saved checkpoints the framework has removed since.
func fwRotated(dir string, saved []string) []string {
	var gone []string
	for _, n := range saved {
		if missing(filepath.Join(dir, n)) {
			gone = append(gone, n)
		}
	}
	return gone
}

// fwTable is the README's table of what TestFrameworks showed.
func fwTable() string {
	var b strings.Builder
	b.WriteString("| Framework | Versions | Periodic checkpoints synced | Notice mid-save | Rotation while syncing | Second notice, same daemon | Restored, loaded by the framework |\n")
	b.WriteString("|---|---|---|---|---|---|---|\n")
	order := map[string]int{}
	for i, fw := range frameworks {
		order[fw.name] = i
	}
	slices.SortFunc(fwResults, func(a, b fwResult) int { return order[a.Framework] - order[b.Framework] })
	for _, r := range fwResults {
		if r.Failed || len(r.Rounds) == 0 {
			fmt.Fprintf(&b, "| %s | %s | failed | | | | |\n", r.Framework, r.Versions)
			continue
		}
		var periodic, mid, rot, restored []string
		for _, rr := range r.Rounds {
			periodic = append(periodic, fmt.Sprint(len(rr.Periodic)))
			how := "not committed"
			if rr.MidSaveLoaded {
				how = "committed, loaded"
			}
			mid = append(mid, fmt.Sprintf("%s (%s; %s)", rr.MidSave, rr.Label, how))
			if len(rr.Rotated) > 0 {
				rot = append(rot, fmt.Sprint(len(rr.Rotated)))
			}
			if rr.Restored {
				restored = append(restored, rr.Final)
			}
		}
		rotation := "n/a (keeps all)"
		if len(rot) > 0 {
			rotation = "yes: " + strings.Join(rot, ", ") + " removed"
		}
		second := "no"
		if len(r.Rounds) > 1 {
			second = fmt.Sprintf("yes: %s committed as latest", r.Rounds[1].Final)
		}
		fmt.Fprintf(&b, "| %s | %s | yes: %s per life | yes: %s | %s | %s | yes: %s |\n", r.Framework, r.Versions,
			strings.Join(periodic, ", "), strings.Join(mid, "; "), rotation, second, strings.Join(restored, ", "))
	}
	return b.String()
}

// writeFrameworkTable puts the table between the markers of file.
func writeFrameworkTable(file string) error {
	const begin, end = "<!-- frameworks-table:begin -->\n", "<!-- frameworks-table:end -->"
	b, err := os.ReadFile(file)
	if err != nil {
		return err
	}
	s := string(b)
	i, j := strings.Index(s, begin), strings.Index(s, end)
	if i < 0 || j < i {
		return fmt.Errorf("%s has no %q … %q markers", file, strings.TrimSpace(begin), end)
	}
	stamp := fmt.Sprintf("Written by `make frameworks-table` from the run of TestFrameworks on %s.\n\n", time.Now().UTC().Format("2006-01-02"))
	s = s[:i+len(begin)] + stamp + fwTable() + s[j:]
	return os.WriteFile(file, []byte(s), 0o644)
}

// example is one of examples/ run as its docstring says, with the
// frameworks' venv and the preemptd package from clients/python.
type example struct {
	dir    string // under examples/
	ranks  int    // > 0: under torchrun
	layout string
	// every: SAVE_EVERY, steps between saves: a few seconds of training
	// (the small models take 100–400 steps a second here), so that the
	// quiet-period layouts see a checkpoint stay unwritten for
	// quiet_period before the next save rotates it away.
	every int
}

var examples = []example{
	{dir: "lightning", layout: "lightning", every: 2000},
	{dir: "hf-trainer", layout: "hf", every: 600},
	{dir: "pytorch-dcp", ranks: 2, layout: "dcp", every: 50},
}

var (
	exResuming = regexp.MustCompile(`(?m)^resuming from (\S+)$`)
	exStopped  = regexp.MustCompile(`(?m)^stopped at step ([0-9]+)$`)
)

// TestExamples: the Lightning, Hugging Face and torchrun examples, as
// written, beside a real preemptd (its own folder store): the first life
// starts fresh (restore() says None), its periodic checkpoints are
// committed, and a notice makes it save and stop, that save committed as
// latest; the second life's preemptd.restore() gives that checkpoint, the
// framework resumes from it and trains on to STEPS.
func TestExamples(t *testing.T) {
	python := peers.Frameworks(t)
	pkg, _ := filepath.Abs("../../clients/python")
	for _, ex := range examples {
		t.Run(ex.dir, func(t *testing.T) {
			dir := shortDir(t)
			ckpt := filepath.Join(dir, "ckpt")
			cfg := fmt.Sprintf("provider: local\nrun_id: %s\ntrainer: {match: %q, kill_after: 60s}\nmetrics: {listen: \"\"}\n"+
				"checkpoint: {dir: %q, layout: %s, quiet_period: 1s, keep: 0}\n",
				ex.dir, trainerpkg.WorkersPattern(ex.dir+"/train.py"), ckpt, ex.layout)
			d := startDaemonIn(t, dir, cfg)
			fw := framework{script: filepath.Join("..", "..", "examples", ex.dir, "train.py"), ranks: ex.ranks,
				env: []string{"CKPT_DIR=" + ckpt, "PREEMPTD_RUN_DIR=" + d.runDir, "PREEMPTD_CONFIG=" + d.config,
					"PREEMPTD_BIN=" + bin, "PYTHONPATH=" + pkg, fmt.Sprintf("SAVE_EVERY=%d", ex.every)}}
			out, done := fwRun(t, python, fw, ex.dir+" first life", nil)
			waitFor(t, 180*time.Second, "a periodic checkpoint committed", func() bool {
				select {
				case <-done:
					t.Fatal("the example exited early")
				default:
				}
				_, names := lsJSON(t, d.config, nil)
				return len(names) > 0
			})
			if m := exResuming.FindStringSubmatch(out.String()); m == nil || m[1] != "None" {
				t.Fatalf("first life: want a fresh start (resuming from None), got %q", m)
			}
			st, _ := d.drill(agent.SimulateRequest{Kind: "terminate", In: "30s"})
			select {
			case <-done:
			case <-time.After(90 * time.Second):
				t.Fatal("the example did not stop on preemptd's signal")
			}
			e := st.Emergency
			if e.Outcome != "completed" || e.Checkpoint == nil {
				t.Fatalf("first life: outcome %s, committed %+v", e.Outcome, e.Checkpoint)
			}
			latest, _ := lsJSON(t, d.config, nil)
			if latest != e.Checkpoint.Name {
				t.Fatalf("latest %s, want the final %s", latest, e.Checkpoint.Name)
			}
			m := exStopped.FindStringSubmatch(out.String())
			if m == nil {
				t.Fatalf("first life: no stopped line")
			}
			var stopped int
			fmt.Sscan(m[1], &stopped)
			waitFor(t, 60*time.Second, "the drill's notice to expire", func() bool { _, ok := d.noticeFile(); return !ok })
			out2, done2 := fwRun(t, python, fw, ex.dir+" second life", []string{fmt.Sprintf("STEPS=%d", stopped+5)})
			select {
			case <-done2:
			case <-time.After(180 * time.Second):
				t.Fatal("the second life did not reach STEPS")
			}
			if m := exResuming.FindStringSubmatch(out2.String()); m == nil || m[1] != filepath.Join(ckpt, latest) {
				t.Fatalf("second life: want it to resume from %s, got %q", filepath.Join(ckpt, latest), m)
			}
			if m := exStopped.FindStringSubmatch(out2.String()); m == nil || m[1] != fmt.Sprint(stopped+5) {
				t.Fatalf("second life: want it to train on from step %d to %d, got %q", stopped, stopped+5, m)
			}
			t.Logf("%s: stopped and committed %s at step %d; the next life resumed from it and reached step %d",
				ex.dir, latest, stopped, stopped+5)
		})
	}
}
