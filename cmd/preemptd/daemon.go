package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/preemptd/preemptd/advice"
	"github.com/preemptd/preemptd/agent"
	"github.com/preemptd/preemptd/agent/config"
	"github.com/preemptd/preemptd/agent/gpu"
	"github.com/preemptd/preemptd/agent/metrics"
	"github.com/preemptd/preemptd/agent/notify"
	"github.com/preemptd/preemptd/agent/trainer"
	"github.com/preemptd/preemptd/checkpoint"
	"github.com/preemptd/preemptd/fleet"
	"github.com/preemptd/preemptd/internal/memory"
	"github.com/preemptd/preemptd/internal/redact"
	"github.com/preemptd/preemptd/internal/runlock"
	"github.com/preemptd/preemptd/job"
	"github.com/preemptd/preemptd/logship"
	"github.com/preemptd/preemptd/providers"
	"github.com/preemptd/preemptd/slurm"
	"github.com/preemptd/preemptd/systemd"
)

func newLogger(w io.Writer, level string) *slog.Logger {
	var l slog.Level
	_ = l.UnmarshalText([]byte(level))
	// Secrets in URLs (an Azure SAS in a request's URL) never reach the journal.
	return slog.New(redact.Handler(slog.NewJSONHandler(w, &slog.HandlerOptions{Level: l})))
}

// cmdRun is the daemon: wiring only.
func cmdRun(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	c := newFlags("run", "run [flags]", stderr, true)
	if err := c.parse(args); err != nil {
		return err
	}
	cfg, err := c.load(getenv)
	if err != nil {
		return err
	}
	log := newLogger(stderr, cfg.LogLevel)
	// run_dir is read by the trainer (notice.json, the socket): 0755;
	// state_dir holds the store by default: 0700.
	// One daemon per run_dir: the lock is taken before anything else there
	// (the socket, notice.json) or under state_dir is touched.
	if err := safeDir(cfg.RunDir, 0o755); err != nil {
		return err
	}
	lock, err := runlock.Acquire(cfg.RunDir)
	if err != nil {
		return err
	}
	defer lock.Release()
	if err := safeDir(cfg.StateDir, 0o700); err != nil {
		return err
	}

	for _, name := range config.UnknownEnv(os.Environ()) {
		log.Warn("environment variable ignored: it is not a preemptd setting", "name", name)
	}
	det := detect(ctx, &cfg, getenv)
	log.Info("provider chosen", "provider", det.Provider, "reasons", det.Reasons)
	gpus := gpu.WithTimeout(gpu.Open(log), 0) // NVML never blocks the emergency path
	defer gpus.Close()
	met := metrics.New(buildVersion(), gpus)
	met.Provider(det.Provider)
	met.WatchRestores(cfg.StateDir)
	prov, err := providers.Build(det.Provider, &cfg, log, func() { met.MetadataError(det.Provider) })
	if err != nil {
		return usageError{err}
	}
	run := cfg.Run(getenv)
	cm, err := newCommitter(&cfg, getenv, log.With("part", "checkpoint"))
	if err != nil {
		return err
	}
	cm.Journal = filepath.Join(cfg.StateDir, "uploads-in-flight.json") // this node's, for Cleanup after a crash
	var a *agent.Agent                                                 // built below; the advice feed asks it for the instance's identity
	adv, feed := newAdvice(ctx, &cfg, det.Provider, gpus, func() agent.Instance { return a.Instance() }, cm, run, log)
	cm.OnCommit = func(r checkpoint.Result) {
		met.Committed(r.Manifest.SentBytes, r.Took, r.Manifest.CommittedAt)
		if adv != nil {
			adv.Uploaded(r.Took)
		}
	}
	jb := newJob(ctx, &cfg, run, det.Provider, prov.Identifier, cm, log)

	// The emergency steps, in order, and the background services that live
	// as long as the watch.
	var steps []agent.Step
	var services []func(context.Context) error
	watchers := []agent.Watcher{prov.Watcher}
	var relays agent.Relays
	var jobStatus func() *agent.JobStatus
	if jb != nil {
		jb.OnFanOut = met.JobFanOut
		watchers = append(watchers, jb)
		relays, jobStatus = append(relays, jb), jb.Status
		services = append(services, jb.Run)
		defer jb.Wait()
	}
	if cfg.Checkpoint.Dir != "" {
		if _, err := os.Stat(cfg.Checkpoint.Dir); errors.Is(err, fs.ErrNotExist) {
			log.Warn("checkpoint.dir does not exist: creating it and watching it; if the trainer saves elsewhere (a typo?), nothing will upload",
				"dir", cfg.Checkpoint.Dir)
		}
		syncer := &checkpoint.Syncer{Dir: cfg.Checkpoint.Dir, Layout: cfg.Checkpoint.Layout, Quiet: cfg.Checkpoint.QuietPeriod.D(),
			Committer: cm, Background: cfg.Checkpoint.Sync, Margin: 3 * time.Second, Log: log.With("part", "checkpoint")}
		if adv != nil {
			syncer.OnComplete = func(ck checkpoint.Checkpoint, save time.Duration) {
				adv.Saved(ck.ModTime, save)
				if save > 0 {
					met.Saved(save)
				}
			}
		}
		steps = append(steps, syncer.Emergency())
		services = append(services, syncer.Run)
	} else {
		log.Info("checkpoint.dir not set: checkpoints are not watched or uploaded")
	}
	var sl *slurm.Slurm
	if cfg.Slurm.Enabled {
		sl = slurm.New(slurm.Config{Node: cfg.Slurm.Node, Target: cfg.Slurm.Target, Requeue: cfg.Slurm.Requeue,
			Drain: cfg.Slurm.Drain}, log)
		relays = append(relays, sl)              // drain at a fatal notice, resume when it is withdrawn
		steps = append(steps, slurm.Step{S: sl}) // requeue once the checkpoint step is over
		log.Info("slurm node: its jobs are the trainer", "node", sl.Node(), "target", cfg.Slurm.Target,
			"requeue", cfg.Slurm.Requeue, "drain", cfg.Slurm.Drain)
	}
	if feed != nil {
		services = append(services, feed.Run)
	}
	if cfg.Trainer.WaitGPURelease {
		steps = append(steps, gpu.ReleaseStep{R: gpus})
	}
	if len(cfg.Logs.Paths) > 0 {
		host, _ := os.Hostname()
		ship := &logship.Shipper{Paths: cfg.Logs.Paths, Store: cm.Store, Prefix: run + "/logs/" + host,
			Interval: cfg.Logs.Interval.D(), Log: log.With("part", "logs")}
		services = append(services, ship.Run)
		steps = append(steps, ship.Step()) // last: the trainer's final lines
	}

	reporters := []agent.Reporter{met, &fleet.Recorder{Store: cm.Store, Log: log.With("part", "events")}}
	if len(cfg.Notify.Webhooks) > 0 {
		var hooks []notify.Webhook
		for _, w := range cfg.Notify.Webhooks {
			hooks = append(hooks, notify.Webhook{URL: w.URL, Format: w.Format})
		}
		reporters = append(reporters, &notify.Sender{Hooks: hooks, Log: log.With("part", "notify")})
	}

	var extra trainer.Extra
	if cfg.Trainer.GPUProcesses {
		extra = gpus
	}
	procs, err := trainer.New(trainer.Config{
		PIDFile: cfg.Trainer.PIDFile, Match: cfg.Trainer.Match, Unit: cfg.Trainer.Unit, Group: cfg.Trainer.Group,
	}, extra, log.With("part", "trainer"))
	if err != nil {
		return usageError{err}
	}
	var tr agent.Trainer = procs
	switch {
	case sl != nil:
		tr = slurm.Trainer{S: sl}
	case !procs.Configured():
		log.Warn("no trainer target configured: notices will be published (notice.json, hooks, API) but no process signalled; set trainer.pid_file, trainer.match or trainer.unit")
	}
	var relay agent.Relay
	if len(relays) > 0 {
		relay = relays
	}

	// A logind delay lock, so that a shutdown waits for the emergency path;
	// released when a path ends while the machine is shutting down.
	inh := systemd.Inhibit(log)
	defer inh.Release()
	var shuttingDown atomic.Bool
	simulateGroups, _ := cfg.SimulateGroups() // checked by Validate
	a = agent.New(agent.Config{
		FatalWithin:     cfg.FatalWithin.D(),
		RunDir:          cfg.RunDir,
		Signal:          cfg.Trainer.Signal,
		RebalanceSignal: cfg.Trainer.RebalanceSignal,
		KillAfter:       cfg.Trainer.KillAfter.D(),
		Hooks:           cfg.Hooks.OnNotice,
		SimulateGroups:  simulateGroups,

		CheckpointSignal: cfg.Trainer.CheckpointSignal,
	}, agent.Deps{
		Watchers:   watchers,
		Relay:      relay,
		Job:        jobStatus,
		Advisor:    adv,
		OnAdvice:   met.Advice,
		Trainer:    tr,
		Acker:      prov.Acker,
		Steps:      steps,
		GPUs:       gpus,
		Reporters:  reporters,
		Identifier: prov.Identifier,
		Instance:   providers.LocalInstance(det.Provider),
		Run:        run,
		Logger:     log,
		Provider:   det.Provider,
		Version:    buildVersion(),
		OnEmergencyDone: func(agent.EmergencyReport) {
			if shuttingDown.Load() {
				inh.Release() // the machine may go now
			}
		},
	})
	if cfg.Metrics.Listen != "" {
		h := met.Handler(a.Ready)
		services = append(services, func(ctx context.Context) error { return metrics.Serve(ctx, cfg.Metrics.Listen, h) })
	}

	l, err := agent.ListenSocket(cfg.Socket())
	if err != nil {
		return err
	}
	// The API outlives the watch: it answers while the emergency path runs.
	apiCtx, apiCancel := context.WithCancel(context.WithoutCancel(ctx))
	defer apiCancel()
	apiDone := make(chan error, 1)
	go func() { apiDone <- a.Serve(apiCtx, l) }()

	watchCtx, watchCancel := context.WithCancel(ctx)
	defer watchCancel()
	agentDone := make(chan error, 1)
	go func() { agentDone <- a.Run(watchCtx) }()
	var svc sync.WaitGroup
	for _, f := range services {
		svc.Go(func() {
			if err := f(watchCtx); err != nil && watchCtx.Err() == nil {
				log.Error("background service stopped", "err", err)
			}
		})
	}

	term := make(chan os.Signal, 1)
	signal.Notify(term, syscall.SIGTERM)
	defer signal.Stop(term)

	// systemd: READY once watching, watchdog pings; logind's shutdown
	// announcement becomes a shutdown notice.
	sd := systemd.Notifier{Log: log}
	go sd.Watchdog(watchCtx)
	shutdown := func(source string) {
		shuttingDown.Store(true)
		if running, _ := a.EmergencyRunning(); running {
			return // the lock goes when that path is over
		}
		if a.FatalHandled() {
			log.Info("shutdown after a handled fatal notice; nothing more to do", "source", source)
			inh.Release()
			return
		}
		now := time.Now()
		if err := a.Inject(agent.Notice{Provider: "systemd", Kind: agent.KindShutdown, ID: source, Action: source,
			NoticedAt: now, Deadline: now.Add(cfg.ShutdownGrace.D())}); err != nil {
			log.Error("shutdown notice not taken", "err", err)
		}
	}
	if inh != nil {
		go inh.OnShutdown(watchCtx, func() { shutdown("PrepareForShutdown") })
	}
	sd.Ready("watching " + det.Provider + " notices")
	go func() {
		// Start-up code is done with: let the kernel take its pages back.
		select {
		case <-watchCtx.Done():
		case <-time.After(10 * time.Second):
			if n, err := memory.DropStartup(); err != nil {
				log.Debug("could not release start-up pages", "err", err)
			} else {
				log.Debug("released start-up pages", "bytes", n)
			}
		}
	}()
	defer sd.Stopping()
	log.Info("preemptd running", "version", buildVersion(), "run_dir", cfg.RunDir, "socket", cfg.Socket())

	var runErr error
loop:
	for {
		select {
		case <-ctx.Done():
			log.Info("interrupted; stopping")
			break loop
		case err := <-agentDone:
			runErr = err
			agentDone = nil
			break loop
		case err := <-apiDone:
			runErr = err
			apiDone = nil
			break loop
		case <-term:
			if !sigtermIsShutdown(ctx, cfg.OnSIGTERM) {
				log.Info("SIGTERM: the machine is not shutting down; stopping cleanly")
				break loop
			}
			if running, _ := a.EmergencyRunning(); running {
				log.Info("SIGTERM during the emergency path; finishing it first")
				break loop
			}
			if a.FatalHandled() {
				log.Info("SIGTERM after the emergency path of a fatal notice; stopping")
				break loop
			}
			log.Warn("SIGTERM at machine shutdown: treating it as a shutdown notice", "grace", cfg.ShutdownGrace.String())
			shutdown("SIGTERM")
			// The emergency path starts on the agent's loop; wait for it, then exit.
			for wait := time.Now().Add(2 * time.Second); time.Now().Before(wait); time.Sleep(10 * time.Millisecond) {
				if running, _ := a.EmergencyRunning(); running {
					break
				}
			}
			break loop
		}
	}
	if running, done := a.EmergencyRunning(); running {
		log.Info("waiting for the emergency path to finish before exit")
		<-done
	}
	watchCancel()
	if agentDone != nil {
		<-agentDone
	}
	svc.Wait()
	a.WaitReports()
	apiCancel()
	if apiDone != nil {
		if err := <-apiDone; err != nil && runErr == nil {
			runErr = err
		}
	}
	log.Info("preemptd stopped")
	return runErr
}

func sigtermIsShutdown(ctx context.Context, mode string) bool {
	switch mode {
	case "shutdown":
		return true
	case "exit":
		return false
	}
	return systemd.ShuttingDown(ctx)
}

// safeDir creates dir with mode (whatever the umask) if it does not exist,
// and refuses one that others could write to or that another user owns:
// whoever could would replace notice.json, the socket or the upload journal
// under preemptd's feet.
func safeDir(dir string, mode os.FileMode) error {
	if _, err := os.Stat(dir); errors.Is(err, fs.ErrNotExist) {
		if err := os.MkdirAll(dir, mode); err != nil {
			return fmt.Errorf("create %s: %w", dir, err)
		}
		if err := os.Chmod(dir, mode); err != nil {
			return fmt.Errorf("create %s: %w", dir, err)
		}
	}
	if err := checkDir(dir); err != nil {
		return usageError{err}
	}
	return nil
}

// checkDir refuses a directory that others could write to or that another
// user owns (preemptd run, and doctor, which creates nothing).
func checkDir(dir string) error {
	st, err := os.Stat(dir)
	if err != nil {
		return err
	}
	if !st.IsDir() {
		return fmt.Errorf("%s is not a directory", dir)
	}
	if st.Mode().Perm()&0o022 != 0 {
		return fmt.Errorf("%s is group- or world-writable (mode %04o): anyone could replace preemptd's files there; chmod 755 it or choose another directory", dir, st.Mode().Perm())
	}
	if uid := st.Sys().(*syscall.Stat_t).Uid; int(uid) != os.Geteuid() {
		return fmt.Errorf("%s is owned by uid %d, not this user's (%d): chown it, run as its owner, or choose another directory", dir, uid, os.Geteuid())
	}
	return nil
}

// newJob makes this daemon a node of its multi-node job when job.nodes > 1
// (nil otherwise): its name, its registration (written now, so that the
// other nodes count it from the start) and the committer's part settings.
func newJob(ctx context.Context, cfg *config.Config, run, provider string, id agent.Identifier, cm *checkpoint.Committer, log *slog.Logger) *job.Job {
	if cfg.Job.Nodes <= 1 {
		return nil
	}
	host, _ := os.Hostname()
	inst := ""
	if id != nil {
		ictx, cancel := context.WithTimeout(ctx, 3*time.Second)
		if in, err := id.Identity(ictx); err == nil {
			inst = in.ID
		}
		cancel()
	}
	node := cfg.Job.Node
	if node == "" {
		node = inst
	}
	if node == "" || checkpoint.SafeNode(node) != nil {
		node = host
	}
	jb := job.New(job.Config{Run: run, Node: node, Instance: inst, Host: host, Nodes: cfg.Job.Nodes, Poll: cfg.Job.Poll.D(),
		Listen: cfg.Job.Listen, Advertise: cfg.JobAdvertise(), Token: cfg.Job.Token, Version: buildVersion()},
		cm.Store, log.With("part", "job"))
	cm.Node, cm.Nodes, cm.Members, cm.PartPoll = node, cfg.Job.Nodes, jb.Members, cfg.Job.Poll.D()
	rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := jb.Register(rctx); err != nil {
		log.Warn("job registration not written yet; retrying in the background", "err", err)
	}
	log.Info("node of a multi-node job", "run", run, "node", node, "nodes", cfg.Job.Nodes, "provider", provider,
		"push", cfg.JobAdvertise())
	return jb
}

// newAdvice builds the checkpoint advisor, starting from the prior rate
// (advice.interruptions_per_hour, else the GPU model), and the feed that
// reads the store's event records for it; both nil when advice is off.
func newAdvice(ctx context.Context, cfg *config.Config, provider string, gpus agent.GPUs, inst func() agent.Instance, cm *checkpoint.Committer,
	run string, log *slog.Logger) (*advice.Advisor, *fleet.Feed) {
	if !cfg.Advice.Enabled {
		return nil, nil
	}
	var gpuNames []string // the model does not change: asked of NVML once
	for _, d := range gpus.Snapshot(ctx).Devices {
		gpuNames = append(gpuNames, d.Name)
	}
	names := func() []string { return gpuNames }
	prior, basis := fleet.PriorFor(cfg.Advice.InterruptionsPerHour, gpuNames, agent.Instance{})
	window := advice.NoticeWindow(provider)
	if provider == "gcp" {
		window = cfg.GCP.PreemptWindow.D()
	}
	adv := advice.New(advice.Config{Min: cfg.Advice.MinInterval.D(), Max: cfg.Advice.MaxInterval.D(), Window: window, Nodes: cfg.Job.Nodes}, time.Now(),
		advice.Estimate(prior, basis, nil))
	if cfg.Advice.FleetPoll.D() <= 0 {
		return adv, nil
	}
	return adv, &fleet.Feed{Store: cm.Store, Advisor: adv, Instance: inst, Job: run, PerHour: cfg.Advice.InterruptionsPerHour,
		GPUs: names, Poll: cfg.Advice.FleetPoll.D(), Log: log.With("part", "advice")}
}
