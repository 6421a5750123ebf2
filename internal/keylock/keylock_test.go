package keylock_test

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/flynn/discoverd/internal/keylock"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

const wait = 10 * time.Second

func mustLock(tb testing.TB, s *keylock.Set[string], key string) func() {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	unlock, err := s.Lock(ctx, key)
	if err != nil {
		tb.Fatalf("Lock(%q): %v", key, err)
	}
	return unlock
}

// TestMutualExclusion: goroutines locking one key never overlap, and the
// set is empty once they are done.
func TestMutualExclusion(t *testing.T) {
	var s keylock.Set[string]
	var inside, overlaps atomic.Int32
	var wg sync.WaitGroup
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 200 {
				unlock := mustLock(t, &s, "k")
				if inside.Add(1) != 1 {
					overlaps.Add(1)
				}
				inside.Add(-1)
				unlock()
			}
		}()
	}
	wg.Wait()
	if n := overlaps.Load(); n != 0 {
		t.Fatalf("%d overlapping critical sections", n)
	}
	if n := s.Len(); n != 0 {
		t.Fatalf("Len = %d after every lock was released, want 0", n)
	}
}

// TestKeysAreIndependent: a held key does not block another key.
func TestKeysAreIndependent(t *testing.T) {
	var s keylock.Set[string]
	unlockA := mustLock(t, &s, "a")
	unlockB := mustLock(t, &s, "b")
	if n := s.Len(); n != 2 {
		t.Fatalf("Len = %d with two keys held, want 2", n)
	}
	unlockB()
	unlockA()
	if n := s.Len(); n != 0 {
		t.Fatalf("Len = %d, want 0", n)
	}
}

// TestWaitHonoursContext: a waiter gives up when its ctx ends, holding
// nothing, and the holder's unlock then frees the key for others.
func TestWaitHonoursContext(t *testing.T) {
	var s keylock.Set[string]
	unlock := mustLock(t, &s, "k")

	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() {
		_, err := s.Lock(ctx, "k")
		errc <- err
	}()
	cancel()
	select {
	case err := <-errc:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("Lock with a cancelled ctx: %v, want context.Canceled", err)
		}
	case <-time.After(wait):
		t.Fatal("a waiter did not give up when its ctx was cancelled")
	}
	unlock()
	mustLock(t, &s, "k")()
	if n := s.Len(); n != 0 {
		t.Fatalf("Len = %d, want 0", n)
	}
}

// TestDoneContextNeverLocks: a caller whose ctx is already done gets its
// error even when the lock is free (select alone would pick either).
func TestDoneContextNeverLocks(t *testing.T) {
	var s keylock.Set[string]
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	for range 1000 {
		if unlock, err := s.Lock(ctx, "k"); err == nil {
			unlock()
			t.Fatal("Lock succeeded with a cancelled ctx")
		}
	}
	if n := s.Len(); n != 0 {
		t.Fatalf("Len = %d, want 0", n)
	}
}

// TestUnlockTwice: a second call of unlock does not release a lock that
// someone else holds by then.
func TestUnlockTwice(t *testing.T) {
	var s keylock.Set[string]
	unlock := mustLock(t, &s, "k")
	unlock()
	unlock2 := mustLock(t, &s, "k")
	unlock() // must not release unlock2's hold
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := s.Lock(ctx, "k"); err == nil {
		t.Fatal("Lock succeeded with a cancelled ctx")
	}
	ctx, cancel = context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if u, err := s.Lock(ctx, "k"); err == nil {
		u()
		t.Fatal("a stale unlock released the lock of another holder")
	}
	unlock2()
	if n := s.Len(); n != 0 {
		t.Fatalf("Len = %d, want 0", n)
	}
}
