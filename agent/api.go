package agent

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/preemptd/preemptd/advice"
)

// SocketName is the local API's unix socket in run_dir.
const SocketName = "preemptd.sock"

// SimulateRequest is the body of POST /v1/simulate.
type SimulateRequest struct {
	Kind string `json:"kind"`
	// In is the time to the deadline, a Go duration ("2m").
	In string `json:"in"`
	ID string `json:"id,omitempty"`
	// Job makes the drill stop the whole multi-node job (its other nodes
	// get a job notice), as a cloud's notice would.
	Job bool `json:"job,omitempty"`
}

const maxNoticeWait = 10 * time.Minute

// Handler serves the local API:
//
//	GET  /v1/status              the agent's Status
//	GET  /v1/notice?wait=30s     the current notice (NoticeFile); with wait,
//	                             a long-poll until one exists (204 on timeout)
//	POST /v1/simulate            inject a simulated notice (SimulateRequest)
//	GET  /v1/advice?wait=30s     when to checkpoint (advice.Advice); with
//	                             wait, held until checkpoint_now is true
func (a *Agent) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/status", func(w http.ResponseWriter, r *http.Request) {
		st := a.Status()
		if a.deps.GPUs != nil {
			snap := a.deps.GPUs.Snapshot(r.Context())
			st.GPUs = &snap
		}
		writeJSON(w, http.StatusOK, st)
	})
	mux.HandleFunc("GET /v1/notice", a.serveNotice)
	mux.HandleFunc("POST /v1/simulate", a.serveSimulate)
	mux.HandleFunc("GET /v1/advice", a.serveAdvice)
	return mux
}

// parseWait reads a long-poll's ?wait= (0 when absent), at most
// maxNoticeWait; a bad value is answered 400 and ok is false.
func parseWait(w http.ResponseWriter, r *http.Request) (time.Duration, bool) {
	v := r.URL.Query().Get("wait")
	if v == "" {
		return 0, true
	}
	d, err := time.ParseDuration(v)
	if err != nil || d < 0 {
		writeJSON(w, http.StatusBadRequest, map[string]string{"error": fmt.Sprintf("wait: %q is not a duration like 30s", v)})
		return 0, false
	}
	return min(d, maxNoticeWait), true
}

func (a *Agent) serveNotice(w http.ResponseWriter, r *http.Request) {
	wait, ok := parseWait(w, r)
	if !ok {
		return
	}
	if !hold(r, wait, func() (bool, <-chan struct{}) {
		_, _, ok, changed := a.waitChange()
		return ok, changed
	}) {
		return
	}
	if n, class, ok := a.current(); ok {
		writeJSON(w, http.StatusOK, NewNoticeFile(n, class, a.now()))
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

// hold is a long-poll's wait: until ready says so (asked again at every
// close of the channel it returns), wait has passed, or the client has
// gone (false: nothing to answer).
func hold(r *http.Request, wait time.Duration, ready func() (bool, <-chan struct{})) bool {
	timer := time.NewTimer(wait)
	defer timer.Stop()
	for {
		ok, changed := ready()
		if ok {
			return true
		}
		select {
		case <-changed:
		case <-timer.C:
			return true
		case <-r.Context().Done():
			return false
		}
	}
}

func (a *Agent) serveSimulate(w http.ResponseWriter, r *http.Request) {
	if p, ok := a.mayChange(r); !ok {
		a.log.Warn("simulate refused", "peer_uid", p.UID, "peer_pid", p.PID)
		writeJSON(w, http.StatusForbidden, map[string]string{"error": fmt.Sprintf(
			"uid %d may not simulate notices: run as root or the daemon's user, or join api.simulate_group", p.UID)})
		return
	}
	var req SimulateRequest
	dec := json.NewDecoder(io.LimitReader(r.Body, 64<<10))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil && !errors.Is(err, io.EOF) {
		writeJSON(w, http.StatusBadRequest, map[string]string{"error": "body: " + err.Error()})
		return
	}
	n, err := SimulatedNotice(req, a.now())
	if err != nil {
		writeJSON(w, http.StatusBadRequest, map[string]string{"error": err.Error()})
		return
	}
	if n.Job && a.deps.Job == nil {
		writeJSON(w, http.StatusBadRequest, map[string]string{"error": "job: this daemon is not a node of a multi-node job " +
			"(job.nodes is 1), so a job drill has no other node to stop; leave --job out for a drill of this machine"})
		return
	}
	if err := a.Inject(n); err != nil {
		writeJSON(w, http.StatusServiceUnavailable, map[string]string{"error": err.Error()})
		return
	}
	writeJSON(w, http.StatusAccepted, n)
}

// SimulatedNotice turns a simulate request into a notice; the defaults are a
// terminate notice two minutes out, as AWS gives. A rebalance
// recommendation has no deadline, as AWS's has none.
func SimulatedNotice(req SimulateRequest, now time.Time) (Notice, error) {
	kind := KindTerminate
	if req.Kind != "" {
		k, err := ParseKind(req.Kind)
		if err != nil {
			return Notice{}, err
		}
		kind = k
	}
	in := 2 * time.Minute
	if req.In != "" {
		if kind == KindRebalance {
			return Notice{}, fmt.Errorf("in: a rebalance recommendation has no deadline; leave --in out")
		}
		d, err := time.ParseDuration(req.In)
		if err != nil || d < 0 {
			return Notice{}, fmt.Errorf("in: %q is not a duration like 30s", req.In)
		}
		in = d
	}
	id := req.ID
	if id == "" {
		id = fmt.Sprintf("sim-%d", now.UnixNano())
	}
	n := Notice{Provider: ProviderSimulate, Kind: kind, ID: id, Action: string(kind), NoticedAt: now, Job: req.Job}
	if kind != KindRebalance {
		n.Deadline = now.Add(in)
	}
	return n, nil
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}

// ListenSocket listens on the unix socket at path, mode 0666: anyone who
// can reach run_dir may read the status and long-poll the notice (the
// trainer often runs as its own user); changing anything (POST
// /v1/simulate) is checked per connection against the peer's credentials
// (SO_PEERCRED). The socket is made under an unpredictable temporary name,
// given its mode, then renamed into place.
func ListenSocket(path string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("socket dir: %w", err)
	}
	var rnd [8]byte
	if _, err := rand.Read(rnd[:]); err != nil {
		return nil, fmt.Errorf("socket name: %w", err)
	}
	tmp := fmt.Sprintf("%s.%x.tmp", path, rnd)
	l, err := net.Listen("unix", tmp)
	if err != nil {
		return nil, fmt.Errorf("listen %s: %w", tmp, err)
	}
	ul := l.(*net.UnixListener)
	ul.SetUnlinkOnClose(false)
	if err := os.Chmod(tmp, 0o666); err != nil {
		l.Close()
		os.Remove(tmp)
		return nil, fmt.Errorf("socket mode: %w", err)
	}
	mine, err := os.Lstat(tmp)
	if err != nil {
		l.Close()
		os.Remove(tmp)
		return nil, fmt.Errorf("socket %s: %w", tmp, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		l.Close()
		os.Remove(tmp)
		return nil, fmt.Errorf("socket %s: %w", path, err)
	}
	return &socketListener{Listener: l, path: path, mine: mine}, nil
}

type peerKey struct{}

// Peer is the process at the other end of a local API connection.
type Peer struct {
	PID, UID, GID int
}

// peerConn stashes the connection's peer credentials in its context.
func peerConn(ctx context.Context, c net.Conn) context.Context {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return ctx
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return ctx
	}
	var cred *unix.Ucred
	raw.Control(func(fd uintptr) { cred, _ = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED) })
	if cred == nil {
		return ctx
	}
	return context.WithValue(ctx, peerKey{}, Peer{PID: int(cred.Pid), UID: int(cred.Uid), GID: int(cred.Gid)})
}

// mayChange says whether the peer may change the daemon's state: root, the
// daemon's own user, or a member of the configured simulate group.
func (a *Agent) mayChange(r *http.Request) (Peer, bool) {
	p, ok := r.Context().Value(peerKey{}).(Peer)
	if !ok {
		return p, false
	}
	if p.UID == 0 || p.UID == os.Geteuid() {
		return p, true
	}
	for _, g := range a.cfg.SimulateGroups {
		if p.GID == g || slices.Contains(supplementaryGroups(p.PID), g) {
			return p, true
		}
	}
	return p, false
}

// supplementaryGroups reads a process's groups from /proc.
func supplementaryGroups(pid int) []int {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return nil
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "Groups:"); ok {
			var out []int
			for _, f := range strings.Fields(v) {
				if g, err := strconv.Atoi(f); err == nil {
					out = append(out, g)
				}
			}
			return out
		}
	}
	return nil
}

type socketListener struct {
	net.Listener
	path string
	mine os.FileInfo // the socket file this listener made
}

// Close stops listening and removes the socket only while the path is still
// this listener's own: another daemon's socket there is left alone.
func (l *socketListener) Close() error {
	err := l.Listener.Close()
	if cur, serr := os.Lstat(l.path); serr == nil && os.SameFile(cur, l.mine) {
		os.Remove(l.path)
	}
	return err
}

// Serve runs the local API on l until ctx ends; when it returns the socket
// is closed and removed.
func (a *Agent) Serve(ctx context.Context, l net.Listener) error {
	srv := &http.Server{Handler: a.Handler(), ReadHeaderTimeout: 5 * time.Second, ConnContext: peerConn}
	stopped := make(chan struct{})
	go func() {
		defer close(stopped)
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
	}()
	err := srv.Serve(l)
	if errors.Is(err, http.ErrServerClosed) {
		<-stopped
		err = nil
	}
	l.Close()
	if err != nil {
		return fmt.Errorf("local api: %w", err)
	}
	return nil
}

// Client talks to a running daemon's local API.
type Client struct {
	http *http.Client
}

// NewClient returns a client for the socket at path.
func NewClient(path string) *Client {
	tr := &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", path)
	}}
	return &Client{http: &http.Client{Transport: tr}}
}

// RequestError is the daemon's refusal of a request: its HTTP status and
// its words.
type RequestError struct {
	Status int
	Msg    string
}

func (e *RequestError) Error() string { return e.Msg }

// ErrNotRunning is returned when no daemon answers on the socket.
var ErrNotRunning = errors.New("preemptd is not running (no answer on its socket)")

func (c *Client) do(ctx context.Context, method, path string, body io.Reader, out any) (int, error) {
	req, err := http.NewRequestWithContext(ctx, method, "http://preemptd"+path, body)
	if err != nil {
		return 0, err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.http.Do(req)
	if err != nil {
		var op *net.OpError
		if errors.As(err, &op) {
			return 0, fmt.Errorf("%w: %v", ErrNotRunning, err)
		}
		return 0, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
	if err != nil {
		return resp.StatusCode, err
	}
	if resp.StatusCode >= 400 {
		var e struct{ Error string }
		if json.Unmarshal(b, &e) == nil && e.Error != "" {
			return resp.StatusCode, &RequestError{Status: resp.StatusCode, Msg: e.Error}
		}
		return resp.StatusCode, &RequestError{Status: resp.StatusCode, Msg: "local api: " + resp.Status}
	}
	if out != nil && resp.StatusCode != http.StatusNoContent {
		if err := json.Unmarshal(b, out); err != nil {
			return resp.StatusCode, fmt.Errorf("local api: decode: %w", err)
		}
	}
	return resp.StatusCode, nil
}

// Advice fetches the daemon's checkpoint advice; with wait > 0 the daemon
// holds the request until checkpoint_now is true or wait has passed.
func (c *Client) Advice(ctx context.Context, wait time.Duration) (advice.Advice, error) {
	var a advice.Advice
	path := "/v1/advice"
	if wait > 0 {
		path += "?wait=" + wait.String()
	}
	_, err := c.do(ctx, http.MethodGet, path, nil, &a)
	return a, err
}

// Status fetches the daemon's status.
func (c *Client) Status(ctx context.Context) (Status, error) {
	var s Status
	_, err := c.do(ctx, http.MethodGet, "/v1/status", nil, &s)
	return s, err
}

// Simulate asks the daemon to act on a simulated notice.
func (c *Client) Simulate(ctx context.Context, req SimulateRequest) (Notice, error) {
	b, _ := json.Marshal(req)
	var n Notice
	_, err := c.do(ctx, http.MethodPost, "/v1/simulate", bytes.NewReader(b), &n)
	return n, err
}

// Notice long-polls for the current notice; ok is false when none came
// within wait.
func (c *Client) Notice(ctx context.Context, wait time.Duration) (NoticeFile, bool, error) {
	var f NoticeFile
	code, err := c.do(ctx, http.MethodGet, "/v1/notice?wait="+wait.String(), nil, &f)
	return f, code == http.StatusOK, err
}
