// Package testkit holds the helpers that the root module's tests share:
// a log sink safe for concurrent writes, a bounded poll, and names unique
// to a test. Only tests import it. (The rpc and client modules cannot
// import the root module's internal packages and keep their own.)
//
//	var log testkit.SyncBuffer
//	srv := start(t, &log)
//	testkit.Eventually(t, 5*time.Second, "the start to be logged", func() bool {
//		return strings.Contains(log.String(), "serving")
//	})
package testkit

import (
	"bytes"
	"net"
	"strings"
	"sync"
	"testing"
	"time"
)

// SyncBuffer is a bytes.Buffer safe for concurrent Write and String, for
// logs and process output written from other goroutines. Its zero value is
// ready to use.
type SyncBuffer struct {
	mu    sync.Mutex
	buf   bytes.Buffer
	wrote chan struct{} // capacity 1: signalled after each write
}

// Write appends p and signals Wrote.
func (b *SyncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.wrote == nil {
		b.wrote = make(chan struct{}, 1)
	}
	select {
	case b.wrote <- struct{}{}:
	default:
	}
	return b.buf.Write(p)
}

// String returns everything written so far.
func (b *SyncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// Wrote returns a channel that receives after a write, at most one
// pending signal for any number of writes: a reader waiting for some
// output selects on it and looks at String again.
func (b *SyncBuffer) Wrote() <-chan struct{} {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.wrote == nil {
		b.wrote = make(chan struct{}, 1)
	}
	return b.wrote
}

// pollEvery is how often Eventually checks its condition.
const pollEvery = 10 * time.Millisecond

// Eventually checks cond every 10 ms until it holds, and fails tb
// ("timed out waiting for <what>") when it does not within bound. It is
// for states that have no change notification to wait on.
func Eventually(tb testing.TB, bound time.Duration, what string, cond func() bool) {
	tb.Helper()
	deadline := time.NewTimer(bound)
	defer deadline.Stop()
	tick := time.NewTicker(pollEvery)
	defer tick.Stop()
	for !cond() {
		select {
		case <-deadline.C:
			tb.Fatalf("timed out waiting for %s", what)
		case <-tick.C:
		}
	}
}

// ServiceName returns a valid service name made of the test's name and
// suffix, so that tests sharing a store do not see each other's services.
func ServiceName(tb testing.TB, suffix string) string {
	n := strings.NewReplacer("/", "-", "_", "-").Replace(tb.Name())
	return strings.ToLower(n) + "-" + suffix
}

// TCPTarget starts a real TCP server on 127.0.0.1 that accepts and closes
// every connection (a health-check target that passes), and returns its
// address and stop, which closes it (so that checks fail) and waits for
// its goroutine. stop may be called more than once; the test's cleanup
// calls it too.
func TCPTarget(tb testing.TB) (addr string, stop func()) {
	tb.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	var once sync.Once
	stop = func() { once.Do(func() { ln.Close(); <-done }) }
	tb.Cleanup(stop)
	return ln.Addr().String(), stop
}
