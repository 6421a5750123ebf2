//go:build !linux

package faults_test

import "syscall"

// childAttr: without Pdeathsig, a process the tests start outlives an
// interrupted test binary; the tests' cleanups stop it otherwise.
func childAttr() *syscall.SysProcAttr { return nil }
