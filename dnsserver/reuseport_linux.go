package dnsserver

import (
	"runtime"
	"syscall"

	"golang.org/x/sys/unix"
)

// udpSockets is how many UDP sockets the server reads: one per CPU, so
// that reading packets is not one goroutine's job.
func udpSockets() int { return max(1, min(runtime.GOMAXPROCS(0), 8)) }

// reusePort sets SO_REUSEPORT, so that several sockets of this process
// bind one address (Linux only lets sockets of the same user share it).
func reusePort(_, _ string, c syscall.RawConn) error {
	var serr error
	err := c.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1)
	})
	if err != nil {
		return err
	}
	return serr
}
