package azure

import (
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/preemptd/preemptd/agent"
)

// Document is the Scheduled Events document (api-version 2020-07-01).
type Document struct {
	DocumentIncarnation int     `json:"DocumentIncarnation"`
	Events              []Event `json:"Events"`
}

// Event is one scheduled event.
type Event struct {
	EventID           string   `json:"EventId"`
	EventType         string   `json:"EventType"`
	ResourceType      string   `json:"ResourceType"`
	Resources         []string `json:"Resources"`
	EventStatus       string   `json:"EventStatus"`
	NotBefore         string   `json:"NotBefore"`
	Description       string   `json:"Description"`
	EventSource       string   `json:"EventSource"`
	DurationInSeconds int      `json:"DurationInSeconds"`
}

// ParseDocument decodes a Scheduled Events document.
func ParseDocument(b []byte) (Document, error) {
	var d Document
	if err := json.Unmarshal(b, &d); err != nil {
		return d, fmt.Errorf("scheduledevents: not a JSON document: %w", err)
	}
	for _, e := range d.Events {
		if e.EventID == "" {
			return d, fmt.Errorf("scheduledevents: event without EventId")
		}
	}
	return d, nil
}

// ErrUnknownType marks an event whose EventType preemptd does not know
// (Azure adds types over time); ForVM skips such events and returns them.
var ErrUnknownType = errors.New("unknown EventType")

// ForVM returns the notices among d's events whose Resources name vm, and
// the events skipped because their type is unknown (the known ones beside
// them are still returned).
func ForVM(d Document, vm string, now time.Time) (notices []agent.Notice, unknown []Event, err error) {
	for _, e := range d.Events {
		if !names(e, vm) {
			continue
		}
		n, err := eventNotice(e, now)
		if errors.Is(err, ErrUnknownType) {
			unknown = append(unknown, e)
			continue
		}
		if err != nil {
			return nil, nil, err
		}
		notices = append(notices, n)
	}
	return notices, unknown, nil
}

func names(e Event, vm string) bool {
	return slices.ContainsFunc(e.Resources, func(r string) bool { return strings.EqualFold(r, vm) })
}

// OnlyFor reports whether e's Resources name vm and no other VM: acking it
// releases nobody else.
func OnlyFor(e Event, vm string) bool {
	return len(e.Resources) == 1 && names(e, vm)
}

func eventNotice(e Event, now time.Time) (agent.Notice, error) {
	var kind agent.Kind
	switch e.EventType {
	case "Preempt":
		kind = agent.KindPreempt
	case "Terminate":
		kind = agent.KindTerminate
	case "Reboot", "Redeploy":
		kind = agent.KindMaintenance
	case "Freeze":
		kind = agent.KindFreeze
	default:
		return agent.Notice{}, fmt.Errorf("scheduledevents: %s: %w %q", e.EventID, ErrUnknownType, e.EventType)
	}
	deadline := now
	if e.NotBefore != "" {
		t, err := time.Parse(time.RFC1123, e.NotBefore)
		if err != nil {
			return agent.Notice{}, fmt.Errorf("scheduledevents: %s: NotBefore %q: %w", e.EventID, e.NotBefore, err)
		}
		deadline = t
	}
	raw, _ := json.Marshal(e)
	return agent.Notice{Provider: "azure", Kind: kind, ID: e.EventID, Action: e.EventType,
		NoticedAt: now, Deadline: deadline, Raw: raw}, nil
}

// StartRequests is the acknowledgement body.
func StartRequests(ids ...string) []byte {
	type req struct {
		EventID string `json:"EventId"`
	}
	body := struct {
		StartRequests []req `json:"StartRequests"`
	}{}
	for _, id := range ids {
		body.StartRequests = append(body.StartRequests, req{EventID: id})
	}
	b, _ := json.Marshal(body)
	return b
}
