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
