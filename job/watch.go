package job

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"slices"
	"strings"
	"time"

	"github.com/preemptd/preemptd/agent"
	"github.com/preemptd/preemptd/checkpoint/storage"
)

// grace is how long past its deadline a job notice stays: the machine
// that sent it is gone by then, and a notice the store still holds (its
// node died before deleting it) must not stop the next incarnation of the
// job. Objects older than housekeep past their deadline are deleted.
//
// Notices that arrive within join of the first of a stop make one job
// notice (nodes interrupted together); a notice after that is a new stop,
// with its own job notice (a later drill, the job's next incarnation).
const (
	grace     = 5 * time.Second
	housekeep = 10 * time.Minute
	join      = 10 * time.Second
)

// entry is one other node's notice as this node knows it.
type entry struct {
	p       Published
	inStore bool // seen in the store's listing (so its absence withdraws it)
	arrived time.Time
	episode *episode
}

// episode is one job notice: the notices of one stop.
type episode struct {
	id    string
	start time.Time
	sent  time.Time // the deadline last sent
}

// watchState turns the notices seen into the agent's job notices.
type watchState struct {
	entries  map[string]*entry
	episodes []*episode
	// gone are the notices withdrawn, and when: a listing read before the
	// withdrawal (the push outran the delete) must not bring one back.
	gone map[string]time.Time
}

// Watch implements agent.Watcher: it lists <run>/_job/notices every
// job.poll and takes pushes as they come; while any other node's notice is
// active it sends one fatal job notice (its id the first one's, its
// deadline the earliest), withdrawn when they all are. A store outage
// changes nothing it has seen: no notice is made up, none withdrawn. The
// store is read in a goroutine of its own, so that a store that hangs
// never holds up a push.
func (j *Job) Watch(ctx context.Context, out chan<- agent.Notice) error {
	st := &watchState{entries: map[string]*entry{}, gone: map[string]time.Time{}}
	j.log.Info("watching the job's notices", "run", j.cfg.Run, "node", j.cfg.Node, "nodes", j.cfg.Nodes,
		"poll", j.cfg.Poll.String(), "push", j.cfg.Listen != "")
	listings := make(chan listing)
	go j.pollLoop(ctx, listings)
	for {
		j.emit(ctx, st, out)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case listed := <-listings:
			j.applyListing(st, listed)
		case p := <-j.pushed:
			j.apply(st, p, "push")
		}
	}
}

// listing is one read of the store's notices: the other nodes' notices,
// by id, and the ids with a tombstone (withdrawn).
type listing struct {
	notices   map[string]Published
	withdrawn map[string]bool
}

// apply takes a notice from a push or the store.
func (j *Job) apply(st *watchState, p Published, via string) {
	if p.Node == j.cfg.Node || p.Run != j.cfg.Run {
		return
	}
	if _, withdrawn := st.gone[p.ID]; withdrawn {
		return
	}
	e, ok := st.entries[p.ID]
	if p.Withdrawn {
		st.gone[p.ID] = j.now()
		if ok {
			delete(st.entries, p.ID)
			j.log.Info("job notice withdrawn by its node", "id", p.ID, "node", p.Node, "via", via)
		}
		return
	}
	if !p.Deadline.IsZero() && j.now().After(p.Deadline.Add(grace)) {
		return // over: its node is gone
	}
	if ok {
		e.inStore = e.inStore || via == "store"
		return
	}
	now := j.now()
	var ep *episode
	if n := len(st.episodes); n > 0 && now.Sub(st.episodes[n-1].start) <= join {
		ep = st.episodes[n-1]
	} else {
		ep = &episode{id: p.ID, start: now}
		st.episodes = append(st.episodes, ep)
	}
	st.entries[p.ID] = &entry{p: p, inStore: via == "store", arrived: now, episode: ep}
	d := now.Sub(p.NoticedAt)
	j.log.Warn("job notice from another node", "id", p.ID, "node", p.Node, "provider", p.Provider, "kind", p.Kind,
		"deadline", p.Deadline, "via", via, "latency", d.Round(time.Millisecond).String())
	if j.OnFanOut != nil {
		j.OnFanOut(d, via)
	}
}

// applyListing takes one listing of the store: new notices applied, those
// gone from it (or with a tombstone) withdrawn.
func (j *Job) applyListing(st *watchState, l listing) {
	for id := range l.withdrawn {
		if e, ok := st.entries[id]; ok {
			delete(st.entries, id)
			j.log.Info("job notice withdrawn (its tombstone is in the store)", "id", id, "node", e.p.Node)
		}
		if _, ok := st.gone[id]; !ok {
			st.gone[id] = j.now()
		}
	}
	for id, p := range l.notices {
		if !l.withdrawn[id] {
			j.apply(st, p, "store")
		}
	}
	for id, e := range st.entries {
		if _, ok := l.notices[id]; e.inStore && !ok {
			delete(st.entries, id)
			st.gone[id] = j.now()
			j.log.Info("job notice withdrawn (gone from the store)", "id", id, "node", e.p.Node)
		}
	}
	for id, at := range st.gone {
		if _, ok := l.notices[id]; !ok && !l.withdrawn[id] && j.now().Sub(at) > housekeep {
			delete(st.gone, id) // long gone from the store too
		}
	}
}

// listEvery is how many polls may pass without a listing of the notices
// while their change stamp stays the same: a node that died between its
// notice's create and the stamp's write is heard within it.
const listEvery = 20

// pollLoop reads the notices' change stamp every job.poll (one GET) and
// lists the store's notices when it changed, and every listEvery polls
// whatever it says, sending each complete listing (the other nodes'
// notices and tombstones, each read once); a listing that fails sends
// nothing. A GET costs a twelfth of a LIST at S3's prices.
func (j *Job) pollLoop(ctx context.Context, listings chan<- listing) {
	known := map[string]Published{}
	failing := false
	tick := time.NewTicker(j.cfg.Poll)
	defer tick.Stop()
	lastStamp, sinceList := "", listEvery
	for ; ; sinceList++ {
		stamp, serr := j.readStamp(ctx)
		if serr == nil && stamp == lastStamp && sinceList < listEvery {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
			continue
		}
		listed, read, err := j.list(ctx, known)
		if err == nil && serr == nil {
			lastStamp, sinceList = stamp, 0
		}
		switch {
		case err != nil && ctx.Err() == nil:
			if !failing {
				j.log.Warn("job notices not readable from the store; pushes still arrive, nothing seen is dropped", "err", err)
			}
			failing = true
		case err == nil:
			if failing {
				j.log.Info("job notices readable from the store again")
				failing = false
			}
			known = read
			select {
			case listings <- listed:
			case <-ctx.Done():
				return
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

const tombSuffix = ".withdrawn"

// readStamp reads the notices' change stamp ("" when there is none).
func (j *Job) readStamp(ctx context.Context) (string, error) {
	sctx, cancel := context.WithTimeout(ctx, max(4*j.cfg.Poll, 2*time.Second))
	defer cancel()
	var buf bytes.Buffer
	if err := j.store.Get(sctx, j.stampKey(), &buf); err != nil {
		if errors.Is(err, storage.ErrNotFound) {
			return "", nil
		}
		return "", err
	}
	return buf.String(), nil
}

// list reads the notices in the store: one LIST, and a GET of each notice
// or tombstone not known (by its object's name) from the last listing;
// read is what this one knows, for the next. A notice object that is
// malformed or has no deadline stops nobody: it is deleted. Notices and
// tombstones long past their deadline are deleted too.
func (j *Job) list(ctx context.Context, known map[string]Published) (l listing, read map[string]Published, err error) {
	lctx, cancel := context.WithTimeout(ctx, max(4*j.cfg.Poll, 2*time.Second))
	defer cancel()
	prefix := j.prefix() + "notices"
	objs, err := j.store.List(lctx, prefix)
	if err != nil {
		return l, nil, err
	}
	l = listing{notices: map[string]Published{}, withdrawn: map[string]bool{}}
	read = map[string]Published{}
	var drop []string
	for _, o := range objs {
		name := strings.TrimPrefix(o.Key, prefix+"/")
		id, tomb := strings.CutSuffix(name, tombSuffix)
		if !tomb {
			var ok bool
			if id, ok = strings.CutSuffix(name, ".json"); !ok {
				continue
			}
		}
		if strings.Contains(id, "/") || strings.HasPrefix(id, j.cfg.Node+"--") {
			continue // not a notice, or this node's own
		}
		p, ok := known[name]
		if !ok {
			var buf bytes.Buffer
			if err := j.store.Get(lctx, o.Key, &buf); err != nil {
				if errors.Is(err, storage.ErrNotFound) {
					continue // withdrawn meanwhile
				}
				return l, nil, err
			}
			if err := json.Unmarshal(buf.Bytes(), &p); err != nil || p.ID != id || p.Deadline.IsZero() {
				j.log.Warn("deleting a malformed job notice object (no notice, or none with a deadline)", "key", o.Key)
				drop = append(drop, o.Key)
				continue
			}
		}
		if j.now().After(p.Deadline.Add(housekeep)) {
			drop = append(drop, o.Key) // long over: nobody needs it
			continue
		}
		read[name] = p
		if tomb {
			l.withdrawn[id] = true
		} else {
			l.notices[id] = p
		}
	}
	if len(drop) > 0 {
		_ = j.store.Delete(lctx, drop...)
	}
	return l, read, nil
}

// emit sends the agent the job notices the entries make, when they change:
// one per episode, its deadline the earliest of its notices, withdrawn when
// they all are.
func (j *Job) emit(ctx context.Context, st *watchState, out chan<- agent.Notice) {
	now := j.now()
	active := map[*episode][]*entry{}
	for id, e := range st.entries {
		end := e.p.Deadline
		if end.IsZero() {
			end = e.arrived.Add(2 * time.Minute)
		}
		if now.After(end.Add(grace)) {
			delete(st.entries, id)
			continue
		}
		active[e.episode] = append(active[e.episode], e)
	}
	send := func(n agent.Notice) {
		select {
		case out <- n:
		case <-ctx.Done():
		}
	}
	kept := st.episodes[:0]
	for _, ep := range st.episodes {
		es := active[ep]
		if len(es) == 0 {
			if !ep.sent.IsZero() {
				send(agent.Notice{Provider: "job", Kind: agent.KindJob, ID: ep.id, NoticedAt: now, Withdrawn: true})
			}
			continue
		}
		kept = append(kept, ep)
		slices.SortFunc(es, func(a, b *entry) int {
			if c := a.arrived.Compare(b.arrived); c != 0 {
				return c
			}
			return strings.Compare(a.p.ID, b.p.ID)
		})
		deadline := time.Time{}
		var origins []Published
		for _, e := range es {
			if !e.p.Deadline.IsZero() && (deadline.IsZero() || e.p.Deadline.Before(deadline)) {
				deadline = e.p.Deadline
			}
			origins = append(origins, e.p)
		}
		if deadline.IsZero() { // a fatal notice always has one; never leave it open
			deadline = es[0].arrived.Add(2 * time.Minute)
		}
		if deadline.Equal(ep.sent) {
			continue
		}
		ep.sent = deadline
		first := es[0]
		raw, _ := json.Marshal(struct {
			Node    string      `json:"node"`
			Origins []Published `json:"origins"`
		}{first.p.Node, origins})
		send(agent.Notice{Provider: "job", Kind: agent.KindJob, ID: ep.id, Action: string(first.p.Kind),
			NoticedAt: first.arrived, Deadline: deadline, Raw: raw})
	}
	st.episodes = kept
}
