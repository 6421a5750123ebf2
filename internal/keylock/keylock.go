// Package keylock provides a set of mutexes by key, for serialising the
// operations on one key (a registration, a znode) while operations on
// different keys run in parallel. A lock is created on demand and dropped
// when nobody holds it or waits for it, so the set costs memory only for
// the keys in use. Waiting for a lock honours a context.
//
//	var locks keylock.Set[string]
//	unlock, err := locks.Lock(ctx, "web/10.0.0.1:80")
//	if err != nil {
//		return err // ctx ended first: nothing is held
//	}
//	defer unlock()
//	// ... the store operations on that key ...
package keylock

import (
	"context"
	"sync"
)

// Set is a set of mutexes by key. The zero value is ready to use. A Set
// must not be copied after first use. Its methods are safe for concurrent
// use.
//
// Locks are not reentrant, and waiters are not served in any particular
// order.
type Set[K comparable] struct {
	mu sync.Mutex
	m  map[K]*entry
}

// entry is the lock of one key. ch holds a token while the lock is held,
// so that waiting for it is a select that can also watch a context.
type entry struct {
	ch   chan struct{}
	refs int // holder and waiters; guarded by Set.mu
}

// Lock acquires the lock of key, blocking until it is free or ctx is done.
// It returns the function that releases the lock, which the caller must
// call when done (later calls of it do nothing), or ctx.Err() with nothing
// held.
//
// A ctx that is already done, or that is done by the time the lock is
// acquired, always yields its error: a caller that gave up never proceeds
// on a lock it happened to win.
func (s *Set[K]) Lock(ctx context.Context, key K) (unlock func(), err error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	s.mu.Lock()
	if s.m == nil {
		s.m = make(map[K]*entry)
	}
	e := s.m[key]
	if e == nil {
		e = &entry{ch: make(chan struct{}, 1)}
		s.m[key] = e
	}
	e.refs++
	s.mu.Unlock()

	select {
	case e.ch <- struct{}{}:
	case <-ctx.Done():
		s.release(key, e)
		return nil, ctx.Err()
	}
	if err := ctx.Err(); err != nil {
		// Both were ready and select picked the lock.
		<-e.ch
		s.release(key, e)
		return nil, err
	}
	var once sync.Once
	return func() {
		once.Do(func() {
			<-e.ch
			s.release(key, e)
		})
	}, nil
}

// release drops one reference to e, and e itself once unused.
func (s *Set[K]) release(key K, e *entry) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if e.refs--; e.refs == 0 {
		delete(s.m, key)
	}
}

// Len returns the number of keys locked or waited for now. It is meant for
// tests and metrics.
func (s *Set[K]) Len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.m)
}
