package azure

import (
	"encoding/json"
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

// ForVM returns the notices among d's events whose Resources name vm.
func ForVM(d Document, vm string, now time.Time) ([]agent.Notice, error) {
	var out []agent.Notice
	for _, e := range d.Events {
		if !slices.ContainsFunc(e.Resources, func(r string) bool { return strings.EqualFold(r, vm) }) {
			continue
		}
		n, err := eventNotice(e, now)
		if err != nil {
			return nil, err
		}
		out = append(out, n)
	}
	return out, nil
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
		return agent.Notice{}, fmt.Errorf("scheduledevents: %s: unknown EventType %q", e.EventID, e.EventType)
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
