package agent_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jonboulle/clockwork"
	"go.uber.org/goleak"

	"github.com/flynn/discoverd/agent"
	"github.com/flynn/discoverd/api"
	"github.com/flynn/discoverd/backend"
	"github.com/flynn/discoverd/backend/etcd"
	"github.com/flynn/discoverd/backend/etcd/embedded"
	"github.com/flynn/discoverd/backend/etcd/etcdtest"

	"github.com/flynn/discoverd/internal/testkit"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// wait bounds every wait in these tests. It is generous: a wait that ends
// by timeout is a failure, never a pass.
const wait = 15 * time.Second

func quiet() *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{}, &slog.HandlerOptions{Level: slog.LevelWarn}))
}

type testWriter struct{}

func (testWriter) Write(p []byte) (int, error) { return len(p), nil }

// mustBackend opens an etcd backend on srv whose lease lives ttl.
func mustBackend(tb testing.TB, srv *embedded.Server, ttl time.Duration) *etcd.Backend {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	b, err := etcd.Open(ctx, etcd.Config{Endpoints: srv.Endpoints(), TTL: ttl, Logger: quiet()})
	if err != nil {
		tb.Fatalf("etcd.Open: %v", err)
	}
	tb.Cleanup(func() { b.Close() })
	return b
}

// mustAgent starts an agent on b; cfg.Backend is set by the helper.
func mustAgent(tb testing.TB, b backend.Backend, cfg agent.Config) *agent.Agent {
	tb.Helper()
	cfg.Backend = b
	if cfg.Logger == nil {
		cfg.Logger = quiet()
	}
	a, err := agent.New(cfg)
	if err != nil {
		tb.Fatalf("agent.New: %v", err)
	}
	tb.Cleanup(func() { a.Close() })
	return a
}

// mustAgentClock is mustAgent with the agent's clock of expiry set to c.
func mustAgentClock(tb testing.TB, b backend.Backend, cfg agent.Config, c clockwork.Clock) *agent.Agent {
	tb.Helper()
	cfg.Backend = b
	if cfg.Logger == nil {
		cfg.Logger = quiet()
	}
	a, err := agent.NewWithClock(cfg, c)
	if err != nil {
		tb.Fatalf("agent.NewWithClock: %v", err)
	}
	tb.Cleanup(func() { a.Close() })
	return a
}

// mustAdvance moves c forward by d once the agent's janitor waits on it
// (its ticker is c's one waiter), so that the move reaches the janitor.
func mustAdvance(tb testing.TB, c *clockwork.FakeClock, d time.Duration) {
	tb.Helper()
	if err := c.BlockUntilContext(ctxT(tb), 1); err != nil {
		tb.Fatalf("the janitor never waited on the fake clock: %v", err)
	}
	c.Advance(d)
}

// pair is two agents, each on its own backend, sharing one etcd.
type pair struct {
	srv    *embedded.Server
	b1, b2 *etcd.Backend
	a1, a2 *agent.Agent
}

func mustPair(tb testing.TB, cfg agent.Config) *pair {
	tb.Helper()
	p := &pair{srv: etcdtest.NewServer(tb)}
	p.b1 = mustBackend(tb, p.srv, 10*time.Second)
	p.b2 = mustBackend(tb, p.srv, 10*time.Second)
	p.a1 = mustAgent(tb, p.b1, cfg)
	p.a2 = mustAgent(tb, p.b2, cfg)
	return p
}

func ctxT(tb testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	tb.Cleanup(cancel)
	return ctx
}

func mustRegister(tb testing.TB, s *agent.Session, name, addr string, attrs map[string]string) string {
	tb.Helper()
	got, err := s.Register(ctxT(tb), agent.Args{Name: name, Addr: addr, Attrs: attrs})
	if err != nil {
		tb.Fatalf("Register(%s, %s): %v", name, addr, err)
	}
	return got
}

func mustSubscribe(tb testing.TB, a *agent.Agent, name string) *agent.Subscription {
	tb.Helper()
	sub, err := a.Subscribe(ctxT(tb), name)
	if err != nil {
		tb.Fatalf("Subscribe(%s): %v", name, err)
	}
	tb.Cleanup(sub.Close)
	return sub
}

func mustLeader(tb testing.TB, a *agent.Agent, name string) *agent.Subscription {
	tb.Helper()
	sub, err := a.Leader(ctxT(tb), name)
	if err != nil {
		tb.Fatalf("Leader(%s): %v", name, err)
	}
	tb.Cleanup(sub.Close)
	return sub
}

func mustNext(tb testing.TB, sub *agent.Subscription) agent.ServiceUpdate {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	u, err := sub.Next(ctx)
	if err != nil {
		tb.Fatalf("Next: %v", err)
	}
	return u
}

// mustSnapshot reads the snapshot up to and including the sentinel.
func mustSnapshot(tb testing.TB, sub *agent.Subscription) []agent.ServiceUpdate {
	tb.Helper()
	var us []agent.ServiceUpdate
	for {
		u := mustNext(tb, sub)
		if u.IsSentinel() {
			return us
		}
		if !u.Online {
			tb.Fatalf("snapshot holds an offline update: %+v", u)
		}
		us = append(us, u)
	}
}

// mustNextIs reads one update and checks its addr and online state.
func mustNextIs(tb testing.TB, sub *agent.Subscription, addr string, online bool) agent.ServiceUpdate {
	tb.Helper()
	u := mustNext(tb, sub)
	if u.Addr != addr || u.Online != online {
		tb.Fatalf("got update %+v, want addr %q online %v", u, addr, online)
	}
	return u
}

func wantCode(tb testing.TB, err error, code api.Code) {
	tb.Helper()
	var e *api.Error
	if !errors.As(err, &e) || e.Code != code {
		tb.Fatalf("got error %v (%T), want an *api.Error with code %s", err, err, code)
	}
}

// eventually waits for cond, checking it at short intervals, at most wait.
func eventually(tb testing.TB, what string, cond func() bool) {
	tb.Helper()
	testkit.Eventually(tb, wait, what, cond)
}

// eventuallyAdvancing is eventually in fake time: it moves c forward by
// step between two checks of cond.
func eventuallyAdvancing(tb testing.TB, c *clockwork.FakeClock, step time.Duration, what string, cond func() bool) {
	tb.Helper()
	eventually(tb, what, func() bool {
		if cond() {
			return true
		}
		mustAdvance(tb, c, step)
		return false
	})
}

func TestRegisterSeenByOtherAgent(t *testing.T) {
	p := mustPair(t, agent.Config{})
	sub := mustSubscribe(t, p.a2, "web")
	if snap := mustSnapshot(t, sub); len(snap) != 0 {
		t.Fatalf("snapshot of an unused name: %+v", snap)
	}

	sess := p.a1.NewSession(0)
	defer sess.Close()
	attrs := map[string]string{"version": "1"}
	if got := mustRegister(t, sess, "web", "10.0.0.1:80", attrs); got != "10.0.0.1:80" {
		t.Fatalf("Register returned %q", got)
	}
	u := mustNextIs(t, sub, "10.0.0.1:80", true)
	if u.Name != "web" || u.Created == 0 || !maps.Equal(u.Attrs, attrs) {
		t.Fatalf("update %+v: want name web, attrs %v and a Created", u, attrs)
	}

	insts, err := p.a2.Instances(ctxT(t), "web")
	if err != nil || len(insts) != 1 || insts[0].Created != u.Created {
		t.Fatalf("Instances = %+v, %v; want the one instance", insts, err)
	}
	if st := p.a1.Stats(); st.Registrations != 1 || st.Sessions != 1 {
		t.Fatalf("a1 stats %+v: want 1 registration, 1 session", st)
	}
	if st := p.a2.Stats(); st.Subscribers != 1 || st.Watches != 1 || st.Fanout == 0 {
		t.Fatalf("a2 stats %+v: want 1 subscriber, 1 watch, some fan-out", st)
	}
}

// TestSnapshotThenLive subscribes while registrations are being made and
// checks every subscriber sees each instance exactly once, then nothing
// more.
func TestSnapshotThenLive(t *testing.T) {
	p := mustPair(t, agent.Config{})
	sess := p.a1.NewSession(-1)
	defer sess.Close()
	const before, during = 20, 60
	want := make(map[string]bool)
	for i := range before {
		addr := fmt.Sprintf("10.0.1.%d:80", i+1)
		mustRegister(t, sess, "db", addr, nil)
		want[addr] = true
	}

	var wg sync.WaitGroup
	errs := make(chan error, during)
	for w := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := w; i < during; i += 4 {
				addr := fmt.Sprintf("10.0.2.%d:80", i+1)
				if _, err := sess.Register(context.Background(), agent.Args{Name: "db", Addr: addr}); err != nil {
					errs <- err
				}
			}
		}()
	}
	for i := range during {
		want[fmt.Sprintf("10.0.2.%d:80", i+1)] = true
	}

	// Subscribers join at different points of the registration burst.
	var subs []*agent.Subscription
	for range 5 {
		subs = append(subs, mustSubscribe(t, p.a2, "db"))
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatalf("concurrent Register: %v", err)
	}

	for i, sub := range subs {
		seen := make(map[string]uint)
		record := func(u agent.ServiceUpdate) {
			if !u.Online {
				t.Fatalf("subscriber %d: unexpected offline %+v", i, u)
			}
			if _, dup := seen[u.Addr]; dup {
				t.Fatalf("subscriber %d: %s delivered twice", i, u.Addr)
			}
			seen[u.Addr] = u.Created
		}
		snap := mustSnapshot(t, sub)
		for j, u := range snap {
			if j > 0 && snap[j-1].Created >= u.Created {
				t.Fatalf("subscriber %d: snapshot not oldest first: %+v", i, snap)
			}
			record(u)
		}
		for len(seen) < len(want) {
			record(mustNext(t, sub))
		}
		for addr := range want {
			if _, ok := seen[addr]; !ok {
				t.Fatalf("subscriber %d: missing %s", i, addr)
			}
		}
	}

	// Nothing else is queued: the next update is a marker caused now.
	mustRegister(t, sess, "db", "10.0.3.1:80", nil)
	for _, sub := range subs {
		mustNextIs(t, sub, "10.0.3.1:80", true)
	}
}

func TestReregister(t *testing.T) {
	p := mustPair(t, agent.Config{})
	sub := mustSubscribe(t, p.a2, "api")
	mustSnapshot(t, sub)
	sess := p.a1.NewSession(0)
	defer sess.Close()

	args := agent.Args{Name: "api", Addr: "10.0.0.1:80", Attrs: map[string]string{"v": "1"}}
	mustRegister(t, sess, args.Name, args.Addr, args.Attrs)
	first := mustNextIs(t, sub, args.Addr, true)

	t.Run("heartbeats emit nothing", func(t *testing.T) {
		for range 3 {
			mustRegister(t, sess, args.Name, args.Addr, map[string]string{"v": "1"})
			if err := sess.Heartbeat(ctxT(t), args); err != nil {
				t.Fatalf("Heartbeat: %v", err)
			}
		}
		mustRegister(t, sess, args.Name, "10.0.0.2:80", nil) // marker
		mustNextIs(t, sub, "10.0.0.2:80", true)
	})

	t.Run("attr update keeps Created and emits once", func(t *testing.T) {
		mustRegister(t, sess, args.Name, args.Addr, map[string]string{"v": "2"})
		mustRegister(t, sess, args.Name, args.Addr, map[string]string{"v": "2"})
		u := mustNextIs(t, sub, args.Addr, true)
		if u.Created != first.Created || u.Attrs["v"] != "2" {
			t.Fatalf("update %+v: want v=2 and Created %d", u, first.Created)
		}
		mustRegister(t, sess, args.Name, "10.0.0.3:80", nil) // marker
		mustNextIs(t, sub, "10.0.0.3:80", true)
	})
}

func TestSessionCloseUnregisters(t *testing.T) {
	p := mustPair(t, agent.Config{})
	sub := mustSubscribe(t, p.a2, "web")
	mustSnapshot(t, sub)
	sess := p.a1.NewSession(0)
	other := p.a1.NewSession(0)
	defer other.Close()
	mustRegister(t, sess, "web", "10.0.0.1:80", map[string]string{"k": "v"})
	mustRegister(t, sess, "web", "10.0.0.2:80", nil)
	mustRegister(t, other, "web", "10.0.0.3:80", nil)
	online := mustNextIs(t, sub, "10.0.0.1:80", true)
	mustNextIs(t, sub, "10.0.0.2:80", true)
	mustNextIs(t, sub, "10.0.0.3:80", true)

	// A Register from another session takes the registration over.
	mustRegister(t, other, "web", "10.0.0.2:80", nil)

	sess.Close()
	u := mustNextIs(t, sub, "10.0.0.1:80", false)
	if u.Created != online.Created || u.Attrs["k"] != "v" || u.Name != "web" {
		t.Fatalf("offline update %+v: want the last known attrs and Created %d", u, online.Created)
	}
	mustRegister(t, other, "web", "10.0.0.4:80", nil) // marker: 10.0.0.2 stayed
	mustNextIs(t, sub, "10.0.0.4:80", true)

	_, err := sess.Register(ctxT(t), agent.Args{Name: "web", Addr: "10.0.0.1:80"})
	wantCode(t, err, api.CodeUnavailable)
	sess.Close() // idempotent
	if st := p.a1.Stats(); st.Sessions != 1 || st.Registrations != 3 {
		t.Fatalf("stats %+v: want 1 session, 3 registrations", st)
	}
}

// TestExpiry runs in fake time: a registration whose heartbeats stop
// expires after the TTL, one that keeps beating stays.
func TestExpiry(t *testing.T) {
	t.Parallel()
	const ttl = 10 * time.Second
	clock := clockwork.NewFakeClock()
	srv := etcdtest.NewServer(t)
	a1 := mustAgentClock(t, mustBackend(t, srv, 10*time.Second), agent.Config{TTL: ttl}, clock)
	a2 := mustAgent(t, mustBackend(t, srv, 10*time.Second), agent.Config{TTL: ttl})
	sub := mustSubscribe(t, a2, "web")
	mustSnapshot(t, sub)
	sess := a1.NewSession(0)
	defer sess.Close()

	kept := agent.Args{Name: "web", Addr: "10.0.0.1:80"}
	mustRegister(t, sess, kept.Name, kept.Addr, nil)
	mustRegister(t, sess, "web", "10.0.0.2:80", nil)
	mustNextIs(t, sub, kept.Addr, true)
	mustNextIs(t, sub, "10.0.0.2:80", true)

	// Keep one registration alive; let the other's heartbeats stop. After
	// the second step 10.0.0.2 is 1.3 TTLs old, 10.0.0.1 0.7.
	mustAdvance(t, clock, ttl*6/10)
	if err := sess.Heartbeat(ctxT(t), kept); err != nil {
		t.Fatalf("Heartbeat: %v", err)
	}
	mustAdvance(t, clock, ttl*7/10)
	mustNextIs(t, sub, "10.0.0.2:80", false)
	// Had the heartbeat not counted, 10.0.0.1 (older) would have expired
	// first; the marker proves nothing came before it.
	mustRegister(t, sess, "web", "10.0.0.3:80", nil)
	mustNextIs(t, sub, "10.0.0.3:80", true)

	err := sess.Heartbeat(ctxT(t), agent.Args{Name: "web", Addr: "10.0.0.2:80"})
	wantCode(t, err, api.CodeNotFound)
	if !strings.Contains(err.Error(), "register it again") {
		t.Fatalf("NotFound error %q does not say what to do", err)
	}
	if st := a1.Stats(); st.Expired != 1 {
		t.Fatalf("stats %+v: want 1 expired", st)
	}
}

// TestExpiryKept runs in fake time: a registration of the agent's kept
// class (a health check's) never expires by the TTL, while a connection's
// beside it does; taken over by a connection, it expires like that
// connection's own once its heartbeats stop.
func TestExpiryKept(t *testing.T) {
	t.Parallel()
	const ttl = 10 * time.Second
	clock := clockwork.NewFakeClock()
	srv := etcdtest.NewServer(t)
	a := mustAgentClock(t, mustBackend(t, srv, 10*time.Second), agent.Config{TTL: ttl}, clock)
	sub := mustSubscribe(t, a, "web")
	mustSnapshot(t, sub)
	kept := a.NewKeptSession()
	defer kept.Close()
	conn := a.NewSession(0)
	defer conn.Close()

	mustRegister(t, kept, "web", "10.0.0.1:80", nil)
	mustRegister(t, conn, "web", "10.0.0.2:80", nil)
	mustNextIs(t, sub, "10.0.0.1:80", true)
	mustNextIs(t, sub, "10.0.0.2:80", true)
	mustAdvance(t, clock, ttl*11/10)
	mustNextIs(t, sub, "10.0.0.2:80", false)
	// Three more sweeps, each a TTL or more after the kept registration's
	// last Register; mustAdvance returns once the janitor waits again, so
	// after the third the first two have finished.
	mustAdvance(t, clock, ttl)
	mustAdvance(t, clock, ttl)
	mustAdvance(t, clock, ttl)
	if st := a.Stats(); st.Expired != 1 {
		t.Fatalf("stats %+v: want 1 expired (the connection's only)", st)
	}
	ins, err := a.Instances(ctxT(t), "web")
	if err != nil || len(ins) != 1 || ins[0].Addr != "10.0.0.1:80" {
		t.Fatalf("Instances: %v, %v; want the kept registration alone", ins, err)
	}

	// A connection takes it over: from then on its heartbeats count.
	mustRegister(t, conn, "web", "10.0.0.1:80", nil)
	mustAdvance(t, clock, ttl*11/10)
	mustNextIs(t, sub, "10.0.0.1:80", false)
	if st := a.Stats(); st.Expired != 2 {
		t.Fatalf("stats %+v: want 2 expired", st)
	}
}

// TestAgentDeath: an agent whose backend drops its client without revoking
// the lease loses its registrations after the backend TTL.
func TestAgentDeath(t *testing.T) {
	t.Parallel()
	srv := etcdtest.NewServer(t)
	b1 := mustBackend(t, srv, time.Second)
	a1 := mustAgent(t, b1, agent.Config{})
	a2 := mustAgent(t, mustBackend(t, srv, 10*time.Second), agent.Config{})
	sub := mustSubscribe(t, a2, "web")
	mustSnapshot(t, sub)
	sess := a1.NewSession(0)
	mustRegister(t, sess, "web", "10.0.0.1:80", nil)
	mustNextIs(t, sub, "10.0.0.1:80", true)

	b1.Abandon()
	mustNextIs(t, sub, "10.0.0.1:80", false)
	a1.Close()
	sess.Close()
}

// TestGracefulStop: closing the agent and then its backend removes its
// registrations at once (the lease TTL is far longer than the wait).
func TestGracefulStop(t *testing.T) {
	t.Parallel()
	srv := etcdtest.NewServer(t)
	b1 := mustBackend(t, srv, time.Minute)
	a1 := mustAgent(t, b1, agent.Config{})
	a2 := mustAgent(t, mustBackend(t, srv, time.Minute), agent.Config{})
	sub := mustSubscribe(t, a2, "web")
	mustSnapshot(t, sub)
	mustRegister(t, a1.NewSession(0), "web", "10.0.0.1:80", nil)
	mustNextIs(t, sub, "10.0.0.1:80", true)

	a1.Close()
	if err := b1.Close(); err != nil {
		t.Fatalf("backend Close: %v", err)
	}
	mustNextIs(t, sub, "10.0.0.1:80", false)
}

func TestLeader(t *testing.T) {
	p := mustPair(t, agent.Config{})
	lead := mustLeader(t, p.a2, "db")
	all := mustSubscribe(t, p.a2, "db")
	if u := mustNext(t, lead); !u.IsSentinel() {
		t.Fatalf("leader of an empty service: %+v, want the zero update", u)
	}
	if _, ok, err := p.a2.LeaderOf(ctxT(t), "db"); ok || err != nil {
		t.Fatalf("LeaderOf empty = %v, %v", ok, err)
	}

	var sess [3]*agent.Session
	for i := range sess {
		sess[i] = p.a1.NewSession(0)
		defer sess[i].Close()
		mustRegister(t, sess[i], "db", fmt.Sprintf("10.0.0.%d:5432", i+1), nil)
	}
	first := mustNextIs(t, lead, "10.0.0.1:5432", true)
	for mustNext(t, all).Addr != "10.0.0.3:5432" { // a2's cache has all three
	}
	insts, err := p.a2.Instances(ctxT(t), "db")
	if err != nil || len(insts) != 3 {
		t.Fatalf("Instances = %+v, %v", insts, err)
	}
	for i, u := range insts {
		if u.Addr != fmt.Sprintf("10.0.0.%d:5432", i+1) {
			t.Fatalf("Instances not oldest first: %+v", insts)
		}
	}
	if u, ok, err := p.a2.LeaderOf(ctxT(t), "db"); !ok || err != nil || u.Created != first.Created {
		t.Fatalf("LeaderOf = %+v, %v, %v; want %+v", u, ok, err, first)
	}
	late := mustLeader(t, p.a2, "db")
	mustNextIs(t, late, "10.0.0.1:5432", true)

	// An attribute update of the leader is not a change of leader.
	// (The streams' next update below must be the new leader.)
	mustRegister(t, sess[0], "db", "10.0.0.1:5432", map[string]string{"role": "primary"})

	sess[0].Close()
	mustNextIs(t, lead, "10.0.0.2:5432", true)
	mustNextIs(t, late, "10.0.0.2:5432", true)
	if err := sess[1].Unregister(ctxT(t), agent.Args{Name: "db", Addr: "10.0.0.2:5432"}); err != nil {
		t.Fatalf("Unregister: %v", err)
	}
	mustNextIs(t, lead, "10.0.0.3:5432", true)
	mustNextIs(t, late, "10.0.0.3:5432", true)
	sess[2].Close()
	for _, sub := range []*agent.Subscription{lead, late} {
		if u := mustNext(t, sub); !u.IsSentinel() {
			t.Fatalf("after the last instance left: %+v, want the zero update", u)
		}
	}
}

// TestValidation: the agent trusts its callers' names, addresses and
// attributes (the front ends check them: server's TestRPCErrorsCarryCodes),
// and refuses only what it alone can judge.
func TestValidation(t *testing.T) {
	p := mustPair(t, agent.Config{})
	sess := p.a1.NewSession(0)
	defer sess.Close()
	t.Run(":port without ExternalIP", func(t *testing.T) {
		_, err := sess.Register(ctxT(t), agent.Args{Name: "web", Addr: ":80"})
		wantCode(t, err, api.CodeInvalidArgument)
		// The session is still usable.
		mustRegister(t, sess, "web", "10.0.0.9:80", nil)
	})
	t.Run("unknown registration", func(t *testing.T) {
		args := agent.Args{Name: "web", Addr: "10.9.9.9:80"}
		wantCode(t, sess.Heartbeat(ctxT(t), args), api.CodeNotFound)
		wantCode(t, sess.Unregister(ctxT(t), args), api.CodeNotFound)
	})

	t.Run("session cap", func(t *testing.T) {
		capped := p.a1.NewSession(2)
		defer capped.Close()
		mustRegister(t, capped, "cap", "10.0.0.1:80", nil)
		mustRegister(t, capped, "cap", "10.0.0.2:80", nil)
		_, err := capped.Register(ctxT(t), agent.Args{Name: "cap", Addr: "10.0.0.3:80"})
		wantCode(t, err, api.CodeResourceExhausted)
		// Re-registering held ones is fine; so is taking over after a removal.
		mustRegister(t, capped, "cap", "10.0.0.2:80", map[string]string{"v": "2"})
		if err := capped.Unregister(ctxT(t), agent.Args{Name: "cap", Addr: "10.0.0.1:80"}); err != nil {
			t.Fatalf("Unregister: %v", err)
		}
		mustRegister(t, capped, "cap", "10.0.0.3:80", nil)
		// A take-over counts against the cap too.
		mustRegister(t, sess, "cap", "10.0.0.4:80", nil)
		_, err = capped.Register(ctxT(t), agent.Args{Name: "cap", Addr: "10.0.0.4:80"})
		wantCode(t, err, api.CodeResourceExhausted)
	})
}

func TestExpandPort(t *testing.T) {
	for _, tc := range []struct{ ip, want string }{
		{"10.1.2.3", "10.1.2.3:8080"},
		{"fd00::1", "[fd00::1]:8080"},
	} {
		t.Run(tc.ip, func(t *testing.T) {
			srv := etcdtest.NewServer(t)
			a := mustAgent(t, mustBackend(t, srv, 10*time.Second), agent.Config{ExternalIP: tc.ip})
			sess := a.NewSession(0)
			defer sess.Close()
			if got := mustRegister(t, sess, "web", ":8080", nil); got != tc.want {
				t.Fatalf("Register(:8080) = %q, want %q", got, tc.want)
			}
			short := agent.Args{Name: "web", Addr: ":8080"}
			if err := sess.Heartbeat(ctxT(t), short); err != nil {
				t.Fatalf("Heartbeat(:8080): %v", err)
			}
			insts, err := a.Instances(ctxT(t), "web")
			if err != nil || len(insts) != 1 || insts[0].Addr != tc.want {
				t.Fatalf("Instances = %+v, %v", insts, err)
			}
			if err := sess.Unregister(ctxT(t), short); err != nil {
				t.Fatalf("Unregister(:8080): %v", err)
			}
			wantCode(t, sess.Heartbeat(ctxT(t), agent.Args{Name: "web", Addr: tc.want}), api.CodeNotFound)
		})
	}
}

func TestSlowSubscriberCutOff(t *testing.T) {
	const buffer = 4
	p := mustPair(t, agent.Config{SubscriberBuffer: buffer})
	sess := p.a1.NewSession(0)
	defer sess.Close()
	mustRegister(t, sess, "web", "10.0.0.100:80", nil)
	fast := mustSubscribe(t, p.a2, "web")
	slow := mustSubscribe(t, p.a2, "web")
	mustSnapshot(t, fast)
	// slow reads nothing: its snapshot is not counted against the bound.

	const n = 10
	for i := range n {
		addr := fmt.Sprintf("10.0.0.%d:80", i+1)
		mustRegister(t, sess, "web", addr, nil)
		mustNextIs(t, fast, addr, true)
	}
	if got := mustSnapshot(t, slow); len(got) != 1 {
		t.Fatalf("slow snapshot %+v", got)
	}
	for i := range buffer {
		mustNextIs(t, slow, fmt.Sprintf("10.0.0.%d:80", i+1), true)
	}
	_, err := slow.Next(ctxT(t))
	wantCode(t, err, api.CodeResourceExhausted)
	if !strings.Contains(err.Error(), "too slow") {
		t.Fatalf("cut-off error %q does not say why", err)
	}
	if st := p.a2.Stats(); st.SlowSubscribersCut != 1 {
		t.Fatalf("stats %+v: want 1 slow subscriber cut", st)
	}
	// The fast one keeps receiving.
	mustRegister(t, sess, "web", "10.0.0.200:80", nil)
	mustNextIs(t, fast, "10.0.0.200:80", true)
}

func TestCloseEndsSubscriptions(t *testing.T) {
	srv := etcdtest.NewServer(t)
	a := mustAgent(t, mustBackend(t, srv, 10*time.Second), agent.Config{})
	sess := a.NewSession(0)
	mustRegister(t, sess, "web", "10.0.0.1:80", nil)
	sub := mustSubscribe(t, a, "web")
	lead := mustLeader(t, a, "web")

	blocked := make(chan error, 1)
	go func() {
		_, err := lead.Next(context.Background()) // the leader
		if err == nil {
			_, err = lead.Next(context.Background()) // blocks until Close
		}
		blocked <- err
	}()
	if err := a.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	select {
	case err := <-blocked:
		wantCode(t, err, api.CodeUnavailable)
	case <-time.After(wait):
		t.Fatal("Next still blocked after Close")
	}
	// Queued updates are delivered, then the end.
	mustSnapshot(t, sub)
	_, err := sub.Next(ctxT(t))
	wantCode(t, err, api.CodeUnavailable)

	_, err = a.Subscribe(ctxT(t), "web")
	wantCode(t, err, api.CodeUnavailable)
	_, err = sess.Register(ctxT(t), agent.Args{Name: "web", Addr: "10.0.0.2:80"})
	wantCode(t, err, api.CodeUnavailable)
	sess.Close()
	if err := a.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
}

// countingBackend counts the write calls the agent makes to a real backend.
type countingBackend struct {
	backend.Backend
	calls atomic.Int64
}

func (c *countingBackend) Register(ctx context.Context, name, addr string, attrs map[string]string) error {
	c.calls.Add(1)
	return c.Backend.Register(ctx, name, addr, attrs)
}

func (c *countingBackend) Unregister(ctx context.Context, name, addr string) error {
	c.calls.Add(1)
	return c.Backend.Unregister(ctx, name, addr)
}

// TestHeartbeatsDoNotWrite: rounds of heartbeats (both forms) over many
// idle registrations reach neither the backend nor the store: the Created
// of two markers, registered before and after, are consecutive revisions.
func TestHeartbeatsDoNotWrite(t *testing.T) {
	const n = 1000
	srv := etcdtest.NewServer(t)
	counting := &countingBackend{Backend: mustBackend(t, srv, 10*time.Second)}
	a, err := agent.New(agent.Config{Backend: counting, Logger: quiet()})
	if err != nil {
		t.Fatalf("agent.New: %v", err)
	}
	defer a.Close()
	sess := a.NewSession(-1)
	defer sess.Close()

	var wg sync.WaitGroup
	errs := make(chan error, n)
	for w := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := w; i < n; i += 8 {
				_, err := sess.Register(context.Background(), agent.Args{Name: "idle", Addr: fmt.Sprintf("10.%d.%d.1:80", i/250, i%250), Attrs: map[string]string{"i": fmt.Sprint(i)}})
				if err != nil {
					errs <- err
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatalf("Register: %v", err)
	}

	markers := mustSubscribe(t, a, "marker")
	mustSnapshot(t, markers)
	created := func(addr string) uint {
		mustRegister(t, sess, "marker", addr, nil)
		return mustNextIs(t, markers, addr, true).Created
	}
	before := created("10.255.0.1:80")
	calls := counting.calls.Load()
	for range 3 {
		for i := range n {
			args := agent.Args{Name: "idle", Addr: fmt.Sprintf("10.%d.%d.1:80", i/250, i%250), Attrs: map[string]string{"i": fmt.Sprint(i)}}
			if err := sess.Heartbeat(ctxT(t), args); err != nil {
				t.Fatalf("Heartbeat: %v", err)
			}
			if _, err := sess.Register(ctxT(t), args); err != nil {
				t.Fatalf("re-Register: %v", err)
			}
		}
	}
	if got := counting.calls.Load() - calls; got != 0 {
		t.Fatalf("heartbeats made %d Register/Unregister calls to the backend", got)
	}
	// etcd's token is CreateRevision<<7 | place in the transaction.
	after := created("10.255.0.2:80")
	if before, after := before>>7, after>>7; after != before+1 {
		t.Fatalf("markers created at revisions %d and %d: the heartbeats wrote %d times to the store", before, after, after-before-1)
	}
	if st := a.Stats(); st.Registrations != n+2 {
		t.Fatalf("stats %+v: want %d registrations", st, n+2)
	}
}

func TestWatchStopsWhenUnused(t *testing.T) {
	srv := etcdtest.NewServer(t)
	b := mustBackend(t, srv, 10*time.Second)
	t.Run("at once", func(t *testing.T) {
		a := mustAgent(t, b, agent.Config{WatchLinger: -1})
		sub := mustSubscribe(t, a, "web")
		if _, err := a.Instances(ctxT(t), "web"); err != nil {
			t.Fatalf("Instances: %v", err)
		}
		if st := a.Stats(); st.Watches != 1 || st.Subscribers != 1 {
			t.Fatalf("stats %+v: want 1 watch shared, 1 subscriber", st)
		}
		sub.Close()
		if st := a.Stats(); st.Watches != 0 || st.Subscribers != 0 {
			t.Fatalf("stats %+v after Close: want no watch, no subscriber", st)
		}
	})
	t.Run("after the linger", func(t *testing.T) {
		const linger = 5 * time.Second
		clock := clockwork.NewFakeClock()
		a := mustAgentClock(t, b, agent.Config{TTL: 10 * time.Second, WatchLinger: linger}, clock)
		start := clock.Now()
		if _, err := a.Instances(ctxT(t), "web"); err != nil {
			t.Fatalf("Instances: %v", err)
		}
		eventuallyAdvancing(t, clock, time.Second, "the idle watch to stop", func() bool { return a.Stats().Watches == 0 })
		if idle := clock.Since(start); idle < linger {
			t.Fatalf("the idle watch stopped after %v, before the linger of %v", idle, linger)
		}
	})
}

func TestNewConfig(t *testing.T) {
	if _, err := agent.New(agent.Config{}); err == nil {
		t.Fatal("New without a Backend succeeded")
	}
}
