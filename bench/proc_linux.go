package main

import "syscall"

// childSysProcAttr makes the kernel kill a child when the tool dies.
func childSysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}
