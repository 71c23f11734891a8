// Package agent is the core of preemptd: the Notice every provider produces,
// the interfaces the agent consumes, the state machine that turns a notice into
// action (notice file, hooks, trainer signal, emergency steps, acknowledgement),
// and the local API. It imports no cloud SDK, no NVML and no object store.
package agent

import (
	"encoding/json"
	"fmt"
	"strings"
	"time"
)

// Kind says what a notice announces.
type Kind string

// The kinds of notice. Terminate, stop, hibernate, preempt and shutdown are
// fatal at once — unless the notice is a scheduled event days ahead, which
// is advisory until its deadline comes within fatal_within, as rebalance,
// maintenance and reboot always are; disruption (network or power work the
// machine survives) is advisory and never fatal; freeze and migrate only
// inform.
const (
	KindTerminate   Kind = "terminate"
	KindStop        Kind = "stop"
	KindHibernate   Kind = "hibernate"
	KindPreempt     Kind = "preempt"
	KindShutdown    Kind = "shutdown"
	KindRebalance   Kind = "rebalance"
	KindMaintenance Kind = "maintenance"
	KindReboot      Kind = "reboot"
	KindDisruption  Kind = "disruption"
	KindFreeze      Kind = "freeze"
	KindMigrate     Kind = "migrate"
	// KindJob is a multi-node job's stop: a fatal notice on another node of
	// the job, fanned out to this one (its provider is "job").
	KindJob Kind = "job"
)

var allKinds = []Kind{KindTerminate, KindStop, KindHibernate, KindPreempt, KindShutdown,
	KindRebalance, KindMaintenance, KindReboot, KindDisruption, KindFreeze, KindMigrate, KindJob}

// ProviderSimulate is the provider of notices made by `preemptd simulate`;
// they end at their deadline, since no cloud withdraws them.
const ProviderSimulate = "simulate"

// ParseKind returns the Kind named by s (case-insensitive).
func ParseKind(s string) (Kind, error) {
	for _, k := range allKinds {
		if strings.EqualFold(s, string(k)) {
			return k, nil
		}
	}
	names := make([]string, len(allKinds))
	for i, k := range allKinds {
		names[i] = string(k)
	}
	return "", fmt.Errorf("unknown notice kind %q (want one of %s)", s, strings.Join(names, ", "))
}

// Class is how the agent reacts to a notice.
type Class string

// The classes of notice.
const (
	// ClassFatal starts the emergency path at once.
	ClassFatal Class = "fatal"
	// ClassAdvisory writes notice.json, runs hooks and sends rebalance_signal;
	// it turns fatal when its deadline comes within fatal_within.
	ClassAdvisory Class = "advisory"
	// ClassInfo is recorded and published, nothing more.
	ClassInfo Class = "info"
)

// Classify says how notice n is handled at time now, given the fatal_within
// window.
func Classify(n Notice, now time.Time, fatalWithin time.Duration) Class {
	soon := !n.Deadline.IsZero() && n.Deadline.Sub(now) <= fatalWithin
	switch n.Kind {
	case KindJob:
		return ClassFatal
	case KindTerminate, KindStop, KindHibernate, KindPreempt, KindShutdown:
		if n.Scheduled && !soon {
			return ClassAdvisory
		}
		return ClassFatal
	case KindRebalance, KindMaintenance, KindReboot:
		if soon {
			return ClassFatal
		}
		return ClassAdvisory
	case KindDisruption:
		return ClassAdvisory
	default:
		return ClassInfo
	}
}

// Notice is one termination, maintenance or rebalance notice as a provider saw it.
type Notice struct {
	// Provider is the source: aws, gcp, azure, alibaba, tencent, local, simulate or signal.
	Provider string `json:"provider"`
	Kind     Kind   `json:"kind"`
	// ID identifies the notice at its provider; the agent dedupes on
	// (Provider, ID).
	ID string `json:"id"`
	// Action is the provider's own word for it (e.g. "terminate",
	// "TERMINATE_ON_HOST_MAINTENANCE", "Reboot", "system-reboot").
	Action    string    `json:"action,omitempty"`
	NoticedAt time.Time `json:"noticed_at"`
	// Deadline is when the machine goes; zero when the provider gives none
	// (an AWS rebalance recommendation).
	Deadline time.Time `json:"deadline,omitzero"`
	// WindowEnd is when the event's window closes (an AWS scheduled event's
	// NotAfter); zero when the provider gives none.
	WindowEnd time.Time `json:"window_end,omitzero"`
	// Scheduled marks an event planned ahead (AWS scheduled events): even
	// a terminate or stop is advisory until its deadline comes within
	// fatal_within.
	Scheduled bool `json:"scheduled,omitempty"`
	// Withdrawn marks a notice the provider took back.
	Withdrawn bool `json:"withdrawn,omitempty"`
	// Job asks that a simulated notice stop the whole multi-node job
	// (simulate --job); a cloud's fatal notice always does.
	Job bool `json:"job,omitempty"`
	// Raw is the provider's document, for the record.
	Raw json.RawMessage `json:"raw,omitempty"`
}

// Key is the identity the agent dedupes on.
func (n Notice) Key() string { return n.Provider + "/" + n.ID }

// SecondsLeft is the time to the deadline at now, never negative; -1 when the
// notice has no deadline.
func (n Notice) SecondsLeft(now time.Time) float64 {
	if n.Deadline.IsZero() {
		return -1
	}
	s := n.Deadline.Sub(now).Seconds()
	if s < 0 {
		return 0
	}
	return s
}

// RawString wraps a non-JSON provider document so that it can travel in Raw.
func RawString(s string) json.RawMessage {
	b, _ := json.Marshal(s)
	return b
}
