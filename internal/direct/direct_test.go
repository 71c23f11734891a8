package direct

import "testing"

func TestTransportHasNoProxy(t *testing.T) {
	if Transport().Proxy != nil {
		t.Fatal("metadata transport has a proxy function: HTTP(S)_PROXY would carry metadata requests")
	}
	if Client(0).Timeout != 0 {
		t.Fatal("Client(0) has a timeout")
	}
}

func TestHostOf(t *testing.T) {
	for in, want := range map[string]string{"http://127.0.0.1:8080/": "127.0.0.1:8080", "metadata.google.internal": "metadata.google.internal",
		"127.0.0.1:9/": "127.0.0.1:9", "https://h:1/x": "h:1"} {
		if got := HostOf(in); got != want {
			t.Errorf("HostOf(%q) = %q, want %q", in, got, want)
		}
	}
}
