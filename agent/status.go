package agent

import (
	"time"

	"github.com/preemptd/preemptd/advice"
)

// Status is what `preemptd status` and GET /v1/status show.
type Status struct {
	Version   string    `json:"version"`
	Provider  string    `json:"provider"`
	Run       string    `json:"run,omitempty"`
	Instance  Instance  `json:"instance"`
	StartedAt time.Time `json:"started_at"`
	// State is watching, advisory (an advisory notice is active), emergency
	// (the emergency path runs) or done (a path has finished and its fatal
	// notice is still active: the machine is going away). After a path
	// whose notice is gone (a drill, a withdrawn notice) it is watching
	// again, armed for the next, with that path in Emergency.
	State     string           `json:"state"`
	Notices   []NoticeStatus   `json:"notices"`
	Last      *Notice          `json:"last_change,omitempty"`
	Emergency *EmergencyReport `json:"emergency,omitempty"`
	// LastSignal is the last signal sent to the trainer, advisory or fatal.
	LastSignal    *SignalReport     `json:"last_signal,omitempty"`
	WatcherErrors map[string]string `json:"watcher_errors,omitempty"`
	// GPUs is read when the status is asked for; XIDs are the recent
	// critical GPU events.
	GPUs *GPUSnapshot `json:"gpus,omitempty"`
	XIDs []XIDEvent   `json:"xid_events,omitempty"`
	// Job is the multi-node job this node is part of.
	Job *JobStatus `json:"job,omitempty"`
	// Advice is when to checkpoint, as last published.
	Advice *advice.Advice `json:"advice,omitempty"`
}

// JobStatus is a multi-node job as this node sees it.
type JobStatus struct {
	Node  string `json:"node"`
	Nodes int    `json:"nodes"`
	// Members are the nodes registered in the store, live or not.
	Members []JobMember `json:"members"`
	// Problem says what keeps the job's checkpoints from committing, as
	// the registry shows it (more live nodes than job.nodes).
	Problem string `json:"problem,omitempty"`
}

// JobMember is one node of the job's registry.
type JobMember struct {
	Node        string    `json:"node"`
	Instance    string    `json:"instance,omitempty"`
	Host        string    `json:"host,omitempty"`
	Push        string    `json:"push,omitempty"`
	RefreshedAt time.Time `json:"refreshed_at"`
	Live        bool      `json:"live"`
}

// NoticeStatus is an active notice and how it is handled.
type NoticeStatus struct {
	Notice
	Class       Class   `json:"class"`
	SecondsLeft float64 `json:"seconds_left"`
}

// Status returns a snapshot of the agent's state.
func (a *Agent) Status() Status {
	now := a.now()
	var job *JobStatus
	if a.deps.Job != nil {
		job = a.deps.Job()
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	s := Status{
		Version:   a.deps.Version,
		Provider:  a.deps.Provider,
		Run:       a.deps.Run,
		Instance:  a.instance,
		StartedAt: a.started,
		State:     "watching",
		Notices:   []NoticeStatus{},
		Job:       job,
		Advice:    a.advice,
	}
	for _, k := range a.order {
		t := a.active[k]
		s.Notices = append(s.Notices, NoticeStatus{Notice: t.n, Class: t.class, SecondsLeft: t.n.SecondsLeft(now)})
		if t.class == ClassAdvisory {
			s.State = "advisory"
		}
	}
	if a.last != nil {
		l := *a.last
		s.Last = &l
	}
	if a.emergency != nil {
		e := *a.emergency
		e.Steps = append([]StepReport(nil), e.Steps...)
		s.Emergency = &e
		if a.path != nil {
			s.State = "emergency"
		} else if a.handledLocked() != nil {
			s.State = "done"
		}
	}
	if a.lastSig != nil {
		sig := *a.lastSig
		s.LastSignal = &sig
	}
	s.XIDs = append([]XIDEvent(nil), a.xids...)
	if len(a.watchErrs) > 0 {
		s.WatcherErrors = map[string]string{}
		for k, v := range a.watchErrs {
			s.WatcherErrors[k] = v
		}
	}
	return s
}

// waitChange returns the current notice (if any) and a channel closed at the
// next change.
func (a *Agent) waitChange() (Notice, Class, bool, <-chan struct{}) {
	n, c, ok := a.current()
	a.mu.Lock()
	ch := a.changed
	a.mu.Unlock()
	return n, c, ok, ch
}
