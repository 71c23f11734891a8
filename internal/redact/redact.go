// Package redact keeps secrets that ride in URLs out of text: a SAS token
// or a presigned URL's signature in the query string, a password in the
// URL's user info. Go's *url.Error prints the whole request URL, so an
// error from a store's HTTP client carries an Azure SAS (which can write and
// delete) into logs, status and the fleet's event records unless something
// takes it out. The store clients redact their URL errors (URLError), and
// the places text leaves the daemon (its log, step errors, the CLI's
// errors) pass it through String as well.
package redact

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"regexp"
	"strings"
)

// Mark replaces what was taken out.
const Mark = "REDACTED"

var (
	// A URL: scheme://, then anything up to white space or a quote.
	urlRE = regexp.MustCompile(`[a-zA-Z][a-zA-Z0-9+.-]*://[^\s"'<>` + "`" + `]+`)
	// A signature parameter on its own (a header's value echoed back, a
	// query string without its URL).
	sigRE = regexp.MustCompile(`(?i)\b(sig|signature|x-amz-signature|x-amz-credential|x-amz-security-token|x-goog-signature|x-goog-credential|access_token|token)=[^&\s"'<>]+`)
)

// URL is u with its query string replaced by Mark and any password in its
// user info by Mark; a string that does not parse as a URL is cut at its
// first '?'.
func URL(u string) string {
	p, err := url.Parse(u)
	if err != nil {
		if i := strings.IndexByte(u, '?'); i >= 0 {
			return u[:i+1] + Mark
		}
		return u
	}
	changed := false
	if p.RawQuery != "" || p.ForceQuery {
		p.RawQuery, p.ForceQuery = Mark, false
		changed = true
	}
	if p.User != nil {
		if _, ok := p.User.Password(); ok {
			p.User = url.UserPassword(p.User.Username(), Mark)
			changed = true
		}
	}
	if !changed {
		return u
	}
	return p.String()
}

// String is s with every URL in it passed through URL and every bare
// signature parameter's value replaced by Mark.
func String(s string) string {
	if !strings.Contains(s, "://") && !strings.Contains(s, "=") {
		return s
	}
	s = urlRE.ReplaceAllStringFunc(s, URL)
	return sigRE.ReplaceAllStringFunc(s, func(kv string) string {
		k, _, _ := strings.Cut(kv, "=")
		return k + "=" + Mark
	})
}

// URLError takes the query string and password out of the URL of every
// *url.Error in err's chain, in place, and returns err: whatever wraps it
// prints it redacted from then on.
func URLError(err error) error {
	for e := err; e != nil; {
		var ue *url.Error
		if !errors.As(e, &ue) {
			break
		}
		ue.URL = URL(ue.URL)
		e = ue.Err
	}
	return err
}

// Error is err with its text passed through String; errors.Is and As still
// see what it wraps. nil stays nil, and an error with nothing to take out is
// returned as it is.
func Error(err error) error {
	if err == nil {
		return nil
	}
	msg := err.Error()
	if r := String(msg); r != msg {
		return &redacted{msg: r, err: err}
	}
	return err
}

type redacted struct {
	msg string
	err error
}

func (r *redacted) Error() string { return r.msg }
func (r *redacted) Unwrap() error { return r.err }

// Handler wraps h so that every record's message and attributes (strings,
// errors, anything printed) are passed through String before h sees them.
func Handler(h slog.Handler) slog.Handler { return handler{h} }

type handler struct{ slog.Handler }

func (h handler) Handle(ctx context.Context, r slog.Record) error {
	out := slog.NewRecord(r.Time, r.Level, String(r.Message), r.PC)
	r.Attrs(func(a slog.Attr) bool {
		out.AddAttrs(attr(a))
		return true
	})
	return h.Handler.Handle(ctx, out)
}

func (h handler) WithAttrs(as []slog.Attr) slog.Handler {
	red := make([]slog.Attr, len(as))
	for i, a := range as {
		red[i] = attr(a)
	}
	return handler{h.Handler.WithAttrs(red)}
}

func (h handler) WithGroup(name string) slog.Handler { return handler{h.Handler.WithGroup(name)} }

func attr(a slog.Attr) slog.Attr {
	v := a.Value.Resolve()
	switch v.Kind() {
	case slog.KindString:
		return slog.String(a.Key, String(v.String()))
	case slog.KindGroup:
		g := v.Group()
		red := make([]any, len(g))
		for i, x := range g {
			red[i] = attr(x)
		}
		return slog.Group(a.Key, red...)
	case slog.KindAny:
		switch x := v.Any().(type) {
		case error:
			return slog.String(a.Key, String(x.Error()))
		case []string:
			red := make([]string, len(x))
			for i, s := range x {
				red[i] = String(s)
			}
			return slog.Any(a.Key, red)
		case fmt.Stringer:
			return slog.String(a.Key, String(x.String()))
		}
	}
	return slog.Attr{Key: a.Key, Value: v}
}
