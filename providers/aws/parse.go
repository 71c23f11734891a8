package aws

import (
	"bytes"
	"encoding/json"
	"fmt"
	"strings"
	"time"

	"github.com/preemptd/preemptd/agent"
	"github.com/preemptd/preemptd/providers/internal/emit"
)

// Notice IDs for the documents that have no ID of their own.
const (
	IDInstanceAction = "spot/instance-action"
	IDRebalance      = "events/recommendations/rebalance"
	IDLifecycle      = "autoscaling/target-lifecycle-state"
)

// ParseInstanceAction reads spot/instance-action:
// {"action":"terminate","time":"2026-01-01T00:02:00Z"}.
func ParseInstanceAction(b []byte, now time.Time) (agent.Notice, error) {
	var doc struct {
		Action string `json:"action"`
		Time   string `json:"time"`
	}
	if err := json.Unmarshal(b, &doc); err != nil {
		return agent.Notice{}, fmt.Errorf("spot/instance-action: not JSON: %w", err)
	}
	var kind agent.Kind
	switch strings.ToLower(doc.Action) {
	case "terminate":
		kind = agent.KindTerminate
	case "stop":
		kind = agent.KindStop
	case "hibernate":
		kind = agent.KindHibernate
	default:
		return agent.Notice{}, fmt.Errorf("spot/instance-action: unknown action %q", doc.Action)
	}
	t, err := time.Parse(time.RFC3339, doc.Time)
	if err != nil {
		return agent.Notice{}, fmt.Errorf("spot/instance-action: time %q: %w", doc.Time, err)
	}
	return agent.Notice{Provider: "aws", Kind: kind, ID: IDInstanceAction, Action: doc.Action,
		NoticedAt: now, Deadline: t, Raw: compact(b)}, nil
}

// ParseRebalance reads events/recommendations/rebalance:
// {"noticeTime":"2026-01-01T00:00:00Z"}. A recommendation has no deadline.
func ParseRebalance(b []byte, now time.Time) (agent.Notice, error) {
	var doc struct {
		NoticeTime string `json:"noticeTime"`
	}
	if err := json.Unmarshal(b, &doc); err != nil {
		return agent.Notice{}, fmt.Errorf("rebalance: not JSON: %w", err)
	}
	t, err := time.Parse(time.RFC3339, doc.NoticeTime)
	if err != nil {
		return agent.Notice{}, fmt.Errorf("rebalance: noticeTime %q: %w", doc.NoticeTime, err)
	}
	if t.After(now) {
		t = now
	}
	return agent.Notice{Provider: "aws", Kind: agent.KindRebalance, ID: IDRebalance, Action: "rebalance",
		NoticedAt: t, Raw: compact(b)}, nil
}

// scheduledTime is the layout of maintenance event times: "21 Jan 2026 09:00:00 GMT".
const scheduledTime = "2 Jan 2006 15:04:05 MST"

// ScheduledKind says what a scheduled event's code does to the machine:
// instance-stop and instance-retirement stop it (an instance-store machine
// is terminated; either way the process dies), instance-reboot and
// system-reboot reboot it, and system-maintenance is network or power work
// the machine usually runs through — advisory, never fatal.
func ScheduledKind(code string) agent.Kind {
	switch strings.ToLower(code) {
	case "instance-stop", "instance-retirement":
		return agent.KindStop
	case "instance-reboot", "system-reboot":
		return agent.KindReboot
	case "system-maintenance":
		return agent.KindDisruption
	}
	return agent.KindMaintenance // a code AWS adds later: treated as maintenance
}

// ParseScheduled reads events/maintenance/scheduled, an array of events. A
// canceled or completed event comes back withdrawn. The deadline is
// NotBefore (AWS may move it later: a rescheduled event); NotAfter is the
// window's end.
func ParseScheduled(b []byte, now time.Time) ([]agent.Notice, error) {
	var docs []struct {
		Code        string `json:"Code"`
		Description string `json:"Description"`
		EventID     string `json:"EventId"`
		NotBefore   string `json:"NotBefore"`
		NotAfter    string `json:"NotAfter"`
		State       string `json:"State"`
	}
	if err := json.Unmarshal(b, &docs); err != nil {
		return nil, fmt.Errorf("maintenance/scheduled: not a JSON array: %w", err)
	}
	out := make([]agent.Notice, 0, len(docs))
	for _, d := range docs {
		if d.EventID == "" {
			return nil, fmt.Errorf("maintenance/scheduled: event without EventId")
		}
		nb, err := time.Parse(scheduledTime, d.NotBefore)
		if err != nil {
			return nil, fmt.Errorf("maintenance/scheduled: %s NotBefore %q: %w", d.EventID, d.NotBefore, err)
		}
		var na time.Time
		if d.NotAfter != "" {
			if na, err = time.Parse(scheduledTime, d.NotAfter); err != nil {
				return nil, fmt.Errorf("maintenance/scheduled: %s NotAfter %q: %w", d.EventID, d.NotAfter, err)
			}
		}
		raw, _ := json.Marshal(d)
		state := strings.ToLower(d.State)
		out = append(out, agent.Notice{Provider: "aws", Kind: ScheduledKind(d.Code), ID: d.EventID,
			Action: d.Code, NoticedAt: now, Deadline: nb, WindowEnd: na, Scheduled: true, Raw: raw,
			Withdrawn: state == "canceled" || state == "cancelled" || state == "completed"})
	}
	return out, nil
}

// LifecycleKind reads autoscaling/target-lifecycle-state (plain text) and
// says what it does to the machine: Terminated and Warmed:Terminated
// terminate it, Warmed:Stopped stops it and Warmed:Hibernated hibernates it
// (an instance going into a warm pool); "" for the states it survives.
func LifecycleKind(b []byte) (agent.Kind, error) {
	s := strings.TrimSpace(string(b))
	switch s {
	case "Terminated", "Warmed:Terminated":
		return agent.KindTerminate, nil
	case "Warmed:Stopped":
		return agent.KindStop, nil
	case "Warmed:Hibernated":
		return agent.KindHibernate, nil
	case "InService", "Standby", "Detached", "Warmed:Running":
		return "", nil
	}
	if s == "" || len(s) > 64 || strings.ContainsAny(s, "{}<> \n") {
		return "", fmt.Errorf("target-lifecycle-state: unexpected %q", emit.Truncate(s, 40))
	}
	return "", nil // a state AWS adds later
}

func compact(b []byte) json.RawMessage {
	var buf bytes.Buffer
	if json.Compact(&buf, b) != nil {
		return agent.RawString(string(b))
	}
	return buf.Bytes()
}
