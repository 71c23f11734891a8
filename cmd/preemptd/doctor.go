package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/preemptd/preemptd/agent/config"
	"github.com/preemptd/preemptd/agent/gpu"
	"github.com/preemptd/preemptd/agent/trainer"
	"github.com/preemptd/preemptd/internal/runlock"
	"github.com/preemptd/preemptd/job"
	"github.com/preemptd/preemptd/providers"
	"github.com/preemptd/preemptd/slurm"
)

// errDoctor is returned when a check failed (exit code 1).
var errDoctor = errors.New("doctor: some checks failed")

// cmdDoctor checks what preemptd needs before a notice comes: the metadata
// service, the store (write, read back, delete), NVML and the trainer target.
func cmdDoctor(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	c := newFlags("doctor", "doctor [--config FILE]", stderr, true)
	if err := c.parse(args); err != nil {
		return err
	}
	cfg, err := c.load(getenv)
	if err != nil {
		return err
	}
	failed := false
	report := func(level, what, detail string) {
		if level == "FAIL" {
			failed = true
		}
		fmt.Fprintf(stdout, "%-4s  %-10s %s\n", level, what, detail)
	}
	report("OK", "config", "valid")
	for _, name := range config.UnknownEnv(os.Environ()) {
		report("WARN", "env", name+" is not a preemptd setting and is ignored (preemptd run lists none of it; the keys: README, Configuration)")
	}

	// Metadata.
	det := detect(ctx, &cfg, getenv)
	prov, err := providers.Build(det.Provider, &cfg, newLogger(io.Discard, "error"), nil)
	switch {
	case err != nil:
		report("FAIL", "metadata", err.Error())
	case prov.Identifier == nil:
		report("OK", "metadata", fmt.Sprintf("provider %s (no metadata service to reach; trigger file %s)", det.Provider, cfg.TriggerFile()))
	default:
		mctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		inst, err := prov.Identifier.Identity(mctx)
		cancel()
		if err != nil {
			report("FAIL", "metadata", fmt.Sprintf("provider %s: %v", det.Provider, err))
		} else {
			report("OK", "metadata", fmt.Sprintf("provider %s: %s %s in %s (%s)", det.Provider, inst.ID, inst.Type, inst.Zone, inst.Lifecycle))
		}
	}

	// Run dir. Doctor creates nothing: a missing folder is for `preemptd
	// run` to make.
	switch _, err := os.Stat(cfg.RunDir); {
	case errors.Is(err, fs.ErrNotExist):
		parent := nearestDir(cfg.RunDir)
		if unix.Access(parent, unix.W_OK) != nil {
			report("FAIL", "run_dir", fmt.Sprintf("%s does not exist and %s is not writable for this user: run as root, or pass --run-dir DIR (and --state-dir DIR)", cfg.RunDir, parent))
		} else {
			report("OK", "run_dir", fmt.Sprintf("%s does not exist yet; `preemptd run` creates it", cfg.RunDir))
		}
	case err != nil:
		report("FAIL", "run_dir", err.Error())
	default:
		if err := checkDir(cfg.RunDir); err != nil {
			report("FAIL", "run_dir", err.Error()+"; or pass --run-dir DIR")
		} else {
			report("OK", "run_dir", cfg.RunDir)
		}
	}

	if pid := runlock.Holder(cfg.RunDir); pid > 0 {
		report("INFO", "daemon", fmt.Sprintf("preemptd (pid %d) runs with this run_dir; a second `preemptd run` on it would be refused", pid))
	}

	// The checkpoint folder: a typo there means nothing ever uploads.
	switch st, err := os.Stat(cfg.Checkpoint.Dir); {
	case cfg.Checkpoint.Dir == "":
		report("INFO", "checkpoint", "checkpoint.dir not set: checkpoints are not watched or uploaded")
	case errors.Is(err, fs.ErrNotExist):
		report("WARN", "checkpoint", fmt.Sprintf("checkpoint.dir %s does not exist: `preemptd run` creates and watches it, "+
			"but if it is not where the trainer saves (a typo?), nothing will ever upload", cfg.Checkpoint.Dir))
	case err != nil:
		report("FAIL", "checkpoint", err.Error())
	case !st.IsDir():
		report("FAIL", "checkpoint", fmt.Sprintf("checkpoint.dir %s is not a folder", cfg.Checkpoint.Dir))
	default:
		report("OK", "checkpoint", fmt.Sprintf("watching %s (layout %s)", cfg.Checkpoint.Dir, cfg.Checkpoint.Layout))
	}

	// Store: write, read back, delete — but a local store that does not
	// exist yet is not created here.
	storeDir := strings.TrimPrefix(cfg.StorageURL(), "file://")
	_, statErr := os.Stat(storeDir)
	if strings.HasPrefix(cfg.StorageURL(), "file://") && errors.Is(statErr, fs.ErrNotExist) {
		if unix.Access(nearestDir(storeDir), unix.W_OK) != nil {
			report("FAIL", "store", fmt.Sprintf("%s does not exist and cannot be created by this user: run as root, or pass --state-dir DIR", storeDir))
		} else {
			report("OK", "store", fmt.Sprintf("%s does not exist yet; `preemptd run` creates it", storeDir))
		}
	} else if cm, err := newCommitter(&cfg, getenv, nil); err != nil {
		report("FAIL", "store", err.Error())
	} else {
		sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		// GCS and Azure: the machine's token and what it may do, said
		// before the write that would fail without them.
		if c, ok := cm.Store.(interface{ CheckAccess(context.Context) error }); ok {
			if err := c.CheckAccess(sctx); err != nil {
				report("FAIL", "store access", err.Error())
			} else {
				report("OK", "store access", "a token, and the prefix can be listed")
			}
		}
		key := fmt.Sprintf("_doctor/%s-%d", filepath.Base(cm.Instance), time.Now().UnixNano())
		probe := []byte("preemptd doctor " + time.Now().UTC().Format(time.RFC3339Nano))
		var got bytes.Buffer
		err := cm.Store.PutBytes(sctx, key, probe)
		if err == nil {
			err = cm.Store.Get(sctx, key, &got)
		}
		if err == nil && !bytes.Equal(got.Bytes(), probe) {
			err = fmt.Errorf("read back %d bytes that differ from the %d written", got.Len(), len(probe))
		}
		if err == nil {
			err = cm.Store.Delete(sctx, key)
		}
		cancel()
		if err != nil {
			report("FAIL", "store", fmt.Sprintf("%s: %v", cm.Store, err))
		} else {
			report("OK", "store", fmt.Sprintf("%s: write, read back and delete work (run %s)", cm.Store, cm.Run))
		}
	}

	// A multi-node job: every node must reach the same store.
	if cfg.Job.Nodes > 1 {
		doctorJob(ctx, &cfg, getenv, report)
	}

	// NVML.
	g := gpu.Open(nil)
	snap := g.Snapshot(ctx)
	g.Close()
	if snap.Available {
		report("OK", "gpu", fmt.Sprintf("driver %s, CUDA %s, %d GPU(s), %d process(es) on them", snap.Driver, snap.CUDA, len(snap.Devices), len(snap.GPUPIDs())))
	} else {
		report("INFO", "gpu", snap.Reason)
	}

	// Slurm: the node's jobs are the trainer.
	if cfg.Slurm.Enabled {
		sl := slurm.New(slurm.Config{Node: cfg.Slurm.Node, Target: cfg.Slurm.Target}, nil)
		sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		reason, state, err := sl.NodeState(sctx)
		jobs, jerr := sl.Jobs(sctx)
		cancel()
		switch {
		case err != nil:
			report("FAIL", "slurm", fmt.Sprintf("node %s: %v (is slurm.node this machine's NodeName, and SLURM_CONF set as for any Slurm command?)", sl.Node(), err))
		case jerr != nil:
			report("FAIL", "slurm", fmt.Sprintf("squeue: %v", jerr))
		default:
			msg := fmt.Sprintf("node %s is %s; %d job(s) running there %v would get %s (%s)", sl.Node(), state, len(jobs), jobs, cfg.Trainer.Signal, cfg.Slurm.Target)
			if reason != "" {
				msg += "; drain reason: " + reason
			}
			report("OK", "slurm", msg)
		}
		if failed {
			return errDoctor
		}
		return nil
	}

	// Trainer.
	var extra trainer.Extra
	if cfg.Trainer.GPUProcesses {
		extra = gpu.Open(nil)
	}
	tr, err := trainer.New(trainer.Config{PIDFile: cfg.Trainer.PIDFile, Match: cfg.Trainer.Match, Unit: cfg.Trainer.Unit,
		Group: cfg.Trainer.Group}, extra, nil)
	switch {
	case err != nil:
		report("FAIL", "trainer", err.Error())
	case !tr.Configured():
		report("WARN", "trainer", "no target configured: set trainer.pid_file, trainer.match, trainer.unit or trainer.gpu_processes")
	default:
		pids, sources, problems := tr.Find(ctx)
		if len(pids) == 0 {
			report("WARN", "trainer", fmt.Sprintf("no process found now %v (fine if the trainer has not started)", problems))
		} else {
			report("OK", "trainer", fmt.Sprintf("would signal %v (%v) with %s", pids, sources, cfg.Trainer.Signal))
			for _, pid := range pids {
				if cmd, err := trainer.Cmdline("/proc", pid); err == nil && trainer.IsLauncher(cmd) {
					report("WARN", "trainer", fmt.Sprintf("process %d is a launcher (%.60s): it forwards the signal and kills its workers "+
						"30 s later, so target the workers instead: trainer.gpu_processes: true, or trainer.match: '%s' "+
						"(with your script in place of train.py; torchrun starts each worker as `<python> -u <script>`); trainer.group: true on it signals it too",
						pid, cmd, trainer.WorkersPattern("train.py")))
				}
			}
		}
	}
	if failed {
		return errDoctor
	}
	return nil
}

// nearestDir is path's nearest existing ancestor.
func nearestDir(path string) string {
	for p := filepath.Dir(path); ; p = filepath.Dir(p) {
		if st, err := os.Stat(p); err == nil && st.IsDir() {
			return p
		}
		if p == filepath.Dir(p) {
			return p
		}
	}
}

// doctorJob checks what a node of a multi-node job needs: a store the other
// nodes share, and who has registered in it.
func doctorJob(ctx context.Context, cfg *config.Config, getenv func(string) string, report func(level, what, detail string)) {
	if strings.HasPrefix(cfg.StorageURL(), "file://") {
		report("WARN", "job", fmt.Sprintf("job.nodes is %d but the store is a local folder (%s): the nodes must share one store (s3://, gs://, azblob://) unless that folder is shared",
			cfg.Job.Nodes, cfg.StorageURL()))
	}
	if cfg.Job.Listen != "" && cfg.JobAdvertise() == "" {
		report("FAIL", "job", "job.listen is set but no address to advertise to the other nodes: set job.advertise")
	}
	cm, err := newCommitter(cfg, getenv, nil)
	if err != nil {
		return // the store check said why
	}
	jctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	ms, err := job.ReadMembers(jctx, cm.Store, cm.Run)
	if err != nil {
		report("FAIL", "job", fmt.Sprintf("the job's registry in %s: %v", cm.Store, err))
		return
	}
	names := []string{"none yet"}
	if len(ms) > 0 {
		names = nil
	}
	for _, m := range ms {
		names = append(names, fmt.Sprintf("%s (refreshed %s)", m.Node, m.RefreshedAt.Format(time.RFC3339)))
	}
	report("OK", "job", fmt.Sprintf("run %s: %d of %d nodes registered: %s; push: %s", cm.Run, len(ms), cfg.Job.Nodes,
		strings.Join(names, ", "), orNone(cfg.JobAdvertise())))
}

func orNone(s string) string {
	if s == "" {
		return "off (store only)"
	}
	return s
}
