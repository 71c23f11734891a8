// Package providers chooses and builds the notice source: Detect finds the
// cloud from DMI first (no network), then short metadata probes, and falls
// back to the local provider; Build makes the chosen one from configuration.
package providers

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/preemptd/preemptd/agent"
	"github.com/preemptd/preemptd/agent/config"
	"github.com/preemptd/preemptd/internal/direct"
	"github.com/preemptd/preemptd/providers/alibaba"
	"github.com/preemptd/preemptd/providers/aws"
	"github.com/preemptd/preemptd/providers/azure"
	"github.com/preemptd/preemptd/providers/gcp"
	"github.com/preemptd/preemptd/providers/local"
	"github.com/preemptd/preemptd/providers/tencent"
)

// azureAssetTag is the chassis asset tag of every Azure VM; plain Hyper-V
// has Microsoft's vendor string but not this tag.
const azureAssetTag = "7783-7084-3265-9085-8269-3286-77"

// DetectConfig says where to look.
type DetectConfig struct {
	// DMIRoot defaults to /sys/class/dmi/id.
	DMIRoot string
	// Endpoints of the metadata services; empty means each cloud's default.
	AWSEndpoint, GCPEndpoint, AzureEndpoint, AlibabaEndpoint, TencentEndpoint string
	// Timeout bounds each probe; default 1s.
	Timeout time.Duration
	// SkipProbes stops after DMI.
	SkipProbes bool
}

// Detection is Detect's answer and its reasons.
type Detection struct {
	Provider string   `json:"provider"`
	Reasons  []string `json:"reasons"`
}

// Detect finds the cloud this machine runs on.
func Detect(ctx context.Context, cfg DetectConfig) Detection {
	if cfg.DMIRoot == "" {
		cfg.DMIRoot = "/sys/class/dmi/id"
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = time.Second
	}
	var d Detection
	if p, why := fromDMI(cfg.DMIRoot); p != "" {
		d.Provider = p
		d.Reasons = append(d.Reasons, why)
		return d
	}
	d.Reasons = append(d.Reasons, "DMI ("+cfg.DMIRoot+") names no known cloud")
	if cfg.SkipProbes {
		d.Provider = "local"
		d.Reasons = append(d.Reasons, "metadata probes skipped; using local")
		return d
	}
	type probe struct {
		name string
		fn   func(context.Context, *http.Client) (bool, string)
	}
	probes := []probe{
		{"aws", func(ctx context.Context, hc *http.Client) (bool, string) { return probeAWS(ctx, hc, cfg.AWSEndpoint) }},
		{"gcp", func(ctx context.Context, hc *http.Client) (bool, string) { return probeGCP(ctx, hc, cfg.GCPEndpoint) }},
		{"azure", func(ctx context.Context, hc *http.Client) (bool, string) {
			return probeAzure(ctx, hc, cfg.AzureEndpoint)
		}},
		{"alibaba", func(ctx context.Context, hc *http.Client) (bool, string) {
			return probeAlibaba(ctx, hc, cfg.AlibabaEndpoint)
		}},
		{"tencent", func(ctx context.Context, hc *http.Client) (bool, string) {
			return probeTencent(ctx, hc, cfg.TencentEndpoint)
		}},
	}
	ok := make([]bool, len(probes))
	why := make([]string, len(probes))
	hc := direct.Client(cfg.Timeout)
	var wg sync.WaitGroup
	for i, p := range probes {
		wg.Go(func() {
			pctx, cancel := context.WithTimeout(ctx, cfg.Timeout)
			defer cancel()
			ok[i], why[i] = p.fn(pctx, hc)
		})
	}
	wg.Wait()
	for i, p := range probes {
		d.Reasons = append(d.Reasons, p.name+" probe: "+why[i])
		if ok[i] && d.Provider == "" {
			d.Provider = p.name
		}
	}
	if d.Provider == "" {
		d.Provider = "local"
		answered := slices.ContainsFunc(why, func(w string) bool { return strings.Contains(w, "answered") })
		if answered {
			d.Reasons = append(d.Reasons, "something answered at the metadata address, but not as any cloud's metadata service; using local")
		} else {
			d.Reasons = append(d.Reasons, "no metadata service answered; using local")
		}
	}
	return d
}

func readDMI(root, name string) string {
	b, err := os.ReadFile(filepath.Join(root, name))
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

func fromDMI(root string) (string, string) {
	sys, bios := readDMI(root, "sys_vendor"), readDMI(root, "bios_vendor")
	product, biosVer := readDMI(root, "product_name"), readDMI(root, "bios_version")
	switch {
	case sys == "Amazon EC2" || bios == "Amazon EC2":
		return "aws", "DMI vendor is Amazon EC2"
	case strings.Contains(strings.ToLower(biosVer), "amazon"):
		return "aws", "DMI bios_version is " + biosVer
	case product == "Google Compute Engine" || sys == "Google":
		return "gcp", "DMI product is Google Compute Engine"
	case sys == "Microsoft Corporation" && readDMI(root, "chassis_asset_tag") == azureAssetTag:
		return "azure", "DMI vendor is Microsoft with Azure's chassis asset tag"
	case sys == "Alibaba Cloud" || strings.HasPrefix(product, "Alibaba Cloud ECS"):
		return "alibaba", "DMI vendor is Alibaba Cloud"
	case sys == "Tencent Cloud":
		return "tencent", "DMI vendor is Tencent Cloud"
	}
	return "", ""
}

func endpoint(configured, env, def string) string {
	if configured != "" {
		return strings.TrimSuffix(configured, "/")
	}
	if env != "" {
		if v := os.Getenv(env); v != "" {
			return strings.TrimSuffix(v, "/")
		}
	}
	return def
}

func probeAWS(ctx context.Context, hc *http.Client, ep string) (bool, string) {
	ep = endpoint(ep, "AWS_EC2_METADATA_SERVICE_ENDPOINT", "http://169.254.169.254")
	req, _ := http.NewRequestWithContext(ctx, http.MethodPut, ep+"/latest/api/token", nil)
	req.Header.Set("X-aws-ec2-metadata-token-ttl-seconds", "60")
	return answer(hc, req, func(r *http.Response, body string) bool { return r.StatusCode == 200 && body != "" })
}

func probeGCP(ctx context.Context, hc *http.Client, ep string) (bool, string) {
	host := endpoint(ep, "GCE_METADATA_HOST", "169.254.169.254")
	if !strings.Contains(host, "://") {
		host = "http://" + host
	}
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, host+"/computeMetadata/v1/instance/id", nil)
	req.Header.Set("Metadata-Flavor", "Google")
	return answer(hc, req, func(r *http.Response, _ string) bool {
		return r.StatusCode == 200 && r.Header.Get("Metadata-Flavor") == "Google"
	})
}

func probeAzure(ctx context.Context, hc *http.Client, ep string) (bool, string) {
	ep = endpoint(ep, "", "http://169.254.169.254")
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, ep+azure.PathVMName, nil)
	req.Header.Set("Metadata", "true")
	return answer(hc, req, func(r *http.Response, body string) bool { return r.StatusCode == 200 && body != "" })
}

// probeAlibaba asks for a metadata token, as the hardened mode requires
// (a normal-mode service hands one out as well), then for the instance ID.
func probeAlibaba(ctx context.Context, hc *http.Client, ep string) (bool, string) {
	ep = endpoint(ep, "", alibaba.DefaultEndpoint)
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, ep+"/latest/meta-data/instance-id", nil)
	treq, _ := http.NewRequestWithContext(ctx, http.MethodPut, ep+alibaba.PathToken, nil)
	treq.Header.Set(alibaba.HeaderTTL, "60")
	if resp, err := hc.Do(treq); err == nil {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		resp.Body.Close()
		if resp.StatusCode == http.StatusOK {
			req.Header.Set(alibaba.HeaderToken, strings.TrimSpace(string(b)))
		}
	}
	return answer(hc, req, func(r *http.Response, body string) bool {
		return r.StatusCode == 200 && strings.HasPrefix(body, "i-")
	})
}

func probeTencent(ctx context.Context, hc *http.Client, ep string) (bool, string) {
	ep = endpoint(ep, "", tencent.DefaultEndpoint)
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, ep+"/latest/meta-data/instance-id", nil)
	return answer(hc, req, func(r *http.Response, body string) bool {
		return r.StatusCode == 200 && strings.HasPrefix(body, "ins-")
	})
}

func answer(hc *http.Client, req *http.Request, good func(*http.Response, string) bool) (bool, string) {
	resp, err := hc.Do(req)
	if err != nil {
		return false, "no answer from " + req.URL.Host
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	if good(resp, strings.TrimSpace(string(b))) {
		return true, "answered at " + req.URL.Host
	}
	return false, fmt.Sprintf("%s answered HTTP %d, not as this cloud", req.URL.Host, resp.StatusCode)
}

// Built is a provider and what else it offers.
type Built struct {
	Watcher agent.Watcher
	// Acker is nil for providers that acknowledge nothing.
	Acker agent.Acker
	// Identifier is nil for the local provider.
	Identifier agent.Identifier
}

// Build makes the named provider (not "auto") from cfg; onError, if not
// nil, is called on every failed metadata request.
func Build(name string, cfg *config.Config, log *slog.Logger, onError func()) (Built, error) {
	poll := cfg.PollInterval.D()
	switch name {
	case "aws":
		p := aws.New(aws.Config{Endpoint: cfg.AWS.Endpoint, PollInterval: poll, SlowPollInterval: cfg.AWS.SlowPollInterval.D(),
			LifecycleWindow: cfg.AWS.LifecycleWindow.D(), IMDSv1Fallback: cfg.AWS.IMDSv1Fallback, Logger: log, OnError: onError})
		return Built{Watcher: p, Identifier: p}, nil
	case "gcp":
		p := gcp.New(gcp.Config{Endpoint: cfg.GCP.Endpoint, PreemptWindow: cfg.GCP.PreemptWindow.D(),
			MaintenanceWindow: cfg.GCP.MaintenanceWindow.D(), Logger: log, OnError: onError})
		return Built{Watcher: p, Identifier: p}, nil
	case "azure":
		p := azure.New(azure.Config{Endpoint: cfg.Azure.Endpoint, PollInterval: poll, Ack: cfg.Azure.Ack, Logger: log, OnError: onError})
		return Built{Watcher: p, Acker: p, Identifier: p}, nil
	case "alibaba":
		p := alibaba.New(alibaba.Config{Endpoint: cfg.Alibaba.Endpoint, PollInterval: poll, Logger: log, OnError: onError})
		return Built{Watcher: p, Identifier: p}, nil
	case "tencent":
		p := tencent.New(tencent.Config{Endpoint: cfg.Tencent.Endpoint, PollInterval: poll, Logger: log, OnError: onError})
		return Built{Watcher: p, Identifier: p}, nil
	case "local":
		return Built{Watcher: local.New(cfg.TriggerFile(), log)}, nil
	}
	return Built{}, fmt.Errorf("provider: %q is not one of aws, gcp, azure, alibaba, tencent, local", name)
}
