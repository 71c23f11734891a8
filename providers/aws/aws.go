// Package aws watches the EC2 instance metadata service (IMDSv2, through
// aws-sdk-go-v2's imds client) for spot interruption notices, rebalance
// recommendations, scheduled maintenance and the Auto Scaling lifecycle
// state, and turns them into agent notices.
package aws

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"time"

	awssdk "github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/aws/retry"
	"github.com/aws/aws-sdk-go-v2/feature/ec2/imds"

	"github.com/preemptd/preemptd/agent"
	"github.com/preemptd/preemptd/internal/direct"
	"github.com/preemptd/preemptd/providers/internal/emit"
	"github.com/preemptd/preemptd/providers/internal/outage"
)

// Config configures the provider.
type Config struct {
	// Endpoint overrides the SDK's own choice (AWS_EC2_METADATA_SERVICE_ENDPOINT,
	// then http://169.254.169.254).
	Endpoint     string
	PollInterval time.Duration
	// SlowPollInterval is how often the slow-moving documents (scheduled
	// events, days ahead; the Auto Scaling lifecycle state) are read; the
	// spot interruption notice and the rebalance recommendation are read
	// every PollInterval.
	SlowPollInterval time.Duration
	LifecycleWindow  time.Duration
	// IMDSv1Fallback lets requests go without a token when IMDSv2 fails.
	IMDSv1Fallback bool
	Logger         *slog.Logger
	Now            func() time.Time
	// OnError is called on every failed metadata request.
	OnError func()
}

// Provider polls IMDS.
type Provider struct {
	cfg    Config
	client *imds.Client
	log    *slog.Logger
	out    *outage.Tracker
	now    func() time.Time
	// active holds the IDs currently announced, by source path.
	active map[string]map[string]agent.Notice
	// slowAt is when the slow paths were last read.
	slowAt time.Time
}

// New builds the provider and its IMDS client.
func New(cfg Config) *Provider {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.PollInterval <= 0 {
		cfg.PollInterval = time.Second
	}
	if cfg.SlowPollInterval <= 0 {
		cfg.SlowPollInterval = max(cfg.PollInterval, 5*time.Second)
	}
	cfg.SlowPollInterval = max(cfg.SlowPollInterval, cfg.PollInterval)
	log := cfg.Logger.With("provider", "aws")
	return &Provider{
		cfg:    cfg,
		client: NewClient(cfg.Endpoint, cfg.IMDSv1Fallback),
		log:    log,
		out:    outage.New(log, time.Minute, cfg.OnError),
		now:    cfg.Now,
		active: map[string]map[string]agent.Notice{},
	}
}

// NewClient returns an IMDS client: IMDSv2 only unless fallback, one retry
// (enough for the SDK's refresh of an expired token on 401), short backoff.
func NewClient(endpoint string, fallback bool) *imds.Client {
	return imds.New(imds.Options{
		Endpoint:       endpoint,
		HTTPClient:     direct.Client(0), // never through HTTP(S)_PROXY; each call has its own timeout
		EnableFallback: awssdk.BoolTernary(fallback),
		// Our own short backoff, not the SDK's one-second cap.
		DisableDefaultMaxBackoff: true,
		Retryer: retry.NewStandard(func(o *retry.StandardOptions) {
			o.MaxAttempts = 2
			o.MaxBackoff = 200 * time.Millisecond
		}),
	})
}

// Paths polled, in order of urgency.
const (
	PathInstanceAction = "spot/instance-action"
	PathRebalance      = "events/recommendations/rebalance"
	PathScheduled      = "events/maintenance/scheduled"
	PathLifecycle      = "autoscaling/target-lifecycle-state"
)

// errNotFound is a 404: the document does not exist, i.e. no notice.
var errNotFound = errors.New("not found")

// get fetches a metadata path; errNotFound for 404.
func (p *Provider) get(ctx context.Context, path string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, requestTimeout(p.cfg.PollInterval))
	defer cancel()
	out, err := p.client.GetMetadata(ctx, &imds.GetMetadataInput{Path: path})
	if err != nil {
		var se interface{ HTTPStatusCode() int }
		if errors.As(err, &se) && se.HTTPStatusCode() == http.StatusNotFound {
			return nil, errNotFound
		}
		return nil, err
	}
	defer out.Content.Close()
	b, err := io.ReadAll(io.LimitReader(out.Content, 1<<20))
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	return b, nil
}

func requestTimeout(poll time.Duration) time.Duration {
	return min(max(2*poll, 2*time.Second), 5*time.Second)
}

// Watch implements agent.Watcher.
func (p *Provider) Watch(ctx context.Context, out chan<- agent.Notice) error {
	p.log.Info("watching instance metadata", "endpoint", p.endpointForLog(), "poll_interval", p.cfg.PollInterval.String())
	t := time.NewTicker(p.cfg.PollInterval)
	defer t.Stop()
	for {
		p.Poll(ctx, out)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
	}
}

func (p *Provider) endpointForLog() string {
	if p.cfg.Endpoint != "" {
		return p.cfg.Endpoint
	}
	return "sdk default"
}

// Poll reads the fast paths, and the slow ones when SlowPollInterval has
// passed, all at once so that one slow path does not delay the others, and
// sends what changed.
func (p *Provider) Poll(ctx context.Context, out chan<- agent.Notice) {
	paths := []string{PathInstanceAction, PathRebalance}
	if now := p.now(); p.cfg.SlowPollInterval == p.cfg.PollInterval || p.slowAt.IsZero() ||
		now.Sub(p.slowAt) >= p.cfg.SlowPollInterval-p.cfg.PollInterval/2 {
		p.slowAt = now
		paths = append(paths, PathScheduled, PathLifecycle)
	}
	results := make([][]agent.Notice, len(paths))
	errs := make([]error, len(paths))
	var wg sync.WaitGroup
	for i, path := range paths {
		wg.Go(func() { results[i], errs[i] = p.read(ctx, path) })
	}
	wg.Wait()
	if ctx.Err() != nil {
		return
	}
	failed := false
	for i, path := range paths {
		if errs[i] != nil {
			failed = true
			p.out.Fail(path, errs[i])
			continue // an outage never changes what is announced
		}
		p.reconcile(ctx, path, results[i], out)
	}
	if !failed {
		p.out.OK()
	}
}

// read returns the notices a path holds now (nil when it holds none).
func (p *Provider) read(ctx context.Context, path string) ([]agent.Notice, error) {
	b, err := p.get(ctx, path)
	if errors.Is(err, errNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	now := p.now()
	switch path {
	case PathInstanceAction:
		n, err := ParseInstanceAction(b, now)
		return []agent.Notice{n}, err
	case PathRebalance:
		n, err := ParseRebalance(b, now)
		return []agent.Notice{n}, err
	case PathScheduled:
		return ParseScheduled(b, now)
	case PathLifecycle:
		kind, err := LifecycleKind(b)
		if err != nil || kind == "" {
			return nil, err
		}
		state := strings.TrimSpace(string(b))
		return []agent.Notice{{Provider: "aws", Kind: kind, ID: IDLifecycle + "/" + state,
			Action: state, NoticedAt: now, Deadline: now.Add(p.cfg.LifecycleWindow),
			Raw: agent.RawString(state)}}, nil
	}
	return nil, fmt.Errorf("unknown path %s", path)
}

// reconcile sends new notices, notices whose deadline moved (a scheduled
// event rescheduled, either way), and withdraws those that vanished from path.
func (p *Provider) reconcile(ctx context.Context, path string, now []agent.Notice, out chan<- agent.Notice) {
	prev := p.active[path]
	next := map[string]agent.Notice{}
	for _, n := range now {
		if n.Withdrawn {
			continue
		}
		old, seen := prev[n.ID]
		switch {
		case !seen:
			emit.Send(ctx, out, n)
		case path == PathLifecycle:
			n = old // its deadline is the window from when it was first seen
		case moved(path, old, n):
			emit.Send(ctx, out, n)
		default:
			n = old
		}
		next[n.ID] = n
	}
	for id, n := range prev {
		if _, still := next[id]; !still {
			n.Withdrawn = true
			n.NoticedAt = p.now()
			emit.Send(ctx, out, n)
		}
	}
	p.active[path] = next
}

// moved reports whether a notice seen before came back with news: a
// scheduled event with another deadline or window (AWS reschedules them,
// usually later), any other notice with an earlier deadline (a later one
// is never trusted over the first).
func moved(path string, old, n agent.Notice) bool {
	if path == PathScheduled {
		return !n.Deadline.Equal(old.Deadline) || !n.WindowEnd.Equal(old.WindowEnd)
	}
	return !n.Deadline.IsZero() && (old.Deadline.IsZero() || n.Deadline.Before(old.Deadline))
}

// Identity implements agent.Identifier from the instance metadata.
func (p *Provider) Identity(ctx context.Context) (agent.Instance, error) {
	inst := agent.Instance{Provider: "aws"}
	for path, dst := range map[string]*string{"instance-id": &inst.ID, "instance-type": &inst.Type,
		"placement/availability-zone": &inst.Zone, "placement/region": &inst.Region, "instance-life-cycle": &inst.Lifecycle} {
		b, err := p.get(ctx, path)
		if err != nil {
			return inst, fmt.Errorf("%s: %w", path, err)
		}
		*dst = strings.TrimSpace(string(b))
	}
	return inst, nil
}
