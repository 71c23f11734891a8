package fakes

import (
	"crypto/rand"
	"encoding/hex"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
)

// Alibaba is the ECS metadata service at 100.100.100.200, from Alibaba
// Cloud's documentation: PUT /latest/api/token with
// X-aliyun-ecs-metadata-token-ttl-seconds (1 to 21600) hands out a token;
// with Hardened (the security hardening mode) every GET must carry it in
// X-aliyun-ecs-metadata-token, else 403; instance/spot/termination-time is
// 404 until the release time is set (UTC, 2006-01-02T15:04:05Z).
type Alibaba struct {
	Hardened bool
	// NoTokens makes the token endpoint 404, as an older service's.
	NoTokens bool

	mu      sync.Mutex
	tokens  map[string]bool
	release string
	fault   Fault
	gets    atomic.Int64
}

// NewAlibaba returns the service with no notice.
func NewAlibaba() *Alibaba { return &Alibaba{tokens: map[string]bool{}} }

// SetRelease sets instance/spot/termination-time ("" removes it).
func (s *Alibaba) SetRelease(v string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.release = v
}

// SetFault makes f answer first.
func (s *Alibaba) SetFault(f Fault) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.fault = f
}

// ForgetTokens drops every token handed out (the service restarted).
func (s *Alibaba) ForgetTokens() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.tokens = map[string]bool{}
}

// Gets counts the GETs of the spot document.
func (s *Alibaba) Gets() int { return int(s.gets.Load()) }

func (s *Alibaba) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	f, hardened := s.fault, s.Hardened
	s.mu.Unlock()
	if f != nil && f(w, r) {
		return
	}
	if r.URL.Path == "/latest/api/token" {
		if s.NoTokens {
			http.NotFound(w, r)
			return
		}
		if r.Method != http.MethodPut {
			http.Error(w, "", http.StatusMethodNotAllowed)
			return
		}
		ttl, err := strconv.Atoi(r.Header.Get("X-aliyun-ecs-metadata-token-ttl-seconds"))
		if err != nil || ttl < 1 || ttl > 21600 {
			http.Error(w, "invalid ttl", http.StatusBadRequest)
			return
		}
		b := make([]byte, 16)
		rand.Read(b)
		tok := hex.EncodeToString(b)
		s.mu.Lock()
		s.tokens[tok] = true
		s.mu.Unlock()
		w.Write([]byte(tok))
		return
	}
	if r.Method != http.MethodGet {
		http.Error(w, "", http.StatusMethodNotAllowed)
		return
	}
	s.mu.Lock()
	tok := r.Header.Get("X-aliyun-ecs-metadata-token")
	valid := s.tokens[tok]
	release := s.release
	s.mu.Unlock()
	if (hardened && !valid) || (tok != "" && !valid) {
		http.Error(w, "", http.StatusForbidden)
		return
	}
	path := strings.TrimPrefix(r.URL.Path, "/latest/meta-data/")
	switch path {
	case "instance-id":
		w.Write([]byte("i-bp1fakefakefake0001"))
	case "instance/instance-type":
		w.Write([]byte("ecs.gn7i-c8g1.2xlarge"))
	case "region-id":
		w.Write([]byte("cn-hangzhou"))
	case "zone-id":
		w.Write([]byte("cn-hangzhou-i"))
	case "instance/spot/termination-time":
		s.gets.Add(1)
		if release == "" {
			http.NotFound(w, r)
			return
		}
		w.Write([]byte(release))
	default:
		http.NotFound(w, r)
	}
}

// Tencent is the CVM metadata service at metadata.tencentyun.com, from
// Tencent Cloud's documentation: spot/termination-time is 404 until the
// reclaim time is set, in Beijing time (UTC+8) as 2006-01-02 15:04:05.
type Tencent struct {
	mu      sync.Mutex
	reclaim string
	fault   Fault
}

// NewTencent returns the service with no notice.
func NewTencent() *Tencent { return &Tencent{} }

// SetReclaim sets spot/termination-time ("" removes it).
func (s *Tencent) SetReclaim(v string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.reclaim = v
}

// SetFault makes f answer first.
func (s *Tencent) SetFault(f Fault) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.fault = f
}

func (s *Tencent) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	f, reclaim := s.fault, s.reclaim
	s.mu.Unlock()
	if f != nil && f(w, r) {
		return
	}
	if r.Method != http.MethodGet {
		http.Error(w, "", http.StatusMethodNotAllowed)
		return
	}
	switch strings.TrimPrefix(r.URL.Path, "/latest/meta-data/") {
	case "instance-id":
		w.Write([]byte("ins-fake0001"))
	case "instance/instance-type":
		w.Write([]byte("GN7.2XLARGE32"))
	case "placement/region":
		w.Write([]byte("ap-guangzhou"))
	case "placement/zone":
		w.Write([]byte("ap-guangzhou-3"))
	case "spot/termination-time":
		if reclaim == "" {
			http.NotFound(w, r)
			return
		}
		w.Write([]byte(reclaim))
	default:
		http.NotFound(w, r)
	}
}
