package agent_test

import (
	"context"
	"errors"
	"maps"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/flynn/discoverd/agent"
	"github.com/flynn/discoverd/backend"
	"github.com/flynn/discoverd/backend/etcd/etcdtest"
)

// faultyBackend is a real backend with seams to inject failures:
// breakStreams ends every open stream with an error, and while down,
// Subscribe fails; while hang is set, Subscribe blocks until its ctx ends;
// while failUnregister is set, Unregister fails without reaching the
// store; inject adds an event to every open stream (foreign data).
// Everything else goes to the real store.
type faultyBackend struct {
	backend.Backend

	hang           atomic.Bool
	failUnregister atomic.Bool
	unregisters    atomic.Int64 // Unregister calls

	mu      sync.Mutex
	down    bool
	streams map[*faultyStream]struct{}
}

func (f *faultyBackend) Unregister(ctx context.Context, name, addr string) error {
	f.unregisters.Add(1)
	if f.failUnregister.Load() {
		return errInjected
	}
	return f.Backend.Unregister(ctx, name, addr)
}

// inject delivers ev on every open stream, as if the store sent it.
func (f *faultyBackend) inject(tb testing.TB, ev backend.Event) {
	tb.Helper()
	f.mu.Lock()
	streams := slices.Collect(maps.Keys(f.streams))
	f.mu.Unlock()
	if len(streams) == 0 {
		tb.Fatal("inject: no open stream")
	}
	for _, s := range streams {
		select {
		case s.inject <- ev:
		case <-time.After(wait):
			tb.Fatal("inject: the stream did not take the event")
		}
	}
}

var errInjected = errors.New("injected stream failure")

func (f *faultyBackend) Subscribe(ctx context.Context, name string) (backend.Stream, error) {
	f.mu.Lock()
	down := f.down
	f.mu.Unlock()
	if down {
		return nil, errInjected
	}
	if f.hang.Load() {
		<-ctx.Done()
		return nil, ctx.Err()
	}
	inner, err := f.Backend.Subscribe(ctx, name)
	if err != nil {
		return nil, err
	}
	s := &faultyStream{inner: inner, events: make(chan backend.Event), inject: make(chan backend.Event), broken: make(chan struct{}), done: make(chan struct{})}
	f.mu.Lock()
	if f.streams == nil {
		f.streams = make(map[*faultyStream]struct{})
	}
	f.streams[s] = struct{}{}
	f.mu.Unlock()
	go s.forward()
	return s, nil
}

// breakStreams ends every open stream with errInjected and makes
// Subscribe fail until heal.
func (f *faultyBackend) breakStreams() {
	f.mu.Lock()
	f.down = true
	streams := f.streams
	f.streams = nil
	f.mu.Unlock()
	for s := range streams {
		s.breakOnce.Do(func() { close(s.broken) })
		<-s.done
	}
}

func (f *faultyBackend) heal() {
	f.mu.Lock()
	f.down = false
	f.mu.Unlock()
}

type faultyStream struct {
	inner     backend.Stream
	events    chan backend.Event
	inject    chan backend.Event // events to deliver as if from the store
	breakOnce sync.Once
	broken    chan struct{} // closed to break (or close) the stream
	done      chan struct{} // closed when forward returned
	err       error         // set before events is closed
}

// forward copies the inner stream's events until it ends or is broken.
func (s *faultyStream) forward() {
	defer close(s.done)
	defer close(s.events)
	defer s.inner.Close()
	for {
		var ev backend.Event
		select {
		case <-s.broken:
			s.err = errInjected
			return
		case ev = <-s.inject:
		case e, ok := <-s.inner.Events():
			if !ok {
				s.err = s.inner.Err()
				return
			}
			ev = e
		}
		select {
		case s.events <- ev:
		case <-s.broken:
			s.err = errInjected
			return
		}
	}
}

func (s *faultyStream) Events() <-chan backend.Event { return s.events }
func (s *faultyStream) Err() error                   { return s.err }
func (s *faultyStream) Close() error {
	s.breakOnce.Do(func() { close(s.broken) })
	<-s.done
	if errors.Is(s.err, errInjected) {
		s.err = nil
	}
	return nil
}

// TestWatchRecovers: when the backend stream breaks, subscribers keep the
// last known state (no offline storm) and, once the stream is back, get
// exactly the changes made meanwhile.
func TestWatchRecovers(t *testing.T) {
	srv := etcdtest.NewServer(t)
	a1 := mustAgent(t, mustBackend(t, srv, 10*time.Second), agent.Config{})
	faulty := &faultyBackend{Backend: mustBackend(t, srv, 10*time.Second)}
	a2, err := agent.New(agent.Config{Backend: faulty, Logger: quiet()})
	if err != nil {
		t.Fatalf("agent.New: %v", err)
	}
	defer a2.Close()

	sess := a1.NewSession(0)
	defer sess.Close()
	mustRegister(t, sess, "web", "10.0.0.1:80", nil)
	mustRegister(t, sess, "web", "10.0.0.2:80", nil)
	sub := mustSubscribe(t, a2, "web")
	if snap := mustSnapshot(t, sub); len(snap) != 2 {
		t.Fatalf("snapshot %+v", snap)
	}

	faulty.breakStreams()
	if err := sess.Unregister(ctxT(t), agent.Args{Name: "web", Addr: "10.0.0.2:80"}); err != nil {
		t.Fatalf("Unregister: %v", err)
	}
	mustRegister(t, sess, "web", "10.0.0.1:80", map[string]string{"v": "2"})
	mustRegister(t, sess, "web", "10.0.0.3:80", nil)
	// While the store is unreachable the agent serves its last known state.
	insts, err := a2.Instances(ctxT(t), "web")
	if err != nil || len(insts) != 2 {
		t.Fatalf("Instances during the outage = %+v, %v; want the 2 last known", insts, err)
	}
	eventually(t, "the broken watch to be counted", func() bool { return a2.Stats().BackendErrors > 0 })

	faulty.heal()
	// Removals first, then additions and updates, oldest first.
	mustNextIs(t, sub, "10.0.0.2:80", false)
	if u := mustNextIs(t, sub, "10.0.0.1:80", true); u.Attrs["v"] != "2" {
		t.Fatalf("update after recovery %+v, want v=2", u)
	}
	mustNextIs(t, sub, "10.0.0.3:80", true)
	mustRegister(t, sess, "web", "10.0.0.4:80", nil) // marker: nothing else came
	mustNextIs(t, sub, "10.0.0.4:80", true)
}
