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

// ParseScheduled reads events/maintenance/scheduled, an array of events. A
// canceled or completed event comes back withdrawn.
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
		raw, _ := json.Marshal(d)
		state := strings.ToLower(d.State)
		out = append(out, agent.Notice{Provider: "aws", Kind: agent.KindMaintenance, ID: d.EventID,
			Action: d.Code, NoticedAt: now, Deadline: nb, Raw: raw,
			Withdrawn: state == "canceled" || state == "cancelled" || state == "completed"})
	}
	return out, nil
}

// ParseLifecycle reads autoscaling/target-lifecycle-state (plain text) and
// reports whether the instance is being terminated.
func ParseLifecycle(b []byte) (terminated bool, err error) {
	s := strings.TrimSpace(string(b))
	switch s {
	case "Terminated":
		return true, nil
	case "InService", "Standby", "Detached", "Warmed:Stopped", "Warmed:Running", "Warmed:Hibernated", "Warmed:Terminated":
		return false, nil
	}
	if s == "" || len(s) > 64 || strings.ContainsAny(s, "{}<> \n") {
		return false, fmt.Errorf("target-lifecycle-state: unexpected %q", emit.Truncate(s, 40))
	}
	return false, nil
}

func compact(b []byte) json.RawMessage {
	var buf bytes.Buffer
	if json.Compact(&buf, b) != nil {
		return agent.RawString(string(b))
	}
	return buf.Bytes()
}
