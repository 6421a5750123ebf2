package agent_test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"runtime"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/flynn/discoverd/agent"
	"github.com/flynn/discoverd/backend/etcd/etcdtest"
)

// TestManySubscribers: 10,000 idle subscribers to one name share one
// watch, cost little memory each, and all see a change.
func TestManySubscribers(t *testing.T) {
	const n = 10000
	srv := etcdtest.NewServer(t)
	a := mustAgent(t, mustBackend(t, srv, 10*time.Second), agent.Config{})
	sess := a.NewSession(0)
	defer sess.Close()
	mustRegister(t, sess, "web", "10.0.0.1:80", map[string]string{"k": "v"})
	if _, err := a.Instances(ctxT(t), "web"); err != nil { // start the watch
		t.Fatalf("Instances: %v", err)
	}

	subs := make([]*agent.Subscription, 0, n)
	defer func() {
		for _, sub := range subs {
			sub.Close()
		}
	}()
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	ctx := ctxT(t)
	for range n {
		sub, err := a.Subscribe(ctx, "web")
		if err != nil {
			t.Fatalf("Subscribe: %v", err)
		}
		subs = append(subs, sub)
		if snap := mustSnapshot(t, sub); len(snap) != 1 {
			t.Fatalf("snapshot %+v", snap)
		}
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	per := (int64(after.HeapAlloc) - int64(before.HeapAlloc)) / n
	t.Logf("heap per idle subscriber: %d bytes", per)
	if per > 10<<10 {
		t.Fatalf("an idle subscriber costs %d bytes of heap, more than 10 KiB", per)
	}
	if st := a.Stats(); st.Watches != 1 || st.Subscribers != n {
		t.Fatalf("stats %+v: want 1 watch, %d subscribers", st, n)
	}

	mustRegister(t, sess, "web", "10.0.0.2:80", nil)
	for _, sub := range subs {
		mustNextIs(t, sub, "10.0.0.2:80", true)
	}
}

// TestConcurrentSessions races registers, heartbeats, unregisters, takeovers
// and session closes on a few keys, then checks that what the agent holds
// is exactly what the store holds.
func TestConcurrentSessions(t *testing.T) {
	p := mustPair(t, agent.Config{})
	sub := mustSubscribe(t, p.a2, "race")
	mustSnapshot(t, sub)
	addrs := make([]string, 8)
	for i := range addrs {
		addrs[i] = fmt.Sprintf("10.0.0.%d:80", i+1)
	}

	var mu sync.Mutex
	var live []*agent.Session // sessions still open at the end
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w), 1))
			sess := p.a1.NewSession(0)
			for range 150 {
				args := agent.Args{Name: "race", Addr: addrs[rng.IntN(len(addrs))], Attrs: map[string]string{"v": fmt.Sprint(rng.IntN(2))}}
				ctx := context.Background()
				switch rng.IntN(10) {
				case 0:
					sess.Close()
					sess = p.a1.NewSession(0)
				case 1, 2:
					_ = sess.Unregister(ctx, args) // may be unknown
				case 3, 4:
					_ = sess.Heartbeat(ctx, args) // may be unknown
				default:
					if _, err := sess.Register(ctx, args); err != nil {
						t.Errorf("Register: %v", err)
						return
					}
				}
			}
			mu.Lock()
			live = append(live, sess)
			mu.Unlock()
		}()
	}
	wg.Wait()
	if t.Failed() {
		return
	}

	// Everything written before the marker is in a2's cache once the
	// marker arrives.
	marker := p.a1.NewSession(0)
	mustRegister(t, marker, "race", "10.0.1.1:80", nil)
	for mustNext(t, sub).Addr != "10.0.1.1:80" {
	}
	insts, err := p.a2.Instances(ctxT(t), "race")
	if err != nil {
		t.Fatalf("Instances: %v", err)
	}
	var stored []string
	for _, u := range insts {
		stored = append(stored, u.Addr) // the marker included: a1 holds it too
	}
	slices.Sort(stored)
	if held := agent.HeldAddrs(p.a1, "race"); !slices.Equal(held, stored) {
		t.Fatalf("the agent holds %v, the store %v", held, stored)
	}

	marker.Close()
	for _, s := range live {
		s.Close()
	}
	eventually(t, "every registration gone from the store", func() bool {
		insts, err := p.a2.Instances(ctxT(t), "race")
		return err == nil && len(insts) == 0
	})
	if st := p.a1.Stats(); st.Registrations != 0 || st.Sessions != 0 {
		t.Fatalf("stats %+v after closing every session", st)
	}
}

// BenchmarkSweep100k: the janitor's periodic sweep over 100,000 live
// registrations (none expired: the common case, run every TTL/4). Its
// time per op is the sweep's CPU; B/op what it allocates;
// agent-heap-B/registration the agent's own memory per registration
// (registration and map entries; the backend's record of the key is
// not included, the registrations being held in memory only).
func BenchmarkSweep100k(b *testing.B) {
	const n = 100_000
	srv := etcdtest.NewServer(b)
	a := mustAgent(b, mustBackend(b, srv, 10*time.Second), agent.Config{})
	s := a.NewSession(-1)
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	agent.HoldFake(s, "web", n)
	runtime.GC()
	runtime.ReadMemStats(&after)
	for b.Loop() {
		agent.Sweep(a)
	}
	// After the loop: b.Loop's first call resets the timer, which drops
	// metrics reported before it.
	b.ReportMetric(float64(after.HeapInuse-before.HeapInuse)/n, "agent-heap-B/registration")
	if got := a.Stats().Registrations; got != n {
		b.Fatalf("%d registrations after the sweeps, want %d", got, n)
	}
}
