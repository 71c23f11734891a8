package providers

import (
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/preemptd/preemptd/agent/config"
	"github.com/preemptd/preemptd/test/fakes"
)

func dmi(t *testing.T, files map[string]string) string {
	t.Helper()
	dir := t.TempDir()
	for k, v := range files {
		os.WriteFile(filepath.Join(dir, k), []byte(v+"\n"), 0o444)
	}
	return dir
}

func closedURL(t *testing.T) string {
	srv := httptest.NewServer(http.NotFoundHandler())
	srv.Close()
	return srv.URL
}

func TestDetectDMI(t *testing.T) {
	tests := []struct {
		name  string
		files map[string]string
		want  string
	}{
		{"aws nitro", map[string]string{"sys_vendor": "Amazon EC2", "product_name": "p5.48xlarge"}, "aws"},
		{"aws xen", map[string]string{"sys_vendor": "Xen", "bios_version": "4.11.amazon"}, "aws"},
		{"gcp", map[string]string{"sys_vendor": "Google", "product_name": "Google Compute Engine"}, "gcp"},
		{"azure", map[string]string{"sys_vendor": "Microsoft Corporation", "chassis_asset_tag": azureAssetTag}, "azure"},
		{"hyper-v is not azure", map[string]string{"sys_vendor": "Microsoft Corporation", "chassis_asset_tag": "none"}, "local"},
		{"laptop", map[string]string{"sys_vendor": "LENOVO"}, "local"},
		{"alibaba", map[string]string{"sys_vendor": "Alibaba Cloud", "product_name": "Alibaba Cloud ECS"}, "alibaba"},
		{"tencent", map[string]string{"sys_vendor": "Tencent Cloud", "product_name": "CVM"}, "tencent"},
	}
	dead := closedURL(t)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d := Detect(t.Context(), DetectConfig{DMIRoot: dmi(t, tt.files), AWSEndpoint: dead, GCPEndpoint: dead,
				AzureEndpoint: dead, AlibabaEndpoint: dead, TencentEndpoint: dead, Timeout: 200 * time.Millisecond})
			if d.Provider != tt.want || len(d.Reasons) == 0 {
				t.Fatalf("Detect = %+v, want %s", d, tt.want)
			}
		})
	}
}

// TestDetectProbes: with no DMI, each cloud is recognised by its own
// protocol, and a server that answers like another cloud is not mistaken.
func TestDetectProbes(t *testing.T) {
	aws := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodPut && r.URL.Path == "/latest/api/token" {
			fmt.Fprint(w, "tok")
			return
		}
		http.NotFound(w, r)
	}))
	defer aws.Close()
	gcp := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Metadata-Flavor") == "Google" {
			w.Header().Set("Metadata-Flavor", "Google")
			fmt.Fprint(w, "123")
			return
		}
		http.Error(w, "", 403)
	}))
	defer gcp.Close()
	azure := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Metadata") == "true" && strings.HasPrefix(r.URL.Path, "/metadata/instance/compute/name") {
			fmt.Fprint(w, "vm-1")
			return
		}
		http.Error(w, "", 400)
	}))
	defer azure.Close()
	ali := fakes.NewAlibaba()
	ali.Hardened = true
	alibaba := httptest.NewServer(ali)
	defer alibaba.Close()
	tencent := httptest.NewServer(fakes.NewTencent())
	defer tencent.Close()
	dead := closedURL(t)
	none := t.TempDir()
	for _, tc := range []struct {
		name                             string
		awsEP, gcpEP, azEP, aliEP, tenEP string
		want                             string
	}{
		{"aws", aws.URL, dead, dead, dead, dead, "aws"},
		{"gcp", dead, strings.TrimPrefix(gcp.URL, "http://"), dead, dead, dead, "gcp"},
		{"azure", dead, dead, azure.URL, dead, dead, "azure"},
		{"alibaba, hardened mode", dead, dead, dead, alibaba.URL, dead, "alibaba"},
		{"tencent", dead, dead, dead, dead, tencent.URL, "tencent"},
		{"gcp server is not aws or azure", gcp.URL, gcp.URL, gcp.URL, gcp.URL, gcp.URL, "gcp"},
		{"tencent server is not alibaba", dead, dead, dead, tencent.URL, tencent.URL, "tencent"},
		{"nothing", dead, dead, dead, dead, dead, "local"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := Detect(t.Context(), DetectConfig{DMIRoot: none, AWSEndpoint: tc.awsEP, GCPEndpoint: tc.gcpEP,
				AzureEndpoint: tc.azEP, AlibabaEndpoint: tc.aliEP, TencentEndpoint: tc.tenEP, Timeout: 500 * time.Millisecond})
			if d.Provider != tc.want {
				t.Fatalf("Detect = %+v, want %s", d, tc.want)
			}
		})
	}
}

func TestBuild(t *testing.T) {
	cfg := config.Default()
	cfg.RunDir = t.TempDir()
	for _, name := range []string{"aws", "gcp", "azure", "alibaba", "tencent", "local"} {
		b, err := Build(name, &cfg, nil, nil)
		if err != nil || b.Watcher == nil || (name == "azure") != (b.Acker != nil) || (name == "local") != (b.Identifier == nil) {
			t.Errorf("Build(%s) = %+v, %v", name, b, err)
		}
	}
	if _, err := Build("oracle", &cfg, nil, nil); err == nil {
		t.Error("Build(oracle) succeeded")
	}
}

// TestDetectSaysSomethingAnswered: when the metadata address answers (a
// 403 from a sandbox or proxy) but as no cloud, detect does not claim that
// nothing answered.
func TestDetectSaysSomethingAnswered(t *testing.T) {
	forbidden := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { http.Error(w, "no", 403) }))
	defer forbidden.Close()
	d := Detect(t.Context(), DetectConfig{DMIRoot: dmi(t, map[string]string{"sys_vendor": "LENOVO"}), AWSEndpoint: forbidden.URL,
		GCPEndpoint: forbidden.URL, AzureEndpoint: forbidden.URL, AlibabaEndpoint: forbidden.URL, TencentEndpoint: forbidden.URL, Timeout: time.Second})
	last := d.Reasons[len(d.Reasons)-1]
	if d.Provider != "local" || strings.Contains(last, "no metadata service answered") || !strings.Contains(last, "not as any cloud") {
		t.Fatalf("Detect = %+v", d)
	}
	dead := closedURL(t)
	d = Detect(t.Context(), DetectConfig{DMIRoot: dmi(t, map[string]string{"sys_vendor": "LENOVO"}), AWSEndpoint: dead,
		GCPEndpoint: dead, AzureEndpoint: dead, AlibabaEndpoint: dead, TencentEndpoint: dead, Timeout: 200 * time.Millisecond})
	if last := d.Reasons[len(d.Reasons)-1]; !strings.Contains(last, "no metadata service answered") {
		t.Fatalf("nothing answering: %+v", d)
	}
}
