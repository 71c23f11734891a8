package config

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/preemptd/preemptd/checkpoint"
)

func envOf(m map[string]string) func(string) string { return func(k string) string { return m[k] } }

func writeFile(t *testing.T, s string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "preemptd.yaml")
	if err := os.WriteFile(p, []byte(s), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestDefaultsValidate(t *testing.T) {
	c := Default()
	if err := c.Validate(); err != nil {
		t.Fatalf("defaults do not validate: %v", err)
	}
	if c.Provider != "auto" || c.PollInterval.D() != time.Second || c.FatalWithin.D() != 2*time.Minute ||
		c.RunDir != "/run/preemptd" || c.Azure.Ack != AckMine || c.Trainer.Signal != "SIGTERM" {
		t.Fatalf("defaults = %+v", c)
	}
}

// TestAzureAckValues: mine, all, off, and the booleans of earlier
// configurations (true: mine, false: off); anything else names the key.
func TestAzureAckValues(t *testing.T) {
	for in, want := range map[string]string{"mine": AckMine, "all": AckAll, "off": AckOff, "true": AckMine, "false": AckOff} {
		c := Default()
		if err := decodeYAML([]byte("azure: {ack: "+in+"}"), &c); err != nil {
			t.Fatal(err)
		}
		if err := c.Validate(); err != nil || c.Azure.Ack != want {
			t.Errorf("azure.ack %s: %q, %v; want %q", in, c.Azure.Ack, err, want)
		}
	}
	c := Default()
	c.Azure.Ack = "some"
	if err := c.Validate(); err == nil || !strings.Contains(err.Error(), "azure.ack") {
		t.Fatalf("azure.ack some: %v", err)
	}
}

// TestGCPWindows: preempt_window up to 2m (GCP's longer notice), and a
// maintenance_window of 0 (the default) taken from the machine.
func TestGCPWindows(t *testing.T) {
	c := Default()
	if c.GCP.MaintenanceWindow != 0 {
		t.Fatalf("default gcp.maintenance_window = %v, want 0 (from the machine)", c.GCP.MaintenanceWindow)
	}
	c.GCP.PreemptWindow = Duration(2 * time.Minute)
	if err := c.Validate(); err != nil {
		t.Fatalf("preempt_window 2m: %v", err)
	}
	c.GCP.PreemptWindow = Duration(3 * time.Minute)
	if err := c.Validate(); err == nil || !strings.Contains(err.Error(), "gcp.preempt_window") {
		t.Fatalf("preempt_window 3m: %v", err)
	}
}

func TestPrecedence(t *testing.T) {
	path := writeFile(t, `
provider: aws
poll_interval: 2s
aws: {endpoint: "http://127.0.0.1:1338"}
trainer: {signal: SIGUSR1, match: "train\\.py", kill_after: 90s}
hooks: {on_notice: ["echo one", "echo two"]}
`)
	c, err := Load(path, envOf(map[string]string{
		"PREEMPTD_POLL_INTERVAL":    "500ms",
		"PREEMPTD_TRAINER_SIGNAL":   "SIGUSR2",
		"PREEMPTD_AZURE_ACK":        "false",
		"PREEMPTD_HOOKS_ON_NOTICE":  "[\"a\", \"b, c\"]",
		"PREEMPTD_TRAINER_PID_FILE": "/run/train.pid",
	}))
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	checks := []struct {
		name      string
		got, want any
	}{
		{"provider from file", c.Provider, "aws"},
		{"poll_interval env over file", c.PollInterval.D(), 500 * time.Millisecond},
		{"trainer.signal env over file", c.Trainer.Signal, "SIGUSR2"},
		{"trainer.match from file", c.Trainer.Match, `train\.py`},
		{"trainer.kill_after from file", c.Trainer.KillAfter.D(), 90 * time.Second},
		{"azure.ack from env", c.Azure.Ack, AckOff},
		{"azure.endpoint default kept", c.Azure.Endpoint, "http://169.254.169.254"},
		{"hooks list from env", strings.Join(c.Hooks.OnNotice, "|"), "a|b, c"},
		{"pid_file from env", c.Trainer.PIDFile, "/run/train.pid"},
		{"fatal_within default", c.FatalWithin.D(), 2 * time.Minute},
	}
	for _, ch := range checks {
		if ch.got != ch.want {
			t.Errorf("%s: got %v, want %v", ch.name, ch.got, ch.want)
		}
	}
}

func TestSingleHookFromEnv(t *testing.T) {
	c, err := Load(writeFile(t, ""), envOf(map[string]string{"PREEMPTD_HOOKS_ON_NOTICE": "curl -X POST x, y"}))
	if err != nil {
		t.Fatal(err)
	}
	if len(c.Hooks.OnNotice) != 1 || c.Hooks.OnNotice[0] != "curl -X POST x, y" {
		t.Fatalf("hooks = %q", c.Hooks.OnNotice)
	}
}

func TestLoadErrors(t *testing.T) {
	tests := []struct {
		name, file string
		env        map[string]string
		want       string
	}{
		{"unknown key", "provider: aws\npoll_intervall: 1s\n", nil, "poll_intervall"},
		{"bad duration", "poll_interval: often\n", nil, "duration"},
		{"bad env duration", "", map[string]string{"PREEMPTD_FATAL_WITHIN": "soon"}, "PREEMPTD_FATAL_WITHIN (key fatal_within)"},
		{"bad env bool", "", map[string]string{"PREEMPTD_CHECKPOINT_SYNC": "perhaps"}, "PREEMPTD_CHECKPOINT_SYNC"},
		{"not yaml", "provider: [aws\n", nil, "config"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Load(writeFile(t, tt.file), envOf(tt.env))
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("Load = %v, want an error mentioning %q", err, tt.want)
			}
		})
	}
	if _, err := Load(filepath.Join(t.TempDir(), "missing.yaml"), nil); err == nil || !strings.Contains(err.Error(), "--config") {
		t.Fatalf("missing explicit file: %v", err)
	}
}

func TestValidateNamesKeyAndFix(t *testing.T) {
	tests := []struct {
		name   string
		mutate func(*Config)
		want   string
	}{
		{"provider", func(c *Config) { c.Provider = "oracle" }, "provider: \"oracle\" is not one of auto, aws, gcp, azure, alibaba, tencent, local"},
		{"poll too fast", func(c *Config) { c.PollInterval = Duration(time.Millisecond) }, "poll_interval: 1ms is out of range; use 100ms to 1m"},
		{"signal", func(c *Config) { c.Trainer.Signal = "SIGFOO" }, "trainer.signal: unknown signal \"SIGFOO\""},
		{"rebalance signal", func(c *Config) { c.Trainer.RebalanceSignal = "99" }, "trainer.rebalance_signal"},
		{"match", func(c *Config) { c.Trainer.Match = "train(" }, "trainer.match: not a valid regular expression"},
		{"endpoint", func(c *Config) { c.AWS.Endpoint = "169.254.169.254" }, "aws.endpoint: \"169.254.169.254\" is not an http(s) URL"},
		{"kill_after", func(c *Config) { c.Trainer.KillAfter = Duration(-time.Second) }, "trainer.kill_after: must not be negative"},
		{"empty hook", func(c *Config) { c.Hooks.OnNotice = []string{" "} }, "hooks.on_notice[0]: is empty"},
		{"on_sigterm", func(c *Config) { c.OnSIGTERM = "maybe" }, "on_sigterm"},
		{"long run_dir", func(c *Config) { c.RunDir = "/" + strings.Repeat("x", 120) }, "too long for a unix socket"},
		{"job push without token", func(c *Config) { c.Job.Nodes, c.Job.Listen = 2, ":9478" }, "job.token: job.listen takes pushes that stop the job"},
		{"job short token", func(c *Config) { c.Job.Listen, c.Job.Token = ":9478", "short" }, "job.token"},
		{"job nodes", func(c *Config) { c.Job.Nodes = -1 }, "job.nodes: -1 is out of range"},
		{"job node", func(c *Config) { c.Job.Node = "a/b" }, "job.node: \"a/b\" must be"},
		{"job listen", func(c *Config) { c.Job.Listen = "9478" }, "job.listen: \"9478\" is not host:port"},
		{"job poll", func(c *Config) { c.Job.Poll = Duration(time.Millisecond) }, "job.poll: 1ms is out of range"},
		{"slurm without run_id", func(c *Config) { c.Slurm.Enabled = true }, "run_id: slurm.enabled needs run_id set"},
		{"slurm and a process target", func(c *Config) { c.Slurm.Enabled, c.RunID, c.Trainer.Match = true, "r", "train.py" },
			"slurm.enabled: the node's Slurm jobs are the trainer"},
		{"slurm target", func(c *Config) { c.Slurm.Target = "everything" }, "slurm.target: \"everything\" is not one of full, steps, batch"},
		{"alibaba endpoint", func(c *Config) { c.Alibaba.Endpoint = "100.100.100.200" }, "alibaba.endpoint"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := Default()
			tt.mutate(&c)
			err := c.Validate()
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("Validate = %v, want %q", err, tt.want)
			}
		})
	}
}

func TestGCPEndpointHostOnly(t *testing.T) {
	c := Default()
	c.GCP.Endpoint = "127.0.0.1:8080"
	if err := c.Validate(); err != nil {
		t.Fatalf("host:port gcp.endpoint rejected: %v", err)
	}
}

func TestEnvVarsCoverContract(t *testing.T) {
	vars := EnvVars()
	for _, name := range []string{"PREEMPTD_PROVIDER", "PREEMPTD_POLL_INTERVAL", "PREEMPTD_FATAL_WITHIN", "PREEMPTD_RUN_DIR",
		"PREEMPTD_STATE_DIR", "PREEMPTD_AWS_ENDPOINT", "PREEMPTD_GCP_ENDPOINT", "PREEMPTD_AZURE_ENDPOINT", "PREEMPTD_AZURE_ACK",
		"PREEMPTD_TRAINER_PID_FILE", "PREEMPTD_TRAINER_MATCH", "PREEMPTD_TRAINER_UNIT", "PREEMPTD_TRAINER_SIGNAL",
		"PREEMPTD_TRAINER_REBALANCE_SIGNAL", "PREEMPTD_TRAINER_KILL_AFTER", "PREEMPTD_HOOKS_ON_NOTICE",
		"PREEMPTD_JOB_NODES", "PREEMPTD_JOB_NODE", "PREEMPTD_JOB_POLL", "PREEMPTD_JOB_LISTEN", "PREEMPTD_JOB_TOKEN"} {
		if _, ok := vars[name]; !ok {
			t.Errorf("no environment override %s", name)
		}
	}
}

func FuzzLoad(f *testing.F) {
	f.Add("provider: aws\npoll_interval: 1s\n")
	f.Add("trainer: {signal: SIGUSR1, kill_after: 0}\n")
	f.Add("hooks: {on_notice: [a, b]}\n")
	f.Fuzz(func(t *testing.T, s string) {
		p := filepath.Join(t.TempDir(), "c.yaml")
		if err := os.WriteFile(p, []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
		c, err := Load(p, nil)
		if err == nil {
			_ = c.Validate()
		}
	})
}

// TestExampleConfigs: every preemptd.yaml under examples/ loads and
// validates, with the secrets they say come from the environment set there.
func TestExampleConfigs(t *testing.T) {
	paths, _ := filepath.Glob("../../examples/*/preemptd.yaml")
	if len(paths) < 4 {
		t.Fatalf("found %d example configs", len(paths))
	}
	env := map[string]string{"PREEMPTD_JOB_TOKEN": "0123456789abcdef0123456789abcdef"}
	for _, p := range paths {
		c, err := Load(p, func(k string) string { return env[k] })
		if err == nil {
			err = c.Validate()
		}
		if err != nil {
			t.Errorf("%s: %v", p, err)
		}
	}
}

func TestCheckpointKeys(t *testing.T) {
	c, err := Load(writeFile(t, "run_id: r1\ncheckpoint: {dir: /data/ckpt, layout: dcp, quiet_period: 2s, sync: false, keep: 5}\n"+
		"storage: {url: \"s3://b/p\", endpoint: \"http://127.0.0.1:9000\", region: eu-west-1}\n"), envOf(map[string]string{
		"PREEMPTD_CHECKPOINT_KEEP": "7"}))
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	if c.Checkpoint.Layout != "dcp" || c.Checkpoint.Keep != 7 || c.Checkpoint.Sync || c.Storage.Region != "eu-west-1" || c.Run(nil) != "r1" {
		t.Fatalf("config = %+v", c)
	}
	d := Default()
	d.StateDir = "/var/lib/preemptd"
	if d.StorageURL() != "file:///var/lib/preemptd/store" {
		t.Fatalf("default store = %s", d.StorageURL())
	}
	if got := d.Run(envOf(map[string]string{"SKYPILOT_TASK_ID": "sky-1/2"})); got != "sky-1_2" {
		t.Fatalf("run from SkyPilot = %q", got)
	}
	for key, mutate := range map[string]func(*Config){
		"checkpoint.layout": func(c *Config) { c.Checkpoint.Layout = "tensorflow" },
		"storage.url":       func(c *Config) { c.Storage.URL = "ftp://x" },
		"run_id":            func(c *Config) { c.RunID = "a/b" },
		"storage.threads":   func(c *Config) { c.Storage.Threads = 0 },
	} {
		c := Default()
		mutate(&c)
		if err := c.Validate(); err == nil || !strings.Contains(err.Error(), key) {
			t.Errorf("%s: %v", key, err)
		}
	}
}

// TestLayoutsMatchCheckpoint: config's list of layouts (kept here so that
// config does not pull in the store's client) is exactly checkpoint's.
// TestNodeNamesMatchCheckpoint: job.node is validated here by the same
// rule the store's keys are (kept here for the same reason as layouts).
func TestNodeNamesMatchCheckpoint(t *testing.T) {
	if nodeName.String() != checkpoint.NodeName.String() {
		t.Fatalf("config accepts job.node %s, checkpoint %s", nodeName, checkpoint.NodeName)
	}
}

func TestLayoutsMatchCheckpoint(t *testing.T) {
	if !slices.Equal(layouts, checkpoint.Layouts) {
		t.Fatalf("config accepts %v, checkpoint knows %v", layouts, checkpoint.Layouts)
	}
}

// TestErrorsNameTheKeyAndTheFix: what a first-time user gets wrong, said in
// the configuration's own words.
func TestErrorsNameTheKeyAndTheFix(t *testing.T) {
	for _, tc := range []struct{ name, yaml, want string }{
		{"typo", "trainer:\n  kil_after: 90s\n", "unknown key trainer.kil_after (did you mean kill_after?)"},
		{"typo at the top", "poll_intervall: 2s\n", "unknown key poll_intervall (did you mean poll_interval?)"},
		{"bad duration", "trainer: {kill_after: 90 seconds}\n", `trainer.kill_after: "90 seconds" is not a duration`},
		{"bad top duration", "poll_interval: soon\n", `poll_interval: "soon" is not a duration`},
		{"value for a section", "storage: s3://bucket\n", "storage holds keys"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := Default()
			err := decodeYAML([]byte(tc.yaml), &c)
			if err == nil || !strings.Contains(err.Error(), tc.want) || strings.Contains(err.Error(), "config.") {
				t.Fatalf("error = %v, want %q and no Go type names", err, tc.want)
			}
		})
	}
	for _, tc := range []struct{ url, want string }{
		{"s3://", "names no bucket"}, {"gs://", "names no bucket"}, {"ftp://x/y", "azblob://account/container/prefix"}, {"file://", "names no directory"},
		{"azblob://acct", "names no container"}, {"https://example.com/c/p", "storage.endpoint: https://example.com"},
		{"http://127.0.0.1:9000/bkt/runs", "write storage.url: s3://bkt/runs and storage.endpoint: http://127.0.0.1:9000"},
		{"https://acct.blob.core.windows.net/", "names no container"},
	} {
		c := Default()
		c.Storage.URL = tc.url
		if err := c.Validate(); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("storage.url %q: %v, want %q", tc.url, err, tc.want)
		}
	}
	for _, u := range []string{"azblob://acct/ckpt/runs", "https://acct.blob.core.windows.net/ckpt/runs", "gs://b/p"} {
		c := Default()
		c.Storage.URL = u
		if err := c.Validate(); err != nil {
			t.Errorf("storage.url %q: %v", u, err)
		}
	}
}

func TestUnknownEnvNamed(t *testing.T) {
	got := UnknownEnv([]string{"PREEMPTD_TRAINER_SIGNL=SIGUSR1", "PREEMPTD_TRAINER_SIGNAL=SIGINT", "PREEMPTD_CONFIG=/x",
		"HOME=/root", "PREEMPTD_WHATEVER=1", "PREEMPTD_DMI_ROOT=/d"})
	want := []string{"PREEMPTD_TRAINER_SIGNL (did you mean PREEMPTD_TRAINER_SIGNAL?)", "PREEMPTD_WHATEVER"}
	if !slices.Equal(got, want) {
		t.Fatalf("UnknownEnv = %q, want %q", got, want)
	}
}
