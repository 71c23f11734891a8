// Package tencent watches Tencent Cloud CVM instance metadata
// (http://metadata.tencentyun.com/latest/meta-data/) for the spot
// instance's reclaim time, spot/termination-time: not found while there is
// no notice, then a time in UTC+8 about two minutes before the instance is
// reclaimed.
package tencent

import (
	"context"
	"log/slog"
	"net/http"
	"strings"
	"time"

	"github.com/preemptd/preemptd/agent"
	"github.com/preemptd/preemptd/internal/direct"
	"github.com/preemptd/preemptd/providers/internal/termtime"
)

// DefaultEndpoint is the metadata service's name on every CVM instance.
const DefaultEndpoint = "http://metadata.tencentyun.com"

// PathTermination is the spot reclaim time, under /latest/meta-data/.
const PathTermination = "spot/termination-time"

// Config configures the provider.
type Config struct {
	Endpoint     string // default http://metadata.tencentyun.com
	PollInterval time.Duration
	Logger       *slog.Logger
	OnError      func()
	Now          func() time.Time
}

// Provider polls the termination time.
type Provider struct {
	*termtime.Watcher
	ep string
	hc *http.Client
}

// New builds the provider.
func New(cfg Config) *Provider {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	ep := strings.TrimSuffix(cfg.Endpoint, "/")
	if ep == "" {
		ep = DefaultEndpoint
	}
	p := &Provider{ep: ep, hc: direct.Client(5 * time.Second)}
	p.Watcher = &termtime.Watcher{Path: ep + "/latest/meta-data/" + PathTermination,
		Get:   func(ctx context.Context) ([]byte, error) { return p.get(ctx, PathTermination) },
		Parse: ParseTerminationTime, Poll: cfg.PollInterval, Log: cfg.Logger.With("provider", "tencent"), OnError: cfg.OnError, Now: cfg.Now}
	return p
}

func (p *Provider) get(ctx context.Context, path string) ([]byte, error) {
	b, _, err := termtime.Get(ctx, p.hc, http.MethodGet, p.ep+"/latest/meta-data/"+path, nil)
	return b, err
}

// Identity implements agent.Identifier from the instance metadata.
func (p *Provider) Identity(ctx context.Context) (agent.Instance, error) {
	return termtime.Identity(ctx, "tencent", p.get, termtime.Paths{ID: "instance-id", Type: "instance/instance-type", Zone: "placement/zone", Region: "placement/region"})
}
