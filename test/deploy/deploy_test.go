// Package deploy checks the ways preemptd is deployed: the systemd units
// (systemd-analyze verify), the .deb and .rpm (built with nfpm, inspected,
// and under CI installed with dpkg), the install script, the Kubernetes
// manifests (strictly decoded into the API types) and the Dockerfile.
package deploy

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"

	"github.com/preemptd/preemptd/agent/config"
	"github.com/preemptd/preemptd/test/peers"
)

const repo = "../.."

func need(t *testing.T, tool string) string {
	t.Helper()
	p, err := exec.LookPath(tool)
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("%s is not installed (CI needs it)", tool)
		}
		t.Skipf("%s not installed", tool)
	}
	return p
}

func build(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "preemptd")
	cmd := exec.Command("go", "build", "-o", bin, "./cmd/preemptd")
	cmd.Dir = repo
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	return bin
}

// verify runs systemd-analyze verify on unit files in dir.
func verify(t *testing.T, dir string, units ...string) {
	t.Helper()
	cmd := exec.Command(need(t, "systemd-analyze"), append([]string{"verify", "--man=no"}, units...)...)
	cmd.Dir = dir
	out, err := cmd.CombinedOutput()
	if err != nil || len(bytes.TrimSpace(out)) > 0 {
		t.Fatalf("systemd-analyze verify %v: %v\n%s", units, err, out)
	}
}

func TestSystemdUnits(t *testing.T) {
	bin := build(t)
	dir := t.TempDir()
	unit, _ := os.ReadFile(filepath.Join(repo, "systemd/preemptd.service"))
	for _, want := range []string{"Type=notify", "Restart=on-failure", "TimeoutStopSec=180s", "WatchdogSec=", "NoNewPrivileges=yes",
		"ProtectSystem=strict", "ReadWritePaths=/var/lib/preemptd /run/preemptd", "ProtectHome=", "PrivateTmp=yes",
		"CapabilityBoundingSet=CAP_KILL", "RuntimeDirectory=preemptd", "StateDirectory=preemptd"} {
		if !bytes.Contains(unit, []byte(want)) {
			t.Errorf("preemptd.service lacks %s", want)
		}
	}
	if bytes.Contains(unit, []byte("CAP_SYS_PTRACE")) {
		t.Error("preemptd.service keeps CAP_SYS_PTRACE (it reads only world-readable /proc files)")
	}
	for _, want := range []string{"UMask=0077", "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK",
		"SystemCallFilter=@system-service", "ProtectKernelLogs=yes", "ProtectClock=yes"} {
		if !bytes.Contains(unit, []byte(want)) {
			t.Errorf("preemptd.service lacks %s", want)
		}
	}
	os.WriteFile(filepath.Join(dir, "preemptd.service"), bytes.ReplaceAll(unit, []byte("/usr/bin/preemptd"), []byte(bin)), 0o644)
	verify(t, dir, "preemptd.service")
	// systemd's own exposure score: 6.0 MEDIUM before this hardening.
	out, _ := exec.Command(need(t, "systemd-analyze"), "security", "--offline=true", filepath.Join(dir, "preemptd.service")).CombinedOutput()
	m := regexp.MustCompile(`Overall exposure level for preemptd.service: ([0-9.]+)`).FindSubmatch(out)
	if m == nil {
		t.Fatalf("systemd-analyze security: no score\n%s", out)
	}
	t.Logf("systemd-analyze security: exposure %s", m[1])
	if score, _ := strconv.ParseFloat(string(m[1]), 64); score > 3.5 {
		t.Errorf("exposure %.1f, want at most 3.5 (OK)", score)
	}

	// A trainer unit with the example drop-in: ordered after preemptd, so it
	// is stopped first at shutdown.
	os.WriteFile(filepath.Join(dir, "trainer.service"), []byte("[Service]\nExecStart=/bin/sleep 60\n"), 0o644)
	os.MkdirAll(filepath.Join(dir, "trainer.service.d"), 0o755)
	dropIn, _ := os.ReadFile(filepath.Join(repo, "systemd/trainer-drop-in.conf"))
	os.WriteFile(filepath.Join(dir, "trainer.service.d", "preemptd.conf"), dropIn, 0o644)
	verify(t, dir, "trainer.service")
	if !bytes.Contains(dropIn, []byte("After=preemptd.service")) {
		t.Fatal("the trainer drop-in does not order the trainer after preemptd")
	}

	// The restore unit: a oneshot before the trainer, a fresh start (exit
	// 4) a success; the example trainer unit requires it and is ordered
	// after it and after preemptd.
	restore, _ := os.ReadFile(filepath.Join(repo, "systemd/preemptd-restore.service"))
	for _, want := range []string{"Type=oneshot", "RemainAfterExit=yes", "SuccessExitStatus=4", "--wait", "After=network-online.target"} {
		if !bytes.Contains(restore, []byte(want)) {
			t.Errorf("preemptd-restore.service lacks %s", want)
		}
	}
	os.WriteFile(filepath.Join(dir, "preemptd-restore.service"), bytes.ReplaceAll(restore, []byte("/usr/bin/preemptd"), []byte(bin)), 0o644)
	verify(t, dir, "preemptd-restore.service")
	example, _ := os.ReadFile(filepath.Join(repo, "systemd/trainer-example.service"))
	for _, want := range []string{"Requires=preemptd-restore.service", "After=preemptd-restore.service", "After=preemptd.service"} {
		if !bytes.Contains(example, []byte(want)) {
			t.Errorf("trainer-example.service lacks %s", want)
		}
	}
	example = regexp.MustCompile(`(?m)^(ExecStart=)\S+.*$`).ReplaceAll(example, []byte("${1}/bin/sleep 60"))
	example = regexp.MustCompile(`(?m)^(User|Group)=.*\n`).ReplaceAll(example, nil)
	os.WriteFile(filepath.Join(dir, "trainer-example.service"), example, 0o644)
	verify(t, dir, "trainer-example.service")

	logind, _ := os.ReadFile(filepath.Join(repo, "systemd/logind-preemptd.conf"))
	if !regexp.MustCompile(`(?m)^InhibitDelayMaxSec=1[0-9]{2}$`).Match(logind) {
		t.Fatalf("logind drop-in: %s", logind)
	}
}

// TestPackage: `make package` builds a .deb and .rpm; the .deb holds the
// binary, unit, logind drop-in and config with the right control data; under
// CI (root) it is installed with dpkg, checked, and purged.
func TestPackage(t *testing.T) {
	need(t, "dpkg-deb")
	dist := t.TempDir() // never the repo's dist/: a user's packages stay
	cmd := exec.Command("make", "package", "PKG_VERSION=0.0.0~test", "DIST="+dist)
	cmd.Dir = repo
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("make package: %v\n%s", err, out)
	}
	debs, _ := filepath.Glob(filepath.Join(dist, "preemptd_0.0.0~test_*.deb"))
	rpms, _ := filepath.Glob(filepath.Join(dist, "preemptd-0.0.0~test-1.*.rpm"))
	if len(debs) != 1 || len(rpms) != 1 {
		t.Fatalf("dist holds %v %v", debs, rpms)
	}
	deb := debs[0]
	list, err := exec.Command("dpkg-deb", "-c", deb).Output()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"./usr/bin/preemptd", "./lib/systemd/system/preemptd.service", "./etc/preemptd/preemptd.yaml",
		"./usr/lib/systemd/logind.conf.d/preemptd.conf", "./var/lib/preemptd/"} {
		if !bytes.Contains(list, []byte(f)) {
			t.Errorf(".deb lacks %s:\n%s", f, list)
		}
	}
	if !regexp.MustCompile(`(?m)^-rw------- root/root .* \./etc/preemptd/preemptd\.yaml$`).Match(list) {
		t.Errorf("the .deb's config is not 0600 root-owned (it may hold webhook URLs and keys):\n%s", list)
	}
	control, _ := exec.Command("dpkg-deb", "-f", deb).Output()
	for _, want := range []string{"Package: preemptd", "Version: 0.0.0~test", "Depends: libc6"} {
		if !bytes.Contains(control, []byte(want)) {
			t.Errorf("control lacks %q:\n%s", want, control)
		}
	}
	scripts := t.TempDir()
	exec.Command("dpkg-deb", "-e", deb, scripts).Run()
	conffiles, _ := os.ReadFile(filepath.Join(scripts, "conffiles"))
	post, _ := os.ReadFile(filepath.Join(scripts, "postinst"))
	if !bytes.Contains(conffiles, []byte("/etc/preemptd/preemptd.yaml")) || !bytes.Contains(post, []byte("enable preemptd.service")) {
		t.Fatalf("conffiles %q, postinst %q", conffiles, post)
	}

	if os.Geteuid() != 0 || (os.Getenv("CI") == "" && os.Getenv("PREEMPTD_DPKG_TEST") == "") {
		t.Log("dpkg -i skipped: it runs as root under CI (or with PREEMPTD_DPKG_TEST=1)")
		return
	}
	if out, err := exec.Command("dpkg", "-s", "preemptd").CombinedOutput(); err == nil && !bytes.Contains(out, []byte("0.0.0~test")) {
		t.Skipf("a real preemptd package is installed here; not replacing it:\n%s", out)
	}
	if out, err := exec.Command("dpkg", "-i", deb).CombinedOutput(); err != nil {
		t.Fatalf("dpkg -i: %v\n%s", err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("dpkg", "--purge", "preemptd").CombinedOutput(); err != nil {
			t.Errorf("dpkg --purge: %v\n%s", err, out)
		}
	})
	for _, f := range []string{"/usr/bin/preemptd", "/lib/systemd/system/preemptd.service", "/etc/preemptd/preemptd.yaml"} {
		if _, err := os.Stat(f); err != nil {
			t.Fatalf("after dpkg -i: %v", err)
		}
	}
	if st, err := os.Stat("/etc/preemptd/preemptd.yaml"); err != nil || st.Mode().Perm() != 0o600 {
		t.Errorf("installed config: %v, mode %v; want 0600", err, st.Mode())
	}
	if out, err := exec.Command("/usr/bin/preemptd", "version").CombinedOutput(); err != nil {
		t.Fatalf("installed binary: %v\n%s", err, out)
	}
	c, err := config.Load("/etc/preemptd/preemptd.yaml", func(string) string { return "" })
	if err == nil {
		err = c.Validate()
	}
	if err != nil {
		t.Fatalf("installed config: %v", err)
	}
	verify(t, "/lib/systemd/system", "/lib/systemd/system/preemptd.service")
}

func TestInstallScript(t *testing.T) {
	bin := build(t)
	root := t.TempDir()
	for range 2 { // idempotent
		cmd := exec.Command("sh", filepath.Join(repo, "deploy/image/install.sh"), "--binary", bin, "--root", root)
		if out, err := cmd.CombinedOutput(); err != nil || !bytes.Contains(out, []byte("installed under")) {
			t.Fatalf("install.sh: %v\n%s", err, out)
		}
	}
	for _, f := range []string{"usr/bin/preemptd", "etc/systemd/system/preemptd.service", "etc/preemptd/preemptd.yaml",
		"etc/systemd/logind.conf.d/preemptd.conf"} {
		if _, err := os.Stat(filepath.Join(root, f)); err != nil {
			t.Errorf("install.sh did not place %s: %v", f, err)
		}
	}
	if st, err := os.Stat(filepath.Join(root, "etc/preemptd/preemptd.yaml")); err != nil || st.Mode().Perm() != 0o600 {
		t.Errorf("install.sh's config: %v, mode %v; want 0600", err, st.Mode())
	}
	cmd := exec.Command("sh", filepath.Join(repo, "deploy/image/install.sh"), "--binary", bin, "--root", root)
	cmd.Env = append(os.Environ(), "PREEMPTD_ARCH=sparc64")
	out, err := cmd.CombinedOutput()
	if err == nil || !bytes.Contains(out, []byte("unsupported architecture 'sparc64'")) {
		t.Fatalf("unknown architecture: %v\n%s", err, out)
	}
}

// docs splits a multi-document YAML file.
func docs(t *testing.T, path string) [][]byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var out [][]byte
	for _, d := range regexp.MustCompile(`(?m)^---\s*$`).Split(string(b), -1) {
		if strings.TrimSpace(regexp.MustCompile(`(?m)^#.*$`).ReplaceAllString(d, "")) != "" {
			out = append(out, []byte(d))
		}
	}
	return out
}

// strict decodes YAML into v, refusing unknown fields.
func strict(doc []byte, v any) error {
	j, err := yaml.YAMLToJSON(doc)
	if err != nil {
		return err
	}
	dec := json.NewDecoder(bytes.NewReader(j))
	dec.DisallowUnknownFields()
	return dec.Decode(v)
}

// checkManifests decodes each document strictly into its Kubernetes type
// and checks what preemptd needs and what must never be: the sidecar a
// native sidecar treating SIGTERM as a shutdown, the DaemonSet on the host's
// network and PID space, no privilege escalation, the runtime's seccomp
// profile, metrics not on every interface, only PREEMPTD_* variables that
// exist. It returns how many documents of each kind it saw.
func checkManifests(t *testing.T, name string, documents [][]byte) map[string]int {
	t.Helper()
	envs := config.EnvVars()
	checkContainer := func(where string, c corev1.Container) {
		if c.Name != "preemptd" {
			return // the trainer's own
		}
		for _, e := range c.Env {
			if strings.HasPrefix(e.Name, "PREEMPTD_") {
				if _, ok := envs[e.Name]; !ok {
					t.Errorf("%s: container %s sets %s, which preemptd does not read", where, c.Name, e.Name)
				}
			}
			if e.Name == "PREEMPTD_METRICS_LISTEN" && strings.HasPrefix(e.Value, "0.0.0.0") {
				t.Errorf("%s: metrics on every interface (%s)", where, e.Value)
			}
		}
		sc := c.SecurityContext
		if sc == nil || sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation ||
			sc.SeccompProfile == nil || sc.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault ||
			sc.Capabilities == nil || len(sc.Capabilities.Drop) != 1 || sc.Capabilities.Drop[0] != "ALL" {
			t.Errorf("%s: preemptd's securityContext must drop ALL, forbid privilege escalation and use RuntimeDefault seccomp: %+v", where, sc)
		}
	}
	// The mount points of emptyDir volumes (world-writable), from every Pod.
	emptyDirs := map[string]bool{}
	for _, d := range documents {
		var p corev1.Pod
		if yaml.Unmarshal(d, &p) != nil || p.Kind != "Pod" {
			continue
		}
		empty := map[string]bool{}
		for _, v := range p.Spec.Volumes {
			if v.EmptyDir != nil {
				empty[v.Name] = true
			}
		}
		for _, c := range append(p.Spec.InitContainers, p.Spec.Containers...) {
			if c.Name != "preemptd" {
				continue
			}
			for _, m := range c.VolumeMounts {
				if empty[m.Name] {
					emptyDirs[m.MountPath] = true
				}
			}
		}
	}
	kinds := map[string]int{}
	for i, d := range documents {
		var meta struct{ Kind string }
		yaml.Unmarshal(d, &meta)
		kinds[meta.Kind]++
		where := fmt.Sprintf("%s#%d (%s)", name, i, meta.Kind)
		switch meta.Kind {
		case "Pod":
			var p corev1.Pod
			if err := strict(d, &p); err != nil {
				t.Fatalf("%s: %v", where, err)
			}
			if p.Spec.ShareProcessNamespace == nil || !*p.Spec.ShareProcessNamespace {
				t.Errorf("%s: the sidecar needs shareProcessNamespace", where)
			}
			if g := p.Spec.TerminationGracePeriodSeconds; g == nil || *g < 120 {
				t.Errorf("%s: terminationGracePeriodSeconds must cover a 2-minute notice", where)
			}
			sidecar := false
			for _, c := range p.Spec.InitContainers {
				checkContainer(where, c)
				if c.Name == "preemptd" && c.RestartPolicy != nil && *c.RestartPolicy == corev1.ContainerRestartPolicyAlways {
					sidecar = true
				}
			}
			if !sidecar {
				t.Errorf("%s: preemptd is not a native sidecar (an init container with restartPolicy: Always)", where)
			}
			for _, c := range p.Spec.Containers {
				if c.Name == "preemptd" {
					t.Errorf("%s: preemptd among the ordinary containers: it must outlive the trainer", where)
				}
				checkContainer(where, c)
			}
		case "DaemonSet":
			var ds appsv1.DaemonSet
			if err := strict(d, &ds); err != nil {
				t.Fatalf("%s: %v", where, err)
			}
			if !ds.Spec.Template.Spec.HostPID || !ds.Spec.Template.Spec.HostNetwork {
				t.Errorf("%s: the DaemonSet needs hostPID and hostNetwork (IMDSv2 at hop limit 1)", where)
			}
			for _, c := range ds.Spec.Template.Spec.Containers {
				checkContainer(where, c)
			}
		case "ConfigMap":
			var cm corev1.ConfigMap
			if err := strict(d, &cm); err != nil {
				t.Fatalf("%s: %v", where, err)
			}
			p := filepath.Join(t.TempDir(), "preemptd.yaml")
			os.WriteFile(p, []byte(cm.Data["preemptd.yaml"]), 0o644)
			c, err := config.Load(p, func(string) string { return "" })
			if err == nil {
				err = c.Validate()
			}
			if err != nil {
				t.Errorf("%s: its preemptd.yaml: %v", where, err)
			}
			if strings.HasPrefix(c.Metrics.Listen, "0.0.0.0") || strings.HasPrefix(c.Metrics.Listen, ":") {
				t.Errorf("%s: metrics.listen %q is on every interface", where, c.Metrics.Listen)
			}
			if emptyDirs[c.RunDir] {
				t.Errorf("%s: run_dir %s is an emptyDir's mount point, which is world-writable: preemptd refuses it; use a folder inside it", where, c.RunDir)
			}
		default:
			t.Errorf("%s: no check for this kind", where)
		}
	}
	return kinds
}

func TestKubernetesManifests(t *testing.T) {
	files, _ := filepath.Glob(filepath.Join(repo, "deploy/kubernetes/*.yaml"))
	if len(files) < 2 {
		t.Fatalf("found %d manifests", len(files))
	}
	kinds := map[string]int{}
	for _, f := range files {
		for k, n := range checkManifests(t, filepath.Base(f), docs(t, f)) {
			kinds[k] += n
		}
		if b, _ := os.ReadFile(f); bytes.Contains(b, []byte("Pod\n")) && !bytes.Contains(b, []byte("on_sigterm: shutdown")) {
			t.Errorf("%s: the sidecar's config must say on_sigterm: shutdown (in a Pod, SIGTERM is the eviction)", f)
		}
	}
	if kinds["Pod"] != 1 || kinds["DaemonSet"] != 1 || kinds["ConfigMap"] != 1 {
		t.Fatalf("kinds = %v", kinds)
	}
	// The sidecar Pod restores the latest checkpoint before anything starts.
	for _, d := range docs(t, filepath.Join(repo, "deploy/kubernetes/sidecar-pod.yaml")) {
		var p corev1.Pod
		if yaml.Unmarshal(d, &p) != nil || p.Kind != "Pod" {
			continue
		}
		if ic := p.Spec.InitContainers; len(ic) < 2 || ic[0].Name != "preemptd-restore" || !slices.Contains(ic[0].Args, "restore") ||
			!slices.Contains(ic[0].Args, "--none-ok") || ic[0].RestartPolicy != nil {
			t.Errorf("sidecar Pod: the first init container must be a one-shot `preemptd restore --none-ok`: %+v", ic)
		}
	}
}

// TestHelmChart: `helm lint` passes on deploy/helm/preemptd, and what `helm
// template` renders (defaults, and values a user would set) passes the same
// strict checks as the plain manifests.
func TestHelmChart(t *testing.T) {
	helm := peers.Require(t, "helm", peers.HelmVersion)
	chart := filepath.Join(repo, "deploy/helm/preemptd")
	if out, err := exec.Command(helm, "lint", "--strict", chart).CombinedOutput(); err != nil {
		t.Fatalf("helm lint: %v\n%s", err, out)
	}
	for name, args := range map[string][]string{
		"defaults": nil,
		"values":   {"--set", "config.storage.url=s3://bucket/ckpt", "--set", "config.run_id=llama", "--set", "image.tag=0.2.1"},
	} {
		out, err := exec.Command(helm, append([]string{"template", "preemptd", chart, "--namespace", "kube-system"}, args...)...).Output()
		if err != nil {
			t.Fatalf("helm template (%s): %v", name, err)
		}
		kinds := checkManifests(t, "helm "+name, docs(t, writeTemp(t, out)))
		if kinds["DaemonSet"] != 1 || kinds["ConfigMap"] != 1 || len(kinds) != 2 {
			t.Fatalf("helm template (%s) kinds = %v", name, kinds)
		}
		if !bytes.Contains(out, []byte(`args: ["restore", "--config", "/etc/preemptd/preemptd.yaml", "--wait", "5m", "--none-ok"]`)) {
			t.Errorf("helm template (%s): no restore init container before preemptd", name)
		}
	}
	out, err := exec.Command(helm, "template", "preemptd", chart, "--set", "restore.enabled=false").Output()
	if err != nil || bytes.Contains(out, []byte("preemptd-restore")) || bytes.Contains(out, []byte("initContainers")) {
		t.Errorf("helm template with restore.enabled=false: %v\n%s", err, out)
	}
}

func writeTemp(t *testing.T, b []byte) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "rendered.yaml")
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestDockerfile: no engine here, so check what can be reasoned about: two
// stages, a cgo build, no static linking, a glibc runtime, files that exist.
func TestDockerfile(t *testing.T) {
	b, err := os.ReadFile(filepath.Join(repo, "deploy/container/Dockerfile"))
	if err != nil {
		t.Fatal(err)
	}
	s := string(b)
	if n := strings.Count(s, "\nFROM ") + strings.Count(s[:5], "FROM"); n < 2 {
		t.Errorf("want a multi-stage build, found %d FROM", n)
	}
	for _, want := range []string{"CGO_ENABLED=1", "distroless/base-debian12", "ENTRYPOINT"} {
		if !strings.Contains(s, want) {
			t.Errorf("Dockerfile lacks %s", want)
		}
	}
	if strings.Contains(s, "-static") || strings.Contains(s, "distroless/static") {
		t.Error("a static binary or image: NVML needs dynamic linking against glibc")
	}
	for _, m := range regexp.MustCompile(`(?m)^COPY (?:--from=\S+ )?(\S+) `).FindAllStringSubmatch(s, -1) {
		if strings.HasPrefix(m[0], "COPY --from") || m[1] == "." {
			continue
		}
		for _, src := range strings.Fields(m[1]) {
			if _, err := os.Stat(filepath.Join(repo, src)); err != nil {
				t.Errorf("COPY %s: %v", src, err)
			}
		}
	}
}
