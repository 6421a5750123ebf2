package backendtest

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/flynn/discoverd/backend"
)

// The membership subtests: fencing tokens (Created) that never repeat and
// survive restores and takeovers, ownership of a registration by the
// session that wrote it last, and the backend's anti-entropy.

func (s *suite) membershipTests() []subtest {
	return []subtest{
		{"CreatedUniqueUnderConcurrency", s.testCreatedUnique},
		{"CreatedKeptAcrossTakeover", s.testCreatedKeptOnTakeover},
		{"FormerOwnerCannotRemove", s.testFormerOwner},
		{"AntiEntropyRemovesUnheldKeys", s.testRepairUnheld},
		{"AntiEntropyRestoresMissingKeys", s.testRepairMissing},
	}
}

type subtest struct {
	name string
	fn   func(t *testing.T)
}

// testCreatedUnique: registrations written at once, on one backend (which
// may batch them into one store transaction) and on two, all get distinct
// Created; and a registration acknowledged after all of them is younger
// than every one.
func (s *suite) testCreatedUnique(t *testing.T) {
	a, b := s.open(t), s.open(t)
	name := s.name(t)
	r := mustSubscribe(t, s.open(t), name)
	const perBackend = 48
	var wg sync.WaitGroup
	errs := make(chan error, 2*perBackend)
	for i := range perBackend {
		for j, be := range []backend.Backend{a, b} {
			wg.Add(1)
			go func() {
				defer wg.Done()
				ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
				defer cancel()
				if err := be.Register(ctx, name, fmt.Sprintf("10.%d.%d.%d:80", j, i/250, i%250+1), nil); err != nil {
					errs <- err
				}
			}()
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatalf("Register: %v", err)
	}
	last := r.readPast(a, "10.9.0.1:80").Instance.Created
	seen := map[uint64]string{}
	for addr, in := range r.view {
		if other, dup := seen[in.Created]; dup {
			t.Errorf("%s and %s share Created %d", addr, other, in.Created)
		}
		seen[in.Created] = addr
		if addr != "10.9.0.1:80" && in.Created >= last {
			t.Errorf("%s has Created %d, not older than the later registration's %d", addr, in.Created, last)
		}
	}
	if len(r.view) != 2*perBackend+1 {
		t.Errorf("view has %d instances, want %d", len(r.view), 2*perBackend+1)
	}
}

// testCreatedKeptOnTakeover: a registration taken over by another backend
// (a new process on the same address, registered through another agent)
// keeps its Created, so it keeps its place in the age order.
func (s *suite) testCreatedKeptOnTakeover(t *testing.T) {
	a, b := s.open(t), s.open(t)
	name := s.name(t)
	r := mustSubscribe(t, s.open(t), name)
	first := r.marker(a, "10.0.0.1:80").Instance.Created
	r.marker(a, "10.0.0.2:80")
	mustRegister(t, b, name, "10.0.0.1:80", map[string]string{"by": "b"})
	r.until("the takeover's Put", func(ev backend.Event) bool {
		return ev.Type == backend.Put && ev.Instance.Addr == "10.0.0.1:80" && ev.Instance.Attrs["by"] == "b"
	})
	if got := r.view["10.0.0.1:80"].Created; got != first {
		t.Errorf("Created after the takeover = %d, want %d (unchanged)", got, first)
	}
}

// testFormerOwner: once another backend took a registration over, the
// former owner's Unregister and Close leave it in place.
func (s *suite) testFormerOwner(t *testing.T) {
	a, b, watcher := s.open(t), s.open(t), s.open(t)
	name := s.name(t)
	r := mustSubscribe(t, watcher, name)
	r.marker(a, "10.0.0.1:80")
	mustRegister(t, b, name, "10.0.0.1:80", map[string]string{"by": "b"})
	if err := a.Unregister(callCtx(t), name, "10.0.0.1:80"); !errors.Is(err, backend.ErrNotOwner) {
		t.Fatalf("former owner's Unregister: %v, want backend.ErrNotOwner", err)
	}
	if err := a.Close(); err != nil {
		t.Fatalf("former owner's Close: %v", err)
	}
	r.readPast(watcher, "10.0.9.1:80")
	if in, ok := r.view["10.0.0.1:80"]; !ok || in.Attrs["by"] != "b" {
		t.Fatalf("view %s after the former owner's Unregister and Close; want 10.0.0.1:80 kept with the new owner's attrs", r.describe())
	}
	if r2 := mustSubscribe(t, watcher, name); !r2.viewIs(map[string]bool{"10.0.0.1:80": true, "10.0.9.1:80": true}) {
		t.Errorf("fresh snapshot %s, want [10.0.0.1:80 10.0.9.1:80]", r2.describe())
	}
	mustUnregister(t, b, name, "10.0.0.1:80")
	r.expect(backend.Delete, "10.0.0.1:80")
}

// testRepairUnheld: a key on the backend's session that the backend does
// not hold (a write whose outcome it lost) is deleted by its anti-entropy
// within about a TTL, and counted.
func (s *suite) testRepairUnheld(t *testing.T) {
	if s.h.Plant == nil {
		t.Skip("Harness.Plant not set")
	}
	b := s.open(t)
	name := s.name(t)
	r := mustSubscribe(t, s.open(t), name)
	mustRegister(t, b, name, "10.0.0.1:80", nil)
	s.h.Plant(t, b, name, "10.0.0.2:80")
	r.waitView("10.0.0.1:80", "10.0.0.2:80")
	r.waitViewWithin(repairTimeout(s.h.TTL), "10.0.0.1:80")
	waitRepairs(t, b, 1)
}

// testRepairMissing: a held registration deleted behind the backend's back
// is written again by its anti-entropy within about a TTL, with its
// Created, and counted.
func (s *suite) testRepairMissing(t *testing.T) {
	if s.h.Erase == nil {
		t.Skip("Harness.Erase not set")
	}
	b := s.open(t)
	name := s.name(t)
	r := mustSubscribe(t, s.open(t), name)
	created := r.marker(b, "10.0.0.1:80").Instance.Created
	s.h.Erase(t, name, "10.0.0.1:80")
	r.expect(backend.Delete, "10.0.0.1:80")
	r.waitViewWithin(repairTimeout(s.h.TTL), "10.0.0.1:80")
	if got := r.view["10.0.0.1:80"].Created; got != created {
		t.Errorf("rewritten registration has Created %d, want %d", got, created)
	}
	waitRepairs(t, b, 1)
}

// repairTimeout bounds the wait for an anti-entropy pass (at least one per
// TTL) and its writes.
func repairTimeout(ttl time.Duration) time.Duration { return 2*ttl + waitTimeout }

// waitViewWithin is waitView with its own bound.
func (r *recorder) waitViewWithin(d time.Duration, addrs ...string) {
	r.tb.Helper()
	want := map[string]bool{}
	for _, a := range addrs {
		want[a] = true
	}
	deadline := time.Now().Add(d)
	for !r.viewIs(want) {
		if time.Now().After(deadline) {
			r.tb.Fatalf("stream %s: view %s after %v, want %v", r.name, r.describe(), d, addrs)
		}
		r.nextWithin(time.Until(deadline))
	}
}

func waitRepairs(tb testing.TB, b backend.Backend, n uint64) {
	tb.Helper()
	sr, ok := b.(backend.SessionReporter)
	if !ok {
		return
	}
	waitSession(tb, sr, func(st backend.SessionState) bool { return st.Repairs >= n })
}
