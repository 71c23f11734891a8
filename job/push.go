package job

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"
)

// The push path: POST /v1/job/notice to each peer, the body a Published
// addressed to that peer's current life (its node and the incarnation its
// registration names) with a nonce, authenticated by an HMAC-SHA256 with
// job.token over the time and the body (Authorization: PREEMPTD-HMAC
// t=<unix seconds>,sig=<hex>). The token never travels; a push more than
// maxSkew old, for another run, for another node or life of it (one
// captured and replayed to a daemon that has restarted), or whose nonce
// this life took already, is refused. The store path carries the same
// notice whether or not a push gets through.

const (
	pushPath = "/v1/job/notice"
	maxSkew  = time.Minute
	authName = "PREEMPTD-HMAC"
)

func mac(token string, t int64, body []byte) string {
	h := hmac.New(sha256.New, []byte(token))
	fmt.Fprintf(h, "%d\n", t)
	h.Write(body)
	return hex.EncodeToString(h.Sum(nil))
}

// Authorization is the header value that signs body at time now.
func Authorization(token string, now time.Time, body []byte) string {
	t := now.Unix()
	return fmt.Sprintf("%s t=%d,sig=%s", authName, t, mac(token, t, body))
}

// checkAuth verifies a push's Authorization header.
func checkAuth(token, header string, now time.Time, body []byte) error {
	rest, ok := strings.CutPrefix(header, authName+" ")
	if !ok {
		return errors.New("no " + authName + " authorization")
	}
	var t int64 = -1
	var sig string
	for _, kv := range strings.Split(rest, ",") {
		k, v, _ := strings.Cut(strings.TrimSpace(kv), "=")
		switch k {
		case "t":
			t, _ = strconv.ParseInt(v, 10, 64)
		case "sig":
			sig = v
		}
	}
	if t < 0 || sig == "" {
		return errors.New("malformed authorization")
	}
	if d := now.Sub(time.Unix(t, 0)); d > maxSkew || d < -maxSkew {
		return fmt.Errorf("signed %s from now (more than %s): check the clocks", d.Round(time.Second), maxSkew)
	}
	if !hmac.Equal([]byte(sig), []byte(mac(token, t, body))) {
		return errors.New("bad signature (is job.token the same on every node?)")
	}
	return nil
}

// pushBody is a push: the notice, addressed to one life of one peer.
type pushBody struct {
	Published
	To          string `json:"to"`
	Incarnation string `json:"incarnation"`
	Nonce       string `json:"nonce"`
}

// push sends p to every live peer at once — those known now, then any
// that a fresh read of the registry adds; failures are logged, the store
// path carries the notice anyway.
func (j *Job) push(ctx context.Context, p Published) {
	if j.cfg.Token == "" || j.cfg.Listen == "" && j.cfg.Advertise == "" {
		return
	}
	var wg sync.WaitGroup
	sent := map[string]bool{}
	send := func(peers []Member) {
		for _, m := range peers {
			if sent[m.Node+"@"+m.Push] {
				continue
			}
			sent[m.Node+"@"+m.Push] = true
			body, _ := json.Marshal(pushBody{Published: p, To: m.Node, Incarnation: m.Incarnation, Nonce: nonce()})
			wg.Go(func() {
				if err := j.pushTo(ctx, m.Push, body); err != nil {
					j.log.Warn("job notice not pushed; the store carries it", "peer", m.Node, "addr", m.Push, "err", err)
				}
			})
		}
	}
	send(j.peers())
	j.mu.Lock()
	stale := j.now().Sub(j.membersAt) > 5*time.Second
	j.mu.Unlock()
	if stale {
		if _, err := j.refreshMembers(ctx); err == nil {
			send(j.peers())
		}
	}
	wg.Wait()
}

func (j *Job) pushTo(ctx context.Context, addr string, body []byte) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://"+addr+pushPath, bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Authorization", Authorization(j.cfg.Token, j.now(), body))
	resp, err := j.client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusAccepted {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return fmt.Errorf("%s: %s", resp.Status, strings.TrimSpace(string(msg)))
	}
	return nil
}

// Handler serves pushes from the job's other nodes.
func (j *Job) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST "+pushPath, func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(io.LimitReader(r.Body, 16<<10))
		if err != nil {
			http.Error(w, "body: "+err.Error(), http.StatusBadRequest)
			return
		}
		if err := checkAuth(j.cfg.Token, r.Header.Get("Authorization"), j.now(), body); err != nil {
			j.log.Warn("job push refused", "from", r.RemoteAddr, "err", err)
			http.Error(w, "refused: "+err.Error(), http.StatusUnauthorized)
			return
		}
		var pb pushBody
		if err := json.Unmarshal(body, &pb); err != nil || pb.ID == "" || pb.Node == "" {
			http.Error(w, "body: not a job notice", http.StatusBadRequest)
			return
		}
		p := pb.Published
		if p.Run != j.cfg.Run {
			http.Error(w, fmt.Sprintf("refused: run %q is not this node's (%q)", p.Run, j.cfg.Run), http.StatusForbidden)
			return
		}
		if pb.To != j.cfg.Node || pb.Incarnation != j.incarnation {
			j.log.Warn("job push refused: addressed to another life of this node (replayed, or the sender's registry is stale: the store carries it)",
				"from", r.RemoteAddr, "to", pb.To, "incarnation", pb.Incarnation, "id", p.ID)
			http.Error(w, fmt.Sprintf("refused: addressed to node %q life %q, not this node's current life", pb.To, pb.Incarnation),
				http.StatusForbidden)
			return
		}
		if !j.fresh(pb.Nonce) {
			j.log.Warn("job push refused: replayed", "from", r.RemoteAddr, "id", p.ID)
			http.Error(w, "refused: this push was taken already (replayed)", http.StatusForbidden)
			return
		}
		select {
		case j.pushed <- p:
		default:
			http.Error(w, "busy", http.StatusServiceUnavailable)
			return
		}
		w.WriteHeader(http.StatusAccepted)
	})
	return mux
}

// fresh says whether a push's nonce is new to this life of the daemon
// within maxSkew (older pushes are refused by their time), and remembers it.
func (j *Job) fresh(nonce string) bool {
	if nonce == "" {
		return false
	}
	j.seenMu.Lock()
	defer j.seenMu.Unlock()
	now := j.now()
	for n, at := range j.seen {
		if now.Sub(at) > 2*maxSkew {
			delete(j.seen, n)
		}
	}
	if _, ok := j.seen[nonce]; ok {
		return false
	}
	j.seen[nonce] = now
	return true
}

// serve listens on job.listen until ctx ends.
func (j *Job) serve(ctx context.Context) error {
	l, err := net.Listen("tcp", j.cfg.Listen)
	if err != nil {
		return fmt.Errorf("job.listen: %w", err)
	}
	srv := &http.Server{Handler: j.Handler(), ReadHeaderTimeout: 5 * time.Second, ReadTimeout: 10 * time.Second}
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		srv.Shutdown(sctx)
	}()
	j.log.Info("taking job notices pushed by peers", "listen", l.Addr().String())
	if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}
