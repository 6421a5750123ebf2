package main

import (
	"context"
	"log/slog"
	"testing"
	"time"

	"github.com/flynn/discoverd/api"
	"github.com/flynn/discoverd/backend/etcd/etcdtest"
	"github.com/flynn/discoverd/backend/zookeeper/zktest"
	discoverd "github.com/flynn/discoverd/client"
	"github.com/flynn/discoverd/rpc"
)

// TestStoresEndToEnd runs the same scenario through two real agents (Main,
// as the binary runs them) on each store: register on one agent, watch and
// follow the leader on the other, attribute update, connection close,
// expiry of a registration whose heartbeats stop, and a graceful agent
// stop that withdraws its registrations at once.
func TestStoresEndToEnd(t *testing.T) {
	for _, store := range []struct {
		name  string
		start func(t *testing.T, m *Main)
	}{
		{"etcd", func(t *testing.T, m *Main) {
			srv := etcdtest.NewServer(t)
			m.Etcd = srv.Endpoints()
		}},
		{"zookeeper", func(t *testing.T, m *Main) {
			srv := zktest.NewServer(t)
			m.ZooKeeper = srv.Servers()
		}},
	} {
		t.Run(store.name, func(t *testing.T) {
			const ttl = 2 * time.Second
			newAgent := func(configure func(*Main)) *Main {
				m := testMain(t)
				m.TTL = ttl
				m.Logger = slog.New(slog.NewTextHandler(tbWriter{t}, &slog.HandlerOptions{Level: slog.LevelWarn}))
				configure(m)
				mustStart(t, m)
				return m
			}
			a := newAgent(func(m *Main) { store.start(t, m) })
			b := newAgent(func(m *Main) { m.Etcd, m.ZooKeeper = a.Etcd, a.ZooKeeper })

			watcher := mustClient(t, b.Addr().String())
			set, err := watcher.NewServiceSet("db")
			if err != nil {
				t.Fatalf("NewServiceSet: %v", err)
			}
			defer set.Close()
			updates := set.Watch(false) // the set starts empty
			next := func(what string) *api.ServiceUpdate {
				t.Helper()
				select {
				case u, ok := <-updates:
					if !ok {
						t.Fatalf("%s: watch channel closed", what)
					}
					return u
				case <-time.After(waitTimeout):
					t.Fatalf("%s: no update in %v", what, waitTimeout)
				}
				panic("unreachable")
			}

			// Register on agent a; seen on agent b, and leader there.
			first := mustClient(t, a.Addr().String())
			if err := first.RegisterWithAttributes("db", "10.0.0.1:5432", map[string]string{"role": "primary"}); err != nil {
				t.Fatalf("Register: %v", err)
			}
			u := next("the first registration")
			if !u.Online || u.Addr != "10.0.0.1:5432" || u.Attrs["role"] != "primary" || u.Created == 0 {
				t.Fatalf("update %+v, want 10.0.0.1:5432 online with role=primary", u)
			}
			created := u.Created
			second := mustClient(t, a.Addr().String())
			if err := second.Register("db", "10.0.0.2:5432"); err != nil {
				t.Fatalf("Register: %v", err)
			}
			if u := next("the second registration"); u.Addr != "10.0.0.2:5432" || u.Created <= created {
				t.Fatalf("update %+v, want 10.0.0.2:5432 with Created > %d", u, created)
			}
			if l := set.Leader(); l == nil || l.Addr != "10.0.0.1:5432" {
				t.Fatalf("Leader() = %+v, want the oldest, 10.0.0.1:5432", l)
			}

			// An attribute update keeps Created.
			if err := first.RegisterWithAttributes("db", "10.0.0.1:5432", map[string]string{"role": "primary", "v": "2"}); err != nil {
				t.Fatalf("re-Register: %v", err)
			}
			if u := next("the attribute update"); u.Addr != "10.0.0.1:5432" || u.Attrs["v"] != "2" || u.Created != created {
				t.Fatalf("update %+v, want v=2 and Created %d", u, created)
			}

			// The leader's process goes away: its connection closes, it goes
			// offline at once and the next oldest leads.
			first.Close()
			if u := next("the leader's departure"); u.Online || u.Addr != "10.0.0.1:5432" {
				t.Fatalf("update %+v, want 10.0.0.1:5432 offline", u)
			}
			if l := set.Leader(); l == nil || l.Addr != "10.0.0.2:5432" {
				t.Fatalf("Leader() = %+v after the leader left, want 10.0.0.2:5432", l)
			}

			// A registration whose heartbeats stop expires after the TTL even
			// though its connection stays open.
			hung := mustRPC(t, a.Addr().String())
			var addr string
			if err := hung.Call(context.Background(), api.MethodRegister, &api.Args{Name: "db", Addr: "10.0.0.3:5432"}, &addr); err != nil {
				t.Fatalf("raw Register: %v", err)
			}
			if u := next("the silent registration"); !u.Online || u.Addr != "10.0.0.3:5432" {
				t.Fatalf("update %+v, want 10.0.0.3:5432 online", u)
			}
			registered := time.Now()
			if u := next("the expiry"); u.Online || u.Addr != "10.0.0.3:5432" {
				t.Fatalf("update %+v, want 10.0.0.3:5432 offline", u)
			}
			if d := time.Since(registered); d < ttl {
				t.Errorf("expired after %v, before the TTL of %v", d, ttl)
			}

			// A graceful stop of agent a withdraws its registrations at once.
			if err := a.Close(); err != nil {
				t.Fatalf("Close: %v", err)
			}
			if u := next("the graceful stop"); u.Online || u.Addr != "10.0.0.2:5432" {
				t.Fatalf("update %+v, want 10.0.0.2:5432 offline", u)
			}
			if l := set.Leader(); l != nil {
				t.Fatalf("Leader() = %+v with no instance left, want nil", l)
			}
		})
	}
}

// mustClient returns a client of the agent at addr that heartbeats often
// enough for the tests' short TTL.
func mustClient(t *testing.T, addr string) *discoverd.Client {
	t.Helper()
	c, err := discoverd.NewClientWithConfig(discoverd.Config{
		Addr:              addr,
		HeartbeatInterval: 300 * time.Millisecond,
		Logger:            slog.New(slog.NewTextHandler(tbWriter{t}, nil)),
	})
	if err != nil {
		t.Fatalf("NewClientWithConfig: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func mustRPC(t *testing.T, addr string) *rpc.Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	c, err := rpc.Dial(ctx, addr, rpc.Gob)
	if err != nil {
		t.Fatalf("Dial: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}
