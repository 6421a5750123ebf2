package agent_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/flynn/discoverd/agent"
	"github.com/flynn/discoverd/backend"
	"github.com/flynn/discoverd/backend/etcd/etcdtest"
	"github.com/jonboulle/clockwork"
)

// logCounter is a slog handler that counts the warnings (and worse) whose
// message contains a given text.
type logCounter struct {
	mu   sync.Mutex
	msgs []string
}

func (c *logCounter) logger() *slog.Logger { return slog.New(c) }

func (c *logCounter) Enabled(_ context.Context, l slog.Level) bool { return l >= slog.LevelWarn }
func (c *logCounter) Handle(_ context.Context, r slog.Record) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.msgs = append(c.msgs, r.Message)
	return nil
}
func (c *logCounter) WithAttrs([]slog.Attr) slog.Handler { return c }
func (c *logCounter) WithGroup(string) slog.Handler      { return c }

func (c *logCounter) count(text string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for _, m := range c.msgs {
		if strings.Contains(m, text) {
			n++
		}
	}
	return n
}

// storeAddrs reads what the store holds for name through a fresh stream
// of b, sorted.
func storeAddrs(tb testing.TB, b backend.Backend, name string) []string {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	s, err := b.Subscribe(ctx, name)
	if err != nil {
		tb.Fatalf("Subscribe: %v", err)
	}
	defer s.Close()
	var addrs []string
	for {
		select {
		case ev, ok := <-s.Events():
			if !ok {
				tb.Fatalf("stream ended: %v", s.Err())
			}
			switch ev.Type {
			case backend.Put:
				addrs = append(addrs, ev.Instance.Addr)
			case backend.Current:
				slices.Sort(addrs)
				return addrs
			}
		case <-ctx.Done():
			tb.Fatal("no snapshot from the store")
		}
	}
}

// TestCallerGivesUp: a caller whose ctx ends is not a store failure: it is
// neither counted nor logged, and it leaves nothing in the store.
func TestCallerGivesUp(t *testing.T) {
	srv := etcdtest.NewServer(t)

	t.Run("unregister", func(t *testing.T) {
		a := mustAgent(t, mustBackend(t, srv, 10*time.Second), agent.Config{})
		sess := a.NewSession(0)
		defer sess.Close()
		cancelled, cancel := context.WithCancel(context.Background())
		cancel()
		for i := range 50 { // a free lock and a done ctx: never the lock
			args := agent.Args{Name: "web", Addr: fmt.Sprintf("10.0.0.1:%d", i+1)}
			mustRegister(t, sess, args.Name, args.Addr, nil)
			if err := sess.Unregister(cancelled, args); !errors.Is(err, context.Canceled) {
				t.Fatalf("Unregister with a cancelled ctx: %v, want context.Canceled", err)
			}
			if err := sess.Heartbeat(ctxT(t), args); err != nil {
				t.Fatalf("the registration is gone after a cancelled Unregister: %v", err)
			}
		}
		if n := a.Stats().BackendErrors; n != 0 {
			t.Fatalf("BackendErrors = %d, want 0", n)
		}
	})

	// The connection dies during a Register: the caller's ctx ends and
	// its session closes while the store write is in flight.
	for _, tc := range []struct {
		name   string
		ctxErr bool // the backend reports the caller's ctx error
	}{{"write acknowledged", false}, {"write cut short", true}} {
		t.Run("connection dies mid-register/"+tc.name, func(t *testing.T) {
			real := mustBackend(t, srv, 10*time.Second)
			g := &gatedBackend{Backend: real, written: make(chan struct{}), release: make(chan struct{}), ctxErr: tc.ctxErr}
			// A long TTL: only a prompt removal passes, not the janitor's
			// periodic sweep.
			a, err := agent.New(agent.Config{Backend: g, TTL: time.Hour, Logger: quiet()})
			if err != nil {
				t.Fatal(err)
			}
			defer a.Close()
			sess := a.NewSession(0)
			ctx, cancel := context.WithCancel(context.Background())
			errc := make(chan error, 1)
			go func() {
				_, err := sess.Register(ctx, agent.Args{Name: "mid", Addr: "10.0.0.1:80"})
				errc <- err
			}()
			select {
			case <-g.written:
			case <-time.After(wait):
				t.Fatal("the store write did not happen")
			}
			cancel()
			sess.Close()
			close(g.release)
			select {
			case err := <-errc:
				if err == nil {
					t.Fatal("Register succeeded on a session closed meanwhile")
				}
			case <-time.After(wait):
				t.Fatal("Register did not return")
			}
			eventually(t, "the key removed from the store", func() bool {
				return len(storeAddrs(t, real, "mid")) == 0
			})
			if n := a.Stats().BackendErrors; n != 0 {
				t.Fatalf("BackendErrors = %d, want 0", n)
			}
		})
	}
}

// gatedBackend writes a registration, then holds the Register call until
// release is closed; with ctxErr it then reports the caller's ctx error as
// a real backend would for a write cut short.
type gatedBackend struct {
	backend.Backend
	once    sync.Once
	written chan struct{} // closed after the first write
	release chan struct{}
	ctxErr  bool
}

func (g *gatedBackend) Register(ctx context.Context, name, addr string, attrs map[string]string) error {
	if err := g.Backend.Register(context.WithoutCancel(ctx), name, addr, attrs); err != nil {
		return err
	}
	g.once.Do(func() { close(g.written) })
	<-g.release
	if g.ctxErr && ctx.Err() != nil {
		return ctx.Err()
	}
	return nil
}

// TestStoreDownRemovals: when the store fails, a batch of removals
// (Session.Close, the janitor's retries) stops at the first failure and
// logs it once, the remaining keys are left to the janitor, whose retries
// back off and succeed once the store is back. It runs in fake time.
func TestStoreDownRemovals(t *testing.T) {
	const n = 40
	const ttl = 10 * time.Second // the janitor sweeps every TTL/4
	srv := etcdtest.NewServer(t)
	real := mustBackend(t, srv, 10*time.Second)
	faulty := &faultyBackend{Backend: real}
	logs := &logCounter{}
	clock := clockwork.NewFakeClock()
	a := mustAgentClock(t, faulty, agent.Config{TTL: ttl, Logger: logs.logger()}, clock)
	sess := a.NewSession(0)
	for i := range n {
		mustRegister(t, sess, "web", fmt.Sprintf("10.0.0.%d:80", i+1), nil)
	}
	if held := agent.HeldAddrs(a, "web"); len(held) != n {
		t.Fatalf("holding %d registrations, want %d", len(held), n)
	}

	faulty.failUnregister.Store(true)
	sess.Close()
	if got := logs.count("unregister failed"); got != 1 {
		t.Fatalf("%d warnings for one failed Session.Close, want 1", got)
	}
	if calls := faulty.unregisters.Load(); calls > agent.RemoveParallelism {
		t.Fatalf("%d store calls after the store failed, want at most %d (those in flight)", calls, agent.RemoveParallelism)
	}
	if held := agent.HeldAddrs(a, "web"); len(held) != 0 {
		t.Fatalf("the closed session's registrations are still held: %v", held)
	}
	if orphans, _ := agent.Orphans(a); orphans != n {
		t.Fatalf("%d keys left to retry, want %d", orphans, n)
	}

	// The janitor's retry fails too: one warning per failed batch.
	eventuallyAdvancing(t, clock, ttl/4, "a failed retry batch", func() bool {
		_, failed := agent.Orphans(a)
		return failed >= 2
	})
	calls := faulty.unregisters.Load() // read first: a batch may be under way
	warns := logs.count("unregister failed")
	_, failed := agent.Orphans(a)
	if warns > failed {
		t.Fatalf("%d warnings for %d failed batches", warns, failed)
	}
	if calls > int64((failed+1)*agent.RemoveParallelism) {
		t.Fatalf("%d store calls in %d failed batches: the batches did not stop at the first failure", calls, failed)
	}

	faulty.failUnregister.Store(false)
	eventuallyAdvancing(t, clock, ttl/4, "the orphans removed once the store is back", func() bool {
		orphans, failed := agent.Orphans(a)
		return orphans == 0 && failed == 0
	})
	if got := storeAddrs(t, real, "web"); len(got) != 0 {
		t.Fatalf("the store still holds %v", got)
	}
}

// TestSessionCloseParallel: Session.Close removes its registrations
// several at a time, at most agent.RemoveParallelism.
func TestSessionCloseParallel(t *testing.T) {
	const n = agent.RemoveParallelism + 4
	srv := etcdtest.NewServer(t)
	real := mustBackend(t, srv, 10*time.Second)
	b := &barrierBackend{Backend: real, want: agent.RemoveParallelism, full: make(chan struct{})}
	a := mustAgent(t, b, agent.Config{})
	sess := a.NewSession(0)
	for i := range n {
		mustRegister(t, sess, "web", fmt.Sprintf("10.0.0.%d:80", i+1), nil)
	}
	sess.Close()
	if got := b.max.Load(); got != agent.RemoveParallelism {
		t.Fatalf("at most %d removals at once, want %d", got, agent.RemoveParallelism)
	}
	if got := storeAddrs(t, real, "web"); len(got) != 0 {
		t.Fatalf("the store still holds %v", got)
	}
}

// barrierBackend holds each Unregister until want calls are in flight at
// once (or the call's ctx ends), and records the most in flight.
type barrierBackend struct {
	backend.Backend
	want     int64
	full     chan struct{}
	fullOnce sync.Once
	inflight atomic.Int64
	max      atomic.Int64
}

func (b *barrierBackend) Unregister(ctx context.Context, name, addr string) error {
	n := b.inflight.Add(1)
	defer b.inflight.Add(-1)
	for {
		m := b.max.Load()
		if n <= m || b.max.CompareAndSwap(m, n) {
			break
		}
	}
	if n >= b.want {
		b.fullOnce.Do(func() { close(b.full) })
	}
	select {
	case <-b.full:
	case <-ctx.Done():
		return ctx.Err()
	}
	return b.Backend.Unregister(ctx, name, addr)
}
