package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"runtime/debug"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/preemptd/preemptd/agent"
	"github.com/preemptd/preemptd/agent/config"
	"github.com/preemptd/preemptd/checkpoint"
	"github.com/preemptd/preemptd/internal/redact"
	"github.com/preemptd/preemptd/internal/runlock"
	"github.com/preemptd/preemptd/providers"
)

// Exit codes.
const (
	exitOK         = 0
	exitFailure    = 1 // the command failed at run time
	exitUsage      = 2 // bad flags, arguments or configuration
	exitNotRunning = 3 // status/simulate found no daemon on the socket
	exitNothing    = 4 // restore: the run has no committed checkpoint yet (a fresh start)
)

// version is set at build time with -ldflags "-X main.version=…".
var version = "dev"

func buildVersion() string {
	if version != "dev" {
		return version
	}
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
		return bi.Main.Version
	}
	return version
}

type usageError struct{ err error }

func (e usageError) Error() string { return e.err.Error() }
func (e usageError) Unwrap() error { return e.err }

func usagef(format string, args ...any) error { return usageError{fmt.Errorf(format, args...)} }

func exitCode(err error, stderr io.Writer) int {
	if err == nil || errors.Is(err, flag.ErrHelp) {
		return exitOK
	}
	fmt.Fprintln(stderr, "preemptd:", redact.String(err.Error()))
	var ue usageError
	switch {
	case errors.As(err, &ue):
		return exitUsage
	case errors.Is(err, agent.ErrNotRunning):
		return exitNotRunning
	case errors.Is(err, checkpoint.ErrNothingCommitted):
		return exitNothing
	}
	return exitFailure
}

const topUsage = `preemptd keeps GPU work alive on spot and preemptible machines.

Usage:
  preemptd <command> [flags]

Commands:
  run        run the daemon (watch notices, signal the trainer, emergency path)
  status     show the running daemon's state
  simulate   make the running daemon act on a simulated notice
  detect     say which cloud this machine is on, and why
  gpu        show the GPUs, their health and the processes on them (NVML)
  ls         list the run's committed checkpoints in the store
  restore    download the latest (or a named) committed checkpoint, verified
  upload     commit one checkpoint folder to the store now
  report     the fleet report: interruptions, lifetimes, time to durable, cost and savings
  advise     when the trainer should checkpoint, and the inputs of that advice
  doctor     check metadata reach, the store (write/read/delete), NVML and the trainer target
  keygen     make an ed25519 key pair for signed checkpoints (storage.sign_key, storage.verify_key)
  version    print the version

Every command takes --config FILE (default $PREEMPTD_CONFIG, then
/etc/preemptd/preemptd.yaml if it exists) and --help.

Exit codes: 0 ok; 1 failure; 2 bad usage or configuration;
3 no daemon answering on the socket (status, simulate);
4 nothing committed yet (restore; ls when the store does not exist).
`

var bracketed = regexp.MustCompile(`\[[^\]]*\]`)

// placeholders name what a flag takes in usage lines.
var placeholders = map[string]string{"config": "FILE", "prices": "FILE", "run-dir": "DIR", "state-dir": "DIR", "to": "DIR",
	"out": "DIR", "run": "RUN", "name": "CKPT", "in": "DUR", "since": "DUR", "poll-interval": "DUR",
	"trainer-kill-after": "DUR", "kind": "KIND", "provider": "NAME", "log-level": "LEVEL", "trainer-pid-file": "FILE",
	"trainer-match": "REGEXP", "trainer-unit": "UNIT", "trainer-signal": "SIGNAL"}

// usageLine is a command's synopsis with every flag it takes, made from
// its flag set so that it never falls behind.
func usageLine(fs *flag.FlagSet, args string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "Usage: preemptd %s", fs.Name())
	fs.VisitAll(func(f *flag.Flag) {
		if _, isBool := f.Value.(interface{ IsBoolFlag() bool }); isBool {
			fmt.Fprintf(&b, " [--%s]", f.Name)
			return
		}
		ph := placeholders[f.Name]
		if ph == "" {
			ph = "VALUE"
		}
		fmt.Fprintf(&b, " [--%s %s]", f.Name, ph)
	})
	return b.String() + args
}

// run is the whole program; main maps its error to an exit code.
func run(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, topUsage)
		return usagef("no command given")
	}
	cmd, rest := args[0], args[1:]
	switch cmd {
	case "run":
		return cmdRun(ctx, rest, getenv, stdout, stderr)
	case "status":
		return cmdStatus(ctx, rest, getenv, stdout, stderr)
	case "simulate":
		return cmdSimulate(ctx, rest, getenv, stdout, stderr)
	case "detect":
		return cmdDetect(ctx, rest, getenv, stdout, stderr)
	case "gpu":
		return cmdGPU(ctx, rest, stdout, stderr)
	case "ls":
		return cmdLs(ctx, rest, getenv, stdout, stderr)
	case "restore":
		return cmdRestore(ctx, rest, getenv, stdout, stderr)
	case "upload":
		return cmdUpload(ctx, rest, getenv, stdout, stderr)
	case "report":
		return cmdReport(ctx, rest, getenv, stdout, stderr)
	case "advise":
		return cmdAdvise(ctx, rest, getenv, stdout, stderr)
	case "doctor":
		return cmdDoctor(ctx, rest, getenv, stdout, stderr)
	case "keygen":
		return cmdKeygen(rest, stdout, stderr)
	case "version", "--version", "-v":
		if len(rest) > 0 {
			fs := flag.NewFlagSet("version", flag.ContinueOnError)
			fs.SetOutput(stderr)
			fs.Usage = func() { fmt.Fprintf(stderr, "%s\n\nPrints preemptd's version.\n", usageLine(fs, "")) }
			if err := fs.Parse(rest); err != nil {
				if errors.Is(err, flag.ErrHelp) {
					return err
				}
				return usageError{err}
			}
			if fs.NArg() > 0 {
				return usagef("version takes no arguments")
			}
		}
		fmt.Fprintln(stdout, "preemptd", buildVersion())
		return nil
	case "help", "-h", "--help":
		fmt.Fprint(stdout, topUsage)
		return nil
	}
	fmt.Fprint(stderr, topUsage)
	return usagef("unknown command %q", cmd)
}

// common are the flags every command takes; the daemon ones override the
// configuration's keys.
type common struct {
	fs           *flag.FlagSet
	configPath   string
	provider     string
	pollInterval string
	runDir       string
	stateDir     string
	logLevel     string
	pidFile      string
	match        string
	unit         string
	signal       string
	killAfter    string
}

func newFlags(name, synopsis string, stderr io.Writer, daemon bool) *common {
	c := &common{fs: flag.NewFlagSet(name, flag.ContinueOnError)}
	c.fs.SetOutput(stderr)
	// The synopsis's positional arguments (e.g. upload's DIR); the flags
	// come from the flag set itself.
	_, rest, _ := strings.Cut(synopsis, " ")
	args := strings.Join(strings.Fields(bracketed.ReplaceAllString(rest, "")), " ")
	if args != "" {
		args = " " + args
	}
	c.fs.Usage = func() { fmt.Fprintf(stderr, "%s\n\nFlags:\n", usageLine(c.fs, args)); c.fs.PrintDefaults() }
	c.fs.StringVar(&c.configPath, "config", "", "configuration file (default $PREEMPTD_CONFIG, then "+config.DefaultPath+")")
	runDir, stateDir := "run_dir: where the daemon keeps its socket, notice.json and trigger file",
		"state_dir: the daemon's state, and the default store (file://<state_dir>/store)"
	switch name {
	case "status", "simulate":
		runDir = "run_dir of the daemon to ask: its socket is <run-dir>/preemptd.sock"
		stateDir = "state_dir (not used by " + name + "; accepted like every command's)"
	case "advise":
		runDir = "run_dir of the daemon to ask: its socket is <run-dir>/preemptd.sock"
		stateDir = "state_dir whose default store to read records from when no daemon answers"
	case "ls", "restore", "upload", "report":
		runDir = "run_dir (not used by " + name + "; accepted like every command's)"
		stateDir = "state_dir whose default store to use (file://<state_dir>/store, when storage.url is not set)"
	case "gpu", "detect":
		runDir = "run_dir (not used by " + name + "; accepted like every command's)"
		stateDir = "state_dir (not used by " + name + "; accepted like every command's)"
	}
	c.fs.StringVar(&c.runDir, "run-dir", "", runDir)
	c.fs.StringVar(&c.stateDir, "state-dir", "", stateDir)
	if daemon {
		c.fs.StringVar(&c.provider, "provider", "", "provider: auto, aws, gcp, azure, alibaba, tencent or local")
		c.fs.StringVar(&c.pollInterval, "poll-interval", "", "poll_interval, e.g. 1s")
		c.fs.StringVar(&c.logLevel, "log-level", "", "log_level: debug, info, warn, error")
		c.fs.StringVar(&c.pidFile, "trainer-pid-file", "", "trainer.pid_file")
		c.fs.StringVar(&c.match, "trainer-match", "", "trainer.match: regexp on the command line")
		c.fs.StringVar(&c.unit, "trainer-unit", "", "trainer.unit: systemd unit of the trainer")
		c.fs.StringVar(&c.signal, "trainer-signal", "", "trainer.signal, e.g. SIGTERM")
		c.fs.StringVar(&c.killAfter, "trainer-kill-after", "", "trainer.kill_after, e.g. 90s (0: never)")
	}
	return c
}

func (c *common) parse(args []string) error {
	if err := c.fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return usageError{err}
	}
	return nil
}

// load reads the configuration: file, environment, then the flags set.
func (c *common) load(getenv func(string) string) (config.Config, error) {
	path := c.configPath
	if path == "" {
		path = getenv("PREEMPTD_CONFIG")
	}
	cfg, err := config.Load(path, getenv)
	if err != nil {
		return cfg, usageError{err}
	}
	var errs []error
	c.fs.Visit(func(f *flag.Flag) {
		v := f.Value.String()
		switch f.Name {
		case "provider":
			cfg.Provider = v
		case "poll-interval":
			d, err := config.ParseDuration(v)
			if err != nil {
				errs = append(errs, fmt.Errorf("--poll-interval (poll_interval): %w", err))
			}
			cfg.PollInterval = config.Duration(d)
		case "run-dir":
			cfg.RunDir = v
		case "state-dir":
			cfg.StateDir = v
		case "log-level":
			cfg.LogLevel = v
		case "trainer-pid-file":
			cfg.Trainer.PIDFile = v
		case "trainer-match":
			cfg.Trainer.Match = v
		case "trainer-unit":
			cfg.Trainer.Unit = v
		case "trainer-signal":
			cfg.Trainer.Signal = v
		case "trainer-kill-after":
			d, err := config.ParseDuration(v)
			if err != nil {
				errs = append(errs, fmt.Errorf("--trainer-kill-after (trainer.kill_after): %w", err))
			}
			cfg.Trainer.KillAfter = config.Duration(d)
		}
	})
	if err := errors.Join(errs...); err != nil {
		return cfg, usageError{err}
	}
	if err := cfg.Validate(); err != nil {
		return cfg, usageError{err}
	}
	return cfg, nil
}

func cmdStatus(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	c := newFlags("status", "status [--json] [--config FILE]", stderr, false)
	asJSON := c.fs.Bool("json", false, "print the status as JSON")
	if err := c.parse(args); err != nil {
		return err
	}
	cfg, err := c.load(getenv)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	st, err := agent.NewClient(cfg.Socket()).Status(ctx)
	if err != nil {
		return notRunning(&cfg, err)
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(st)
	}
	printStatus(stdout, st, time.Now())
	return nil
}

// notRunning adds to a "no daemon answers" error where this command looked
// and how to point it at the daemon that runs.
func notRunning(cfg *config.Config, err error) error {
	if !errors.Is(err, agent.ErrNotRunning) {
		return err
	}
	if pid := runlock.Holder(cfg.RunDir); pid > 0 {
		return fmt.Errorf("%w: preemptd (pid %d) holds %s but does not answer on %s; see its log (journalctl -u preemptd)",
			err, pid, filepath.Join(cfg.RunDir, runlock.Name), cfg.Socket())
	}
	return fmt.Errorf("%w: looked for its socket at %s; if the daemon runs with another configuration, pass the same --config (or --run-dir) as it",
		err, cfg.Socket())
}

func printStatus(w io.Writer, st agent.Status, now time.Time) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	state := st.State
	if st.State == "done" {
		// The path is over; the machine is not gone yet.
		state = "done: the emergency path has finished"
		for _, n := range st.Notices {
			if n.Class == agent.ClassFatal && n.Deadline.After(now) {
				state += fmt.Sprintf("; the machine goes in %s (%s notice)", n.Deadline.Sub(now).Round(time.Second), n.Kind)
				break
			}
		}
	}
	fmt.Fprintf(tw, "state:\t%s\n", state)
	fmt.Fprintf(tw, "provider:\t%s\n", st.Provider)
	fmt.Fprintf(tw, "version:\t%s\n", st.Version)
	fmt.Fprintf(tw, "up since:\t%s\n", st.StartedAt.Format(time.RFC3339))
	if j := st.Job; j != nil {
		fmt.Fprintf(tw, "job:\tnode %s of %d\n", j.Node, j.Nodes)
		for _, m := range j.Members {
			live := "live"
			if !m.Live {
				live = "not refreshed since " + m.RefreshedAt.Format(time.RFC3339)
			}
			fmt.Fprintf(tw, "  node %s:\t%s %s %s\n", m.Node, m.Instance, m.Host, live)
		}
		if j.Problem != "" {
			fmt.Fprintf(tw, "  PROBLEM:\t%s\n", j.Problem)
		}
	}
	if len(st.Notices) == 0 {
		fmt.Fprintf(tw, "notices:\tnone\n")
	}
	for _, n := range st.Notices {
		left := "no deadline"
		if !n.Deadline.IsZero() {
			left = fmt.Sprintf("%s left (deadline %s)", n.Deadline.Sub(now).Round(time.Second), n.Deadline.Format(time.RFC3339))
		}
		fmt.Fprintf(tw, "notice:\t%s %s %s [%s], %s\n", n.Provider, n.Kind, n.ID, n.Class, left)
	}
	if a := st.Advice; a != nil {
		now := ""
		if a.CheckpointNow {
			now = "; checkpoint now (" + a.Reason + ")"
		}
		fmt.Fprintf(tw, "checkpoint advice:	every %s%s (preemptd advise for the inputs)\n",
			time.Duration(a.CheckpointEvery*float64(time.Second)).Round(time.Second), now)
	}
	if s := st.LastSignal; s != nil {
		if len(s.PIDs) == 0 {
			why := "none was found"
			if len(s.Problems) > 0 {
				why = strings.Join(s.Problems, "; ")
			}
			fmt.Fprintf(tw, "last signal:\t%s reached no process: %s\n", s.Signal, why)
		} else {
			fmt.Fprintf(tw, "last signal:\t%s to %v at %s\n", s.Signal, s.PIDs, s.At.Format(time.RFC3339Nano))
		}
	}
	if g := st.GPUs; g != nil {
		if g.Available {
			fmt.Fprintf(tw, "gpus:\t%d, %d process(es) on them\n", len(g.Devices), len(g.GPUPIDs()))
		} else {
			fmt.Fprintf(tw, "gpus:\tnone (%s)\n", g.Reason)
		}
	}
	for _, x := range st.XIDs {
		fmt.Fprintf(tw, "xid:\t%d on GPU %d at %s (hardware %v)\n", x.XID, x.Device, x.At.Format(time.RFC3339), x.Hardware)
	}
	if e := st.Emergency; e != nil {
		fmt.Fprintf(tw, "emergency:\t%s (%s %s, deadline %s)\n", e.Outcome, e.Notice.Provider, e.Notice.Kind, e.Deadline.Format(time.RFC3339))
		for _, s := range e.Steps {
			res := "ok"
			if s.Error != "" {
				res = s.Error
			}
			fmt.Fprintf(tw, "  step %s:\t%s in %s\n", s.Name, res, s.Duration.Round(time.Millisecond))
		}
		if e.Trainer != nil {
			fmt.Fprintf(tw, "  trainer:\texited %v, killed %v, running %v\n", e.Trainer.Exited, e.Trainer.Killed, e.Trainer.Running)
		}
	}
	tw.Flush()
}

func cmdSimulate(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	c := newFlags("simulate", "simulate [--kind KIND] [--in DUR] [--job] [--wait] [--config FILE]", stderr, false)
	jobWide := c.fs.Bool("job", false, "a job drill: the notice stops every node of the multi-node job, as a cloud's would")
	kind := c.fs.String("kind", "terminate", "notice kind: terminate, stop, hibernate, preempt, shutdown, rebalance, maintenance, reboot, disruption, freeze, migrate")
	in := c.fs.String("in", "", "time from now to the deadline (default 2m; a rebalance has none)")
	wait := c.fs.Bool("wait", false, "wait for the emergency path to finish and print its outcome")
	if err := c.parse(args); err != nil {
		return err
	}
	if _, err := agent.ParseKind(*kind); err != nil {
		return usageError{fmt.Errorf("--kind: %w", err)}
	}
	req := agent.SimulateRequest{Kind: *kind, Job: *jobWide}
	if *in != "" {
		d, err := config.ParseDuration(*in)
		if err != nil {
			return usageError{fmt.Errorf("--in: %w", err)}
		}
		if d < 0 {
			return usagef("--in: %s is in the past; give the time from now to the deadline, like 30s", *in)
		}
		req.In = d.String()
	}
	cfg, err := c.load(getenv)
	if err != nil {
		return err
	}
	cl := agent.NewClient(cfg.Socket())
	rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	n, err := cl.Simulate(rctx, req)
	cancel()
	if re := (*agent.RequestError)(nil); errors.As(err, &re) && re.Status == http.StatusBadRequest {
		return usageError{err} // the daemon refused the request itself (--job without a job, say)
	}
	if err != nil {
		return notRunning(&cfg, err)
	}
	deadline := "none"
	if !n.Deadline.IsZero() {
		deadline = n.Deadline.Format(time.RFC3339)
	}
	fmt.Fprintf(stdout, "simulated %s notice %s, deadline %s\n", n.Kind, n.ID, deadline)
	if !*wait || agent.Classify(n, time.Now(), cfg.FatalWithin.D()) != agent.ClassFatal {
		return nil
	}
	wctx, cancel := context.WithDeadline(ctx, n.Deadline.Add(10*time.Second))
	defer cancel()
	for {
		st, err := cl.Status(wctx)
		if err != nil {
			return notRunning(&cfg, err)
		}
		// An earlier path (an earlier drill) may be in the status: wait for this one's.
		if e := st.Emergency; e != nil && e.Notice.Key() == n.Key() && !e.FinishedAt.IsZero() {
			printStatus(stdout, st, time.Now())
			return nil
		}
		select {
		case <-wctx.Done():
			return fmt.Errorf("emergency path did not finish by the deadline")
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func cmdDetect(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	c := newFlags("detect", "detect [--json] [--config FILE]", stderr, false)
	asJSON := c.fs.Bool("json", false, "print as JSON")
	if err := c.parse(args); err != nil {
		return err
	}
	cfg, err := c.load(getenv)
	if err != nil {
		return err
	}
	d := detect(ctx, &cfg, getenv)
	if *asJSON {
		return json.NewEncoder(stdout).Encode(d)
	}
	fmt.Fprintln(stdout, d.Provider)
	for _, r := range d.Reasons {
		fmt.Fprintln(stdout, "  -", r)
	}
	return nil
}

func detect(ctx context.Context, cfg *config.Config, getenv func(string) string) providers.Detection {
	if cfg.Provider != "auto" {
		return providers.Detection{Provider: cfg.Provider, Reasons: []string{"provider is set to " + cfg.Provider + " in the configuration"}}
	}
	return providers.Detect(ctx, providers.DetectConfig{
		DMIRoot:         getenv("PREEMPTD_DMI_ROOT"),
		AWSEndpoint:     cfg.AWS.Endpoint,
		GCPEndpoint:     cfg.GCP.Endpoint,
		AzureEndpoint:   cfg.Azure.Endpoint,
		AlibabaEndpoint: cfg.Alibaba.Endpoint,
		TencentEndpoint: cfg.Tencent.Endpoint,
	})
}

func cmdKeygen(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("keygen", flag.ContinueOnError)
	fs.SetOutput(stderr)
	dir := fs.String("out", ".", "folder for sign.key (0600) and verify.pub")
	fs.Usage = func() {
		fmt.Fprintf(stderr, "Usage: preemptd keygen [--out DIR]\n\nFlags:\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return usageError{err}
	}
	if fs.NArg() > 0 {
		return usagef("keygen takes no arguments (the folder is --out DIR)")
	}
	if err := os.MkdirAll(*dir, 0o700); err != nil {
		return fmt.Errorf("keygen --out: %w", err)
	}
	signPath, verifyPath, err := checkpoint.GenerateKeys(*dir)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "wrote %s (storage.sign_key, on the machines that commit; keep it secret)\n", signPath)
	fmt.Fprintf(stdout, "wrote %s (storage.verify_key, on the machines that restore)\n", verifyPath)
	return nil
}
