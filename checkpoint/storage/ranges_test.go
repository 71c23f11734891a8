package storage

import (
	"bytes"
	"errors"
	"io"
	"net/http"
	"strings"
	"testing"
)

// TestReadRangeRefusesWhatIsNotTheRange: a ranged GET's answer is taken
// only as the range asked for — a server that ignored the Range header (a
// 200 with the whole object) is refused unless the range was the whole
// object, and a body cut short is ErrShortRange, never a shorter range.
func TestReadRangeRefusesWhatIsNotTheRange(t *testing.T) {
	resp := func(status int, body string) *http.Response {
		return &http.Response{StatusCode: status, Status: http.StatusText(status), ContentLength: int64(len(body)),
			Body: io.NopCloser(strings.NewReader(body))}
	}
	for _, c := range []struct {
		name   string
		resp   *http.Response
		off, n int64
		want   string
		err    string
	}{
		{"206 with the range", resp(206, "cdef"), 2, 4, "cdef", ""},
		{"200 with the whole object asked for", resp(200, "abcdef"), 0, 6, "abcdef", ""},
		{"200 with the whole object for a range", resp(200, "abcdef"), 2, 4, "", "instead of the range"},
		{"200 with more than the first range", resp(200, "abcdef"), 0, 4, "", "instead of the range"},
		{"206 cut short", resp(206, "cd"), 2, 4, "", ErrShortRange.Error()},
		{"416", resp(416, ""), 2, 4, "", "instead of the range"},
	} {
		t.Run(c.name, func(t *testing.T) {
			var b bytes.Buffer
			err := readRange(&b, c.resp, "k", c.off, c.n)
			if c.err == "" {
				if err != nil || b.String() != c.want {
					t.Fatalf("got %q, %v; want %q", b.String(), err, c.want)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), c.err) {
				t.Fatalf("err = %v, want one saying %q", err, c.err)
			}
			if c.err == ErrShortRange.Error() && !errors.Is(err, ErrShortRange) {
				t.Fatalf("err = %v, not ErrShortRange", err)
			}
		})
	}
}
