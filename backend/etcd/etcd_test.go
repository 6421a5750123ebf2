package etcd_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"strings"
	"testing"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/flynn/discoverd/backend"
	"github.com/flynn/discoverd/backend/backendtest"
	"github.com/flynn/discoverd/backend/etcd"
	"github.com/flynn/discoverd/backend/etcd/etcdtest"
)

func TestMain(m *testing.M) {
	etcdtest.VerifyTestMain(m)
}

const waitTimeout = 15 * time.Second // bound on waits for events; not a speed assertion

func TestConformance(t *testing.T) {
	t.Parallel()
	// A one-member cluster rather than NewServer, for StopStore/StartStore.
	c := etcdtest.NewCluster(t, 1)
	backendtest.Run(t, backendtest.Harness{
		New: func(tb testing.TB, ttl time.Duration) backend.Backend {
			return mustOpen(tb, c.Endpoints(), ttl)
		},
		Kill:      func(tb testing.TB, b backend.Backend) { b.(*etcd.Backend).Abandon() },
		StopStore: func(tb testing.TB) { c.Member(0).Stop() },
		StartStore: func(tb testing.TB) {
			if err := c.Member(0).Restart(); err != nil {
				tb.Fatal(err)
			}
		},
		// Revoking the lease is what etcd does when a partition outlasts
		// the TTL; the revoke returns once the keys are deleted.
		ExpireSession: func(tb testing.TB, b backend.Backend) {
			lease := etcd.LeaseOf(b.(*etcd.Backend))
			if lease == 0 {
				tb.Fatal("ExpireSession: the backend holds no lease")
			}
			if _, err := mustClient(tb, c.Endpoints()).Revoke(ctxT(tb), lease); err != nil {
				tb.Fatalf("ExpireSession: revoking lease %x: %v", lease, err)
			}
		},
		Plant: func(tb testing.TB, b backend.Backend, name, addr string) {
			lease := etcd.LeaseOf(b.(*etcd.Backend))
			key := etcd.DefaultPrefix + name + "/" + addr
			if _, err := mustClient(tb, c.Endpoints()).Put(ctxT(tb), key, `{"attrs":{},"seq":0}`, clientv3.WithLease(lease)); err != nil {
				tb.Fatalf("Plant: %v", err)
			}
		},
		Erase: func(tb testing.TB, name, addr string) {
			if _, err := mustClient(tb, c.Endpoints()).Delete(ctxT(tb), etcd.DefaultPrefix+name+"/"+addr); err != nil {
				tb.Fatalf("Erase: %v", err)
			}
		},
	})
}

func mustOpen(tb testing.TB, endpoints []string, ttl time.Duration) *etcd.Backend {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	b, err := etcd.Open(ctx, etcd.Config{Endpoints: endpoints, TTL: ttl})
	if err != nil {
		tb.Fatalf("Open: %v", err)
	}
	tb.Cleanup(func() { b.Close() })
	return b
}

func mustClient(tb testing.TB, endpoints []string) *clientv3.Client {
	tb.Helper()
	cli, err := clientv3.New(clientv3.Config{Endpoints: endpoints, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		tb.Fatalf("etcd client: %v", err)
	}
	tb.Cleanup(func() { cli.Close() })
	return cli
}

func ctxT(tb testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	tb.Cleanup(cancel)
	return ctx
}

// view is what a stream has told its reader.
type view struct {
	tb     testing.TB
	s      backend.Stream
	addrs  map[string]backend.Instance
	events []backend.Event // every event read, in order
}

func mustSubscribe(tb testing.TB, b backend.Backend, name string) *view {
	tb.Helper()
	s, err := b.Subscribe(ctxT(tb), name)
	if err != nil {
		tb.Fatalf("Subscribe: %v", err)
	}
	tb.Cleanup(func() { s.Close() })
	return &view{tb: tb, s: s, addrs: map[string]backend.Instance{}}
}

func (v *view) next() backend.Event {
	v.tb.Helper()
	timer := time.NewTimer(waitTimeout)
	defer timer.Stop()
	select {
	case ev, ok := <-v.s.Events():
		if !ok {
			v.tb.Fatalf("stream ended: %v", v.s.Err())
		}
		switch ev.Type {
		case backend.Put:
			v.addrs[ev.Instance.Addr] = ev.Instance
		case backend.Delete:
			delete(v.addrs, ev.Instance.Addr)
		}
		v.events = append(v.events, ev)
		return ev
	case <-timer.C:
		v.tb.Fatalf("no event within %v; view has %d instances", waitTimeout, len(v.addrs))
	}
	return backend.Event{}
}

// waitFor reads events until cond holds for the view.
func (v *view) waitFor(what string, cond func(map[string]backend.Instance) bool) {
	v.tb.Helper()
	deadline := time.Now().Add(waitTimeout)
	for !cond(v.addrs) {
		if time.Now().After(deadline) {
			v.tb.Fatalf("waiting for %s: view has %d instances", what, len(v.addrs))
		}
		v.next()
	}
}

func addr(i int) string { return fmt.Sprintf("10.0.%d.%d:80", i/250, i%250+1) }

// TestCompactionWhileStreamBehind: history the stream still needs is
// compacted away; the stream resyncs and converges on the store's state.
func TestCompactionWhileStreamBehind(t *testing.T) {
	t.Parallel()
	srv := etcdtest.NewServer(t)
	b := mustOpen(t, srv.Endpoints(), 2*time.Second)
	cli := mustClient(t, srv.Endpoints())
	ctx := ctxT(t)
	const name, n = "compacted", 40

	for i := range n {
		if err := b.Register(ctx, name, addr(i), map[string]string{"v": "1"}); err != nil {
			t.Fatal(err)
		}
	}
	// The snapshot (n events) overflows the stream's buffer, so the stream
	// cannot start its watch until we read: it is behind for sure.
	v := mustSubscribe(t, b, name)
	for i := range n {
		switch {
		case i%4 == 0:
			err := b.Unregister(ctx, name, addr(i))
			if err != nil {
				t.Fatal(err)
			}
		case i%4 == 1:
			if err := b.Register(ctx, name, addr(i), map[string]string{"v": "2"}); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := b.Register(ctx, name, addr(n), nil); err != nil {
		t.Fatal(err)
	}
	resp, err := cli.Get(ctx, "compaction-point")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cli.Compact(ctx, resp.Header.Revision, clientv3.WithCompactPhysical()); err != nil {
		t.Fatalf("Compact: %v", err)
	}

	want := map[string]string{addr(n): ""} // addr -> attr v
	for i := range n {
		switch i % 4 {
		case 0:
		case 1:
			want[addr(i)] = "2"
		default:
			want[addr(i)] = "1"
		}
	}
	v.waitFor("the state after compaction", func(got map[string]backend.Instance) bool {
		if len(got) != len(want) {
			return false
		}
		for a, attr := range want {
			if in, ok := got[a]; !ok || in.Attrs["v"] != attr {
				return false
			}
		}
		return true
	})
	// Live changes still arrive after the resync.
	if err := b.Register(ctx, name, addr(n+1), nil); err != nil {
		t.Fatal(err)
	}
	v.waitFor("a live put after the resync", func(got map[string]backend.Instance) bool {
		_, ok := got[addr(n+1)]
		return ok
	})
}

// TestLeaseRevokedUnderneath: someone else revokes the backend's lease;
// the backend takes a new one and puts its registrations back.
func TestLeaseRevokedUnderneath(t *testing.T) {
	t.Parallel()
	srv := etcdtest.NewServer(t)
	b := mustOpen(t, srv.Endpoints(), 2*time.Second)
	watcher := mustOpen(t, srv.Endpoints(), 2*time.Second)
	cli := mustClient(t, srv.Endpoints())
	ctx := ctxT(t)
	const name = "revoked"
	attrs := map[string]string{"k": "v"}
	for i := range 3 {
		if err := b.Register(ctx, name, addr(i), attrs); err != nil {
			t.Fatal(err)
		}
	}
	v := mustSubscribe(t, watcher, name)
	v.waitFor("the snapshot", func(got map[string]backend.Instance) bool { return len(got) == 3 })
	before := v.addrs[addr(0)].Created
	if st := b.SessionState(); !st.Live || st.Established != 1 {
		t.Fatalf("SessionState before the revoke = %+v, want live, 1 established", st)
	}

	old := leaseOf(t, cli, etcd.DefaultPrefix+name+"/"+addr(0))
	if _, err := cli.Revoke(ctx, old); err != nil {
		t.Fatalf("Revoke: %v", err)
	}
	// The keys go with the lease, then come back under a new one.
	v.waitFor("the deletes", func(got map[string]backend.Instance) bool { return len(got) == 0 })
	v.waitFor("the registrations restored", func(got map[string]backend.Instance) bool { return len(got) == 3 })
	if in := v.addrs[addr(0)]; in.Attrs["k"] != "v" || in.Created != before {
		t.Errorf("restored %+v, want attrs k=v and Created %d (the fencing token kept)", in, before)
	}
	var lease clientv3.LeaseID
	for i := range 3 {
		l := leaseOf(t, cli, etcd.DefaultPrefix+name+"/"+addr(i))
		if l == old || (lease != 0 && l != lease) {
			t.Fatalf("key %d on lease %x; old lease %x, others on %x", i, l, old, lease)
		}
		lease = l
	}
	ttl, err := cli.TimeToLive(ctx, lease)
	if err != nil || ttl.TTL <= 0 {
		t.Fatalf("new lease %x: TTL %v, err %v", lease, ttl, err)
	}
	if st := b.SessionState(); !st.Live || st.Established != 2 {
		t.Errorf("SessionState after the renewal = %+v, want live, 2 established", st)
	}
	// The backend works on: a new registration lands on the new lease, and
	// Close removes everything at once.
	if err := b.Register(ctx, name, addr(3), nil); err != nil {
		t.Fatal(err)
	}
	if l := leaseOf(t, cli, etcd.DefaultPrefix+name+"/"+addr(3)); l != lease {
		t.Errorf("new registration on lease %x, want %x", l, lease)
	}
	if err := b.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	v.waitFor("Close to remove everything", func(got map[string]backend.Instance) bool { return len(got) == 0 })
	if st := b.SessionState(); st.Live {
		t.Errorf("SessionState after Close = %+v, want not live", st)
	}
}

func leaseOf(tb testing.TB, cli *clientv3.Client, key string) clientv3.LeaseID {
	tb.Helper()
	resp, err := cli.Get(ctxT(tb), key)
	if err != nil {
		tb.Fatalf("Get %s: %v", key, err)
	}
	if len(resp.Kvs) != 1 || resp.Kvs[0].Lease == 0 {
		tb.Fatalf("key %s: %d keys, want one on a lease", key, len(resp.Kvs))
	}
	return clientv3.LeaseID(resp.Kvs[0].Lease)
}

// TestAbandonKeepsLease: Abandon leaves the lease (and the keys) to expire
// by themselves; the backend refuses further use.
func TestAbandonKeepsLease(t *testing.T) {
	t.Parallel()
	srv := etcdtest.NewServer(t)
	b := mustOpen(t, srv.Endpoints(), 30*time.Second)
	cli := mustClient(t, srv.Endpoints())
	ctx := ctxT(t)
	if err := b.Register(ctx, "abandoned", addr(0), nil); err != nil {
		t.Fatal(err)
	}
	b.Abandon()
	lease := leaseOf(t, cli, etcd.DefaultPrefix+"abandoned/"+addr(0))
	ttl, err := cli.TimeToLive(ctx, lease)
	if err != nil || ttl.TTL <= 0 {
		t.Fatalf("lease after Abandon: TTL %v, err %v; want it alive", ttl, err)
	}
	if err := b.Register(ctx, "abandoned", addr(1), nil); !errors.Is(err, backend.ErrClosed) {
		t.Errorf("Register after Abandon: %v, want ErrClosed", err)
	}
	if err := b.Close(); err != nil {
		t.Errorf("Close after Abandon: %v", err)
	}
	if _, err := cli.Revoke(ctx, lease); err != nil {
		t.Fatalf("Revoke: %v", err)
	}
}

// TestHeartbeatIsNoWrite: registering the same attributes again does not
// touch the store (no new revision).
func TestHeartbeatIsNoWrite(t *testing.T) {
	t.Parallel()
	srv := etcdtest.NewServer(t)
	b := mustOpen(t, srv.Endpoints(), 2*time.Second)
	cli := mustClient(t, srv.Endpoints())
	ctx := ctxT(t)
	attrs := map[string]string{"a": "1", "b": "2"}
	if err := b.Register(ctx, "hb", addr(0), attrs); err != nil {
		t.Fatal(err)
	}
	rev := func() int64 {
		resp, err := cli.Get(ctx, "rev")
		if err != nil {
			t.Fatal(err)
		}
		return resp.Header.Revision
	}
	before := rev()
	for range 10 {
		if err := b.Register(ctx, "hb", addr(0), map[string]string{"b": "2", "a": "1"}); err != nil {
			t.Fatal(err)
		}
	}
	if after := rev(); after != before {
		t.Errorf("10 heartbeats moved the store from revision %d to %d", before, after)
	}
	if err := b.Register(ctx, "hb", addr(0), map[string]string{"a": "1"}); err != nil {
		t.Fatal(err)
	}
	if after := rev(); after != before+1 {
		t.Errorf("an attribute change moved the store from revision %d to %d, want one write", before, after)
	}
}

func TestOpenFailsWhenStoreUnreachable(t *testing.T) {
	t.Parallel()
	srv := etcdtest.NewServer(t)
	eps := srv.Endpoints()
	srv.Close()
	_, err := etcd.Open(ctxT(t), etcd.Config{Endpoints: eps, DialTimeout: 500 * time.Millisecond})
	if err == nil {
		t.Fatal("Open with the store down = nil error")
	}
	if _, err := etcd.Open(ctxT(t), etcd.Config{}); err == nil {
		t.Fatal("Open without endpoints = nil error")
	}
}

// TestClusterMemberStopRestart: a backend on a 3-member cluster keeps
// working while the leader is stopped, and the member rejoins.
func TestClusterMemberStopRestart(t *testing.T) {
	t.Parallel()
	c := etcdtest.NewCluster(t, 3)
	b := mustOpen(t, c.Endpoints(), 5*time.Second)
	v := mustSubscribe(t, mustOpen(t, c.Endpoints(), 5*time.Second), "clustered")
	ctx := ctxT(t)
	if err := b.Register(ctx, "clustered", addr(0), nil); err != nil {
		t.Fatal(err)
	}
	v.waitFor("the first registration", func(got map[string]backend.Instance) bool { return len(got) == 1 })

	leader := c.Leader()
	if leader < 0 {
		t.Fatal("no leader")
	}
	c.Member(leader).Stop()
	// Writes may fail until a new leader is elected; retry within the bound.
	deadline := time.Now().Add(waitTimeout)
	for {
		rctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		err := b.Register(rctx, "clustered", addr(1), nil)
		cancel()
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("Register with the leader stopped: %v", err)
		}
	}
	v.waitFor("the registration made after the failover", func(got map[string]backend.Instance) bool { return len(got) == 2 })
	if err := c.Member(leader).Restart(); err != nil {
		t.Fatal(err)
	}
	if !c.Member(leader).Running() {
		t.Fatal("member not running after Restart")
	}
	// The restarted member serves reads of what was written without it.
	cli := mustClient(t, []string{c.Member(leader).Endpoint()})
	resp, err := cli.Get(ctx, etcd.DefaultPrefix+"clustered/", clientv3.WithPrefix(), clientv3.WithCountOnly())
	if err != nil || resp.Count != 2 {
		t.Fatalf("restarted member: count %v, err %v; want 2", resp, err)
	}
}

// TestLeaseLostDuringOutage: the store is down for longer than the TTL, so
// the backend gives its lease up; when the store is back, the backend
// takes a new lease and puts its registrations back. A Register blocked
// in its write on the old lease all along ends on the new lease, and a
// registration removed during the outage (its delete failed) is not put
// back by the renewal.
func TestLeaseLostDuringOutage(t *testing.T) {
	t.Parallel()
	c := etcdtest.NewCluster(t, 1)
	logs := &logWatch{msgs: make(chan string, 1024)}
	ctx := ctxT(t)
	b, err := etcd.Open(ctx, etcd.Config{Endpoints: c.Endpoints(), TTL: time.Second, Logger: slog.New(logs)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	const name = "outage"
	for i := range 3 {
		if err := b.Register(ctx, name, addr(i), map[string]string{"i": fmt.Sprint(i)}); err != nil {
			t.Fatal(err)
		}
	}
	v := mustSubscribe(t, mustOpen(t, c.Endpoints(), time.Second), name)
	v.waitFor("the registrations", func(got map[string]backend.Instance) bool { return len(got) == 3 })
	cli := mustClient(t, c.Endpoints())
	old := leaseOf(t, cli, etcd.DefaultPrefix+name+"/"+addr(0))

	c.Member(0).Stop()
	// A removal that cannot reach the store: the backend forgets addr(1)
	// all the same, so the renewal must not store it again.
	uctx, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
	if err := b.Unregister(uctx, name, addr(1)); err == nil {
		t.Fatal("Unregister with the store down = nil error")
	}
	cancel()
	// No keepalive answer for a TTL: the backend asks etcd about the lease
	// for another TTL, and meanwhile still writes on it. A write on the
	// old lease, blocked (the client waits for a connection) until the
	// store is back, after the lease has been given up.
	logs.waitFor(t, "etcd lease keepalive interrupted")
	blocked := make(chan error, 1)
	go func() { blocked <- b.Register(ctx, name, addr(3), map[string]string{"i": "3"}) }()
	logs.waitFor(t, "etcd lease lost")
	if st := b.SessionState(); st.Live {
		t.Errorf("SessionState after the lease was lost = %+v, want not live", st)
	}
	if err := c.Member(0).Restart(); err != nil {
		t.Fatal(err)
	}
	logs.waitFor(t, "etcd lease renewed")
	select {
	case err := <-blocked:
		if err != nil {
			t.Fatalf("Register blocked across the renewal: %v", err)
		}
	case <-time.After(waitTimeout):
		t.Fatalf("Register blocked across the renewal did not return within %v", waitTimeout)
	}

	lease := leaseOf(t, cli, etcd.DefaultPrefix+name+"/"+addr(0))
	if lease == old {
		t.Fatalf("registrations still on the old lease %x", old)
	}
	resp, err := cli.Get(ctx, etcd.DefaultPrefix+name+"/", clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	onNew := map[string]bool{}
	for _, kv := range resp.Kvs {
		switch clientv3.LeaseID(kv.Lease) {
		case lease:
			onNew[strings.TrimPrefix(string(kv.Key), etcd.DefaultPrefix+name+"/")] = true
		case old: // addr(1), until the old lease, extended by the restart, expires
		default:
			t.Errorf("%s on lease %x, want %x", kv.Key, kv.Lease, lease)
		}
	}
	if want := map[string]bool{addr(0): true, addr(2): true, addr(3): true}; !maps.Equal(onNew, want) {
		t.Errorf("on the new lease: %v, want %v", onNew, want)
	}
	if st := b.SessionState(); !st.Live || st.Established != 2 {
		t.Errorf("SessionState after the renewal = %+v, want live, 2 established", st)
	}
	// The old lease is not kept alive: what is left on it goes.
	v.waitFor("the removed registration gone and the blocked one stored", func(got map[string]backend.Instance) bool {
		_, removed := got[addr(1)]
		_, added := got[addr(3)]
		return !removed && added && len(got) == 3
	})
	// A clean Close still removes everything at once.
	if err := b.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if resp, err := cli.Get(ctx, etcd.DefaultPrefix+name+"/", clientv3.WithPrefix(), clientv3.WithCountOnly()); err != nil || resp.Count != 0 {
		t.Fatalf("after Close: %v keys, err %v; want none", resp, err)
	}
}

// TestLeaseKeptThroughQuorumLoss: the cluster loses its quorum (and its
// leader) for longer than the TTL, so the backend's keepalives go
// unanswered and the client gives up on them. etcd holds the lease all
// along (no leader can expire it, and the next one extends it), so when
// the quorum is back the backend goes on with the same lease: its keys
// never leave the store and a subscriber sees no Delete.
func TestLeaseKeptThroughQuorumLoss(t *testing.T) {
	t.Parallel()
	// TTL: how long the backend keeps asking etcd once the keepalives
	// stopped; the test restarts a member within it. 5 s leaves room for
	// a member restart and an election on a loaded machine.
	const ttl = 5 * time.Second
	c := etcdtest.NewCluster(t, 3)
	logs := &logWatch{msgs: make(chan string, 1024)}
	ctx := ctxT(t)
	b, err := etcd.Open(ctx, etcd.Config{Endpoints: c.Endpoints(), TTL: ttl, Logger: slog.New(logs)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	const name = "quorum"
	for i := range 3 {
		if err := b.Register(ctx, name, addr(i), nil); err != nil {
			t.Fatal(err)
		}
	}
	v := mustSubscribe(t, mustOpen(t, c.Endpoints(), ttl), name)
	v.waitFor("the registrations", func(got map[string]backend.Instance) bool { return len(got) == 3 })
	cli := mustClient(t, c.Endpoints())
	old := leaseOf(t, cli, etcd.DefaultPrefix+name+"/"+addr(0))

	leader := c.Leader()
	if leader < 0 {
		t.Fatal("no leader")
	}
	other := (leader + 1) % 3
	c.Member(leader).Stop()
	c.Member(other).Stop()
	logs.waitFor(t, "etcd lease keepalive interrupted")
	if err := c.Member(other).Restart(); err != nil {
		t.Fatal(err)
	}
	logs.waitFor(t, "etcd lease still held", "etcd lease lost")

	if st := b.SessionState(); !st.Live || st.Established != 1 {
		t.Errorf("SessionState after the quorum came back = %+v, want live, 1 established", st)
	}
	// Writes go on, on the same lease.
	if err := b.Register(ctx, name, addr(3), nil); err != nil {
		t.Fatal(err)
	}
	for i := range 4 {
		if l := leaseOf(t, cli, etcd.DefaultPrefix+name+"/"+addr(i)); l != old {
			t.Errorf("%s on lease %x, want the original %x", addr(i), l, old)
		}
	}
	v.waitFor("the registration made after the quorum came back", func(got map[string]backend.Instance) bool {
		_, ok := got[addr(3)]
		return ok
	})
	for _, ev := range v.events {
		if ev.Type == backend.Delete {
			t.Errorf("subscriber saw %v %s", ev.Type, ev.Instance.Addr)
		}
	}
	if err := c.Member(leader).Restart(); err != nil {
		t.Fatal(err)
	}
}

// logWatch is a slog.Handler that passes the messages of records to a
// channel, so a test can wait for the backend to report a state change.
type logWatch struct{ msgs chan string }

func (l *logWatch) Enabled(context.Context, slog.Level) bool { return true }
func (l *logWatch) WithAttrs([]slog.Attr) slog.Handler       { return l }
func (l *logWatch) WithGroup(string) slog.Handler            { return l }
func (l *logWatch) Handle(_ context.Context, r slog.Record) error {
	select {
	case l.msgs <- r.Message:
	default: // the test reads only what it waits for; never block the backend
	}
	return nil
}

// waitFor waits for a message starting with prefix, and fails tb if none
// comes within waitTimeout or one starting with one of failOn comes first.
func (l *logWatch) waitFor(tb testing.TB, prefix string, failOn ...string) {
	tb.Helper()
	timer := time.NewTimer(waitTimeout)
	defer timer.Stop()
	for {
		select {
		case m := <-l.msgs:
			if strings.HasPrefix(m, prefix) {
				return
			}
			for _, f := range failOn {
				if strings.HasPrefix(m, f) {
					tb.Fatalf("log message %q while waiting for %q", m, prefix)
				}
			}
		case <-timer.C:
			tb.Fatalf("no log message %q within %v", prefix, waitTimeout)
		}
	}
}

// TestTakenOverThenRemovedStaysRemoved: a registration taken over by
// another backend and then unregistered there does not come back through
// its former owner's anti-entropy (which would bring an old fencing token
// back); the former owner drops it instead.
func TestTakenOverThenRemovedStaysRemoved(t *testing.T) {
	t.Parallel()
	srv := etcdtest.NewServer(t)
	const ttl = time.Second
	former, owner := mustOpen(t, srv.Endpoints(), ttl), mustOpen(t, srv.Endpoints(), ttl)
	cli := mustClient(t, srv.Endpoints())
	ctx := ctxT(t)
	key := etcd.DefaultPrefix + "taken/" + addr(0)
	if err := former.Register(ctx, "taken", addr(0), nil); err != nil {
		t.Fatal(err)
	}
	if err := owner.Register(ctx, "taken", addr(0), map[string]string{"by": "owner"}); err != nil {
		t.Fatal(err)
	}
	if err := owner.Unregister(ctx, "taken", addr(0)); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(waitTimeout)
	for former.SessionState().Lost < 1 {
		if resp, err := cli.Get(ctx, key); err != nil || len(resp.Kvs) > 0 {
			t.Fatalf("key back in the store (%v, %v): the former owner wrote it again", resp, err)
		}
		if time.Now().After(deadline) {
			t.Fatalf("former owner still holds the registration after %v: %+v", waitTimeout, former.SessionState())
		}
		time.Sleep(20 * time.Millisecond) // polling SessionState: it has no change notification
	}
	if resp, err := cli.Get(ctx, key); err != nil || len(resp.Kvs) > 0 {
		t.Fatalf("key in the store after the former owner dropped it: %v, %v", resp, err)
	}
}

// TestReclaimAfterRestart: a backend that is the store's only user
// (Config.ReclaimAfter, the embedded etcd) removes, after the delay, what a
// previous run left on its lease and no client registered again, and
// keeps what was claimed back, with its fencing token.
func TestReclaimAfterRestart(t *testing.T) {
	t.Parallel()
	srv := etcdtest.NewServer(t)
	cli := mustClient(t, srv.Endpoints())
	ctx := ctxT(t)
	previous := mustOpen(t, srv.Endpoints(), 30*time.Second)
	for i := range 2 {
		if err := previous.Register(ctx, "reclaim", addr(i), nil); err != nil {
			t.Fatal(err)
		}
	}
	before, err := cli.Get(ctx, etcd.DefaultPrefix+"reclaim/"+addr(0))
	if err != nil {
		t.Fatal(err)
	}
	previous.Abandon() // killed: its lease lives on

	b, err := etcd.Open(ctx, etcd.Config{Endpoints: srv.Endpoints(), TTL: 30 * time.Second, ReclaimAfter: 300 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if err := b.Register(ctx, "reclaim", addr(0), nil); err != nil { // claimed back
		t.Fatal(err)
	}
	deadline := time.Now().Add(waitTimeout)
	for {
		resp, err := cli.Get(ctx, etcd.DefaultPrefix+"reclaim/", clientv3.WithPrefix())
		if err != nil {
			t.Fatal(err)
		}
		if len(resp.Kvs) == 1 {
			kv := resp.Kvs[0]
			if string(kv.Key) != etcd.DefaultPrefix+"reclaim/"+addr(0) || clientv3.LeaseID(kv.Lease) != etcd.LeaseOf(b) {
				t.Fatalf("left %s on lease %x, want the claimed key on the new lease %x", kv.Key, kv.Lease, etcd.LeaseOf(b))
			}
			in, err := etcd.Decode(etcd.DefaultPrefix+"reclaim/", "reclaim", kv)
			old, err2 := etcd.Decode(etcd.DefaultPrefix+"reclaim/", "reclaim", before.Kvs[0])
			if err != nil || err2 != nil || in.Created != old.Created {
				t.Fatalf("claimed registration has Created %d (%v), want %d (%v)", in.Created, err, old.Created, err2)
			}
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d keys left %v after the reclaim delay, want only the claimed one", len(resp.Kvs), waitTimeout)
		}
		time.Sleep(20 * time.Millisecond) // polling the store: nothing to wait on
	}
}

// TestRestoreSkipsTakenOver: a backend that loses its lease before its
// anti-entropy noticed a takeover (through another backend, then removed
// there) does not write that registration back when it restores the rest.
func TestRestoreSkipsTakenOver(t *testing.T) {
	t.Parallel()
	srv := etcdtest.NewServer(t)
	former, owner := mustOpen(t, srv.Endpoints(), 30*time.Second), mustOpen(t, srv.Endpoints(), 30*time.Second)
	cli := mustClient(t, srv.Endpoints())
	ctx := ctxT(t)
	for i := range 2 {
		if err := former.Register(ctx, "restored", addr(i), nil); err != nil {
			t.Fatal(err)
		}
	}
	if err := owner.Register(ctx, "restored", addr(0), nil); err != nil {
		t.Fatal(err)
	}
	if err := owner.Unregister(ctx, "restored", addr(0)); err != nil {
		t.Fatal(err)
	}
	if _, err := cli.Revoke(ctx, etcd.LeaseOf(former)); err != nil {
		t.Fatal(err)
	}
	waitRenewed(t, former)
	resp, err := cli.Get(ctx, etcd.DefaultPrefix+"restored/", clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.Kvs) != 1 || string(resp.Kvs[0].Key) != etcd.DefaultPrefix+"restored/"+addr(1) {
		t.Fatalf("after the restore the store holds %d keys (%v), want only %s", len(resp.Kvs), resp.Kvs, addr(1))
	}
	if st := former.SessionState(); st.Lost != 1 {
		t.Errorf("SessionState %+v, want Lost 1", st)
	}
}

// TestTakenOverAfterDeletionStaysRemoved: the key of a registration is
// deleted under its owner (as when its lease expires in a store stall),
// another backend then registers it afresh and removes it. The former
// owner's key is missing, as if only its own lease had run out, but its
// history holds the other session's put: neither the restore after a lost
// lease nor the anti-entropy writes it back (that would bring the old
// token after the newer one); the former owner drops it instead.
func TestTakenOverAfterDeletionStaysRemoved(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		ttl  time.Duration
		lose bool // revoke the former owner's lease: a restore, not a repair
	}{
		{"Restore", 30 * time.Second, true},
		{"AntiEntropy", time.Second, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			srv := etcdtest.NewServer(t)
			former, owner := mustOpen(t, srv.Endpoints(), tc.ttl), mustOpen(t, srv.Endpoints(), tc.ttl)
			cli := mustClient(t, srv.Endpoints())
			ctx := ctxT(t)
			name := "deleted" + tc.name
			key := etcd.DefaultPrefix + name + "/" + addr(0)
			for i := range 2 {
				if err := former.Register(ctx, name, addr(i), nil); err != nil {
					t.Fatal(err)
				}
			}
			if _, err := cli.Delete(ctx, key); err != nil {
				t.Fatal(err)
			}
			if err := owner.Register(ctx, name, addr(0), map[string]string{"by": "owner"}); err != nil {
				t.Fatal(err)
			}
			if err := owner.Unregister(ctx, name, addr(0)); err != nil {
				t.Fatal(err)
			}
			if tc.lose {
				if _, err := cli.Revoke(ctx, etcd.LeaseOf(former)); err != nil {
					t.Fatal(err)
				}
			}
			deadline := time.Now().Add(waitTimeout)
			// Done: addr(0) dropped and, after a lost lease, addr(1)
			// restored on the new one.
			done := func(st backend.SessionState) bool {
				return st.Lost >= 1 && (!tc.lose || st.Established >= 2 && st.Live)
			}
			for st := former.SessionState(); !done(st); st = former.SessionState() {
				if resp, err := cli.Get(ctx, key); err != nil || len(resp.Kvs) > 0 {
					t.Fatalf("key back in the store (%v, %v): the former owner wrote it again", resp, err)
				}
				if time.Now().After(deadline) {
					t.Fatalf("former owner not done after %v: %+v", waitTimeout, st)
				}
				time.Sleep(20 * time.Millisecond) // polling SessionState: it has no change notification
			}
			resp, err := cli.Get(ctx, etcd.DefaultPrefix+name+"/", clientv3.WithPrefix())
			if err != nil {
				t.Fatal(err)
			}
			if len(resp.Kvs) != 1 || string(resp.Kvs[0].Key) != etcd.DefaultPrefix+name+"/"+addr(1) {
				t.Fatalf("the store holds %d keys (%v), want only %s", len(resp.Kvs), resp.Kvs, addr(1))
			}
		})
	}
}

// TestFailedRegisterKeepsHistoryCheck: a Register that fails while the
// store is down leaves the backend holding its previous registration of
// the key; if another backend took that key over and removed it before,
// the restore after a lost lease must still see it in the key's history
// and drop it, not write it back with its old token.
func TestFailedRegisterKeepsHistoryCheck(t *testing.T) {
	t.Parallel()
	c := etcdtest.NewCluster(t, 1)
	ctx := ctxT(t)
	former := mustOpen(t, c.Endpoints(), time.Second)
	owner := mustOpen(t, c.Endpoints(), time.Second)
	cli := mustClient(t, c.Endpoints())
	const name = "failed"
	key := etcd.DefaultPrefix + name + "/" + addr(0)
	if err := former.Register(ctx, name, addr(0), map[string]string{"v": "1"}); err != nil {
		t.Fatal(err)
	}
	if err := owner.Register(ctx, name, addr(0), map[string]string{"by": "owner"}); err != nil {
		t.Fatal(err)
	}
	if err := owner.Unregister(ctx, name, addr(0)); err != nil {
		t.Fatal(err)
	}
	c.Member(0).Stop()
	rctx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
	err := former.Register(rctx, name, addr(0), map[string]string{"v": "2"})
	cancel()
	if err == nil {
		t.Fatal("Register with the store down = nil error")
	}
	if err := c.Member(0).Restart(); err != nil {
		t.Fatal(err)
	}
	// The restarted member extends the lease; lose it, unless it was
	// lost already (the keeper gave up on it while the member was down).
	if _, err := cli.Revoke(ctx, etcd.LeaseOf(former)); err != nil && !errors.Is(err, rpctypes.ErrLeaseNotFound) {
		t.Fatal(err)
	}
	waitRenewed(t, former)
	if resp, err := cli.Get(ctx, key); err != nil || len(resp.Kvs) > 0 {
		t.Fatalf("key in the store after the renewal (%v, %v): the former owner wrote it back", resp, err)
	}
	if st := former.SessionState(); st.Lost != 1 {
		t.Errorf("SessionState %+v, want Lost 1", st)
	}
}

// waitRenewed waits until b has renewed its lease once and published it.
func waitRenewed(t *testing.T, b *etcd.Backend) {
	t.Helper()
	deadline := time.Now().Add(waitTimeout)
	for st := b.SessionState(); st.Established < 2 || !st.Live; st = b.SessionState() {
		if time.Now().After(deadline) {
			t.Fatalf("no lease renewal within %v: %+v", waitTimeout, st)
		}
		time.Sleep(20 * time.Millisecond) // polling SessionState: it has no change notification
	}
}
