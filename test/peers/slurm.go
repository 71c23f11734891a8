package peers

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// SlurmVersion is the Debian version of slurmctld, slurmd, slurm-client
// (and munge 0.5.15) that scripts/tools.sh installs (as root).
const SlurmVersion = "22.05.8-4+deb12u3"

// Slurm is a one-node Slurm cluster on this machine: munged with a key of
// its own, slurmctld and slurmd, each a real daemon from Debian's packages,
// configured in a temporary folder and stopped when the test ends.
type Slurm struct {
	Conf string // slurm.conf: SLURM_CONF for every command
	Node string // the node's NodeName (this machine's short hostname)
	Dir  string
}

// Env is what Slurm's commands need in their environment.
func (s *Slurm) Env() []string { return []string{"SLURM_CONF=" + s.Conf} }

// Run runs one of Slurm's commands against the cluster and returns its
// output; a failure fails the test.
func (s *Slurm) Run(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := s.Try(name, args...)
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return out
}

// Try is Run without failing the test.
func (s *Slurm) Try(name string, args ...string) (string, error) {
	cmd := exec.Command(name, args...)
	cmd.Env = append(os.Environ(), s.Env()...)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// Field is KEY's value in `scontrol show {job,node} ID --oneliner`.
func (s *Slurm) Field(t testing.TB, what, id, key string) string {
	t.Helper()
	out := s.Run(t, "scontrol", "show", what, id, "--oneliner")
	for _, f := range strings.Fields(out) {
		if v, ok := strings.CutPrefix(f, key+"="); ok {
			return v
		}
	}
	return ""
}

// RequireSlurm skips (fails under CI) unless Slurm's daemons and munge are
// installed and this process is root (slurmd starts jobs as their users).
func RequireSlurm(t testing.TB) {
	t.Helper()
	missing := ""
	for _, b := range []string{"munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "scontrol"} {
		if _, err := exec.LookPath(b); err != nil {
			missing += " " + b
		}
	}
	switch {
	case missing == "" && os.Geteuid() == 0:
		return
	case os.Getenv("CI") != "":
		t.Fatalf("Slurm %s is not usable here (missing:%s; root: %v); `make tools` as root installs it", SlurmVersion, missing, os.Geteuid() == 0)
	}
	t.Skipf("Slurm not usable here (missing:%s; root: %v); run `make tools` as root", missing, os.Geteuid() == 0)
}

// StartSlurm starts munged, slurmctld and slurmd on 127.0.0.1 with free
// ports and waits until the node is idle.
func StartSlurm(t testing.TB) *Slurm {
	t.Helper()
	RequireSlurm(t)
	dir, err := os.MkdirTemp("", "slurm-") // short: munge's socket path has a length limit
	if err != nil {
		t.Fatal(err)
	}
	os.Chmod(dir, 0o755)
	t.Cleanup(func() { os.RemoveAll(dir) })
	for _, d := range []string{"munge", "state", "spool", "log"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o700); err != nil {
			t.Fatal(err)
		}
	}
	os.Chmod(filepath.Join(dir, "munge"), 0o711) // clients reach the socket
	key := filepath.Join(dir, "munge", "munge.key")
	if out, err := exec.Command("mungekey", "--create", "--keyfile="+key).CombinedOutput(); err != nil {
		t.Fatalf("mungekey: %v\n%s", err, out)
	}
	sock := filepath.Join(dir, "munge", "munge.sock")
	process(t, "munged", []string{"munged", "--force", "--foreground", "--socket=" + sock, "--key-file=" + key,
		"--log-file=" + filepath.Join(dir, "munge", "munged.log"), "--pid-file=" + filepath.Join(dir, "munge", "munged.pid"),
		"--seed-file=" + filepath.Join(dir, "munge", "seed")}, nil)
	waitFile(t, sock, 10*time.Second)

	host, _ := os.Hostname()
	node, _, _ := strings.Cut(host, ".")
	s := &Slurm{Conf: filepath.Join(dir, "slurm.conf"), Node: node, Dir: dir}
	conf := fmt.Sprintf(`ClusterName=preemptd-test
SlurmctldHost=%[1]s(127.0.0.1)
SlurmctldPort=%[2]d
SlurmdPort=%[3]d
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=%[4]s
CredType=cred/munge
StateSaveLocation=%[5]s/state
SlurmdSpoolDir=%[5]s/spool
SlurmctldPidFile=%[5]s/slurmctld.pid
SlurmdPidFile=%[5]s/slurmd.pid
SlurmctldLogFile=%[5]s/log/slurmctld.log
SlurmdLogFile=%[5]s/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
MpiDefault=none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
JobRequeue=1
KillWait=5
NodeName=%[1]s NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
`, node, FreePort(t), FreePort(t), sock, dir)
	if err := os.WriteFile(s.Conf, []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	env := append(os.Environ(), s.Env()...)
	process(t, "slurmctld", []string{"slurmctld", "-D", "-f", s.Conf}, env)
	process(t, "slurmd", []string{"slurmd", "-D", "-f", s.Conf}, env)
	t.Cleanup(func() {
		// Jobs first: their slurmstepd would outlive slurmd.
		s.Try("scancel", "--full", "--signal=KILL", "--user=root")
		time.Sleep(500 * time.Millisecond)
		if t.Failed() {
			for _, l := range []string{"slurmctld.log", "slurmd.log"} {
				b, _ := os.ReadFile(filepath.Join(dir, "log", l))
				t.Logf("%s:\n%s", l, tail(b, 4000))
			}
		}
	})
	deadline := time.Now().Add(30 * time.Second)
	for {
		out, _ := s.Try("sinfo", "--noheader", "--nodes="+node, "--format=%T")
		if strings.TrimSpace(out) == "idle" {
			return s
		}
		if time.Now().After(deadline) {
			b, _ := os.ReadFile(filepath.Join(dir, "log", "slurmctld.log"))
			t.Fatalf("the Slurm node never became idle (sinfo: %q)\n%s", out, tail(b, 4000))
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func waitFile(t testing.TB, p string, d time.Duration) {
	t.Helper()
	for deadline := time.Now().Add(d); ; time.Sleep(50 * time.Millisecond) {
		if _, err := os.Stat(p); err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s never appeared", p)
		}
	}
}

func tail(b []byte, n int) []byte {
	if len(b) > n {
		b = b[len(b)-n:]
		if i := bytes.IndexByte(b, '\n'); i >= 0 {
			b = b[i+1:]
		}
	}
	return b
}
