package chaos

import (
	"net"
	"os/exec"
)

func netListen(addr string) (net.Listener, error) { return net.Listen("tcp", addr) }

func runCmd(name string, args ...string) (string, error) {
	out, err := exec.Command(name, args...).CombinedOutput()
	return string(out), err
}
