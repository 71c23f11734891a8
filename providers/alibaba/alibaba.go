// Package alibaba watches Alibaba Cloud ECS instance metadata
// (http://100.100.100.200/latest/meta-data/) for the spot instance's
// release time, instance/spot/termination-time, set about five minutes
// before the instance is released. Requests carry a metadata token
// (PUT /latest/api/token, then the X-aliyun-ecs-metadata-token header), which
// the security hardening mode requires; where the token endpoint does not
// exist the requests go without one, as in normal mode.
package alibaba

import (
	"context"
	"errors"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/preemptd/preemptd/agent"
	"github.com/preemptd/preemptd/internal/direct"
	"github.com/preemptd/preemptd/providers/internal/termtime"
)

// DefaultEndpoint is the metadata service's address on every ECS instance.
const DefaultEndpoint = "http://100.100.100.200"

// The metadata token: its path, headers and lifetime (the longest allowed,
// six hours).
const (
	PathToken   = "/latest/api/token"
	HeaderTTL   = "X-aliyun-ecs-metadata-token-ttl-seconds"
	HeaderToken = "X-aliyun-ecs-metadata-token"
	tokenTTL    = 6 * time.Hour
)

// PathTermination is the spot release time, under /latest/meta-data/.
const PathTermination = "instance/spot/termination-time"

// Config configures the provider.
type Config struct {
	Endpoint     string // default http://100.100.100.200
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

	mu       sync.Mutex
	token    string
	tokenExp time.Time
	noToken  bool // the token endpoint does not exist here: normal mode only
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
		Parse: ParseTerminationTime, Poll: cfg.PollInterval, Log: cfg.Logger.With("provider", "alibaba"), OnError: cfg.OnError, Now: cfg.Now}
	return p
}

// tokenHeader is the header of a current token (nil where the service has
// no token endpoint).
func (p *Provider) tokenHeader(ctx context.Context) (http.Header, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.noToken {
		return nil, nil
	}
	if p.token != "" && time.Until(p.tokenExp) > time.Minute {
		return http.Header{HeaderToken: {p.token}}, nil
	}
	b, status, err := termtime.Get(ctx, p.hc, http.MethodPut, p.ep+PathToken, http.Header{HeaderTTL: {strconv.Itoa(int(tokenTTL.Seconds()))}})
	switch {
	case errors.Is(err, termtime.ErrNotFound) || status == http.StatusMethodNotAllowed:
		p.noToken = true // an older metadata service: tokens do not exist, normal mode
		return nil, nil
	case err != nil:
		return nil, err
	}
	p.token, p.tokenExp = strings.TrimSpace(string(b)), time.Now().Add(tokenTTL)
	return http.Header{HeaderToken: {p.token}}, nil
}

// get reads path under /latest/meta-data/ with a token; a token refused
// (401/403: expired, or the service restarted) is fetched again once.
func (p *Provider) get(ctx context.Context, path string) ([]byte, error) {
	for try := 0; ; try++ {
		hdr, err := p.tokenHeader(ctx)
		if err != nil {
			return nil, err
		}
		b, status, err := termtime.Get(ctx, p.hc, http.MethodGet, p.ep+"/latest/meta-data/"+path, hdr)
		if (status == http.StatusUnauthorized || status == http.StatusForbidden) && hdr != nil && try == 0 {
			p.mu.Lock()
			p.token = ""
			p.mu.Unlock()
			continue
		}
		return b, err
	}
}

// Identity implements agent.Identifier from the instance metadata.
func (p *Provider) Identity(ctx context.Context) (agent.Instance, error) {
	return termtime.Identity(ctx, "alibaba", p.get, termtime.Paths{ID: "instance-id", Type: "instance/instance-type", Zone: "zone-id", Region: "region-id"})
}
