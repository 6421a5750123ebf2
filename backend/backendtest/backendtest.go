// Package backendtest is the conformance suite of the backend contract. A
// store implementation is done when Run passes against a real server:
//
//	func TestConformance(t *testing.T) {
//		srv := etcdtest.NewServer(t)
//		backendtest.Run(t, backendtest.Harness{
//			New: func(tb testing.TB, ttl time.Duration) backend.Backend {
//				b, err := etcd.Open(ctx, etcd.Config{Endpoints: srv.Endpoints(), TTL: ttl})
//				if err != nil {
//					tb.Fatal(err)
//				}
//				tb.Cleanup(func() { b.Close() })
//				return b
//			},
//			Kill: func(tb testing.TB, b backend.Backend) { b.(*etcd.Backend).Abandon() },
//		})
//	}
//
// The suite checks, besides the subtests' own assertions, these invariants
// on every stream it reads: Put events before exactly one Current event;
// every event names the subscribed service; a Put carries a non-zero
// Created, and a Put for an instance already in the view keeps its Created
// (a registration that was re-created under a new Created must appear as a
// Delete followed by a Put); a Delete names an instance in the view.
//
// Every wait is bounded (a generous bound that only catches hangs and lost
// events); nothing is asserted about speed.
package backendtest

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/flynn/discoverd/backend"
)

// Harness tells the suite how to make backends on one shared store.
type Harness struct {
	// New opens a backend on the shared store whose session lives for ttl
	// without keepalives. It fails tb on error and registers b.Close with
	// tb.Cleanup; the suite may close b earlier (Close is idempotent).
	// Required.
	New func(tb testing.TB, ttl time.Duration) backend.Backend

	// Kill makes b die the way a SIGKILLed agent does: its goroutines stop
	// and its connection to the store is dropped without ending its session,
	// so its registrations vanish only when the session expires. Calling
	// b.Close afterwards must be safe. Required.
	Kill func(tb testing.TB, b backend.Backend)

	// StopStore stops the shared store, keeping its data; StartStore starts
	// it again on the same addresses and blocks until it serves. Optional:
	// the store-restart subtests are skipped unless both are set.
	StopStore, StartStore func(tb testing.TB)

	// TTL is the session TTL the suite asks for. It must be one the store
	// accepts (ZooKeeper: within its min and max session timeouts). Default
	// 2 s.
	TTL time.Duration
}

// Bounds on waits. They only turn a hang or a lost event into a failure
// with a message; they are not performance assertions and are generous
// for a loaded CI machine running -race.
const (
	waitTimeout = 15 * time.Second // for an event that should come promptly
	callTimeout = 15 * time.Second // for one backend call
	expirySlack = 10 * time.Second // beyond the TTL, for a dead session's registrations to go
)

// Run runs the conformance suite against h. Subtests that do not disturb
// the store run in parallel; those that stop the store run afterwards,
// alone.
func Run(t *testing.T, h Harness) {
	if h.New == nil || h.Kill == nil {
		t.Fatal("backendtest: Harness.New and Harness.Kill are required")
	}
	if h.TTL <= 0 {
		h.TTL = 2 * time.Second
	}
	s := &suite{h: h}
	t.Run("Store", func(t *testing.T) {
		tests := []struct {
			name string
			fn   func(t *testing.T)
		}{
			{"RegisterEmitsPut", s.testRegisterEmitsPut},
			{"SnapshotHoldsExistingRegistrations", s.testSnapshot},
			{"UnregisterEmitsDelete", s.testUnregister},
			{"UnregisterUnknownIsNoError", s.testUnregisterUnknown},
			{"AttrUpdateKeepsCreatedOneEvent", s.testAttrUpdate},
			{"ReregisterEqualAttrsNoEvent", s.testReregisterEqual},
			{"NamesAreIsolated", s.testNamesIsolated},
			{"SnapshotThenLiveUnderConcurrency", s.testConcurrentSnapshotThenLive},
			{"CreatedGrowsWithRegistrationOrder", s.testCreatedOrder},
			{"LeaderIsSmallestCreated", s.testLeaderOrder},
			{"TwoBackendsSeeEachOther", s.testTwoBackends},
			{"ExpiryWhenOwnerKilled", s.testExpiryOnKill},
			{"CloseRemovesRegistrationsAtOnce", s.testCloseRemoves},
			{"MethodsAfterCloseReturnErrClosed", s.testAfterClose},
			{"StreamCloseEndsEvents", s.testStreamClose},
			{"Ping", s.testPing},
		}
		for _, tc := range tests {
			t.Run(tc.name, func(t *testing.T) {
				t.Parallel()
				tc.fn(t)
			})
		}
	})
	t.Run("StoreRestart", func(t *testing.T) {
		if h.StopStore == nil || h.StartStore == nil {
			t.Skip("Harness.StopStore/StartStore not set")
		}
		t.Run("PingFailsWhileStoreDown", s.testPingStoreDown)
		t.Run("StreamsRecoverAfterRestart", s.testRecoverAfterRestart)
	})
}

type suite struct {
	h   Harness
	seq atomic.Uint64
}

// name returns a service name unique to this run and subtest, so that
// parallel subtests on one store do not see each other.
func (s *suite) name(tb testing.TB) string {
	base := tb.Name()
	if i := strings.LastIndexByte(base, '/'); i >= 0 {
		base = base[i+1:]
	}
	var b strings.Builder
	for _, c := range base {
		if 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '-' {
			b.WriteRune(c)
		}
		if b.Len() >= 64 {
			break
		}
	}
	return fmt.Sprintf("t%s-%x-%d", b.String(), time.Now().UnixNano()&0xffffffff, s.seq.Add(1))
}

func (s *suite) open(tb testing.TB) backend.Backend { return s.openTTL(tb, s.h.TTL) }

func (s *suite) openTTL(tb testing.TB, ttl time.Duration) backend.Backend {
	tb.Helper()
	b := s.h.New(tb, ttl)
	if b == nil {
		tb.Fatal("Harness.New returned nil")
	}
	return b
}

func callCtx(tb testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	tb.Cleanup(cancel)
	return ctx
}

func mustRegister(tb testing.TB, b backend.Backend, name, addr string, attrs map[string]string) {
	tb.Helper()
	if err := b.Register(callCtx(tb), name, addr, attrs); err != nil {
		tb.Fatalf("Register(%s, %s): %v", name, addr, err)
	}
}

func mustUnregister(tb testing.TB, b backend.Backend, name, addr string) {
	tb.Helper()
	if err := b.Unregister(callCtx(tb), name, addr); err != nil {
		tb.Fatalf("Unregister(%s, %s): %v", name, addr, err)
	}
}

// recorder reads one stream and keeps the view it describes, checking the
// stream invariants on every event.
type recorder struct {
	tb      testing.TB
	name    string
	s       backend.Stream
	view    map[string]backend.Instance // by addr
	current bool
}

// mustSubscribe subscribes to name on b and reads the snapshot up to its
// Current event.
func mustSubscribe(tb testing.TB, b backend.Backend, name string) *recorder {
	tb.Helper()
	st, err := b.Subscribe(callCtx(tb), name)
	if err != nil {
		tb.Fatalf("Subscribe(%s): %v", name, err)
	}
	tb.Cleanup(func() { st.Close() })
	r := &recorder{tb: tb, name: name, s: st, view: map[string]backend.Instance{}}
	for !r.current {
		r.next()
	}
	return r
}

// next reads and applies one event, failing tb if none comes in time or
// the stream ends.
func (r *recorder) next() backend.Event {
	r.tb.Helper()
	timer := time.NewTimer(waitTimeout)
	defer timer.Stop()
	select {
	case ev, ok := <-r.s.Events():
		if !ok {
			r.tb.Fatalf("stream %s ended unexpectedly: %v", r.name, r.s.Err())
		}
		r.apply(ev)
		return ev
	case <-timer.C:
		r.tb.Fatalf("stream %s: no event within %v; view %s", r.name, waitTimeout, r.describe())
	}
	return backend.Event{} // not reached: Fatalf stops the goroutine
}

func (r *recorder) apply(ev backend.Event) {
	r.tb.Helper()
	in := ev.Instance
	switch ev.Type {
	case backend.Current:
		if r.current {
			r.tb.Fatalf("stream %s: second Current event", r.name)
		}
		r.current = true
	case backend.Put:
		if in.Name != r.name {
			r.tb.Fatalf("stream %s: Put for service %q", r.name, in.Name)
		}
		if in.Created == 0 {
			r.tb.Fatalf("stream %s: Put %s with Created 0", r.name, in.Addr)
		}
		if old, ok := r.view[in.Addr]; ok && old.Created != in.Created {
			r.tb.Fatalf("stream %s: Put %s changed Created %d -> %d without a Delete", r.name, in.Addr, old.Created, in.Created)
		}
		r.view[in.Addr] = in
	case backend.Delete:
		if !r.current {
			r.tb.Fatalf("stream %s: Delete %s before Current", r.name, in.Addr)
		}
		if in.Name != r.name {
			r.tb.Fatalf("stream %s: Delete for service %q", r.name, in.Name)
		}
		if _, ok := r.view[in.Addr]; !ok {
			r.tb.Fatalf("stream %s: Delete of %s, which is not in the view", r.name, in.Addr)
		}
		delete(r.view, in.Addr)
	default:
		r.tb.Fatalf("stream %s: event of unknown type %d", r.name, ev.Type)
	}
}

// expect reads one event and checks its type and address.
func (r *recorder) expect(typ backend.EventType, addr string) backend.Event {
	r.tb.Helper()
	ev := r.next()
	if ev.Type != typ || ev.Instance.Addr != addr {
		r.tb.Fatalf("stream %s: got %v %s, want %v %s", r.name, ev.Type, ev.Instance.Addr, typ, addr)
	}
	return ev
}

// waitView reads events until the set of addresses in the view is exactly
// addrs.
func (r *recorder) waitView(addrs ...string) {
	r.tb.Helper()
	want := map[string]bool{}
	for _, a := range addrs {
		want[a] = true
	}
	deadline := time.Now().Add(waitTimeout)
	for !r.viewIs(want) {
		if time.Now().After(deadline) {
			r.tb.Fatalf("stream %s: view %s, want %v", r.name, r.describe(), slices.Sorted(maps.Keys(want)))
		}
		r.next()
	}
}

func (r *recorder) viewIs(want map[string]bool) bool {
	if len(r.view) != len(want) {
		return false
	}
	for a := range r.view {
		if !want[a] {
			return false
		}
	}
	return true
}

func (r *recorder) describe() string {
	addrs := slices.Sorted(maps.Keys(r.view))
	if len(addrs) > 10 {
		return fmt.Sprintf("%d instances %v...", len(addrs), addrs[:10])
	}
	return fmt.Sprintf("%v", addrs)
}

// leader returns the instance with the smallest Created in the view.
func (r *recorder) leader() (backend.Instance, bool) {
	var l backend.Instance
	found := false
	for _, in := range r.view {
		if !found || in.Created < l.Created {
			l, found = in, true
		}
	}
	return l, found
}

func attrsEqual(a, b map[string]string) bool {
	return len(a) == len(b) && maps.Equal(a, b)
}

// marker registers a fresh instance and waits for its Put, so that every
// event caused by earlier writes must have been read by now: events are
// delivered in store order. It returns the Put.
func (r *recorder) marker(b backend.Backend, addr string) backend.Event {
	r.tb.Helper()
	mustRegister(r.tb, b, r.name, addr, nil)
	return r.expect(backend.Put, addr)
}

func (s *suite) testRegisterEmitsPut(t *testing.T) {
	b := s.open(t)
	name := s.name(t)
	r := mustSubscribe(t, b, name)
	if len(r.view) != 0 {
		t.Fatalf("snapshot of a new service: %s, want empty", r.describe())
	}
	attrs := map[string]string{"proto": "http", "zone": "a"}
	mustRegister(t, b, name, "10.0.0.1:80", attrs)
	ev := r.expect(backend.Put, "10.0.0.1:80")
	if !attrsEqual(ev.Instance.Attrs, attrs) {
		t.Errorf("Put attrs = %v, want %v", ev.Instance.Attrs, attrs)
	}
	// An IPv6 address and empty attrs round-trip as well.
	mustRegister(t, b, name, "[::1]:8080", nil)
	ev = r.expect(backend.Put, "[::1]:8080")
	if len(ev.Instance.Attrs) != 0 {
		t.Errorf("Put attrs = %v, want none", ev.Instance.Attrs)
	}
}

func (s *suite) testSnapshot(t *testing.T) {
	b := s.open(t)
	name := s.name(t)
	want := map[string]map[string]string{
		"10.0.0.1:80": {"n": "1"},
		"10.0.0.2:80": {"n": "2"},
		"10.0.0.3:80": nil,
	}
	for _, addr := range slices.Sorted(maps.Keys(want)) {
		mustRegister(t, b, name, addr, want[addr])
	}
	// A second subscriber on another backend gets the same snapshot.
	for _, sb := range []backend.Backend{b, s.open(t)} {
		r := mustSubscribe(t, sb, name)
		if len(r.view) != len(want) {
			t.Fatalf("snapshot %s, want %v", r.describe(), slices.Sorted(maps.Keys(want)))
		}
		for addr, attrs := range want {
			if got := r.view[addr]; !attrsEqual(got.Attrs, attrs) {
				t.Errorf("snapshot %s attrs = %v, want %v", addr, got.Attrs, attrs)
			}
		}
	}
}

func (s *suite) testUnregister(t *testing.T) {
	b := s.open(t)
	name := s.name(t)
	mustRegister(t, b, name, "10.0.0.1:80", nil)
	r := mustSubscribe(t, b, name)
	mustUnregister(t, b, name, "10.0.0.1:80")
	r.expect(backend.Delete, "10.0.0.1:80")
	// A registration removed and made again is a new one: larger Created.
	first := r.marker(b, "10.0.0.2:80")
	mustUnregister(t, b, name, "10.0.0.2:80")
	r.expect(backend.Delete, "10.0.0.2:80")
	again := r.marker(b, "10.0.0.2:80")
	if again.Instance.Created <= first.Instance.Created {
		t.Errorf("re-created registration has Created %d, not larger than the first %d", again.Instance.Created, first.Instance.Created)
	}
	// A fresh snapshot agrees with the live view.
	if r2 := mustSubscribe(t, b, name); !r2.viewIs(map[string]bool{"10.0.0.2:80": true}) {
		t.Errorf("fresh snapshot %s, want [10.0.0.2:80]", r2.describe())
	}
}

func (s *suite) testUnregisterUnknown(t *testing.T) {
	b := s.open(t)
	name := s.name(t)
	r := mustSubscribe(t, b, name)
	mustUnregister(t, b, name, "10.0.0.9:80")
	// Another backend's registration is not this backend's to forget, but
	// removing it is allowed (the agent only unregisters its own).
	mustRegister(t, b, name, "10.0.0.1:80", nil)
	r.expect(backend.Put, "10.0.0.1:80")
	mustUnregister(t, b, name, "10.0.0.1:80")
	mustUnregister(t, b, name, "10.0.0.1:80")
	r.expect(backend.Delete, "10.0.0.1:80")
	// Nothing else happened: the next event is the marker.
	r.marker(b, "10.0.0.2:80")
}

func (s *suite) testAttrUpdate(t *testing.T) {
	b := s.open(t)
	name := s.name(t)
	r := mustSubscribe(t, b, name)
	mustRegister(t, b, name, "10.0.0.1:80", map[string]string{"v": "1"})
	first := r.expect(backend.Put, "10.0.0.1:80")
	mustRegister(t, b, name, "10.0.0.1:80", map[string]string{"v": "2"})
	upd := r.expect(backend.Put, "10.0.0.1:80")
	if upd.Instance.Created != first.Instance.Created {
		t.Errorf("attr update changed Created %d -> %d", first.Instance.Created, upd.Instance.Created)
	}
	if upd.Instance.Attrs["v"] != "2" {
		t.Errorf("attr update delivered attrs %v, want v=2", upd.Instance.Attrs)
	}
	// Exactly one event for the update: the next one is the marker.
	r.marker(b, "10.0.0.2:80")
	// A new subscriber sees the updated attrs and the same Created.
	r2 := mustSubscribe(t, s.open(t), name)
	if got := r2.view["10.0.0.1:80"]; got.Created != first.Instance.Created || got.Attrs["v"] != "2" {
		t.Errorf("snapshot after update: %+v, want Created %d attrs v=2", got, first.Instance.Created)
	}
}

func (s *suite) testReregisterEqual(t *testing.T) {
	b := s.open(t)
	name := s.name(t)
	r := mustSubscribe(t, b, name)
	attrs := map[string]string{"a": "1", "b": "2"}
	mustRegister(t, b, name, "10.0.0.1:80", attrs)
	r.expect(backend.Put, "10.0.0.1:80")
	for range 3 {
		mustRegister(t, b, name, "10.0.0.1:80", map[string]string{"b": "2", "a": "1"})
	}
	mustRegister(t, b, name, "10.0.0.3:80", nil)
	r.expect(backend.Put, "10.0.0.3:80")
	mustRegister(t, b, name, "10.0.0.3:80", map[string]string{}) // empty equals nil
	// No event for the heartbeats: the next one is the marker.
	r.marker(b, "10.0.0.2:80")
}

func (s *suite) testNamesIsolated(t *testing.T) {
	b := s.open(t)
	name := s.name(t)
	r := mustSubscribe(t, b, name)
	// Names sharing a prefix with the subscribed one must not leak into it.
	for _, other := range []string{name + "x", name + "-2", name + ".a"} {
		mustRegister(t, b, other, "10.0.0.1:80", nil)
	}
	r.marker(b, "10.0.0.2:80")
	if r2 := mustSubscribe(t, b, name); !r2.viewIs(map[string]bool{"10.0.0.2:80": true}) {
		t.Errorf("snapshot of %s: %s, want only [10.0.0.2:80]", name, r2.describe())
	}
}

// testConcurrentSnapshotThenLive registers and unregisters from several
// goroutines while a subscriber starts, and checks that the stream's view
// converges to the exact final set: nothing lost between snapshot and live.
func (s *suite) testConcurrentSnapshotThenLive(t *testing.T) {
	const workers, perWorker = 4, 50
	writers := []backend.Backend{s.open(t), s.open(t)}
	name := s.name(t)

	addr := func(w, i int) string { return fmt.Sprintf("10.1.%d.%d:80", w, i+1) }
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	start := make(chan struct{})
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			b := writers[w%len(writers)]
			ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
			defer cancel()
			<-start
			for i := range perWorker {
				a := addr(w, i)
				if err := b.Register(ctx, name, a, map[string]string{"i": fmt.Sprint(i)}); err != nil {
					errs <- fmt.Errorf("register %s: %w", a, err)
					return
				}
				if i%5 == 0 { // an attribute update
					if err := b.Register(ctx, name, a, map[string]string{"i": fmt.Sprint(i), "u": "1"}); err != nil {
						errs <- fmt.Errorf("register %s: %w", a, err)
						return
					}
				}
				if i%3 == 0 { // and some go away again
					if err := b.Unregister(ctx, name, a); err != nil {
						errs <- fmt.Errorf("unregister %s: %w", a, err)
						return
					}
				}
			}
		}()
	}
	close(start)
	// Subscribe while the writers run, from a backend that does not write.
	r := mustSubscribe(t, s.open(t), name)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	var want []string
	for w := range workers {
		for i := range perWorker {
			if i%3 != 0 {
				want = append(want, addr(w, i))
			}
		}
	}
	r.waitView(want...)
	for w := range workers {
		for i := range perWorker {
			in, ok := r.view[addr(w, i)]
			if !ok {
				continue
			}
			wantAttrs := map[string]string{"i": fmt.Sprint(i)}
			if i%5 == 0 {
				wantAttrs["u"] = "1"
			}
			if !attrsEqual(in.Attrs, wantAttrs) {
				t.Errorf("%s: attrs %v, want %v", in.Addr, in.Attrs, wantAttrs)
			}
		}
	}
	// Nothing more is pending: the next event is the marker.
	r.marker(writers[0], "10.2.0.1:80")
}

func (s *suite) testCreatedOrder(t *testing.T) {
	a, b := s.open(t), s.open(t)
	name := s.name(t)
	r := mustSubscribe(t, a, name)
	var last uint64
	for i, be := range []backend.Backend{a, b, a, b, b} {
		ev := r.marker(be, fmt.Sprintf("10.0.0.%d:80", i+1))
		if ev.Instance.Created <= last {
			t.Fatalf("registration %d has Created %d, not larger than the previous %d", i+1, ev.Instance.Created, last)
		}
		last = ev.Instance.Created
	}
	// Updating an old registration does not move it in the order.
	mustRegister(t, a, name, "10.0.0.1:80", map[string]string{"x": "y"})
	ev := r.expect(backend.Put, "10.0.0.1:80")
	if ev.Instance.Created >= last {
		t.Errorf("updated registration has Created %d, want < %d", ev.Instance.Created, last)
	}
}

func (s *suite) testLeaderOrder(t *testing.T) {
	a, b := s.open(t), s.open(t)
	name := s.name(t)
	r := mustSubscribe(t, s.open(t), name)
	wantLeader := func(addr string) {
		t.Helper()
		l, ok := r.leader()
		if !ok || l.Addr != addr {
			t.Fatalf("leader %s (ok=%v), want %s; view %s", l.Addr, ok, addr, r.describe())
		}
	}
	r.marker(a, "10.0.0.1:80")
	r.marker(b, "10.0.0.2:80")
	r.marker(a, "10.0.0.3:80")
	wantLeader("10.0.0.1:80")
	mustRegister(t, a, name, "10.0.0.1:80", map[string]string{"v": "2"}) // update keeps leadership
	r.expect(backend.Put, "10.0.0.1:80")
	wantLeader("10.0.0.1:80")
	mustUnregister(t, a, name, "10.0.0.1:80")
	r.expect(backend.Delete, "10.0.0.1:80")
	wantLeader("10.0.0.2:80")
	r.marker(a, "10.0.0.1:80") // back, but now the newest
	wantLeader("10.0.0.2:80")
	b.Close() // the leader's backend goes away
	r.waitView("10.0.0.1:80", "10.0.0.3:80")
	wantLeader("10.0.0.3:80")
}

func (s *suite) testTwoBackends(t *testing.T) {
	a, b := s.open(t), s.open(t)
	name := s.name(t)
	ra, rb := mustSubscribe(t, a, name), mustSubscribe(t, b, name)
	mustRegister(t, a, name, "10.0.0.1:80", map[string]string{"from": "a"})
	mustRegister(t, b, name, "10.0.0.2:80", map[string]string{"from": "b"})
	ra.waitView("10.0.0.1:80", "10.0.0.2:80")
	rb.waitView("10.0.0.1:80", "10.0.0.2:80")
	for _, r := range []*recorder{ra, rb} {
		if r.view["10.0.0.1:80"].Attrs["from"] != "a" || r.view["10.0.0.2:80"].Attrs["from"] != "b" {
			t.Errorf("view attrs: %+v", r.view)
		}
	}
	mustUnregister(t, a, name, "10.0.0.1:80")
	ra.waitView("10.0.0.2:80")
	rb.waitView("10.0.0.2:80")
}

func (s *suite) testExpiryOnKill(t *testing.T) {
	victim, survivor, watcher := s.open(t), s.open(t), s.open(t)
	name := s.name(t)
	r := mustSubscribe(t, watcher, name)
	mustRegister(t, victim, name, "10.0.0.1:80", nil)
	mustRegister(t, victim, name, "10.0.0.2:80", nil)
	mustRegister(t, survivor, name, "10.0.0.3:80", nil)
	r.waitView("10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80")

	s.h.Kill(t, victim)
	deadline := time.Now().Add(s.h.TTL + expirySlack)
	for len(r.view) > 1 {
		if time.Now().After(deadline) {
			t.Fatalf("killed backend's registrations still present %v after the TTL (%v); view %s", s.h.TTL+expirySlack, s.h.TTL, r.describe())
		}
		ev := r.next()
		if ev.Type != backend.Delete || ev.Instance.Addr == "10.0.0.3:80" {
			t.Fatalf("unexpected %v %s while the killed backend expires", ev.Type, ev.Instance.Addr)
		}
	}
	// The survivor's registration is untouched, for a fresh subscriber too,
	// and the survivor still works.
	if r2 := mustSubscribe(t, survivor, name); !r2.viewIs(map[string]bool{"10.0.0.3:80": true}) {
		t.Errorf("fresh snapshot %s, want [10.0.0.3:80]", r2.describe())
	}
	r.marker(survivor, "10.0.0.4:80")
}

func (s *suite) testCloseRemoves(t *testing.T) {
	// A long TTL, so that only Close (not expiry) can explain the removal
	// within the wait.
	closer := s.openTTL(t, 2*waitTimeout)
	watcher := s.open(t)
	name := s.name(t)
	r := mustSubscribe(t, watcher, name)
	mustRegister(t, closer, name, "10.0.0.1:80", nil)
	mustRegister(t, closer, name, "10.0.0.2:80", nil)
	r.waitView("10.0.0.1:80", "10.0.0.2:80")
	if err := closer.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	r.waitView()
}

func (s *suite) testAfterClose(t *testing.T) {
	b := s.open(t)
	name := s.name(t)
	st, err := b.Subscribe(callCtx(t), name)
	if err != nil {
		t.Fatalf("Subscribe: %v", err)
	}
	defer st.Close()
	if err := b.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := b.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	// The open stream ends.
	timer := time.NewTimer(waitTimeout)
	defer timer.Stop()
	for open := true; open; {
		select {
		case _, open = <-st.Events():
		case <-timer.C:
			t.Fatal("stream still open after the backend closed")
		}
	}
	// It was not closed by its own Close, so Err says why it ended.
	if err := st.Err(); !errors.Is(err, backend.ErrClosed) {
		t.Errorf("stream Err after the backend closed = %v, want ErrClosed", err)
	}
	ctx := callCtx(t)
	checks := map[string]error{
		"Register":   b.Register(ctx, name, "10.0.0.1:80", nil),
		"Unregister": b.Unregister(ctx, name, "10.0.0.1:80"),
		"Ping":       b.Ping(ctx),
	}
	_, checks["Subscribe"] = b.Subscribe(ctx, name)
	for method, err := range checks {
		if !errors.Is(err, backend.ErrClosed) {
			t.Errorf("%s after Close: %v, want ErrClosed", method, err)
		}
	}
}

func (s *suite) testStreamClose(t *testing.T) {
	b := s.open(t)
	name := s.name(t)
	r := mustSubscribe(t, b, name)
	mustRegister(t, b, name, "10.0.0.1:80", nil) // an event may be pending at Close
	if err := r.s.Close(); err != nil {
		t.Fatalf("stream Close: %v", err)
	}
	if err := r.s.Close(); err != nil {
		t.Errorf("second stream Close: %v", err)
	}
	timer := time.NewTimer(waitTimeout)
	defer timer.Stop()
	for open := true; open; {
		select {
		case _, open = <-r.s.Events():
		case <-timer.C:
			t.Fatal("Events not closed after Close")
		}
	}
	if err := r.s.Err(); err != nil {
		t.Errorf("Err after Close = %v, want nil", err)
	}
	// The backend is unaffected.
	mustSubscribe(t, b, name).waitView("10.0.0.1:80")
}

func (s *suite) testPing(t *testing.T) {
	if err := s.open(t).Ping(callCtx(t)); err != nil {
		t.Fatalf("Ping: %v", err)
	}
}

func (s *suite) testPingStoreDown(t *testing.T) {
	b := s.open(t)
	if err := b.Ping(callCtx(t)); err != nil {
		t.Fatalf("Ping: %v", err)
	}
	s.h.StopStore(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	err := b.Ping(ctx)
	cancel()
	s.h.StartStore(t)
	if err == nil {
		t.Fatal("Ping with the store down = nil, want an error")
	}
	deadline := time.Now().Add(waitTimeout)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		err := b.Ping(ctx)
		cancel()
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("Ping after the store restarted: %v", err)
		}
	}
}

// testRecoverAfterStoreRestart: streams and registrations survive a short
// store outage (shorter than the TTL), and writes work again afterwards.
func (s *suite) testRecoverAfterRestart(t *testing.T) {
	// The outage must not outlast the sessions.
	ttl := max(s.h.TTL, 2*waitTimeout)
	a, b := s.openTTL(t, ttl), s.openTTL(t, ttl)
	name := s.name(t)
	r := mustSubscribe(t, b, name)
	mustRegister(t, a, name, "10.0.0.1:80", nil)
	mustRegister(t, b, name, "10.0.0.2:80", nil)
	r.waitView("10.0.0.1:80", "10.0.0.2:80")

	s.h.StopStore(t)
	s.h.StartStore(t)

	// Writes may fail while the clients reconnect; retry within the bound.
	deadline := time.Now().Add(waitTimeout)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		err := a.Register(ctx, name, "10.0.0.3:80", nil)
		cancel()
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("Register after the store restarted: %v", err)
		}
	}
	mustUnregister(t, b, name, "10.0.0.2:80")
	r.waitView("10.0.0.1:80", "10.0.0.3:80")
	// A new subscriber agrees.
	mustSubscribe(t, a, name).waitView("10.0.0.1:80", "10.0.0.3:80")
}
