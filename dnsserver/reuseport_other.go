//go:build !linux

package dnsserver

import "syscall"

// udpSockets is 1 where SO_REUSEPORT is not used.
func udpSockets() int { return 1 }

func reusePort(_, _ string, _ syscall.RawConn) error { return nil }
