//go:build !linux

package main

import "syscall"

// childSysProcAttr: without Pdeathsig, children exit when their stdin
// closes.
func childSysProcAttr() *syscall.SysProcAttr { return nil }
