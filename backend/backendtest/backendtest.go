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

	// ExpireSession makes the store end b's session the way a partition
	// longer than the TTL does (ZooKeeper: expire the session; etcd: revoke
	// the lease), so that b's registrations vanish while b keeps running;
	// b must then renew its session and store its registrations again. It
	// returns once the store has ended the session and removed its
	// registrations. Optional: the session-renewal subtest is skipped when
	// it is nil.
	ExpireSession func(tb testing.TB, b backend.Backend)

	// Plant stores name/addr directly in the store, attached to b's
	// session, without b knowing: what a write whose outcome b lost (a
	// crash mid-write) leaves behind. Optional: the anti-entropy subtest
	// that needs it is skipped when nil.
	Plant func(tb testing.TB, b backend.Backend, name, addr string)

	// Erase deletes name/addr directly from the store, behind every
	// backend's back. Optional, as Plant.
	Erase func(tb testing.TB, name, addr string)

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

	// retryInterval spaces the tries of a call that fails while a store
	// is unreachable (some backends fail at once when disconnected).
	retryInterval = 50 * time.Millisecond
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
		tests := []subtest{
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
			{"RegistrationsStoredAgainAfterSessionRenewal", s.testSessionRenewal},
			{"CancelledRegisterLeavesNoOrphan", s.testRegisterCancelled},
			{"CloseRemovesRegistrationsAtOnce", s.testCloseRemoves},
			{"MethodsAfterCloseReturnErrClosed", s.testAfterClose},
			{"StreamCloseEndsEvents", s.testStreamClose},
			{"Ping", s.testPing},
		}
		tests = append(tests, s.membershipTests()...)
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
	ev, ok := r.nextWithin(waitTimeout)
	if !ok {
		r.tb.Fatalf("stream %s: no event within %v; view %s", r.name, waitTimeout, r.describe())
	}
	return ev
}

// nextWithin reads and applies one event if one comes within d (ok),
// failing tb if the stream ends.
func (r *recorder) nextWithin(d time.Duration) (ev backend.Event, ok bool) {
	r.tb.Helper()
	timer := time.NewTimer(max(d, time.Millisecond))
	defer timer.Stop()
	select {
	case ev, open := <-r.s.Events():
		if !open {
			r.tb.Fatalf("stream %s ended unexpectedly: %v", r.name, r.s.Err())
		}
		r.apply(ev)
		return ev, true
	case <-timer.C:
		return backend.Event{}, false
	}
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

// until reads events until one satisfies stop, and returns it.
func (r *recorder) until(what string, stop func(backend.Event) bool) backend.Event {
	r.tb.Helper()
	deadline := time.Now().Add(waitTimeout)
	for {
		if time.Now().After(deadline) {
			r.tb.Fatalf("stream %s: no %s within %v; view %s", r.name, what, waitTimeout, r.describe())
		}
		if ev := r.next(); stop(ev) {
			return ev
		}
	}
}

// waitView reads events until the set of addresses in the view is exactly
// addrs.
func (r *recorder) waitView(addrs ...string) {
	r.tb.Helper()
	r.waitViewWithin(waitTimeout, addrs...)
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
// delivered in store order. The Put must be the next event. It returns it.
func (r *recorder) marker(b backend.Backend, addr string) backend.Event {
	r.tb.Helper()
	mustRegister(r.tb, b, r.name, addr, nil)
	return r.expect(backend.Put, addr)
}

// readPast is marker for when other events may come first: it reads
// events up to and including the marker's Put.
func (r *recorder) readPast(b backend.Backend, addr string) backend.Event {
	r.tb.Helper()
	mustRegister(r.tb, b, r.name, addr, nil)
	return r.until("Put of marker "+addr, func(ev backend.Event) bool {
		return ev.Type == backend.Put && ev.Instance.Addr == addr
	})
}

// retry calls f until it succeeds, at most every retryInterval, and fails
// tb if it still fails after waitTimeout. It is for calls that may fail
// while a backend reconnects.
func retry(tb testing.TB, what string, f func(ctx context.Context) error) {
	tb.Helper()
	tick := time.NewTicker(retryInterval)
	defer tick.Stop()
	deadline := time.Now().Add(waitTimeout)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		err := f(ctx)
		cancel()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			tb.Fatalf("%s: still failing after %v: %v", what, waitTimeout, err)
		}
		<-tick.C
	}
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

// testExpiryOnKill: a killed backend's registrations stay until its
// session expires (Kill is not Close), then vanish by themselves.
func (s *suite) testExpiryOnKill(t *testing.T) {
	// A TTL long enough to look at the registrations after the kill.
	ttl := 3 * s.h.TTL
	victim, survivor, watcher := s.openTTL(t, ttl), s.open(t), s.open(t)
	name := s.name(t)
	r := mustSubscribe(t, watcher, name)
	mustRegister(t, victim, name, "10.0.0.1:80", nil)
	mustRegister(t, victim, name, "10.0.0.2:80", nil)
	mustRegister(t, survivor, name, "10.0.0.3:80", nil)
	r.waitView("10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80")

	s.h.Kill(t, victim)
	killed := time.Now()
	// A fresh snapshot still holds them. The session was kept alive until
	// the kill, so it has at least about two thirds of its TTL left (keep
	// alives go every third of the TTL); the check is made only if the
	// snapshot came well within that, so a slow machine cannot fail it.
	fresh := mustSubscribe(t, survivor, name)
	if took := time.Since(killed); took < ttl/3 {
		if !fresh.viewIs(map[string]bool{"10.0.0.1:80": true, "10.0.0.2:80": true, "10.0.0.3:80": true}) {
			t.Fatalf("snapshot %v after Kill: %s; a killed backend's registrations must stay until its session expires (TTL %v)", took, fresh.describe(), ttl)
		}
	} else {
		t.Logf("snapshot after Kill took %v, too close to the TTL (%v) to check that the registrations were kept", took, ttl)
	}
	fresh.s.Close()

	deadline := time.Now().Add(ttl + expirySlack)
	for len(r.view) > 1 {
		if time.Now().After(deadline) {
			t.Fatalf("killed backend's registrations still present %v after the TTL (%v); view %s", ttl+expirySlack, ttl, r.describe())
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

// testSessionRenewal: when the store ends a backend's session under it,
// the backend renews the session and stores its registrations again, with
// their latest attributes; registrations made or updated again right after
// the renewal take effect; and the registrations stored again are ordinary
// ones, which Unregister and Close remove.
func (s *suite) testSessionRenewal(t *testing.T) {
	if s.h.ExpireSession == nil {
		t.Skip("Harness.ExpireSession not set")
	}
	b, watcher := s.open(t), s.open(t)
	name := s.name(t)
	r := mustSubscribe(t, watcher, name)
	mustRegister(t, b, name, "10.0.0.1:80", map[string]string{"v": "1"})
	mustRegister(t, b, name, "10.0.0.2:80", map[string]string{"v": "1"})
	mustRegister(t, b, name, "10.0.0.2:80", map[string]string{"v": "2"})
	r.waitView("10.0.0.1:80", "10.0.0.2:80")
	before := maps.Clone(r.view)

	s.h.ExpireSession(t, b)
	// The session's end removed the registrations; a marker written after
	// it comes after their Deletes (and maybe after their Puts, if b was
	// quick to store them again).
	r.readPast(watcher, "10.0.9.1:80")

	// Made again after the renewal: a heartbeat, an attribute update and
	// a new registration. They may fail while b reconnects.
	retry(t, "Register 10.0.0.1:80 again", func(ctx context.Context) error {
		return b.Register(ctx, name, "10.0.0.1:80", map[string]string{"v": "1"})
	})
	retry(t, "Register 10.0.0.2:80 with new attrs", func(ctx context.Context) error {
		return b.Register(ctx, name, "10.0.0.2:80", map[string]string{"v": "3"})
	})
	retry(t, "Register 10.0.0.3:80", func(ctx context.Context) error {
		return b.Register(ctx, name, "10.0.0.3:80", map[string]string{"v": "1"})
	})
	want := map[string]string{"10.0.0.1:80": "1", "10.0.0.2:80": "3", "10.0.0.3:80": "1", "10.0.9.1:80": ""}
	r.until("view with the registrations stored again", func(backend.Event) bool {
		if len(r.view) != len(want) {
			return false
		}
		for addr, v := range want {
			if in, ok := r.view[addr]; !ok || in.Attrs["v"] != v {
				return false
			}
		}
		return true
	})
	// Stored again, they keep their Created: a fencing token survives the
	// loss of its backend's session.
	for _, addr := range []string{"10.0.0.1:80", "10.0.0.2:80"} {
		if r.view[addr].Created != before[addr].Created {
			t.Errorf("%s has Created %d after the renewal, want %d (unchanged)", addr, r.view[addr].Created, before[addr].Created)
		}
	}
	if sr, ok := b.(backend.SessionReporter); ok {
		waitSession(t, sr, func(st backend.SessionState) bool { return st.Live && st.Established >= 2 })
	}

	// Ordinary registrations: Unregister removes one for good, and a fresh
	// subscriber agrees.
	mustUnregister(t, b, name, "10.0.0.1:80")
	r.expect(backend.Delete, "10.0.0.1:80")
	r.marker(watcher, "10.0.9.2:80")
	if r2 := mustSubscribe(t, s.open(t), name); !r2.viewIs(map[string]bool{"10.0.0.2:80": true, "10.0.0.3:80": true, "10.0.9.1:80": true, "10.0.9.2:80": true}) {
		t.Errorf("fresh snapshot %s, want [10.0.0.2:80 10.0.0.3:80 10.0.9.1:80 10.0.9.2:80]", r2.describe())
	}
	// And Close removes the rest.
	if err := b.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	r.waitView("10.0.9.1:80", "10.0.9.2:80")
}

// waitSession polls sr until its state satisfies ok; SessionState has no
// change notification.
func waitSession(tb testing.TB, sr backend.SessionReporter, ok func(backend.SessionState) bool) {
	tb.Helper()
	tick := time.NewTicker(retryInterval)
	defer tick.Stop()
	deadline := time.Now().Add(waitTimeout)
	for st := sr.SessionState(); !ok(st); st = sr.SessionState() {
		if time.Now().After(deadline) {
			tb.Fatalf("SessionState %+v after %v", st, waitTimeout)
		}
		<-tick.C
	}
}

// testRegisterCancelled: a Register whose ctx ends while it runs either
// leaves nothing or a registration that Unregister removes; nothing
// reappears afterwards, not even after a session renewal (when the harness
// can force one), which would store again what the backend still
// remembers.
func (s *suite) testRegisterCancelled(t *testing.T) {
	b, watcher := s.open(t), s.open(t)
	name := s.name(t)
	r := mustSubscribe(t, watcher, name)
	// Deadlines from "already over" to "about one round trip" end the
	// call at different points of its way to the store.
	delays := []time.Duration{0, time.Microsecond, 50 * time.Microsecond, 200 * time.Microsecond, time.Millisecond, 3 * time.Millisecond, 10 * time.Millisecond, 30 * time.Millisecond, 100 * time.Millisecond}
	// Unregister follows at once, as when a client goes away, so that it
	// races with whatever the cancelled call left running.
	for i, d := range delays {
		addr := fmt.Sprintf("10.0.0.%d:80", i+1)
		ctx, cancel := context.WithTimeout(context.Background(), d)
		err := b.Register(ctx, name, addr, map[string]string{"d": d.String()})
		cancel()
		mustUnregister(t, b, name, addr)
		t.Logf("Register with a %v deadline: %v", d, err)
	}
	// Also with several calls on the same key queued behind each other.
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	for i := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			b.Register(ctx, name, "10.0.1.1:80", map[string]string{"i": fmt.Sprint(i)})
		}()
	}
	cancel()
	wg.Wait()
	mustUnregister(t, b, name, "10.0.1.1:80")

	r.readPast(b, "10.0.9.1:80")
	if !r.viewIs(map[string]bool{"10.0.9.1:80": true}) {
		t.Errorf("view after unregistering the cancelled registrations: %s, want only the marker", r.describe())
	}
	if r2 := mustSubscribe(t, s.open(t), name); !r2.viewIs(map[string]bool{"10.0.9.1:80": true}) {
		t.Errorf("fresh snapshot %s, want only the marker", r2.describe())
	}

	// The backend forgot them too: a session renewal stores none again.
	sr, ok := b.(backend.SessionReporter)
	if s.h.ExpireSession == nil || !ok {
		return
	}
	s.h.ExpireSession(t, b)
	waitSession(t, sr, func(st backend.SessionState) bool { return st.Live && st.Established >= 2 })
	r.readPast(watcher, "10.0.9.2:80")
	if !r.viewIs(map[string]bool{"10.0.9.1:80": true, "10.0.9.2:80": true}) {
		t.Errorf("view after a session renewal: %s, want only the markers", r.describe())
	}
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
	retry(t, "Ping after the store restarted", b.Ping)
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
	retry(t, "Register after the store restarted", func(ctx context.Context) error {
		return a.Register(ctx, name, "10.0.0.3:80", nil)
	})
	mustUnregister(t, b, name, "10.0.0.2:80")
	r.waitView("10.0.0.1:80", "10.0.0.3:80")
	// A new subscriber agrees.
	mustSubscribe(t, a, name).waitView("10.0.0.1:80", "10.0.0.3:80")
}
