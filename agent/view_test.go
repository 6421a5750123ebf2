package agent_test

import (
	"context"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/flynn/discoverd/agent"
	"github.com/flynn/discoverd/api"
	"github.com/flynn/discoverd/backend/etcd"
	"github.com/flynn/discoverd/backend/etcd/etcdtest"
)

// addrsOf is a View compile function: the addrs, oldest first, then the
// leader's; it counts its calls in *calls.
func addrsOf(calls *atomic.Int64) func(string, []api.ServiceUpdate, api.ServiceUpdate) []string {
	return func(_ string, us []api.ServiceUpdate, leader api.ServiceUpdate) []string {
		calls.Add(1)
		var out []string
		for _, u := range us {
			out = append(out, u.Addr)
		}
		return append(out, "leader="+leader.Addr)
	}
}

func mustGet[T any](tb testing.TB, v *agent.View[T], name string) T {
	tb.Helper()
	val, stale, err := v.Get(ctxT(tb), name)
	if err != nil {
		tb.Fatalf("Get %s: %v", name, err)
	}
	if stale {
		tb.Fatalf("Get %s: stale with the store up", name)
	}
	return val
}

// TestView: a view compiles a name once per change, sees a write of its
// own agent as soon as the write returns, and keeps at most Size names
// watched, dropping the least recently asked.
func TestView(t *testing.T) {
	srv := etcdtest.NewServer(t)
	a := mustAgent(t, mustBackend(t, srv, 10*time.Second), agent.Config{WatchLinger: -1})
	var calls atomic.Int64
	v := agent.NewView(a, agent.ViewConfig{Size: 2}, addrsOf(&calls))
	defer v.Close()
	s := a.NewSession(0)
	defer s.Close()

	if got := mustGet(t, v, "web"); !slices.Equal(got, []string{"leader="}) {
		t.Fatalf("empty service: %q", got)
	}
	mustRegister(t, s, "web", "10.0.0.1:80", nil)
	mustRegister(t, s, "web", "10.0.0.2:80", nil)
	want := []string{"10.0.0.1:80", "10.0.0.2:80", "leader=10.0.0.1:80"}
	if got := mustGet(t, v, "web"); !slices.Equal(got, want) {
		t.Fatalf("after two registrations: %q, want %q", got, want)
	}
	before := calls.Load()
	for range 100 {
		mustGet(t, v, "web")
	}
	if n := calls.Load() - before; n != 0 {
		t.Fatalf("compiled %d times without a change", n)
	}

	mustGet(t, v, "db")
	mustGet(t, v, "web") // web is now the most recently asked
	mustGet(t, v, "queue")
	if n, ev := v.Len(), v.Evictions(); n != 2 || ev != 1 {
		t.Fatalf("%d names held, %d evictions; want 2 and 1", n, ev)
	}
	if st := a.Stats(); st.Watches != 2 {
		t.Fatalf("%d watches, want those of web and queue (db dropped)", st.Watches)
	}
	if got := mustGet(t, v, "web"); !slices.Equal(got, want) {
		t.Fatalf("web after the eviction of db: %q", got)
	}

	v.Close()
	if _, _, err := v.Get(ctxT(t), "web"); api.ErrorCode(err) != api.CodeUnavailable {
		t.Fatalf("Get after Close: %v", err)
	}
	if st := a.Stats(); st.Watches != 0 {
		t.Fatalf("%d watches after Close", st.Watches)
	}
}

// TestViewStale: while the store is down, held names are answered and
// marked stale; a name not held fails with CodeUnavailable.
func TestViewStale(t *testing.T) {
	c := etcdtest.NewCluster(t, 1)
	b := mustBackendOn(t, c.Endpoints(), 10*time.Second)
	a := mustAgent(t, b, agent.Config{})
	var calls atomic.Int64
	v := agent.NewView(a, agent.ViewConfig{Probe: 20 * time.Millisecond}, addrsOf(&calls))
	defer v.Close()
	s := a.NewSession(0)
	defer s.Close()
	mustRegister(t, s, "web", "10.0.0.1:80", nil)
	mustGet(t, v, "web")

	c.Member(0).Stop()
	eventually(t, "answers marked stale", func() bool {
		got, stale, err := v.Get(ctxT(t), "web")
		if err != nil || !slices.Equal(got, []string{"10.0.0.1:80", "leader=10.0.0.1:80"}) {
			t.Fatalf("during the outage: %q, %v", got, err)
		}
		return stale
	})
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	if _, _, err := v.Get(ctx, "db"); err == nil {
		t.Fatal("a name never asked answered during the outage")
	}
	if err := c.Member(0).Restart(); err != nil {
		t.Fatal(err)
	}
	eventually(t, "fresh answers", func() bool {
		_, stale, err := v.Get(ctxT(t), "web")
		return err == nil && !stale
	})
}

// mustBackendOn opens an etcd backend on endpoints whose lease lives ttl.
func mustBackendOn(tb testing.TB, endpoints []string, ttl time.Duration) *etcd.Backend {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	b, err := etcd.Open(ctx, etcd.Config{Endpoints: endpoints, TTL: ttl, Logger: quiet()})
	if err != nil {
		tb.Fatalf("etcd.Open: %v", err)
	}
	tb.Cleanup(func() { b.Close() })
	return b
}
