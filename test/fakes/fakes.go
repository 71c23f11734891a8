// Package fakes holds metadata servers written from GCP's, Azure's, Alibaba's and Tencent's
// documented behaviour, for tests and benchmarks of preemptd (AWS has a real
// simulator, amazon-ec2-metadata-mock, and needs none), each of which can be
// told to misbehave through Fault; and an object store in memory
// (MemStore), for trials too many for a real server.
package fakes

import (
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Fault, when it returns true, has answered the request itself.
type Fault func(w http.ResponseWriter, r *http.Request) bool

// GCP is the Compute Engine metadata server: "Metadata-Flavor: Google"
// required and echoed, ETags, and wait_for_change=true hanging until the
// value's ETag differs from last_etag.
type GCP struct {
	mu      sync.Mutex
	values  map[string]string
	version map[string]int
	changed chan struct{}
	fault   Fault
	waits   int
	// TokenTTL is how long the service-account tokens it issues live
	// (default an hour, as GCP's do).
	TokenTTL time.Duration
	tokens   tokens
	// HangLimit ends a hanging GET with the unchanged value after this long,
	// as the real server does after its timeout, when the request names no
	// timeout_sec of its own; zero waits for a change.
	HangLimit time.Duration
}

// NewGCP returns a server with instance/preempted FALSE and
// instance/maintenance-event NONE.
func NewGCP() *GCP {
	return &GCP{values: map[string]string{"instance/preempted": "FALSE", "instance/maintenance-event": "NONE",
		"instance/id": "1234567890", "instance/name": "trainer-1",
		"instance/service-accounts/default/scopes": "https://www.googleapis.com/auth/cloud-platform\nhttps://www.googleapis.com/auth/logging.write\n"},
		version: map[string]int{}, changed: make(chan struct{})}
}

// Delete removes a value (404 from then on) and wakes waiters.
func (s *GCP) Delete(path string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.values, path)
	s.version[path]++
	close(s.changed)
	s.changed = make(chan struct{})
}

// Set changes a value (path below /computeMetadata/v1/) and wakes waiters.
func (s *GCP) Set(path, v string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.values[path] = v
	s.version[path]++
	close(s.changed)
	s.changed = make(chan struct{})
}

// SetFault installs f (nil removes it).
func (s *GCP) SetFault(f Fault) {
	s.mu.Lock()
	s.fault = f
	s.mu.Unlock()
}

// Waits counts the wait_for_change requests served.
func (s *GCP) Waits() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.waits
}

func (s *GCP) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	fault := s.fault
	s.mu.Unlock()
	if fault != nil && fault(w, r) {
		return
	}
	if r.Header.Get("Metadata-Flavor") != "Google" {
		http.Error(w, "Missing Metadata-Flavor:Google header.", http.StatusForbidden)
		return
	}
	path := strings.TrimPrefix(r.URL.Path, "/computeMetadata/v1/")
	if path == "instance/service-accounts/default/token" {
		// {"access_token","expires_in","token_type"}, as the server answers.
		w.Header().Set("Metadata-Flavor", "Google")
		w.Header().Set("Content-Type", "application/json")
		tok, ttl := s.tokens.issue("ya29.fake-", s.TokenTTL)
		json.NewEncoder(w).Encode(map[string]any{"access_token": tok, "expires_in": int(ttl.Seconds()), "token_type": "Bearer"})
		return
	}
	wait := r.URL.Query().Get("wait_for_change") == "true"
	last := r.URL.Query().Get("last_etag")
	for {
		s.mu.Lock()
		v, ok := s.values[path]
		etag := strconv.Itoa(s.version[path])
		ch := s.changed
		if wait {
			s.waits++
		}
		s.mu.Unlock()
		w.Header().Set("Metadata-Flavor", "Google")
		if !ok {
			http.NotFound(w, r)
			return
		}
		if !wait || etag != last {
			w.Header().Set("ETag", etag)
			fmt.Fprint(w, v)
			return
		}
		var limit <-chan time.Time
		hang := s.HangLimit
		if sec, err := strconv.Atoi(r.URL.Query().Get("timeout_sec")); err == nil && sec > 0 {
			hang = time.Duration(sec) * time.Second // the request's own timeout, as the real server does
		}
		if hang > 0 {
			limit = time.After(hang)
		}
		select {
		case <-ch:
		case <-limit:
			w.Header().Set("ETag", etag)
			fmt.Fprint(w, v)
			return
		case <-r.Context().Done():
			return
		}
	}
}

// Valid says whether tok is a token this server issued that has not expired.
func (s *GCP) Valid(tok string) bool { return s.tokens.valid(tok) }

// Issued counts the tokens issued.
func (s *GCP) Issued() int { return s.tokens.issued() }

// tokens are the OAuth tokens a metadata server issued, with their expiry.
type tokens struct {
	mu  sync.Mutex
	exp map[string]time.Time
	n   int
}

func (t *tokens) issue(prefix string, ttl time.Duration) (string, time.Duration) {
	if ttl == 0 {
		ttl = time.Hour
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	t.n++
	tok := fmt.Sprintf("%s%d-%d", prefix, t.n, time.Now().UnixNano())
	if t.exp == nil {
		t.exp = map[string]time.Time{}
	}
	t.exp[tok] = time.Now().Add(ttl)
	return tok, ttl
}

func (t *tokens) valid(tok string) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	exp, ok := t.exp[tok]
	return ok && time.Now().Before(exp)
}

func (t *tokens) issued() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.n
}

// AzureEvent is one scheduled event as the service writes it.
type AzureEvent struct {
	EventId           string   `json:"EventId"`
	EventType         string   `json:"EventType"`
	ResourceType      string   `json:"ResourceType"`
	Resources         []string `json:"Resources"`
	EventStatus       string   `json:"EventStatus"`
	NotBefore         string   `json:"NotBefore"`
	Description       string   `json:"Description"`
	EventSource       string   `json:"EventSource"`
	DurationInSeconds int      `json:"DurationInSeconds"`
}

// Azure is the Scheduled Events service (api-version 2020-07-01) with the
// instance name endpoint: "Metadata: true" required, DocumentIncarnation
// bumped on every change, StartRequests POSTs recorded and the acknowledged
// events started (removed, as the platform does once it proceeds).
type Azure struct {
	mu     sync.Mutex
	VMName string
	incarn int
	events []AzureEvent
	acks   []string
	fault  Fault
	onAck  func(id string)
	// ClientIDs are the user-assigned identities the VM has (any
	// client_id else is refused, as IMDS does); the system-assigned one
	// always answers.
	ClientIDs []string
	// TokenTTL is how long its managed-identity tokens live (default 24 h).
	TokenTTL time.Duration
	// Tenant names the issuer of its tokens.
	Tenant string
	tokens tokens
}

// NewAzure returns a service for the VM named vm, with no events.
func NewAzure(vm string) *Azure { return &Azure{VMName: vm, incarn: 1} }

// SetEvents replaces the event list.
func (s *Azure) SetEvents(evs ...AzureEvent) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.incarn++
	s.events = evs
}

// SetFault installs f (nil removes it).
func (s *Azure) SetFault(f Fault) {
	s.mu.Lock()
	s.fault = f
	s.mu.Unlock()
}

// OnAck is called with each acknowledged EventId.
func (s *Azure) OnAck(f func(id string)) {
	s.mu.Lock()
	s.onAck = f
	s.mu.Unlock()
}

// Acks returns the acknowledged EventIds in order.
func (s *Azure) Acks() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.acks...)
}

func (s *Azure) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	fault := s.fault
	s.mu.Unlock()
	if fault != nil && fault(w, r) {
		return
	}
	if r.Header.Get("Metadata") != "true" {
		http.Error(w, `{"error":"Bad request. Required metadata header not specified"}`, http.StatusBadRequest)
		return
	}
	switch {
	case r.URL.Path == "/metadata/instance/compute/name":
		s.mu.Lock()
		name := s.VMName
		s.mu.Unlock()
		fmt.Fprint(w, name)
	case r.URL.Path == "/metadata/identity/oauth2/token" && r.URL.Query().Get("api-version") != "":
		s.token(w, r)
	case r.URL.Path == "/metadata/scheduledevents" && r.URL.Query().Get("api-version") != "":
		if r.Method == http.MethodPost {
			s.start(w, r)
			return
		}
		s.mu.Lock()
		doc := struct {
			DocumentIncarnation int
			Events              []AzureEvent
		}{s.incarn, append([]AzureEvent{}, s.events...)}
		s.mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(doc)
	default:
		http.NotFound(w, r)
	}
}

// token answers as IMDS's managed-identity endpoint does: the numbers as
// strings, and the token a JWT whose audience is the resource asked for and
// whose issuer is the tenant's (what Azurite's OAuth mode checks).
func (s *Azure) token(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	resource := q.Get("resource")
	s.mu.Lock()
	known := q.Get("client_id") == "" || slices.Contains(s.ClientIDs, q.Get("client_id"))
	ttl, tenant := s.TokenTTL, s.Tenant
	s.mu.Unlock()
	switch {
	case resource == "":
		http.Error(w, `{"error":"invalid_request","error_description":"Required query variable 'resource' is missing"}`, http.StatusBadRequest)
		return
	case !known:
		http.Error(w, `{"error":"invalid_request","error_description":"Identity not found"}`, http.StatusBadRequest)
		return
	}
	if ttl == 0 {
		ttl = 24 * time.Hour
	}
	if tenant == "" {
		tenant = "ab1f708d-50f6-404c-a006-d71b2ac7a606"
	}
	now := time.Now()
	claims, _ := json.Marshal(map[string]any{"aud": strings.TrimSuffix(resource, "/"), "iss": "https://sts.windows.net/" + tenant + "/",
		"iat": now.Unix(), "nbf": now.Unix() - 60, "exp": now.Add(ttl).Unix(), "oid": "00000000-0000-0000-0000-000000000001",
		"tid": tenant, "xms_mirid": q.Get("client_id")})
	enc := base64.RawURLEncoding
	seq, _ := s.tokens.issue("", ttl)
	jwt := enc.EncodeToString([]byte(`{"alg":"RS256","typ":"JWT","kid":"`+seq+`"}`)) + "." + enc.EncodeToString(claims) + "." + enc.EncodeToString([]byte("unsigned-fake"))
	s.tokens.mu.Lock()
	s.tokens.exp[jwt] = s.tokens.exp[seq]
	s.tokens.mu.Unlock()
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(map[string]string{"access_token": jwt, "expires_in": strconv.Itoa(int(ttl.Seconds())),
		"expires_on": strconv.FormatInt(now.Add(ttl).Unix(), 10), "resource": resource, "token_type": "Bearer"})
}

// Valid says whether tok is a token this service issued that has not expired.
func (s *Azure) Valid(tok string) bool { return s.tokens.valid(tok) }

// Issued counts the tokens issued.
func (s *Azure) Issued() int { return s.tokens.issued() }

func (s *Azure) start(w http.ResponseWriter, r *http.Request) {
	b, _ := io.ReadAll(io.LimitReader(r.Body, 1<<16))
	var body struct {
		StartRequests []struct{ EventId string }
	}
	if err := json.Unmarshal(b, &body); err != nil || len(body.StartRequests) == 0 {
		http.Error(w, "bad StartRequests", http.StatusBadRequest)
		return
	}
	s.mu.Lock()
	onAck := s.onAck
	for _, sr := range body.StartRequests {
		s.acks = append(s.acks, sr.EventId)
		kept := s.events[:0]
		for _, e := range s.events {
			if e.EventId != sr.EventId {
				kept = append(kept, e)
			}
		}
		s.events = kept
		s.incarn++
	}
	s.mu.Unlock()
	if onAck != nil {
		for _, sr := range body.StartRequests {
			onAck(sr.EventId)
		}
	}
}
