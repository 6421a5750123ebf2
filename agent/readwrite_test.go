package agent_test

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/flynn/discoverd/agent"
	"github.com/flynn/discoverd/api"
	"github.com/flynn/discoverd/backend"
	"github.com/flynn/discoverd/backend/etcd/etcdtest"
)

// TestReadYourWrites: on one agent, a lookup that follows a Register or an
// Unregister sees it, although lookups are served from the watch cache,
// which follows the store a moment after the store acknowledges a write.
func TestReadYourWrites(t *testing.T) {
	srv := etcdtest.NewServer(t)
	a := mustAgent(t, mustBackend(t, srv, 10*time.Second), agent.Config{})
	s := a.NewSession(-1)
	defer s.Close()
	// Keep the name watched, so lookups are answered from its cache.
	sub := mustSubscribe(t, a, "web")
	defer sub.Close()

	find := func(addr string) (api.ServiceUpdate, bool) {
		t.Helper()
		list, err := a.Instances(ctxT(t), "web")
		if err != nil {
			t.Fatalf("Instances: %v", err)
		}
		for _, u := range list {
			if u.Addr == addr {
				return u, true
			}
		}
		return api.ServiceUpdate{}, false
	}
	for i := range 100 {
		addr := fmt.Sprintf("10.0.0.%d:80", i+1)
		attrs := map[string]string{"v": "1"}
		mustRegister(t, s, "web", addr, attrs)
		if u, ok := find(addr); !ok || !maps.Equal(u.Attrs, attrs) {
			t.Fatalf("round %d: Instances right after Register: %+v, present %v", i, u, ok)
		}
		attrs = map[string]string{"v": "2"}
		mustRegister(t, s, "web", addr, attrs)
		if u, ok := find(addr); !ok || !maps.Equal(u.Attrs, attrs) {
			t.Fatalf("round %d: Instances right after an attribute update: %+v, present %v", i, u, ok)
		}
		if err := s.Unregister(ctxT(t), agent.Args{Name: "web", Addr: addr}); err != nil {
			t.Fatalf("Unregister: %v", err)
		}
		if u, ok := find(addr); ok {
			t.Fatalf("round %d: Instances right after Unregister still has %+v", i, u)
		}
	}
}

// TestWriteDoesNotWaitForWatch: a Register or Unregister returns once the
// store acknowledged it, even while the agent's watch of the name is held
// back; lookups, new subscriptions and View compiles made after it wait
// for the watch to show it instead. Lookups wait for as long as the test
// takes (SetLocalWait), so a write that waited for the watch would hang
// the test, and a lookup that did not wait would miss the write.
func TestWriteDoesNotWaitForWatch(t *testing.T) {
	srv := etcdtest.NewServer(t)
	gated := &watchGate{Backend: mustBackend(t, srv, 10*time.Second), open: make(chan struct{})}
	gated.reopen()
	cfg := agent.Config{Backend: gated, Logger: quiet()}
	a, err := agent.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	agent.SetLocalWait(a, time.Hour)
	defer a.Close()
	s := a.NewSession(-1)
	defer s.Close()
	sub := mustSubscribe(t, a, "web") // the snapshot passed the gate: it was open
	mustSnapshot(t, sub)

	view := agent.NewView(a, agent.ViewConfig{}, func(_ string, us []api.ServiceUpdate, _ api.ServiceUpdate) []api.ServiceUpdate { return us })
	defer view.Close()
	lookups := []struct {
		name string
		has  func(addr string) (bool, error)
	}{
		{"View.Get", func(addr string) (bool, error) {
			us, _, err := view.Get(ctxT(t), "web")
			return slices.ContainsFunc(us, func(u api.ServiceUpdate) bool { return u.Addr == addr }), err
		}},
		{"Instances", func(addr string) (bool, error) {
			us, err := a.Instances(ctxT(t), "web")
			return slices.ContainsFunc(us, func(u api.ServiceUpdate) bool { return u.Addr == addr }), err
		}},
		{"LeaderOf", func(addr string) (bool, error) {
			u, _, err := a.LeaderOf(ctxT(t), "web")
			return u.Addr == addr, err
		}},
		{"Subscribe", func(addr string) (bool, error) {
			sub, err := a.Subscribe(ctxT(t), "web")
			if err != nil {
				return false, err
			}
			defer sub.Close()
			snap := mustSnapshot(t, sub)
			return slices.ContainsFunc(snap, func(u api.ServiceUpdate) bool { return u.Addr == addr }), nil
		}},
	}
	for i, l := range lookups {
		addr := fmt.Sprintf("10.0.1.%d:80", i+1)
		gated.close()
		mustRegister(t, s, "web", addr, nil) // returns although the watch cannot show it
		results := make(chan bool, 1)
		errs := make(chan error, 1)
		go func() {
			ok, err := l.has(addr)
			results <- ok
			errs <- err
		}()
		gated.reopen()
		if ok, err := <-results, <-errs; err != nil || !ok {
			t.Fatalf("%s after Register, made while the watch was held: present %v, err %v", l.name, ok, err)
		}
		if u := mustNext(t, sub); u.Addr != addr || !u.Online {
			t.Fatalf("subscriber got %+v, want %s online", u, addr)
		}

		gated.close()
		if err := s.Unregister(ctxT(t), agent.Args{Name: "web", Addr: addr}); err != nil {
			t.Fatalf("Unregister: %v", err)
		}
		go func() {
			ok, err := l.has(addr)
			results <- ok
			errs <- err
		}()
		gated.reopen()
		if ok, err := <-results, <-errs; err != nil || ok {
			t.Fatalf("%s after Unregister, made while the watch was held: present %v, err %v", l.name, ok, err)
		}
		if u := mustNext(t, sub); u.Addr != addr || u.Online {
			t.Fatalf("subscriber got %+v, want %s offline", u, addr)
		}
	}
	// Each change reached the subscriber once: a marker comes next.
	mustRegister(t, s, "web", "10.0.2.1:80", nil)
	if u := mustNext(t, sub); u.Addr != "10.0.2.1:80" {
		t.Fatalf("subscriber got %+v, want the marker", u)
	}
}

// watchGate is a real backend whose streams forward the store's events
// only while the gate is open (close and reopen it).
type watchGate struct {
	backend.Backend

	mu   sync.Mutex
	open chan struct{} // closed while the gate is open
}

func (g *watchGate) close() {
	g.mu.Lock()
	defer g.mu.Unlock()
	if gateOpen(g.open) {
		g.open = make(chan struct{})
	}
}

func (g *watchGate) reopen() {
	g.mu.Lock()
	defer g.mu.Unlock()
	if !gateOpen(g.open) {
		close(g.open)
	}
}

func gateOpen(c chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}

func (g *watchGate) gate() <-chan struct{} {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.open
}

func (g *watchGate) Subscribe(ctx context.Context, name string) (backend.Stream, error) {
	inner, err := g.Backend.Subscribe(ctx, name)
	if err != nil {
		return nil, err
	}
	s := &gatedStream{inner: inner, events: make(chan backend.Event), stop: make(chan struct{}), done: make(chan struct{})}
	go s.forward(g)
	return s, nil
}

type gatedStream struct {
	inner    backend.Stream
	events   chan backend.Event
	stopOnce sync.Once
	stop     chan struct{} // closed by Close
	done     chan struct{} // closed when forward returned
}

// forward passes each event of the inner stream on once the gate is open.
func (s *gatedStream) forward(g *watchGate) {
	defer close(s.done)
	defer close(s.events)
	for {
		var ev backend.Event
		select {
		case e, ok := <-s.inner.Events():
			if !ok {
				return
			}
			ev = e
		case <-s.stop:
			return
		}
		for passed := false; !passed; {
			gate := g.gate()
			select {
			case <-gate:
				passed = g.gate() == gate // not closed again meanwhile
			case <-s.stop:
				return
			}
		}
		select {
		case s.events <- ev:
		case <-s.stop:
			return
		}
	}
}

func (s *gatedStream) Events() <-chan backend.Event { return s.events }
func (s *gatedStream) Err() error                   { return s.inner.Err() }
func (s *gatedStream) Close() error {
	s.stopOnce.Do(func() { close(s.stop) })
	<-s.done
	return s.inner.Close()
}
