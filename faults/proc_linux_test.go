package faults_test

import "syscall"

// childAttr makes the kernel SIGKILL a process the tests start (an etcd
// member, an agent, a checker client) when the test binary dies, so that
// an interrupted run leaves no member frozen by SIGSTOP holding its ports
// and its data directory.
func childAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}
