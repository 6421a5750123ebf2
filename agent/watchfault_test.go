package agent_test

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/flynn/discoverd/agent"
	"github.com/flynn/discoverd/api"
	"github.com/flynn/discoverd/backend"
	"github.com/flynn/discoverd/backend/etcd/etcdtest"
)

// TestLookupStoreUnreachable: a lookup of a name not watched yet fails
// with CodeUnavailable when the store cannot be subscribed to, instead of
// waiting for the caller's ctx (an RPC stream's ctx lasts as long as its
// connection). The watch keeps retrying: once the store is back, lookups
// succeed.
func TestLookupStoreUnreachable(t *testing.T) {
	lookups := []struct {
		name string
		call func(ctx context.Context, a *agent.Agent, name string) error
	}{
		{"Subscribe", func(ctx context.Context, a *agent.Agent, name string) error {
			s, err := a.Subscribe(ctx, name)
			if err == nil {
				s.Close()
			}
			return err
		}},
		{"Leader", func(ctx context.Context, a *agent.Agent, name string) error {
			s, err := a.Leader(ctx, name)
			if err == nil {
				s.Close()
			}
			return err
		}},
		{"Instances", func(ctx context.Context, a *agent.Agent, name string) error {
			_, err := a.Instances(ctx, name)
			return err
		}},
		{"LeaderOf", func(ctx context.Context, a *agent.Agent, name string) error {
			_, _, err := a.LeaderOf(ctx, name)
			return err
		}},
	}
	srv := etcdtest.NewServer(t)

	t.Run("subscribe fails", func(t *testing.T) {
		faulty := &faultyBackend{Backend: mustBackend(t, srv, 10*time.Second)}
		a, err := agent.New(agent.Config{Backend: faulty, Logger: quiet()})
		if err != nil {
			t.Fatal(err)
		}
		defer a.Close()
		faulty.breakStreams()
		for _, l := range lookups {
			wantCode(t, l.call(ctxT(t), a, "web"), api.CodeUnavailable)
		}
		faulty.heal()
		for _, l := range lookups {
			eventually(t, l.name+" to succeed once the store is back", func() bool {
				return l.call(ctxT(t), a, "web") == nil
			})
		}
	})

	t.Run("subscribe hangs", func(t *testing.T) {
		faulty := &faultyBackend{Backend: mustBackend(t, srv, 10*time.Second)}
		a, err := agent.NewWithBackendTimeout(agent.Config{Backend: faulty, Logger: quiet()}, 50*time.Millisecond)
		if err != nil {
			t.Fatal(err)
		}
		defer a.Close()
		faulty.hang.Store(true)
		for _, l := range lookups {
			wantCode(t, l.call(ctxT(t), a, "web"), api.CodeUnavailable)
		}
	})
}

// TestResyncLeader: after the watch resynchronises, a Leader stream gets
// only the leader as it is now, never instances that are already gone nor
// a "no leader" that the store never went through.
func TestResyncLeader(t *testing.T) {
	srv := etcdtest.NewServer(t)
	a1 := mustAgent(t, mustBackend(t, srv, 10*time.Second), agent.Config{})
	faulty := &faultyBackend{Backend: mustBackend(t, srv, 10*time.Second)}
	a2, err := agent.New(agent.Config{Backend: faulty, Logger: quiet()})
	if err != nil {
		t.Fatal(err)
	}
	defer a2.Close()
	sess := a1.NewSession(0)
	defer sess.Close()

	t.Run("leader and next gone", func(t *testing.T) {
		for _, addr := range []string{"10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"} {
			mustRegister(t, sess, "db", addr, nil)
		}
		lead := mustLeader(t, a2, "db")
		for mustNext(t, lead).Addr != "10.0.0.1:80" {
		}
		eventually(t, "a2 to see 3 instances", func() bool {
			us, _ := a2.Instances(ctxT(t), "db")
			return len(us) == 3
		})
		faulty.breakStreams()
		for _, addr := range []string{"10.0.0.1:80", "10.0.0.2:80"} {
			if err := sess.Unregister(ctxT(t), agent.Args{Name: "db", Addr: addr}); err != nil {
				t.Fatal(err)
			}
		}
		faulty.heal()
		mustNextIs(t, lead, "10.0.0.3:80", true)
		if err := sess.Unregister(ctxT(t), agent.Args{Name: "db", Addr: "10.0.0.3:80"}); err != nil {
			t.Fatal(err)
		}
		if u := mustNext(t, lead); !u.IsSentinel() {
			t.Fatalf("leader update %+v, want none left (zero)", u)
		}
	})

	t.Run("replaced", func(t *testing.T) {
		mustRegister(t, sess, "cache", "10.0.1.1:80", nil)
		lead := mustLeader(t, a2, "cache")
		mustNextIs(t, lead, "10.0.1.1:80", true)
		faulty.breakStreams()
		if err := sess.Unregister(ctxT(t), agent.Args{Name: "cache", Addr: "10.0.1.1:80"}); err != nil {
			t.Fatal(err)
		}
		mustRegister(t, sess, "cache", "10.0.1.2:80", nil)
		faulty.heal()
		if u := mustNext(t, lead); u.Addr != "10.0.1.2:80" {
			t.Fatalf("leader update %+v after resync, want 10.0.1.2:80 (no spurious 'no leader')", u)
		}
	})
}

// TestResyncRecreated: an instance removed and registered again while the
// watch was down (same addr, new Created) reaches subscribers as an
// offline with the old Created, then an online with the new one.
func TestResyncRecreated(t *testing.T) {
	srv := etcdtest.NewServer(t)
	a1 := mustAgent(t, mustBackend(t, srv, 10*time.Second), agent.Config{})
	faulty := &faultyBackend{Backend: mustBackend(t, srv, 10*time.Second)}
	a2, err := agent.New(agent.Config{Backend: faulty, Logger: quiet()})
	if err != nil {
		t.Fatal(err)
	}
	defer a2.Close()
	sess := a1.NewSession(0)
	defer sess.Close()
	mustRegister(t, sess, "web", "10.0.0.1:80", nil)
	sub := mustSubscribe(t, a2, "web")
	first := mustSnapshot(t, sub)[0]
	lead := mustLeader(t, a2, "web")
	mustNextIs(t, lead, "10.0.0.1:80", true)

	faulty.breakStreams()
	if err := sess.Unregister(ctxT(t), agent.Args{Name: "web", Addr: "10.0.0.1:80"}); err != nil {
		t.Fatal(err)
	}
	mustRegister(t, sess, "web", "10.0.0.1:80", nil)
	faulty.heal()

	off := mustNextIs(t, sub, "10.0.0.1:80", false)
	if off.Created != first.Created {
		t.Fatalf("offline %+v, want the old Created %d", off, first.Created)
	}
	on := mustNextIs(t, sub, "10.0.0.1:80", true)
	if on.Created <= first.Created {
		t.Fatalf("online %+v, want a Created after %d", on, first.Created)
	}
	if u := mustNextIs(t, lead, "10.0.0.1:80", true); u.Created != on.Created {
		t.Fatalf("leader %+v, want the re-created instance (Created %d)", u, on.Created)
	}
}

// TestForeignData: instances in the store that break the api limits
// (written by something other than a discoverd agent) never reach
// subscribers nor lookups; an instance updated beyond the limits goes
// offline. The refusals are logged once, not per instance.
func TestForeignData(t *testing.T) {
	srv := etcdtest.NewServer(t)
	a1 := mustAgent(t, mustBackend(t, srv, 10*time.Second), agent.Config{})
	faulty := &faultyBackend{Backend: mustBackend(t, srv, 10*time.Second)}
	logs := &logCounter{}
	a2 := mustAgent(t, faulty, agent.Config{Logger: logs.logger()})
	sess := a1.NewSession(0)
	defer sess.Close()
	mustRegister(t, sess, "web", "10.0.0.1:80", nil)
	sub := mustSubscribe(t, a2, "web")
	first := mustSnapshot(t, sub)[0]

	tooMany := make(map[string]string, api.MaxAttrs+1)
	for i := range api.MaxAttrs + 1 {
		tooMany[fmt.Sprint("k", i)] = "v"
	}
	for _, in := range []backend.Instance{
		{Name: "web", Addr: "not an address", Created: 1 << 40},
		{Name: "web", Addr: strings.Repeat("a", api.MaxAddrLen) + ":80", Created: 1<<40 + 1},
		{Name: "web", Addr: "10.0.0.9:80", Attrs: tooMany, Created: 1<<40 + 2},
		// The valid instance, updated beyond the limits.
		{Name: "web", Addr: "10.0.0.1:80", Attrs: map[string]string{"big": strings.Repeat("x", api.MaxAttrValueLen+1)}, Created: uint64(first.Created)},
	} {
		faulty.inject(t, backend.Event{Type: backend.Put, Instance: in})
	}
	mustRegister(t, sess, "web", "10.0.0.2:80", nil) // marker
	mustNextIs(t, sub, "10.0.0.1:80", false)
	mustNextIs(t, sub, "10.0.0.2:80", true)
	insts, err := a2.Instances(ctxT(t), "web")
	if err != nil || len(insts) != 1 || insts[0].Addr != "10.0.0.2:80" {
		t.Fatalf("Instances = %+v, %v; want only 10.0.0.2:80", insts, err)
	}
	if got := logs.count("break the limits"); got != 1 {
		t.Fatalf("%d log lines for 4 refused instances, want 1", got)
	}
}

// TestBackendClosedFirst: when the backend is closed before the agent, the
// watches stop instead of resubscribing forever, their subscriptions end
// with CodeUnavailable, and lookups fail with it.
func TestBackendClosedFirst(t *testing.T) {
	srv := etcdtest.NewServer(t)
	b := mustBackend(t, srv, 10*time.Second)
	a := mustAgent(t, b, agent.Config{})
	sub := mustSubscribe(t, a, "web")
	mustSnapshot(t, sub)
	b.Close()
	_, err := sub.Next(ctxT(t))
	wantCode(t, err, api.CodeUnavailable)
	eventually(t, "the stopped watch to be dropped", func() bool { return a.Stats().Watches == 0 })
	_, err = a.Instances(ctxT(t), "web")
	wantCode(t, err, api.CodeUnavailable)
	if n := a.Stats().BackendErrors; n > 1 {
		t.Fatalf("BackendErrors = %d: the watch kept resubscribing to a closed backend", n)
	}
}

// TestLeaderTies: instances that share a Created (stored in one
// transaction) are ordered by Addr, so the leader does not depend on the
// order of events nor on map iteration.
func TestLeaderTies(t *testing.T) {
	srv := etcdtest.NewServer(t)
	a1 := mustAgent(t, mustBackend(t, srv, 10*time.Second), agent.Config{})
	faulty := &faultyBackend{Backend: mustBackend(t, srv, 10*time.Second)}
	a2 := mustAgent(t, faulty, agent.Config{})
	sess := a1.NewSession(0)
	defer sess.Close()
	mustRegister(t, sess, "db", "10.0.0.9:80", nil)
	lead := mustLeader(t, a2, "db")
	mustNextIs(t, lead, "10.0.0.9:80", true)

	// Older than the registered one, all with one Created, the larger
	// addrs first.
	for _, addr := range []string{"10.0.0.4:80", "10.0.0.3:80", "10.0.0.1:80"} {
		faulty.inject(t, backend.Event{Type: backend.Put, Instance: backend.Instance{Name: "db", Addr: addr, Created: 1}})
	}
	mustNextIs(t, lead, "10.0.0.4:80", true)
	mustNextIs(t, lead, "10.0.0.3:80", true)
	mustNextIs(t, lead, "10.0.0.1:80", true)
	faulty.inject(t, backend.Event{Type: backend.Delete, Instance: backend.Instance{Name: "db", Addr: "10.0.0.1:80"}})
	mustNextIs(t, lead, "10.0.0.3:80", true)
	if u, ok, err := a2.LeaderOf(ctxT(t), "db"); err != nil || !ok || u.Addr != "10.0.0.3:80" {
		t.Fatalf("LeaderOf = %+v, %v, %v; want 10.0.0.3:80", u, ok, err)
	}
}
