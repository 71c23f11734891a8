// Package azure watches Azure Scheduled Events on the instance metadata
// service, keeps only the events addressed to this VM, and acknowledges them
// (StartRequests) once the emergency path is over.
package azure

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/preemptd/preemptd/agent"
	"github.com/preemptd/preemptd/internal/direct"
	"github.com/preemptd/preemptd/providers/internal/emit"
	"github.com/preemptd/preemptd/providers/internal/outage"
)

// APIVersion of Scheduled Events used.
const APIVersion = "2020-07-01"

// Paths on the metadata service.
const (
	PathEvents = "/metadata/scheduledevents?api-version=" + APIVersion
	PathVMName = "/metadata/instance/compute/name?api-version=2021-02-01&format=text"
)

// Config configures the provider.
type Config struct {
	Endpoint     string
	PollInterval time.Duration
	// Ack says which events get StartRequests after the emergency path:
	// "mine" (Resources name only this VM), "all", or "off".
	Ack    string
	Logger *slog.Logger
	Now    func() time.Time
	// OnError is called on every failed metadata request.
	OnError func()
	// HTTPClient defaults to one that never goes through a proxy; every
	// request carries its own timeout.
	HTTPClient *http.Client
	// FirstTimeout bounds the first Scheduled Events request, which
	// enables the service and can take up to two minutes (default 2m5s).
	FirstTimeout time.Duration
}

// Provider polls Scheduled Events.
type Provider struct {
	cfg    Config
	hc     *http.Client
	log    *slog.Logger
	now    func() time.Time
	out    *outage.Tracker
	vm     string
	active map[string]agent.Notice
	incarn int
	// enabled is set once Scheduled Events has answered: the first request
	// may take minutes, the later ones a poll's worth.
	enabled bool
	// unknown are the event IDs of unknown types already logged.
	unknown map[string]bool

	mu     sync.Mutex
	acked  map[string]bool
	events map[string]Event // this VM's events, by ID, for Ack
}

// New builds the provider.
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
	if cfg.HTTPClient == nil {
		cfg.HTTPClient = direct.Client(0)
	}
	if cfg.FirstTimeout <= 0 {
		cfg.FirstTimeout = 2*time.Minute + 5*time.Second
	}
	if cfg.Ack == "" {
		cfg.Ack = "mine"
	}
	cfg.Endpoint = strings.TrimSuffix(cfg.Endpoint, "/")
	log := cfg.Logger.With("provider", "azure")
	return &Provider{cfg: cfg, hc: cfg.HTTPClient, log: log, now: cfg.Now, out: outage.New(log, time.Minute, cfg.OnError),
		active: map[string]agent.Notice{}, acked: map[string]bool{}, events: map[string]Event{}, unknown: map[string]bool{},
		incarn: -1}
}

// requestTimeout bounds one ordinary request.
func (p *Provider) requestTimeout() time.Duration {
	return min(max(2*p.cfg.PollInterval, 2*time.Second), 5*time.Second)
}

func (p *Provider) do(ctx context.Context, method, path string, body []byte) ([]byte, error) {
	return p.doWithin(ctx, p.requestTimeout(), method, path, body)
}

func (p *Provider) doWithin(ctx context.Context, timeout time.Duration, method, path string, body []byte) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var r io.Reader
	if body != nil {
		r = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, p.cfg.Endpoint+path, r)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Metadata", "true")
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := p.hc.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return nil, err
	}
	if resp.StatusCode/100 != 2 {
		return nil, fmt.Errorf("%s %s: HTTP %d %s", method, path, resp.StatusCode, emit.Truncate(strings.TrimSpace(string(b)), 80))
	}
	return b, nil
}

// VMName asks the metadata service for this VM's name.
func (p *Provider) VMName(ctx context.Context) (string, error) {
	b, err := p.do(ctx, http.MethodGet, PathVMName, nil)
	if err != nil {
		return "", err
	}
	name := strings.TrimSpace(string(b))
	if name == "" || strings.ContainsAny(name, "{}<>\n ") {
		return "", fmt.Errorf("compute/name: unexpected %q", emit.Truncate(name, 40))
	}
	return name, nil
}

// Watch implements agent.Watcher. The first request enables the service,
// which Azure says can take up to two minutes; failures until then are
// outages like any other.
func (p *Provider) Watch(ctx context.Context, out chan<- agent.Notice) error {
	p.log.Info("watching scheduled events", "endpoint", p.cfg.Endpoint, "poll_interval", p.cfg.PollInterval.String())
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

// Poll reads the events once and sends what changed.
func (p *Provider) Poll(ctx context.Context, out chan<- agent.Notice) {
	if p.vm == "" {
		name, err := p.VMName(ctx)
		if err != nil {
			if ctx.Err() == nil {
				p.out.Fail("compute/name", err)
			}
			return
		}
		p.vm = name
		p.log.Info("vm name", "name", name)
	}
	timeout := p.requestTimeout()
	if !p.enabled {
		// The first request enables Scheduled Events: Azure says it can take
		// up to two minutes to answer. Give it that long, once.
		timeout = p.cfg.FirstTimeout
	}
	b, err := p.doWithin(ctx, timeout, http.MethodGet, PathEvents, nil)
	if err == nil {
		p.enabled = true
		var doc Document
		doc, err = ParseDocument(b)
		if err == nil {
			err = p.reconcile(ctx, doc, out)
		}
	}
	if err != nil {
		if ctx.Err() == nil {
			p.out.Fail("scheduledevents", err)
		}
		return
	}
	p.out.OK()
}

func (p *Provider) reconcile(ctx context.Context, doc Document, out chan<- agent.Notice) error {
	if doc.DocumentIncarnation == p.incarn {
		return nil // nothing changed
	}
	now := p.now()
	notices, unknown, err := ForVM(doc, p.vm, now)
	if err != nil {
		return err
	}
	for _, e := range unknown {
		if !p.unknown[e.EventID] {
			p.unknown[e.EventID] = true
			p.log.Warn("scheduled event of a type preemptd does not know; ignored (the others are acted on)",
				"id", e.EventID, "type", e.EventType, "not_before", e.NotBefore)
		}
	}
	p.incarn = doc.DocumentIncarnation
	p.mu.Lock()
	for _, e := range doc.Events {
		if names(e, p.vm) {
			p.events[e.EventID] = e
		}
	}
	p.mu.Unlock()
	seen := map[string]bool{}
	for _, n := range notices {
		seen[n.ID] = true
		if _, ok := p.active[n.ID]; ok {
			continue
		}
		p.active[n.ID] = n
		emit.Send(ctx, out, n)
	}
	for id, n := range p.active {
		if !seen[id] {
			delete(p.active, id)
			n.Withdrawn, n.NoticedAt = true, now
			emit.Send(ctx, out, n)
		}
	}
	return nil
}

// ErrShared is returned by Ack for an event that names other VMs too: an
// ack would let the platform proceed for every one of them (azure.ack: all
// allows it).
var ErrShared = errors.New("event names other VMs too; not acknowledged (azure.ack: all would release it for all of them)")

// Ack implements agent.Acker: POST StartRequests for the event, once, when
// azure.ack allows it.
func (p *Provider) Ack(ctx context.Context, n agent.Notice) error {
	if p.cfg.Ack == "off" || n.Provider != "azure" {
		return nil
	}
	p.mu.Lock()
	done := p.acked[n.ID]
	ev, known := p.events[n.ID]
	p.mu.Unlock()
	if done {
		return nil
	}
	if p.cfg.Ack != "all" && (!known || !OnlyFor(ev, p.vm)) {
		p.log.Info("not acknowledging a scheduled event shared with other VMs", "id", n.ID, "resources", ev.Resources)
		return fmt.Errorf("ack %s: %w", n.ID, ErrShared)
	}
	var err error
	for attempt := range 3 {
		if _, err = p.do(ctx, http.MethodPost, PathEvents, StartRequests(n.ID)); err == nil {
			p.mu.Lock()
			p.acked[n.ID] = true
			p.mu.Unlock()
			return nil
		}
		if errors.Is(ctx.Err(), context.DeadlineExceeded) {
			break
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("ack %s: %w", n.ID, err)
		case <-time.After(time.Duration(attempt+1) * 200 * time.Millisecond):
		}
	}
	return fmt.Errorf("ack %s: %w", n.ID, err)
}

// PathCompute is the instance's compute metadata.
const PathCompute = "/metadata/instance/compute?api-version=2021-02-01"

// Identity implements agent.Identifier from the instance metadata.
func (p *Provider) Identity(ctx context.Context) (agent.Instance, error) {
	b, err := p.do(ctx, http.MethodGet, PathCompute, nil)
	if err != nil {
		return agent.Instance{Provider: "azure"}, err
	}
	var c struct {
		VMID     string `json:"vmId"`
		VMSize   string `json:"vmSize"`
		Location string `json:"location"`
		Zone     string `json:"zone"`
		Priority string `json:"priority"`
	}
	if err := json.Unmarshal(b, &c); err != nil {
		return agent.Instance{Provider: "azure"}, fmt.Errorf("compute: %w", err)
	}
	inst := agent.Instance{Provider: "azure", ID: c.VMID, Type: c.VMSize, Region: c.Location, Zone: c.Zone, Lifecycle: "on-demand"}
	if c.Zone != "" {
		inst.Zone = c.Location + "-" + c.Zone
	}
	if strings.EqualFold(c.Priority, "Spot") || strings.EqualFold(c.Priority, "Low") {
		inst.Lifecycle = "spot"
	}
	return inst, nil
}
