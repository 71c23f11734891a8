// Package config holds preemptd's one configuration struct, its embedded
// defaults, and loading in increasing precedence: YAML file, then PREEMPTD_*
// environment variables, then flags (applied by the caller); Validate checks
// it once and names the key and the fix in every error.
package config

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"net"
	"net/url"
	"os"
	"os/user"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/preemptd/preemptd/agent/trainer"
)

var nodeName = regexp.MustCompile(`^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$`)

// DefaultPath is read when no --config or PREEMPTD_CONFIG names a file and it exists.
const DefaultPath = "/etc/preemptd/preemptd.yaml"

// EnvPrefix starts every environment override.
const EnvPrefix = "PREEMPTD_"

// Config is all of preemptd's configuration.
type Config struct {
	// Provider is auto, aws, gcp, azure, alibaba, tencent or local.
	Provider     string   `yaml:"provider"`
	PollInterval Duration `yaml:"poll_interval"`
	FatalWithin  Duration `yaml:"fatal_within"`
	RunDir       string   `yaml:"run_dir"`
	StateDir     string   `yaml:"state_dir"`
	// LogLevel is debug, info, warn or error.
	LogLevel string `yaml:"log_level"`
	// OnSIGTERM says what a SIGTERM to preemptd means: auto (a shutdown
	// notice when the machine is shutting down, else a clean exit),
	// shutdown (always a notice) or exit (always a clean exit).
	OnSIGTERM string `yaml:"on_sigterm"`
	// ShutdownGrace is the deadline of the shutdown notice a SIGTERM makes.
	ShutdownGrace Duration `yaml:"shutdown_grace"`

	// RunID names the training run in the store; default from the
	// environment (SKYPILOT_TASK_ID, TORCHELASTIC_RUN_ID, SLURM_JOB_ID),
	// else the hostname.
	RunID      string     `yaml:"run_id"`
	Checkpoint Checkpoint `yaml:"checkpoint"`
	Storage    Storage    `yaml:"storage"`
	Restore    Restore    `yaml:"restore"`

	Logs    Logs    `yaml:"logs"`
	Notify  Notify  `yaml:"notify"`
	Metrics Metrics `yaml:"metrics"`
	API     API     `yaml:"api"`

	AWS     AWS     `yaml:"aws"`
	GCP     GCP     `yaml:"gcp"`
	Azure   Azure   `yaml:"azure"`
	Alibaba Alibaba `yaml:"alibaba"`
	Tencent Tencent `yaml:"tencent"`
	Local   Local   `yaml:"local"`
	Trainer Trainer `yaml:"trainer"`
	Hooks   Hooks   `yaml:"hooks"`
	Job     Job     `yaml:"job"`
	Slurm   Slurm   `yaml:"slurm"`
	Advice  Advice  `yaml:"advice"`
}

// Advice configures checkpoint advice: when the trainer should checkpoint.
type Advice struct {
	// Enabled publishes advice.json and GET /v1/advice.
	Enabled bool `yaml:"enabled"`
	// InterruptionsPerHour is the prior rate until the event records say
	// more; 0 takes it from the GPU model or instance type.
	InterruptionsPerHour float64 `yaml:"interruptions_per_hour"`
	// MinInterval and MaxInterval bound the advised interval.
	MinInterval Duration `yaml:"min_interval"`
	MaxInterval Duration `yaml:"max_interval"`
	// FleetPoll is how often the store's recent event records are read for
	// interruptions nearby (same job, or same type and zone); the rate is
	// re-estimated every tenth poll. 0 reads no records.
	FleetPoll Duration `yaml:"fleet_poll"`
}

// Job makes this daemon one node of a multi-node job: the nodes of a job
// share run_id and the store.
type Job struct {
	// Nodes is how many nodes the job has; 0 or 1 is a single node.
	Nodes int `yaml:"nodes"`
	// Node names this node in the job; default the cloud's instance id,
	// else the hostname.
	Node string `yaml:"node"`
	// Poll is how often each node reads the job notices' change stamp in
	// the store (listing the notices when it changed, and every 20 polls).
	Poll Duration `yaml:"poll"`
	// Listen (host:port, e.g. ":9478") takes notices pushed by the other
	// nodes, the fast path; empty: the store path only.
	Listen string `yaml:"listen"`
	// Advertise is the host:port the other nodes push to; default the
	// listen address's host, else this machine's hostname, and its port.
	Advertise string `yaml:"advertise"`
	// Token is the secret every node of the job shares: it signs each
	// push. Required with listen.
	Token string `yaml:"token"`
}

// AWS configures the EC2 instance metadata provider.
type AWS struct {
	// Endpoint overrides AWS_EC2_METADATA_SERVICE_ENDPOINT and the default
	// http://169.254.169.254.
	Endpoint string `yaml:"endpoint"`
	// IMDSv1Fallback allows tokenless requests when IMDSv2 fails; off by default.
	IMDSv1Fallback bool `yaml:"imdsv1_fallback"`
	// LifecycleWindow is the deadline given to an Auto Scaling "Terminated"
	// lifecycle state, which carries no time of its own.
	LifecycleWindow Duration `yaml:"lifecycle_window"`
	// SlowPollInterval is how often scheduled events and the Auto Scaling
	// lifecycle state are read (the spot notice and rebalance recommendation
	// every poll_interval).
	SlowPollInterval Duration `yaml:"slow_poll_interval"`
}

// GCP configures the Compute Engine metadata provider.
type GCP struct {
	// Endpoint (host[:port] or URL) overrides GCE_METADATA_HOST.
	Endpoint string `yaml:"endpoint"`
	// PreemptWindow is the deadline after `preempted` turns TRUE: 30s, or up
	// to 120s for a Spot VM created with a longer preemption notice.
	PreemptWindow Duration `yaml:"preempt_window"`
	// MaintenanceWindow is the deadline after TERMINATE_ON_HOST_MAINTENANCE;
	// 0 takes it from the machine: about an hour with GPUs attached, 60s
	// without.
	MaintenanceWindow Duration `yaml:"maintenance_window"`
}

// Azure configures the Scheduled Events provider.
type Azure struct {
	Endpoint string `yaml:"endpoint"`
	// Ack says which events get StartRequests once the emergency path is
	// over: mine (the default: events whose Resources name only this VM),
	// all (also events shared with other VMs, which an ack releases for
	// every one of them) or off. true and false mean mine and off.
	Ack string `yaml:"ack"`
}

// Slurm makes preemptd act on a Slurm node's jobs, whatever the cloud: at
// a fatal notice the node is drained and its jobs signalled through
// scancel; once the checkpoint is durable they are requeued; a withdrawn
// notice resumes the node.
type Slurm struct {
	Enabled bool `yaml:"enabled"`
	// Node is this machine's Slurm NodeName (default: the short hostname).
	Node string `yaml:"node"`
	// Target is which of a job's processes get trainer.signal (and
	// trainer.rebalance_signal, trainer.checkpoint_signal): full (the batch script,
	// its children and every step: scancel --full; the default), steps
	// (only what srun started, as --signal=SIG@secs does) or batch (the
	// batch script's shell alone, for a script that traps it, as
	// --signal=B:SIG@secs).
	Target string `yaml:"target"`
	// Requeue the jobs once the checkpoint is durable (default true).
	Requeue bool `yaml:"requeue"`
	// Drain the node at the notice, with a reason naming it (default
	// true); undone when the notice is withdrawn.
	Drain bool `yaml:"drain"`
}

// Alibaba configures the Alibaba Cloud ECS metadata provider (the spot
// instance's release time, about five minutes ahead).
type Alibaba struct {
	// Endpoint is the metadata service (default http://100.100.100.200).
	Endpoint string `yaml:"endpoint"`
}

// Tencent configures the Tencent Cloud CVM metadata provider (the spot
// instance's reclaim time, about two minutes ahead).
type Tencent struct {
	// Endpoint is the metadata service (default http://metadata.tencentyun.com).
	Endpoint string `yaml:"endpoint"`
}

// The azure.ack values.
const (
	AckMine = "mine"
	AckAll  = "all"
	AckOff  = "off"
)

// Local configures the file-triggered provider.
type Local struct {
	// TriggerFile is watched for notices; default <run_dir>/trigger.
	TriggerFile string `yaml:"trigger_file"`
}

// Trainer says which process(es) to signal and how.
type Trainer struct {
	PIDFile string `yaml:"pid_file"`
	Match   string `yaml:"match"`
	Unit    string `yaml:"unit"`
	// Group signals each target's whole process group.
	Group bool `yaml:"group"`
	// GPUProcesses makes the processes NVML reports on the GPUs targets
	// (torchrun's workers, directly).
	GPUProcesses bool `yaml:"gpu_processes"`
	// WaitGPURelease makes the emergency path wait until the processes that
	// held the GPUs when the trainer was signalled have let go.
	WaitGPURelease  bool     `yaml:"wait_gpu_release"`
	Signal          string   `yaml:"signal"`
	RebalanceSignal string   `yaml:"rebalance_signal"`
	KillAfter       Duration `yaml:"kill_after"`
	// CheckpointSignal, if set, is sent when a checkpoint is advised
	// ("checkpoint, keep training"), e.g. SIGUSR1.
	CheckpointSignal string `yaml:"checkpoint_signal"`
}

// Checkpoint says where the trainer writes checkpoints and how to tell
// when one is complete.
type Checkpoint struct {
	// Dir is watched for checkpoints; empty disables checkpoint handling.
	Dir string `yaml:"dir"`
	// Layout is auto, dcp, orbax, deepspeed, megatron, lightning, hf or files.
	Layout string `yaml:"layout"`
	// QuietPeriod is how long a checkpoint without a marker must go
	// unwritten to count as complete.
	QuietPeriod Duration `yaml:"quiet_period"`
	// Sync uploads every complete checkpoint in the background.
	Sync bool `yaml:"sync"`
	// Keep is how many committed checkpoints the store keeps (0: all).
	Keep int `yaml:"keep"`
}

// Storage is the object store for checkpoints.
type Storage struct {
	// URL is file:///dir, s3://bucket/prefix, gs://bucket/prefix,
	// azblob://account/container/prefix (or its https://ACCOUNT.blob.core.windows.net/container/prefix);
	// default file://<state_dir>/store.
	URL      string `yaml:"url"`
	Endpoint string `yaml:"endpoint"`
	Region   string `yaml:"region"`
	// Threads is how many parts of one file upload at once.
	Threads int `yaml:"threads"`
	// Checksum is what every part carries for the server to check: auto
	// (CRC32C where the server checks it, else Content-MD5), md5 or crc32c.
	Checksum string `yaml:"checksum"`
	// SignKey is an ed25519 private key (PEM) that signs every manifest
	// this machine commits; VerifyKey an ed25519 public key (PEM) without
	// whose signature no checkpoint is restored, listed or reused.
	SignKey   string `yaml:"sign_key"`
	VerifyKey string `yaml:"verify_key"`
}

// Restore tunes `preemptd restore`: ranges of every file fetched at once.
type Restore struct {
	// Threads is how many ranges are fetched at once (default 32).
	Threads int `yaml:"threads"`
	// PartSizeMiB is the size of one ranged GET in MiB (default 16).
	PartSizeMiB int `yaml:"part_size_mib"`
}

// Logs are the trainer's log files kept in the store.
type Logs struct {
	// Paths are files and globs.
	Paths []string `yaml:"paths"`
	// Interval is how often they are synced (the emergency path flushes too).
	Interval Duration `yaml:"interval"`
}

// Notify lists the webhooks told of every notice and outcome.
type Notify struct {
	Webhooks []Webhook `yaml:"webhooks"`
}

// Webhook is one destination: format json (the whole event) or slack.
type Webhook struct {
	URL    string `yaml:"url"`
	Format string `yaml:"format"`
}

// Metrics configures the Prometheus endpoint.
type Metrics struct {
	// Listen is host:port for /metrics, /healthz and /readyz; empty disables.
	Listen string `yaml:"listen"`
}

// API configures the local API on <run_dir>/preemptd.sock.
type API struct {
	// SimulateGroup names a group whose members may simulate notices
	// (POST /v1/simulate) beside root and preemptd's own user; reads are
	// open to every local user.
	SimulateGroup string `yaml:"simulate_group"`
}

// Hooks are commands run on every notice.
type Hooks struct {
	OnNotice []string `yaml:"on_notice"`
}

// Default returns the embedded defaults.
func Default() Config {
	return Config{
		Provider:      "auto",
		PollInterval:  Duration(time.Second),
		FatalWithin:   Duration(2 * time.Minute),
		RunDir:        "/run/preemptd",
		StateDir:      "/var/lib/preemptd",
		LogLevel:      "info",
		OnSIGTERM:     "auto",
		ShutdownGrace: Duration(25 * time.Second),
		AWS:           AWS{LifecycleWindow: Duration(2 * time.Minute), SlowPollInterval: Duration(5 * time.Second)},
		GCP:           GCP{PreemptWindow: Duration(30 * time.Second)},
		Azure:         Azure{Endpoint: "http://169.254.169.254", Ack: AckMine},
		Trainer:       Trainer{Signal: "SIGTERM"},
		Checkpoint:    Checkpoint{Layout: "auto", QuietPeriod: Duration(5 * time.Second), Sync: true, Keep: 3},
		Storage:       Storage{Threads: 8, Checksum: "auto"},
		Restore:       Restore{Threads: 32, PartSizeMiB: 16},
		Logs:          Logs{Interval: Duration(30 * time.Second)},
		Metrics:       Metrics{Listen: "127.0.0.1:9477"},
		Job:           Job{Poll: Duration(500 * time.Millisecond)},
		Slurm:         Slurm{Target: "full", Requeue: true, Drain: true},
		Advice:        Advice{Enabled: true, MaxInterval: Duration(24 * time.Hour), FleetPoll: Duration(time.Minute)},
	}
}

// Duration is a time.Duration written as "1s", "2m".
type Duration time.Duration

// D returns the time.Duration.
func (d Duration) D() time.Duration { return time.Duration(d) }

func (d Duration) String() string { return time.Duration(d).String() }

// UnmarshalYAML reads "1s"-style durations; a bare 0 is allowed.
func (d *Duration) UnmarshalYAML(n *yaml.Node) error {
	if n.Kind != yaml.ScalarNode {
		return fmt.Errorf("want a duration like 30s")
	}
	v, err := ParseDuration(n.Value)
	if err != nil {
		return err
	}
	*d = Duration(v)
	return nil
}

// MarshalYAML writes the duration as "1s".
func (d Duration) MarshalYAML() (any, error) { return d.String(), nil }

// ParseDuration accepts Go durations and a bare 0.
func ParseDuration(s string) (time.Duration, error) {
	s = strings.TrimSpace(s)
	if s == "0" {
		return 0, nil
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return 0, fmt.Errorf("%q is not a duration like 30s, 2m or 1h30m", s)
	}
	return v, nil
}

// ErrNoFile is wrapped when an explicitly named config file does not exist.
var ErrNoFile = errors.New("config file not found")

// Load reads the defaults, then path (DefaultPath when path is empty and it
// exists), then the environment through getenv.
func Load(path string, getenv func(string) string) (Config, error) {
	cfg := Default()
	explicit := path != ""
	if !explicit {
		path = DefaultPath
	}
	b, err := os.ReadFile(path)
	switch {
	case err == nil:
		if err := decodeYAML(b, &cfg); err != nil {
			return cfg, fmt.Errorf("config %s: %w", path, err)
		}
	case errors.Is(err, fs.ErrNotExist) && !explicit:
	case errors.Is(err, fs.ErrPermission) && !explicit:
		// The installed file is 0600 (it may hold secrets): a non-root
		// user's `preemptd status` runs on the defaults (and --run-dir).
	case errors.Is(err, fs.ErrNotExist):
		return cfg, fmt.Errorf("%w: %s (check --config / PREEMPTD_CONFIG)", ErrNoFile, path)
	default:
		return cfg, fmt.Errorf("config %s: %w", path, err)
	}
	if err := applyEnv(&cfg, getenv); err != nil {
		return cfg, err
	}
	return cfg, nil
}

func decodeYAML(b []byte, cfg *Config) error {
	var root yaml.Node
	if err := yaml.Unmarshal(b, &root); err != nil {
		return err
	}
	if len(root.Content) > 0 {
		if errs := checkNode(root.Content[0], reflect.TypeOf(*cfg), ""); len(errs) > 0 {
			return joinLines(errs)
		}
	}
	dec := yaml.NewDecoder(bytes.NewReader(b))
	dec.KnownFields(true)
	if err := dec.Decode(cfg); err != nil && !errors.Is(err, io.EOF) {
		return fmt.Errorf("%w (keys are listed in the README's configuration reference)", err)
	}
	return nil
}

var durationType = reflect.TypeOf(Duration(0))

// yamlKey is a field's key in the file ("" or "-" for none).
func yamlKey(f reflect.StructField) string { return strings.Split(f.Tag.Get("yaml"), ",")[0] }

// checkNode walks a YAML mapping against the struct type t before decoding,
// so that an error names the whole key and the fix: an unknown key with the
// nearest known one, a value that is not a duration, a mapping where a value
// belongs.
func checkNode(n *yaml.Node, t reflect.Type, prefix string) []error {
	if t.Kind() != reflect.Struct || n.Kind != yaml.MappingNode {
		return nil
	}
	fields := map[string]reflect.Type{}
	var names []string
	for i := range t.NumField() {
		tag := yamlKey(t.Field(i))
		if tag != "" && tag != "-" {
			fields[tag] = t.Field(i).Type
			names = append(names, tag)
		}
	}
	var errs []error
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, v := n.Content[i], n.Content[i+1]
		key := k.Value
		if prefix != "" {
			key = prefix + "." + k.Value
		}
		ft, ok := fields[k.Value]
		if !ok {
			msg := fmt.Sprintf("line %d: unknown key %s", k.Line, key)
			if near := nearest(k.Value, names); near != "" {
				msg += fmt.Sprintf(" (did you mean %s?)", near)
			} else {
				msg += " (keys are listed in the README's configuration reference)"
			}
			errs = append(errs, errors.New(msg))
			continue
		}
		switch {
		case ft == durationType:
			if v.Kind != yaml.ScalarNode {
				errs = append(errs, fmt.Errorf("line %d: %s: want a duration like 30s", v.Line, key))
			} else if _, err := ParseDuration(v.Value); err != nil {
				errs = append(errs, fmt.Errorf("line %d: %s: %w", v.Line, key, err))
			}
		case ft.Kind() == reflect.Struct:
			if v.Kind != yaml.MappingNode && !(v.Kind == yaml.ScalarNode && v.Tag == "!!null") {
				errs = append(errs, fmt.Errorf("line %d: %s holds keys (%s: {…}), not a value", v.Line, key, key))
				continue
			}
			errs = append(errs, checkNode(v, ft, key)...)
		}
	}
	return errs
}

// nearest is the known name closest to s (edit distance at most 2, or a
// prefix of it), or "".
func nearest(s string, names []string) string {
	best, bestD := "", 3
	for _, n := range names {
		d := editDistance(s, n)
		if d < bestD || (strings.HasPrefix(n, s) && len(s) >= 3 && bestD > 2) {
			best, bestD = n, min(d, bestD)
		}
	}
	return best
}

func editDistance(a, b string) int {
	prev := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur := make([]int, len(b)+1)
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev = cur
	}
	return prev[len(b)]
}

// EnvVars lists every PREEMPTD_* variable Load understands, with its key.
func EnvVars() map[string]string {
	out := map[string]string{}
	walk(reflect.ValueOf(new(Config)).Elem(), "", func(key string, _ reflect.Value) error {
		out[envName(key)] = key
		return nil
	})
	return out
}

// otherEnv are the PREEMPTD_* names that are not configuration keys but
// are still preemptd's own: read by the binary (CONFIG, DMI_ROOT), set by
// it for hooks and trainers, or read by its packaging and tooling.
var otherEnv = []string{"CONFIG", "DMI_ROOT", "KIND", "NOTICE_ID", "ACTION", "DEADLINE", "SECONDS_LEFT", "NOTICE_FILE",
	"BIN", "HELPER", "TOOLS", "VERSION", "ARCH", "REQUIRE_TORCH"}

// UnknownEnv names the PREEMPTD_* variables in environ (KEY=VALUE) that
// preemptd does not understand, each with the nearest known name when one
// is close ("PREEMPTD_TRAINER_SIGNL (did you mean PREEMPTD_TRAINER_SIGNAL?)"):
// such a typo would otherwise be silently ignored.
func UnknownEnv(environ []string) []string {
	known := slices.Collect(maps.Keys(EnvVars()))
	for _, n := range otherEnv {
		known = append(known, EnvPrefix+n)
	}
	var out []string
	for _, kv := range environ {
		name, _, _ := strings.Cut(kv, "=")
		if !strings.HasPrefix(name, EnvPrefix) || slices.Contains(known, name) {
			continue
		}
		if near := nearest(name, known); near != "" {
			name += " (did you mean " + near + "?)"
		}
		out = append(out, name)
	}
	slices.Sort(out)
	return out
}

func envName(key string) string {
	return EnvPrefix + strings.ToUpper(strings.ReplaceAll(key, ".", "_"))
}

func applyEnv(cfg *Config, getenv func(string) string) error {
	if getenv == nil {
		return nil
	}
	return walk(reflect.ValueOf(cfg).Elem(), "", func(key string, v reflect.Value) error {
		name := envName(key)
		s := getenv(name)
		if s == "" {
			return nil
		}
		if err := setFromString(v, s); err != nil {
			return fmt.Errorf("%s (key %s): %w", name, key, err)
		}
		return nil
	})
}

// walk calls f for every leaf key of the struct v, named like "trainer.signal".
func walk(v reflect.Value, prefix string, f func(key string, v reflect.Value) error) error {
	t := v.Type()
	for i := range t.NumField() {
		tag := yamlKey(t.Field(i))
		if tag == "" || tag == "-" {
			continue
		}
		key := tag
		if prefix != "" {
			key = prefix + "." + tag
		}
		fv := v.Field(i)
		if fv.Kind() == reflect.Struct {
			if err := walk(fv, key, f); err != nil {
				return err
			}
			continue
		}
		if err := f(key, fv); err != nil {
			return err
		}
	}
	return nil
}

// setFromString sets a leaf from an environment value: strings as they are,
// lists as a YAML flow list ("[a, b]") or one item, the rest as YAML.
func setFromString(v reflect.Value, s string) error {
	switch {
	case v.Kind() == reflect.String:
		v.SetString(s)
		return nil
	case v.Kind() == reflect.Slice && !strings.HasPrefix(strings.TrimSpace(s), "["):
		v.Set(reflect.Append(reflect.MakeSlice(v.Type(), 0, 1), reflect.ValueOf(s)))
		return nil
	}
	if err := yaml.Unmarshal([]byte(s), v.Addr().Interface()); err != nil {
		return fmt.Errorf("cannot use %q: %w", s, err)
	}
	return nil
}

var providers = []string{"auto", "aws", "gcp", "azure", "alibaba", "tencent", "local"}

// layouts mirrors checkpoint.Layouts (config does not import checkpoint).
var layouts = []string{"auto", "dcp", "orbax", "deepspeed", "megatron", "lightning", "hf", "files"}

// Validate checks the whole configuration, makes run_dir and state_dir
// absolute, and returns every problem at once.
func (c *Config) Validate() error {
	var errs []error
	bad := func(key, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: "+format, append([]any{key}, args...)...))
	}
	if !slices.Contains(providers, c.Provider) {
		bad("provider", "%q is not one of %s", c.Provider, strings.Join(providers, ", "))
	}
	if d := c.PollInterval.D(); d < 100*time.Millisecond || d > time.Minute {
		bad("poll_interval", "%s is out of range; use 100ms to 1m (1s is the default)", d)
	}
	if c.FatalWithin < 0 {
		bad("fatal_within", "must not be negative (default 2m)")
	}
	for key, dir := range map[string]*string{"run_dir": &c.RunDir, "state_dir": &c.StateDir} {
		if *dir == "" {
			bad(key, "must be set to a directory")
			continue
		}
		abs, err := filepath.Abs(*dir)
		if err != nil {
			bad(key, "%v", err)
			continue
		}
		*dir = abs
	}
	if len(filepath.Join(c.RunDir, "preemptd.sock")) > 100 {
		bad("run_dir", "%q is too long for a unix socket path; choose a shorter directory", c.RunDir)
	}
	if !slices.Contains([]string{"debug", "info", "warn", "error"}, c.LogLevel) {
		bad("log_level", "%q is not one of debug, info, warn, error", c.LogLevel)
	}
	if !slices.Contains([]string{"auto", "shutdown", "exit"}, c.OnSIGTERM) {
		bad("on_sigterm", "%q is not one of auto, shutdown, exit", c.OnSIGTERM)
	}
	if c.ShutdownGrace <= 0 {
		bad("shutdown_grace", "must be positive (default 25s)")
	}
	checkURL := func(key, s string, hostOnly bool) {
		if s == "" {
			return
		}
		if hostOnly && !strings.Contains(s, "://") {
			s = "http://" + s
		}
		u, err := url.Parse(s)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			bad(key, "%q is not an http(s) URL like http://169.254.169.254", s)
		}
	}
	checkURL("aws.endpoint", c.AWS.Endpoint, false)
	checkURL("gcp.endpoint", c.GCP.Endpoint, true)
	checkURL("azure.endpoint", c.Azure.Endpoint, false)
	checkURL("alibaba.endpoint", c.Alibaba.Endpoint, false)
	checkURL("tencent.endpoint", c.Tencent.Endpoint, false)
	if c.Azure.Endpoint == "" {
		bad("azure.endpoint", "must be set (default http://169.254.169.254)")
	}
	if c.AWS.LifecycleWindow <= 0 {
		bad("aws.lifecycle_window", "must be positive (default 2m)")
	}
	if d := c.AWS.SlowPollInterval.D(); d < c.PollInterval.D() || d > 10*time.Minute {
		bad("aws.slow_poll_interval", "%s is out of range; use poll_interval (%s) to 10m (default 5s)", d, c.PollInterval)
	}
	if d := c.GCP.PreemptWindow.D(); d <= 0 || d > 2*time.Minute {
		bad("gcp.preempt_window", "%s is out of range; use 30s, or up to 2m for a Spot VM created with a longer preemption notice", d)
	}
	if c.GCP.MaintenanceWindow < 0 {
		bad("gcp.maintenance_window", "must not be negative (0, the default, takes it from the machine: 1h with GPUs, 60s without)")
	}
	switch strings.ToLower(c.Azure.Ack) {
	case "true", "yes", "on", AckMine:
		c.Azure.Ack = AckMine
	case "false", "no", AckOff:
		c.Azure.Ack = AckOff
	case AckAll:
		c.Azure.Ack = AckAll
	default:
		bad("azure.ack", "%q is not one of mine, all, off", c.Azure.Ack)
	}
	if _, err := trainer.ParseSignal(c.Trainer.Signal); err != nil {
		bad("trainer.signal", "%v", err)
	}
	if !slices.Contains([]string{"full", "steps", "batch"}, c.Slurm.Target) {
		bad("slurm.target", "%q is not one of full, steps, batch", c.Slurm.Target)
	}
	if c.Slurm.Enabled && c.RunID == "" {
		bad("run_id", "slurm.enabled needs run_id set: the daemon runs outside the jobs, so it cannot name their checkpoints by SLURM_JOB_ID "+
			"as `preemptd restore` inside a job would; set the same run_id for both (e.g. the training's name)")
	}
	if c.Slurm.Enabled && (c.Trainer.PIDFile != "" || c.Trainer.Match != "" || c.Trainer.Unit != "" || c.Trainer.GPUProcesses) {
		bad("slurm.enabled", "the node's Slurm jobs are the trainer (signalled through scancel): leave trainer.pid_file, trainer.match, trainer.unit and trainer.gpu_processes unset")
	}
	if c.Trainer.RebalanceSignal != "" {
		if _, err := trainer.ParseSignal(c.Trainer.RebalanceSignal); err != nil {
			bad("trainer.rebalance_signal", "%v", err)
		}
	}
	if c.Trainer.CheckpointSignal != "" {
		if _, err := trainer.ParseSignal(c.Trainer.CheckpointSignal); err != nil {
			bad("trainer.checkpoint_signal", "%v", err)
		} else if strings.EqualFold(strings.TrimPrefix(strings.ToUpper(c.Trainer.CheckpointSignal), "SIG"), strings.TrimPrefix(strings.ToUpper(c.Trainer.Signal), "SIG")) {
			bad("trainer.checkpoint_signal", "%s is also trainer.signal (stop): use another, e.g. SIGUSR1", c.Trainer.CheckpointSignal)
		}
	}
	if r := c.Advice.InterruptionsPerHour; r < 0 || r > 60 {
		bad("advice.interruptions_per_hour", "%g is out of range; use 0 (from the GPU model) or a rate up to 60 like 0.04 (4%%/h)", r)
	}
	if lo, hi := c.Advice.MinInterval.D(), c.Advice.MaxInterval.D(); lo < 0 || hi < time.Minute || lo > hi {
		bad("advice.max_interval", "min_interval %s and max_interval %s must satisfy 0 <= min <= max, max >= 1m", lo, hi)
	}
	if d := c.Advice.FleetPoll.D(); d != 0 && d < 5*time.Second {
		bad("advice.fleet_poll", "%s is too often; use 5s or more (0: no records read)", d)
	}
	if c.Trainer.Match != "" {
		if _, err := regexp.Compile(c.Trainer.Match); err != nil {
			bad("trainer.match", "not a valid regular expression: %v", err)
		}
	}
	if c.Trainer.KillAfter < 0 {
		bad("trainer.kill_after", "must not be negative (0 never escalates)")
	}
	if !slices.Contains(layouts, c.Checkpoint.Layout) {
		bad("checkpoint.layout", "%q is not one of %s", c.Checkpoint.Layout, strings.Join(layouts, ", "))
	}
	if c.Checkpoint.QuietPeriod < 0 {
		bad("checkpoint.quiet_period", "must not be negative (default 5s)")
	}
	if c.Checkpoint.Keep < 0 {
		bad("checkpoint.keep", "must not be negative (0 keeps every checkpoint)")
	}
	if c.Checkpoint.Dir != "" {
		abs, err := filepath.Abs(c.Checkpoint.Dir)
		if err != nil {
			bad("checkpoint.dir", "%v", err)
		}
		c.Checkpoint.Dir = abs
	}
	if u := c.Storage.URL; u != "" {
		pu, err := url.Parse(u)
		switch {
		case err == nil && (pu.Scheme == "http" || pu.Scheme == "https") && !strings.Contains(pu.Host, ".blob.") && pu.Host != "":
			// An S3-compatible server's address (MinIO at http://127.0.0.1:9000/bkt): the bucket
			// goes in the URL, the server in storage.endpoint.
			bucket, prefix, _ := strings.Cut(strings.Trim(pu.Path, "/"), "/")
			if bucket == "" {
				bucket = "BUCKET"
			}
			bad("storage.url", "%q is a server's address, not a store: for an S3-compatible server write storage.url: s3://%s and storage.endpoint: %s://%s",
				u, strings.TrimSuffix(bucket+"/"+prefix, "/"), pu.Scheme, pu.Host)
		case err != nil || !slices.Contains([]string{"file", "s3", "gs", "azblob", "https"}, pu.Scheme) ||
			(pu.Scheme == "https" && !strings.Contains(pu.Host, ".blob.")):
			bad("storage.url", "%q is not a URL like file:///var/lib/preemptd/store, s3://bucket/prefix, gs://bucket/prefix or azblob://account/container/prefix", u)
		case (pu.Scheme == "azblob" || pu.Scheme == "https") && strings.Trim(pu.Path, "/") == "":
			bad("storage.url", "%q names no container; write azblob://account/container/prefix", u)
		case pu.Scheme != "file" && pu.Host == "":
			bad("storage.url", "%q names no bucket; write %s://bucket/prefix", u, pu.Scheme)
		case pu.Scheme == "file" && (pu.Path == "" || (pu.Host != "" && pu.Host != "localhost")):
			bad("storage.url", "%q names no directory; write file:///path/to/store (three slashes)", u)
		}
	}
	checkURL("storage.endpoint", c.Storage.Endpoint, false)
	if !slices.Contains([]string{"auto", "md5", "crc32c"}, c.Storage.Checksum) {
		bad("storage.checksum", "%q is not one of auto, md5, crc32c", c.Storage.Checksum)
	}
	if c.Storage.Threads < 1 || c.Storage.Threads > 64 {
		bad("storage.threads", "%d is out of range; use 1 to 64 (default 8)", c.Storage.Threads)
	}
	if c.Restore.Threads < 1 || c.Restore.Threads > 256 {
		bad("restore.threads", "%d is out of range; use 1 to 256 (default 32)", c.Restore.Threads)
	}
	if c.Restore.PartSizeMiB < 1 || c.Restore.PartSizeMiB > 1024 {
		bad("restore.part_size_mib", "%d is out of range; use 1 to 1024 (default 16)", c.Restore.PartSizeMiB)
	}
	if c.RunID != "" && (strings.ContainsAny(c.RunID, "/\\\x00") || c.RunID == "." || c.RunID == "..") {
		bad("run_id", "%q must be one path element (no slashes)", c.RunID)
	}
	for i, w := range c.Notify.Webhooks {
		key := fmt.Sprintf("notify.webhooks[%d]", i)
		if w.URL == "" {
			bad(key+".url", "is empty")
		} else {
			checkURL(key+".url", w.URL, false)
		}
		if w.Format != "" && w.Format != "json" && w.Format != "slack" {
			bad(key+".format", "%q is not json or slack", w.Format)
		}
	}
	if c.Logs.Interval.D() < time.Second {
		bad("logs.interval", "%s is too short; use 1s or more (default 30s)", c.Logs.Interval)
	}
	for i, p := range c.Logs.Paths {
		if _, err := filepath.Match(p, ""); err != nil || p == "" {
			bad(fmt.Sprintf("logs.paths[%d]", i), "%q is not a file path or glob", p)
		}
	}
	if l := c.Metrics.Listen; l != "" {
		if _, _, err := net.SplitHostPort(l); err != nil {
			bad("metrics.listen", "%q is not host:port like 127.0.0.1:9477 (empty disables)", l)
		}
	}
	if _, err := c.SimulateGroups(); err != nil {
		bad("api.simulate_group", "%v", err)
	}
	for i, h := range c.Hooks.OnNotice {
		if strings.TrimSpace(h) == "" {
			bad(fmt.Sprintf("hooks.on_notice[%d]", i), "is empty; remove it or give a command")
		}
	}
	if c.Job.Nodes < 0 || c.Job.Nodes > 4096 {
		bad("job.nodes", "%d is out of range; use 0 or 1 for a single node, up to 4096", c.Job.Nodes)
	}
	if n := c.Job.Node; n != "" && !nodeName.MatchString(n) {
		bad("job.node", "%q must be 1 to 128 letters, digits, '.', '_' or '-', not starting with '.'", n)
	}
	if d := c.Job.Poll.D(); d < 100*time.Millisecond || d > time.Minute {
		bad("job.poll", "%s is out of range; use 100ms to 1m (default 500ms)", d)
	}
	for key, addr := range map[string]string{"job.listen": c.Job.Listen, "job.advertise": c.Job.Advertise} {
		if addr == "" {
			continue
		}
		if _, port, err := net.SplitHostPort(addr); err != nil || port == "" {
			bad(key, "%q is not host:port like :9478 (empty disables)", addr)
		}
	}
	if c.Job.Listen != "" && len(c.Job.Token) < 16 {
		bad("job.token", "job.listen takes pushes that stop the job: set a shared secret of 16 characters or more on every node (e.g. PREEMPTD_JOB_TOKEN=$(openssl rand -hex 24))")
	}
	if len(errs) > 0 {
		return fmt.Errorf("invalid configuration:\n  %w", joinLines(errs))
	}
	return nil
}

func joinLines(errs []error) error {
	msgs := make([]string, len(errs))
	for i, e := range errs {
		msgs[i] = e.Error()
	}
	slices.Sort(msgs)
	return errors.New(strings.Join(msgs, "\n  "))
}

// TriggerFile is the local provider's trigger file.
func (c *Config) TriggerFile() string {
	if c.Local.TriggerFile != "" {
		return c.Local.TriggerFile
	}
	return filepath.Join(c.RunDir, "trigger")
}

// SimulateGroups resolves api.simulate_group (a group name or number) to
// the gids the local API lets simulate notices; none when it is empty.
func (c *Config) SimulateGroups() ([]int, error) {
	name := c.API.SimulateGroup
	if name == "" {
		return nil, nil
	}
	g, err := user.LookupGroup(name)
	if err != nil {
		if g, err = user.LookupGroupId(name); err != nil {
			return nil, fmt.Errorf("no group %q on this machine (create it, or leave the key empty)", name)
		}
	}
	id, err := strconv.Atoi(g.Gid)
	if err != nil {
		return nil, fmt.Errorf("group %q has the non-numeric gid %q", name, g.Gid)
	}
	return []int{id}, nil
}

// JobAdvertise is the host:port the job's other nodes push to: job.advertise,
// else job.listen's host (this machine's hostname when it names every
// interface) and port; empty without job.listen.
func (c *Config) JobAdvertise() string {
	if c.Job.Advertise != "" || c.Job.Listen == "" {
		return c.Job.Advertise
	}
	host, port, err := net.SplitHostPort(c.Job.Listen)
	if err != nil {
		return ""
	}
	if host == "" || host == "0.0.0.0" || host == "::" {
		if host, err = os.Hostname(); err != nil {
			return ""
		}
	}
	return net.JoinHostPort(host, port)
}

// Socket is the local API's socket path.
func (c *Config) Socket() string { return filepath.Join(c.RunDir, "preemptd.sock") }

// StorageURL is storage.url, or the embedded default under state_dir.
func (c *Config) StorageURL() string {
	if c.Storage.URL != "" {
		return c.Storage.URL
	}
	return "file://" + filepath.Join(c.StateDir, "store")
}

// Run is run_id, else the first of SKYPILOT_TASK_ID, TORCHELASTIC_RUN_ID and
// SLURM_JOB_ID set in the environment, else the hostname.
func (c *Config) Run(getenv func(string) string) string {
	if c.RunID != "" {
		return c.RunID
	}
	for _, v := range []string{"SKYPILOT_TASK_ID", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID"} {
		if s := strings.ReplaceAll(getenv(v), "/", "_"); s != "" && s != "." && s != ".." {
			return s
		}
	}
	h, err := os.Hostname()
	if err != nil || h == "" {
		return "default"
	}
	return h
}
