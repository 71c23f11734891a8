// Package gcp watches the Compute Engine metadata server, through
// cloud.google.com/go/compute/metadata's hanging GETs (wait_for_change with
// ETags, on a client with no timeout), for preemption and host maintenance.
package gcp

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"time"

	"cloud.google.com/go/compute/metadata"

	"github.com/preemptd/preemptd/agent"
	"github.com/preemptd/preemptd/internal/direct"
	"github.com/preemptd/preemptd/providers/internal/emit"
	"github.com/preemptd/preemptd/providers/internal/outage"
)

// Metadata paths watched.
const (
	PathPreempted   = "instance/preempted"
	PathMaintenance = "instance/maintenance-event"
	// PathUpcoming is planned maintenance, announced days ahead on GPU VMs
	// (404 when none is planned); read every UpcomingPoll.
	PathUpcoming = "instance/upcoming-maintenance"
)

// UpcomingPoll is how often instance/upcoming-maintenance is read: it
// announces maintenance days ahead, so a minute's delay costs nothing.
const UpcomingPoll = time.Minute

// Maintenance event values.
const (
	MaintenanceNone      = "NONE"
	MaintenanceMigrate   = "MIGRATE_ON_HOST_MAINTENANCE"
	MaintenanceTerminate = "TERMINATE_ON_HOST_MAINTENANCE"
)

// Long-poll timing: the server answers a hanging GET after LongPoll
// (timeout_sec) even when nothing changed, and a request that has not
// answered HangSlack later is abandoned (a half-open connection), as
// Google's guest agent does with 60 s and 70 s; preemptd uses 10 s so that a
// lost connection delays a notice by well under the 30 s window.
const (
	DefaultLongPoll = 10 * time.Second
	HangSlack       = 3 * time.Second
)

// Maintenance windows when gcp.maintenance_window is 0: GPU VMs get about an
// hour's notice of TERMINATE_ON_HOST_MAINTENANCE, other VMs about 60 s.
const (
	GPUMaintenanceWindow   = time.Hour
	OtherMaintenanceWindow = 60 * time.Second
)

// Config configures the provider.
type Config struct {
	// Endpoint (host[:port] or URL) overrides GCE_METADATA_HOST.
	Endpoint      string
	PreemptWindow time.Duration
	// MaintenanceWindow is the deadline after TERMINATE_ON_HOST_MAINTENANCE;
	// 0 takes it from the machine (HasGPU).
	MaintenanceWindow time.Duration
	// HasGPU says whether GPUs are attached; default: an NVIDIA PCI device
	// under /sys/bus/pci/devices.
	HasGPU func() bool
	// LongPoll is each hanging GET's timeout_sec (default DefaultLongPoll).
	LongPoll time.Duration
	Logger   *slog.Logger
	Now      func() time.Time
	// OnError is called on every failed metadata request.
	OnError func()
	// UpcomingPoll overrides UpcomingPoll (tests).
	UpcomingPoll time.Duration
}

// Provider subscribes to the metadata server.
type Provider struct {
	cfg    Config
	client *metadata.Client
	log    *slog.Logger
	now    func() time.Time
	out    *outage.Tracker
	// unknown are the maintenance-event values already logged.
	unknown map[string]bool
}

// New builds the provider.
func New(cfg Config) *Provider {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.PreemptWindow <= 0 {
		cfg.PreemptWindow = 30 * time.Second
	}
	if cfg.HasGPU == nil {
		cfg.HasGPU = func() bool { return NVIDIAPCI("/sys/bus/pci/devices") }
	}
	log := cfg.Logger.With("provider", "gcp")
	if cfg.MaintenanceWindow <= 0 {
		cfg.MaintenanceWindow = OtherMaintenanceWindow
		if cfg.HasGPU() {
			cfg.MaintenanceWindow = GPUMaintenanceWindow
		}
		log.Info("host maintenance window taken from the machine", "gpus", cfg.MaintenanceWindow == GPUMaintenanceWindow,
			"window", cfg.MaintenanceWindow.String())
	}
	if cfg.UpcomingPoll <= 0 {
		cfg.UpcomingPoll = UpcomingPoll
	}
	if cfg.LongPoll < time.Second {
		cfg.LongPoll = DefaultLongPoll
	}
	p := &Provider{cfg: cfg, log: log, now: cfg.Now, out: outage.New(log, time.Minute, cfg.OnError), unknown: map[string]bool{}}
	p.client = newClient(cfg.Endpoint, p.out, cfg.LongPoll+HangSlack)
	return p
}

// newClient returns a metadata client whose HTTP client has no overall
// timeout (each call carries its own context; a hanging GET is bounded by
// hangLimit) and that sends to endpoint when it is set. track, if not nil,
// sees every response's outcome.
func newClient(endpoint string, track *outage.Tracker, hangLimit time.Duration) *metadata.Client {
	base := direct.Transport() // never through HTTP(S)_PROXY
	base.ResponseHeaderTimeout = 0
	var rt http.RoundTripper = &hang{next: base, limit: hangLimit}
	if endpoint != "" {
		rt = direct.ToHost(rt, direct.HostOf(endpoint))
	}
	if track != nil {
		rt = &observe{next: rt, track: track}
	}
	return metadata.NewWithOptions(&metadata.Options{Client: &http.Client{Transport: rt}})
}

// hang bounds each hanging GET (wait_for_change) to limit, its timeout_sec
// plus HangSlack: the server answers by timeout_sec, so a request still
// open after that is on a dead connection. The bound is a context deadline,
// so the metadata client returns at once (no sleep) and subscribe
// reconnects.
type hang struct {
	next  http.RoundTripper
	limit time.Duration
}

func (h *hang) RoundTrip(req *http.Request) (*http.Response, error) {
	if req.URL.Query().Get("wait_for_change") != "true" {
		return h.next.RoundTrip(req)
	}
	ctx, cancel := context.WithTimeout(req.Context(), h.limit)
	resp, err := h.next.RoundTrip(req.WithContext(ctx))
	if err != nil {
		cancel()
		return nil, err
	}
	resp.Body = &cancelBody{ReadCloser: resp.Body, cancel: cancel}
	return resp, nil
}

type cancelBody struct {
	io.ReadCloser
	cancel context.CancelFunc
}

func (b *cancelBody) Close() error {
	err := b.ReadCloser.Close()
	b.cancel()
	return err
}

// NVIDIAPCI reports whether an NVIDIA device (vendor 0x10de) is on the PCI
// bus under root: GPUs attached, driver or not.
func NVIDIAPCI(root string) bool {
	vendors, _ := filepath.Glob(filepath.Join(root, "*", "vendor"))
	for _, v := range vendors {
		if b, err := os.ReadFile(v); err == nil && strings.TrimSpace(string(b)) == "0x10de" {
			return true
		}
	}
	return false
}

// observe reports failures (errors and 5xx) to the outage tracker, since the
// metadata client retries them silently (success is reported once a value
// parses), and turns an answer that lacks
// "Metadata-Flavor: Google" (not the metadata server: a proxy, a captive
// portal) into a 502, so that its body is never read as a value.
type observe struct {
	next  http.RoundTripper
	track *outage.Tracker
}

func (o *observe) RoundTrip(req *http.Request) (*http.Response, error) {
	resp, err := o.next.RoundTrip(req)
	switch {
	case err != nil:
		if req.Context().Err() == nil {
			o.track.Fail(req.URL.Path, err)
		}
	case resp.StatusCode >= 500:
		o.track.Fail(req.URL.Path, fmt.Errorf("HTTP %d", resp.StatusCode))
	case resp.Header.Get("Metadata-Flavor") != "Google":
		o.track.Fail(req.URL.Path, errNotMetadata)
		resp.Body.Close()
		resp = &http.Response{StatusCode: http.StatusBadGateway, Status: "502 Bad Gateway", Header: http.Header{},
			Body: io.NopCloser(strings.NewReader(errNotMetadata.Error())), Request: req, ProtoMajor: 1, ProtoMinor: 1}
	}
	return resp, err
}

var errNotMetadata = errors.New("answer without Metadata-Flavor: Google; not the metadata server")

// ParsePreempted reads instance/preempted: TRUE or FALSE.
func ParsePreempted(v string) (bool, error) {
	switch strings.TrimSpace(v) {
	case "TRUE":
		return true, nil
	case "FALSE":
		return false, nil
	}
	return false, fmt.Errorf("preempted: unexpected value %q", emit.Truncate(v, 40))
}

// ErrUnknownEvent marks a well-formed maintenance-event value preemptd does
// not know (Google may add values): logged, never a reason to stop watching.
var ErrUnknownEvent = errors.New("unknown maintenance-event value")

var eventValue = regexp.MustCompile(`^[A-Z][A-Z0-9_]{0,63}$`)

// ParseMaintenance reads instance/maintenance-event.
func ParseMaintenance(v string) (string, error) {
	s := strings.TrimSpace(v)
	switch s {
	case MaintenanceNone, MaintenanceMigrate, MaintenanceTerminate:
		return s, nil
	}
	if eventValue.MatchString(s) {
		return s, fmt.Errorf("maintenance-event: %w %q", ErrUnknownEvent, s)
	}
	return "", fmt.Errorf("maintenance-event: unexpected value %q", emit.Truncate(v, 40))
}

// Watch implements agent.Watcher: one hanging GET per path.
func (p *Provider) Watch(ctx context.Context, out chan<- agent.Notice) error {
	p.log.Info("watching metadata server", "endpoint", p.cfg.Endpoint)
	var wg sync.WaitGroup
	wg.Go(func() { p.subscribe(ctx, PathPreempted, p.preempted(ctx, out)) })
	wg.Go(func() { p.subscribe(ctx, PathMaintenance, p.maintenance(ctx, out)) })
	wg.Go(func() { p.upcoming(ctx, out) })
	wg.Wait()
	return ctx.Err()
}

// subscribe keeps a subscription alive. The metadata client returns when its
// first GET fails or the value is deleted, and fn ends it on a value that
// does not parse (a garbage answer would otherwise be re-fetched at once, in
// a loop); start again with backoff.
func (p *Provider) subscribe(ctx context.Context, path string, fn func(v string, ok bool) error) {
	const first = 500 * time.Millisecond
	backoff := first
	for {
		err := p.client.SubscribeWithContext(ctx, path+fmt.Sprintf("?timeout_sec=%d", int(p.cfg.LongPoll/time.Second)), func(_ context.Context, v string, ok bool) error {
			if err := fn(v, ok); err != nil {
				return err
			}
			p.out.OK()
			backoff = first
			return nil
		})
		if ctx.Err() != nil {
			return
		}
		if err != nil {
			p.out.Fail(path, err)
		}
		wait := backoff/2 + rand.N(backoff/2)
		backoff = min(backoff*2, 5*time.Second)
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
	}
}

func (p *Provider) preempted(ctx context.Context, out chan<- agent.Notice) func(string, bool) error {
	var active *agent.Notice
	return func(v string, ok bool) error {
		pre, err := ParsePreempted(v)
		if !ok {
			pre, err = false, nil
		}
		if err != nil {
			return err
		}
		now := p.now()
		switch {
		case pre && active == nil:
			n := agent.Notice{Provider: "gcp", Kind: agent.KindPreempt, ID: "preempted", Action: "preempted",
				NoticedAt: now, Deadline: now.Add(p.cfg.PreemptWindow), Raw: agent.RawString(strings.TrimSpace(v))}
			active = &n
			emit.Send(ctx, out, n)
		case !pre && active != nil:
			n := *active
			n.Withdrawn, n.NoticedAt = true, now
			active = nil
			emit.Send(ctx, out, n)
		}
		return nil
	}
}

func (p *Provider) maintenance(ctx context.Context, out chan<- agent.Notice) func(string, bool) error {
	var active *agent.Notice
	return func(v string, ok bool) error {
		ev, err := ParseMaintenance(v)
		if !ok {
			ev, err = MaintenanceNone, nil
		}
		if errors.Is(err, ErrUnknownEvent) {
			if !p.unknown[ev] {
				p.unknown[ev] = true
				p.log.Warn("maintenance-event value preemptd does not know; not acted on", "value", ev)
			}
			err = nil
		}
		if err != nil {
			return err
		}
		if active != nil && active.Action == ev {
			return nil
		}
		now := p.now()
		if active != nil {
			n := *active
			n.Withdrawn, n.NoticedAt = true, now
			active = nil
			emit.Send(ctx, out, n)
		}
		var n agent.Notice
		switch ev {
		case MaintenanceNone:
			return nil
		case MaintenanceTerminate:
			n = agent.Notice{Kind: agent.KindMaintenance, Deadline: now.Add(p.cfg.MaintenanceWindow)}
		case MaintenanceMigrate:
			n = agent.Notice{Kind: agent.KindMigrate}
		default: // unknown: logged above; the earlier event, if any, is over
			return nil
		}
		n.Provider, n.ID, n.Action, n.NoticedAt = "gcp", "maintenance-event/"+ev, ev, now
		n.Raw = agent.RawString(ev)
		active = &n
		emit.Send(ctx, out, n)
		return nil
	}
}

// Upcoming is the instance/upcoming-maintenance document.
type Upcoming struct {
	Type              string    `json:"type"`
	Status            string    `json:"maintenance_status"`
	CanReschedule     bool      `json:"can_reschedule"`
	WindowStart       time.Time `json:"window_start_time"`
	WindowEnd         time.Time `json:"window_end_time"`
	LatestWindowStart time.Time `json:"latest_window_start_time"`
}

// ParseUpcoming reads instance/upcoming-maintenance.
func ParseUpcoming(v string) (Upcoming, error) {
	var u Upcoming
	if err := json.Unmarshal([]byte(v), &u); err != nil {
		return u, fmt.Errorf("upcoming-maintenance: %w (value %q)", err, emit.Truncate(v, 60))
	}
	if u.WindowStart.IsZero() {
		return u, fmt.Errorf("upcoming-maintenance: no window_start_time in %q", emit.Truncate(v, 60))
	}
	return u, nil
}

// upcoming reads planned maintenance every UpcomingPoll and turns it into
// an advisory maintenance notice whose deadline is the window's start (the
// agent escalates it at fatal_within before, and the advisor counts it as a
// risk from an hour before); gone, the notice is withdrawn. A failed read
// changes nothing.
func (p *Provider) upcoming(ctx context.Context, out chan<- agent.Notice) {
	var active *agent.Notice
	for {
		rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		v, err := p.client.GetWithContext(rctx, PathUpcoming)
		cancel()
		var none metadata.NotDefinedError
		switch {
		case ctx.Err() != nil:
			return
		case errors.As(err, &none):
			if active != nil {
				n := *active
				n.Withdrawn, n.NoticedAt = true, p.now()
				active = nil
				emit.Send(ctx, out, n)
			}
		case err != nil:
			p.out.Fail(PathUpcoming, err)
		default:
			p.out.OK()
			u, err := ParseUpcoming(v)
			if err != nil {
				p.log.Warn("upcoming maintenance not understood; not acted on", "err", err)
				break
			}
			id := "upcoming-maintenance/" + u.WindowStart.UTC().Format(time.RFC3339)
			if active != nil && active.ID == id {
				break
			}
			now := p.now()
			if active != nil { // rescheduled: the old one is over
				n := *active
				n.Withdrawn, n.NoticedAt = true, now
				emit.Send(ctx, out, n)
			}
			n := agent.Notice{Provider: "gcp", Kind: agent.KindMaintenance, ID: id, Action: "upcoming-maintenance " + u.Type,
				NoticedAt: now, Deadline: u.WindowStart, WindowEnd: u.WindowEnd, Scheduled: true, Raw: json.RawMessage(v)}
			active = &n
			emit.Send(ctx, out, n)
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(p.cfg.UpcomingPoll):
		}
	}
}

// Identity implements agent.Identifier from the metadata server.
func (p *Provider) Identity(ctx context.Context) (agent.Instance, error) {
	inst := agent.Instance{Provider: "gcp"}
	get := func(path string) (string, error) {
		ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		v, err := p.client.GetWithContext(ctx, path)
		return strings.TrimSpace(v), err
	}
	var err error
	if inst.ID, err = get("instance/id"); err != nil {
		return inst, err
	}
	mt, err := get("instance/machine-type")
	if err != nil {
		return inst, err
	}
	inst.Type = mt[strings.LastIndexByte(mt, '/')+1:]
	zone, err := get("instance/zone")
	if err != nil {
		return inst, err
	}
	inst.Zone = zone[strings.LastIndexByte(zone, '/')+1:]
	if i := strings.LastIndexByte(inst.Zone, '-'); i > 0 {
		inst.Region = inst.Zone[:i]
	}
	inst.Lifecycle = "on-demand"
	if model, err := get("instance/scheduling/provisioning-model"); err == nil && model == "SPOT" {
		inst.Lifecycle = "spot"
	} else if pre, err := get("instance/scheduling/preemptible"); err == nil && pre == "TRUE" {
		inst.Lifecycle = "preemptible"
	}
	return inst, nil
}
