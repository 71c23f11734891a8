package redact

import (
	"bytes"
	"errors"
	"io/fs"
	"log/slog"
	"net/url"
	"os"
	"strings"
	"testing"
)

const sas = "sv=2019-12-12&ss=b&srt=sco&sp=rwdlc&se=2026-12-06T20%3A00%3A00Z&sig=AbC%2Bd%2FeF%3D"

func TestString(t *testing.T) {
	for _, tc := range []struct{ name, in, want string }{
		{"SAS in a url.Error", `Put "https://acct.blob.core.windows.net/ckpt/runs/a?comp=block&` + sas + `": connection reset by peer`,
			`Put "https://acct.blob.core.windows.net/ckpt/runs/a?REDACTED": connection reset by peer`},
		{"password in user info", "dial http://user:hunter2@10.0.0.1:9000/bkt failed", "dial http://user:REDACTED@10.0.0.1:9000/bkt failed"},
		{"bare signature", "x-ms-copy-source: c/k?" + sas, "x-ms-copy-source: c/k?sv=2019-12-12&ss=b&srt=sco&sp=rwdlc&se=2026-12-06T20%3A00%3A00Z&sig=REDACTED"},
		{"nothing to take out", "storage: put step-3/model.pt: 503 SlowDown", "storage: put step-3/model.pt: 503 SlowDown"},
		{"a URL without a query", "webhook http://127.0.0.1:1/services/x refused", "webhook http://127.0.0.1:1/services/x refused"},
		{"a key named like a token setting", "set PREEMPTD_JOB_TOKEN=abc on every node", "set PREEMPTD_JOB_TOKEN=abc on every node"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := String(tc.in); got != tc.want {
				t.Fatalf("String(%q)\n got %q\nwant %q", tc.in, got, tc.want)
			}
		})
	}
}

func TestURLErrorInPlace(t *testing.T) {
	ue := &url.Error{Op: "Get", URL: "https://acct.blob.core.windows.net/c/k?" + sas, Err: os.ErrDeadlineExceeded}
	wrapped := errors.Join(errors.New("storage: get k"), ue)
	URLError(wrapped)
	if strings.Contains(wrapped.Error(), "sig=") || !strings.Contains(wrapped.Error(), "?REDACTED") {
		t.Fatalf("after URLError: %v", wrapped)
	}
	if !errors.Is(wrapped, os.ErrDeadlineExceeded) {
		t.Fatal("the chain was lost")
	}
}

func TestErrorKeepsTheChain(t *testing.T) {
	base := fs.ErrNotExist
	err := Error(errors.Join(base, errors.New("https://h/x?"+sas)))
	if strings.Contains(err.Error(), "AbC") || !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("Error: %v (is ErrNotExist: %v)", err, errors.Is(err, fs.ErrNotExist))
	}
	plain := errors.New("nothing secret")
	if Error(plain) != plain || Error(nil) != nil {
		t.Fatal("an error with nothing to take out changed")
	}
}

func TestHandler(t *testing.T) {
	var buf bytes.Buffer
	log := slog.New(Handler(slog.NewJSONHandler(&buf, nil))).With("store", "https://a.blob.core.windows.net/c?"+sas)
	log.Error("upload failed https://h/p?"+sas, "err", errors.New(`Put "https://h/p?`+sas+`": EOF`),
		"urls", []string{"https://h/q?" + sas}, slog.Group("g", "u", "https://h/r?"+sas))
	if strings.Contains(buf.String(), "AbC") || strings.Count(buf.String(), Mark) != 5 {
		t.Fatalf("log: %s", buf.String())
	}
}
