package zookeeper_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-zookeeper/zk"
	"go.uber.org/goleak"

	"github.com/flynn/discoverd/backend"
	"github.com/flynn/discoverd/backend/backendtest"
	"github.com/flynn/discoverd/backend/zookeeper"
	"github.com/flynn/discoverd/backend/zookeeper/zktest"

	"github.com/flynn/discoverd/internal/testkit"
)

// srv is the ZooKeeper server shared by the package's tests (starting a JVM
// per test would dominate the run time); nil when ZooKeeper is not
// installed. Tests use unique service names, so they do not see each other.
var srv *zktest.Server

func TestMain(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) int {
	if zktest.Available() == nil {
		dir, err := os.MkdirTemp("", "zktest")
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		defer os.RemoveAll(dir)
		s, err := zktest.Start(dir)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		srv = s
	}
	code := m.Run()
	if srv != nil {
		srv.Close() // before the leak check: its process-wait goroutine is ours
	}
	if code != 0 {
		return code
	}
	if err := goleak.Find(); err != nil {
		fmt.Fprintf(os.Stderr, "goleak: %v\n", err)
		return 1
	}
	return 0
}

// server returns the shared server, or skips (fails under CI) when
// ZooKeeper is not installed.
func server(tb testing.TB) *zktest.Server {
	tb.Helper()
	zktest.SkipIfUnavailable(tb)
	return srv
}

const testPrefix = "/discoverd-test/services"

// testLogger discards the backends' logs unless ZKTEST_LOG is set.
func testLogger() *slog.Logger {
	if os.Getenv("ZKTEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.DiscardHandler)
}

func open(tb testing.TB, ttl time.Duration) *zookeeper.Backend {
	tb.Helper()
	s := server(tb)
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	b, err := zookeeper.Open(ctx, zookeeper.Config{Servers: s.Servers(), TTL: ttl, Prefix: testPrefix, Logger: testLogger()})
	if err != nil {
		tb.Fatalf("Open: %v", err)
	}
	tb.Cleanup(func() { b.Close() })
	return b
}

// rawConn is a plain ZooKeeper client, to look at what the backend stored.
func rawConn(tb testing.TB) *zk.Conn {
	tb.Helper()
	s := server(tb)
	c, events, err := zk.Connect(s.Servers(), 10*time.Second, zk.WithLogInfo(false), zk.WithLogger(nopLogger{}))
	if err != nil {
		tb.Fatalf("zk.Connect: %v", err)
	}
	tb.Cleanup(func() {
		c.Close()
		for range events { // closed when the client's goroutines are done
		}
	})
	return c
}

type nopLogger struct{}

func (nopLogger) Printf(string, ...any) {}

var seq atomic.Uint64

func uniqueName(tb testing.TB) string {
	r := strings.NewReplacer("/", "-", "_", "-")
	return fmt.Sprintf("%s-%d-%d", r.Replace(tb.Name()), time.Now().UnixNano()&0xffffff, seq.Add(1))
}

func ctxT(tb testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	tb.Cleanup(cancel)
	return ctx
}

func TestConformance(t *testing.T) {
	s := server(t)
	backendtest.Run(t, backendtest.Harness{
		New: func(tb testing.TB, ttl time.Duration) backend.Backend { return open(tb, ttl) },
		Kill: func(tb testing.TB, b backend.Backend) {
			b.(*zookeeper.Backend).Abandon()
		},
		ExpireSession: func(tb testing.TB, b backend.Backend) { expireSession(tb, s, b.(*zookeeper.Backend)) },
		Plant: func(tb testing.TB, b backend.Backend, name, addr string) {
			tb.Helper()
			if err := b.(*zookeeper.Backend).Plant(name, addr); err != nil {
				tb.Fatal(err)
			}
		},
		Erase: func(tb testing.TB, name, addr string) {
			tb.Helper()
			p := testPrefix + "/" + name + "/" + addr
			if err := rawConn(tb).Delete(p, -1); err != nil {
				tb.Fatalf("Delete %s: %v", p, err)
			}
		},
		StopStore:  s.Stop,
		StartStore: s.Start,
		TTL:        2 * time.Second,
	})
}

// expireSession cuts b off from ZooKeeper until the server has expired its
// session and deleted its ephemeral znodes, then lets it reconnect (it then
// finds its session expired and opens a new one).
func expireSession(tb testing.TB, s *zktest.Server, b *zookeeper.Backend) {
	tb.Helper()
	id := b.SessionID()
	heal := b.Partition()
	defer heal()
	waitFor(tb, "expiry of the session", func() bool {
		alive, err := s.HasSession(id)
		if err != nil {
			tb.Fatal(err)
		}
		return !alive
	})
}

// nextEvent reads one event from st or fails after a generous bound.
func nextEvent(tb testing.TB, st backend.Stream) backend.Event {
	tb.Helper()
	timer := time.NewTimer(20 * time.Second)
	defer timer.Stop()
	select {
	case ev, ok := <-st.Events():
		if !ok {
			tb.Fatalf("stream ended: %v", st.Err())
		}
		return ev
	case <-timer.C:
		tb.Fatal("no event within 20s")
	}
	return backend.Event{}
}

func expectEvent(tb testing.TB, st backend.Stream, typ backend.EventType, addr string) backend.Event {
	tb.Helper()
	ev := nextEvent(tb, st)
	if ev.Type != typ || ev.Instance.Addr != addr {
		tb.Fatalf("got %v %s, want %v %s", ev.Type, ev.Instance.Addr, typ, addr)
	}
	return ev
}

func subscribe(tb testing.TB, b backend.Backend, name string) backend.Stream {
	tb.Helper()
	st, err := b.Subscribe(ctxT(tb), name)
	if err != nil {
		tb.Fatalf("Subscribe: %v", err)
	}
	tb.Cleanup(func() { st.Close() })
	expectEvent(tb, st, backend.Current, "")
	return st
}

// TestStoreLayout checks the znodes the backend writes, as documented: an
// ephemeral node <prefix>/<name>/<addr> of the backend's session holding
// the attrs as JSON; an attribute update rewrites the data in place, so its
// czxid (Created) stays; equal attributes write nothing.
func TestStoreLayout(t *testing.T) {
	b := open(t, 5*time.Second)
	raw := rawConn(t)
	name := uniqueName(t)
	p := testPrefix + "/" + name + "/10.0.0.1:80"

	if err := b.Register(ctxT(t), name, "10.0.0.1:80", map[string]string{"v": "1"}); err != nil {
		t.Fatal(err)
	}
	data, st1, err := raw.Get(p)
	if err != nil {
		t.Fatalf("Get %s: %v", p, err)
	}
	if st1.EphemeralOwner != b.SessionID() {
		t.Errorf("ephemeral owner %#x, want the backend's session %#x", st1.EphemeralOwner, b.SessionID())
	}
	var attrs map[string]string
	if err := json.Unmarshal(data, &attrs); err != nil || attrs["v"] != "1" || len(attrs) != 1 {
		t.Errorf("data %q (%v), want {\"v\":\"1\"}", data, err)
	}

	if err := b.Register(ctxT(t), name, "10.0.0.1:80", map[string]string{"v": "1"}); err != nil {
		t.Fatal(err)
	}
	if _, st, err := raw.Get(p); err != nil || st.Mzxid != st1.Mzxid {
		t.Errorf("re-register with equal attrs wrote the znode (mzxid %d -> %d, err %v)", st1.Mzxid, st.Mzxid, err)
	}

	if err := b.Register(ctxT(t), name, "10.0.0.1:80", map[string]string{"v": "2"}); err != nil {
		t.Fatal(err)
	}
	data, st2, err := raw.Get(p)
	if err != nil {
		t.Fatal(err)
	}
	if st2.Czxid != st1.Czxid || st2.Mzxid <= st1.Mzxid {
		t.Errorf("attr update: czxid %d -> %d, mzxid %d -> %d; want same czxid, larger mzxid", st1.Czxid, st2.Czxid, st1.Mzxid, st2.Mzxid)
	}
	if !strings.Contains(string(data), `"v":"2"`) {
		t.Errorf("data after update %q", data)
	}

	if err := b.Unregister(ctxT(t), name, "10.0.0.1:80"); err != nil {
		t.Fatal(err)
	}
	if ok, _, err := raw.Exists(p); err != nil || ok {
		t.Errorf("after Unregister: exists=%v err=%v", ok, err)
	}
}

// TestServiceZnodeIsContainer: the service's znode goes by itself once its
// last instance is gone (the test server checks containers every 100 ms),
// and a stream on the service survives that and sees the next
// registration.
func TestServiceZnodeIsContainer(t *testing.T) {
	b := open(t, 5*time.Second)
	raw := rawConn(t)
	name := uniqueName(t)
	dir := testPrefix + "/" + name
	st := subscribe(t, b, name)
	if err := b.Register(ctxT(t), name, "10.0.0.1:80", nil); err != nil {
		t.Fatal(err)
	}
	expectEvent(t, st, backend.Put, "10.0.0.1:80")
	if err := b.Unregister(ctxT(t), name, "10.0.0.1:80"); err != nil {
		t.Fatal(err)
	}
	expectEvent(t, st, backend.Delete, "10.0.0.1:80")
	timer := time.NewTimer(20 * time.Second)
	defer timer.Stop()
	for {
		ok, _, ch, err := raw.ExistsW(dir)
		if err != nil {
			t.Fatal(err)
		}
		if !ok {
			break
		}
		select {
		case <-ch:
		case <-timer.C:
			t.Fatalf("%s still exists 20s after its last instance went", dir)
		}
	}
	if err := b.Register(ctxT(t), name, "10.0.0.2:80", nil); err != nil {
		t.Fatal(err)
	}
	expectEvent(t, st, backend.Put, "10.0.0.2:80")
}

// TestResubscribeSeesChanges: a stream opened after another one on the
// same name was closed relies on the watches the first one set (the
// backend does not set a watch twice) and still sees every change.
func TestResubscribeSeesChanges(t *testing.T) {
	b := open(t, 5*time.Second)
	name := uniqueName(t)
	if err := b.Register(ctxT(t), name, "10.0.0.1:80", map[string]string{"v": "1"}); err != nil {
		t.Fatal(err)
	}
	for i := range 3 {
		st, err := b.Subscribe(ctxT(t), name)
		if err != nil {
			t.Fatal(err)
		}
		expectEvent(t, st, backend.Put, "10.0.0.1:80")
		expectEvent(t, st, backend.Current, "")
		v := fmt.Sprint(i + 2)
		if err := b.Register(ctxT(t), name, "10.0.0.1:80", map[string]string{"v": v}); err != nil {
			t.Fatal(err)
		}
		if ev := expectEvent(t, st, backend.Put, "10.0.0.1:80"); ev.Instance.Attrs["v"] != v {
			t.Errorf("round %d: attrs %v, want v=%s", i, ev.Instance.Attrs, v)
		}
		// Closing leaves the data watch the stream re-armed after the
		// update unfired: the next round's stream must rely on it.
		st.Close()
	}
}

// TestSessionExpiryRecreatesRegistrations partitions a backend from
// ZooKeeper for longer than its session timeout: its znodes go, and when it
// reconnects (under a new session) it creates them again, new znodes that
// keep the registrations' Created, and its own stream follows.
func TestSessionExpiryRecreatesRegistrations(t *testing.T) {
	const ttl = time.Second
	b := open(t, ttl)
	watcher := open(t, 10*time.Second)
	name := uniqueName(t)
	own := subscribe(t, b, name)
	st := subscribe(t, watcher, name)

	created := map[string]uint64{}
	for _, addr := range []string{"10.0.0.1:80", "10.0.0.2:80"} {
		if err := b.Register(ctxT(t), name, addr, map[string]string{"a": addr}); err != nil {
			t.Fatal(err)
		}
		created[addr] = expectEvent(t, st, backend.Put, addr).Instance.Created
		expectEvent(t, own, backend.Put, addr)
	}
	oldSession := b.SessionID()
	if st := b.SessionState(); !st.Live || st.Established != 1 {
		t.Fatalf("SessionState before expiry = %+v, want live, 1 established", st)
	}

	heal := b.Partition()
	// The server expires the session after the TTL and removes its znodes.
	for range 2 {
		ev := nextEvent(t, st)
		if ev.Type != backend.Delete || created[ev.Instance.Addr] == 0 {
			t.Fatalf("while partitioned: got %v %s, want a Delete of a registration", ev.Type, ev.Instance.Addr)
		}
	}
	heal()

	for range 2 {
		ev := nextEvent(t, st)
		addr := ev.Instance.Addr
		if ev.Type != backend.Put || created[addr] == 0 {
			t.Fatalf("after healing: got %v %s, want a Put of a registration", ev.Type, addr)
		}
		if ev.Instance.Created != created[addr] {
			t.Errorf("%s re-created with Created %d, want %d (kept)", addr, ev.Instance.Created, created[addr])
		}
		if ev.Instance.Attrs["a"] != addr {
			t.Errorf("%s re-created with attrs %v", addr, ev.Instance.Attrs)
		}
	}
	if b.SessionID() == oldSession {
		t.Errorf("session id unchanged after expiry")
	}
	// The watcher may see the znodes just before the backend records the
	// restore as done.
	if st := waitSessionState(t, b, "live", func(st backend.SessionState) bool { return st.Live }); st.Established != 2 {
		t.Errorf("SessionState after expiry = %+v, want live, 2 established", st)
	}
	// The znodes are new ones, of the new session.
	raw := rawConn(t)
	for addr := range created {
		_, stat, err := raw.Get(testPrefix + "/" + name + "/" + addr)
		if err != nil || stat.EphemeralOwner != b.SessionID() || uint64(stat.Czxid) == created[addr] {
			t.Errorf("%s after the restore: owner %#x czxid %d (err %v), want owner %#x and a new czxid", addr, stat.EphemeralOwner, stat.Czxid, err, b.SessionID())
		}
	}
	// The partitioned backend's own stream converges to the same view
	// (it may or may not have seen the znodes go while it was cut off),
	// and Unregister still works on the re-created registration.
	if err := b.Unregister(ctxT(t), name, "10.0.0.1:80"); err != nil {
		t.Fatal(err)
	}
	expectEvent(t, st, backend.Delete, "10.0.0.1:80")
	view := map[string]uint64{"10.0.0.1:80": created["10.0.0.1:80"], "10.0.0.2:80": created["10.0.0.2:80"]}
	deadline := time.Now().Add(20 * time.Second)
	for len(view) != 1 || view["10.0.0.2:80"] != created["10.0.0.2:80"] {
		if time.Now().After(deadline) {
			t.Fatalf("own stream view %v, want only 10.0.0.2:80 with Created %d", view, created["10.0.0.2:80"])
		}
		ev := nextEvent(t, own)
		switch ev.Type {
		case backend.Put:
			view[ev.Instance.Addr] = ev.Instance.Created
		case backend.Delete:
			delete(view, ev.Instance.Addr)
		}
	}
}

// TestSessionNotLiveUntilRestored: on a new session (the old one expired)
// the backend is not Live, and does not count the session as established,
// until its registrations are written there. Here the restore keeps failing
// because another client made the service's znode read-only meanwhile;
// once that is undone, the retried restore succeeds.
func TestSessionNotLiveUntilRestored(t *testing.T) {
	b := open(t, time.Second)
	raw := rawConn(t)
	name := uniqueName(t)
	dir := testPrefix + "/" + name
	node := dir + "/10.0.0.1:80"
	if err := b.Register(ctxT(t), name, "10.0.0.1:80", nil); err != nil {
		t.Fatal(err)
	}
	old := b.SessionID()
	heal := b.Partition()
	defer heal()
	waitExists(t, raw, node, false) // the session expired

	// Swap the (empty) service znode for one nobody may create children in.
	deadline := time.Now().Add(20 * time.Second)
	for {
		if err := raw.Delete(dir, -1); err != nil && !errors.Is(err, zk.ErrNoNode) {
			t.Fatalf("Delete %s: %v", dir, err)
		}
		_, err := raw.Create(dir, nil, 0, zk.WorldACL(zk.PermRead|zk.PermAdmin))
		if err == nil {
			break
		}
		if !errors.Is(err, zk.ErrNodeExists) || time.Now().After(deadline) {
			t.Fatalf("Create %s: %v", dir, err)
		}
	}
	t.Cleanup(func() { raw.Delete(dir, -1) })

	heal()
	ctx := ctxT(t)
	waitFor(t, "a new session", func() bool { return b.SessionID() != old && b.Ping(ctx) == nil })
	if st := b.SessionState(); st.Live || st.Established != 1 {
		t.Errorf("SessionState while the restore fails = %+v, want not live, 1 established", st)
	}
	if ok, _, err := raw.Exists(node); err != nil || ok {
		t.Fatalf("%s exists=%v (err %v): the restore was expected to fail", node, ok, err)
	}

	if _, err := raw.SetACL(dir, zk.WorldACL(zk.PermAll), -1); err != nil {
		t.Fatal(err)
	}
	if st := waitSessionState(t, b, "live", func(st backend.SessionState) bool { return st.Live }); st.Established != 2 {
		t.Errorf("SessionState after the restore = %+v, want live, 2 established", st)
	}
	if _, stat, err := raw.Get(node); err != nil || stat.EphemeralOwner != b.SessionID() {
		t.Errorf("%s after the restore: owner %#x (err %v), want %#x", node, stat.EphemeralOwner, err, b.SessionID())
	}
	if err := b.Unregister(ctxT(t), name, "10.0.0.1:80"); err != nil {
		t.Fatal(err)
	}
}

// waitFor polls cond until it holds; the states it checks have no change
// notification. The bound only catches a hang.
func waitFor(tb testing.TB, what string, cond func() bool) {
	tb.Helper()
	testkit.Eventually(tb, 20*time.Second, what, cond)
}

// waitSessionState waits until b's SessionState satisfies ok and returns it.
func waitSessionState(tb testing.TB, b *zookeeper.Backend, what string, ok func(backend.SessionState) bool) backend.SessionState {
	tb.Helper()
	var st backend.SessionState
	waitFor(tb, "session state "+what, func() bool {
		st = b.SessionState()
		return ok(st)
	})
	return st
}

// waitExists waits, with a watch, until the znode p exists (or not).
func waitExists(tb testing.TB, c *zk.Conn, p string, want bool) {
	tb.Helper()
	timer := time.NewTimer(20 * time.Second)
	defer timer.Stop()
	for {
		ok, _, ch, err := c.ExistsW(p)
		if err != nil {
			tb.Fatalf("ExistsW %s: %v", p, err)
		}
		if ok == want {
			return
		}
		select {
		case <-ch:
		case <-timer.C:
			tb.Fatalf("%s exists=%v for 20s, want %v", p, ok, want)
		}
	}
}

// TestStreamKeepsViewAcrossConnectionLoss partitions a subscriber for less
// than its session timeout: it emits nothing while cut off (its view and
// registrations stay), then the changes made meanwhile.
func TestStreamKeepsViewAcrossConnectionLoss(t *testing.T) {
	sub := open(t, 30*time.Second)
	writer := open(t, 10*time.Second)
	name := uniqueName(t)
	if err := sub.Register(ctxT(t), name, "10.0.0.1:80", nil); err != nil {
		t.Fatal(err)
	}
	st, err := sub.Subscribe(ctxT(t), name)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	expectEvent(t, st, backend.Put, "10.0.0.1:80")
	expectEvent(t, st, backend.Current, "")

	heal := sub.Partition()
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	if err := sub.Ping(ctx); err == nil {
		t.Error("Ping while partitioned = nil, want an error")
	}
	cancel()
	if err := writer.Register(ctxT(t), name, "10.0.0.2:80", map[string]string{"k": "v"}); err != nil {
		t.Fatal(err)
	}
	heal()
	// The first event after healing is the change made meanwhile: the
	// stream neither dropped its view nor lost the subscriber's own
	// registration (a Delete would come first).
	ev := expectEvent(t, st, backend.Put, "10.0.0.2:80")
	if ev.Instance.Attrs["k"] != "v" {
		t.Errorf("attrs %v", ev.Instance.Attrs)
	}
	if err := writer.Unregister(ctxT(t), name, "10.0.0.2:80"); err != nil {
		t.Fatal(err)
	}
	expectEvent(t, st, backend.Delete, "10.0.0.2:80")
}

// TestAbandonKeepsSession: Abandon drops the connection without closing the
// session, so the znodes are still there right after it (they go when the
// session expires, checked by the conformance suite).
func TestAbandonKeepsSession(t *testing.T) {
	b := open(t, 30*time.Second)
	raw := rawConn(t)
	name := uniqueName(t)
	if err := b.Register(ctxT(t), name, "10.0.0.1:80", nil); err != nil {
		t.Fatal(err)
	}
	b.Abandon()
	ok, _, err := raw.Exists(testPrefix + "/" + name + "/10.0.0.1:80")
	if err != nil || !ok {
		t.Errorf("after Abandon: exists=%v err=%v, want the znode kept until the session expires", ok, err)
	}
}

// TestUnreadableAttrs: a znode with data that is not a JSON object (written
// by something else) is delivered without attributes; nothing breaks.
func TestUnreadableAttrs(t *testing.T) {
	b := open(t, 5*time.Second)
	raw := rawConn(t)
	name := uniqueName(t)
	st := subscribe(t, b, name)
	if _, err := raw.Create(testPrefix+"/"+name, nil, 0, zk.WorldACL(zk.PermAll)); err != nil {
		t.Fatal(err)
	}
	_, err := raw.Create(testPrefix+"/"+name+"/10.0.0.9:80", []byte("\xff not json"), zk.FlagEphemeral, zk.WorldACL(zk.PermAll))
	if err != nil {
		t.Fatal(err)
	}
	ev := expectEvent(t, st, backend.Put, "10.0.0.9:80")
	if ev.Instance.Attrs != nil || ev.Instance.Created == 0 {
		t.Errorf("got %+v, want no attrs and a Created", ev.Instance)
	}
}

// TestRegisterReplacesForeignZnode: a znode left at the path by another
// session (say, this agent before a restart) is replaced by the backend's
// own, so it lives and dies with this backend's session; the registration
// keeps its Created (the new znode carries it in its data), and with equal
// attributes subscribers see nothing of the swap.
func TestRegisterReplacesForeignZnode(t *testing.T) {
	other, b := open(t, 30*time.Second), open(t, 5*time.Second)
	raw := rawConn(t)
	name := uniqueName(t)
	p := testPrefix + "/" + name + "/10.0.0.1:80"
	st := subscribe(t, b, name)
	if err := other.Register(ctxT(t), name, "10.0.0.1:80", map[string]string{"v": "1"}); err != nil {
		t.Fatal(err)
	}
	first := expectEvent(t, st, backend.Put, "10.0.0.1:80")
	_, stat0, err := raw.Get(p)
	if err != nil || uint64(stat0.Czxid) != first.Instance.Created {
		t.Fatalf("fresh registration: czxid %d (err %v), Created %d; want equal", stat0.Czxid, err, first.Instance.Created)
	}
	if err := b.Register(ctxT(t), name, "10.0.0.1:80", map[string]string{"v": "1"}); err != nil {
		t.Fatal(err)
	}
	data, stat, err := raw.Get(p)
	if err != nil || stat.EphemeralOwner != b.SessionID() {
		t.Fatalf("owner %#x (err %v), want %#x", stat.EphemeralOwner, err, b.SessionID())
	}
	attrs, created, err := zookeeper.DecodeData(data)
	if err != nil || created != first.Instance.Created || attrs["v"] != "1" || stat.Czxid == stat0.Czxid {
		t.Errorf("taken-over znode: data %q (%v), czxid %d; want the attrs, created %d, a new czxid", data, err, stat.Czxid, first.Instance.Created)
	}
	// An update of the taken-over registration keeps its Created too.
	if err := b.Register(ctxT(t), name, "10.0.0.1:80", map[string]string{"v": "2"}); err != nil {
		t.Fatal(err)
	}
	ev := expectEvent(t, st, backend.Put, "10.0.0.1:80")
	if ev.Instance.Created != first.Instance.Created || ev.Instance.Attrs["v"] != "2" {
		t.Errorf("update after the takeover: %+v, want v=2 and Created %d", ev.Instance, first.Instance.Created)
	}
	// The former owner can no longer remove it.
	if err := other.Unregister(ctxT(t), name, "10.0.0.1:80"); !errors.Is(err, backend.ErrNotOwner) {
		t.Fatalf("former owner's Unregister: %v, want backend.ErrNotOwner", err)
	}
	if ok, _, err := raw.Exists(p); err != nil || !ok {
		t.Errorf("after the former owner's Unregister: exists=%v err=%v, want kept", ok, err)
	}
}

func TestOpenErrors(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	for _, cfg := range []zookeeper.Config{
		{},
		{Servers: []string{"127.0.0.1:1"}, Prefix: "relative"},
		{Servers: []string{"127.0.0.1:1"}, Prefix: "/trailing/"},
	} {
		if b, err := zookeeper.Open(ctx, cfg); err == nil {
			b.Close()
			t.Errorf("Open(%+v) = nil error", cfg)
		}
	}
	// Nothing listens: Open gives up when ctx ends.
	short, cancel2 := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel2()
	if b, err := zookeeper.Open(short, zookeeper.Config{Servers: []string{"127.0.0.1:1"}}); err == nil {
		b.Close()
		t.Error("Open with no server = nil error")
	}
}

// TestRestoreDoesNotSteal: a registration that another backend took over
// while this backend's session was gone is not taken back by the restore:
// it is dropped and counted lost, and the new owner's znode stays.
func TestRestoreDoesNotSteal(t *testing.T) {
	b, other := open(t, time.Second), open(t, 30*time.Second)
	raw := rawConn(t)
	name := uniqueName(t)
	p := testPrefix + "/" + name + "/10.0.0.1:80"
	if err := b.Register(ctxT(t), name, "10.0.0.1:80", map[string]string{"by": "b"}); err != nil {
		t.Fatal(err)
	}
	if err := b.Register(ctxT(t), name, "10.0.0.2:80", nil); err != nil {
		t.Fatal(err)
	}
	heal := b.Partition()
	defer heal()
	waitExists(t, raw, p, false) // b's session expired
	if err := other.Register(ctxT(t), name, "10.0.0.1:80", map[string]string{"by": "other"}); err != nil {
		t.Fatal(err)
	}
	heal()
	st := waitSessionState(t, b, "live on a new session", func(st backend.SessionState) bool { return st.Live && st.Established == 2 })
	if st.Lost != 1 {
		t.Errorf("SessionState after the restore = %+v, want 1 lost", st)
	}
	data, stat, err := raw.Get(p)
	if err != nil || stat.EphemeralOwner != other.SessionID() {
		t.Fatalf("%s: owner %#x (err %v), want the new owner %#x", p, stat.EphemeralOwner, err, other.SessionID())
	}
	if attrs, _, _ := zookeeper.DecodeData(data); attrs["by"] != "other" {
		t.Errorf("%s holds %q, want the new owner's attrs", p, data)
	}
	// The other registration was restored, on b's new session.
	if _, stat, err := raw.Get(testPrefix + "/" + name + "/10.0.0.2:80"); err != nil || stat.EphemeralOwner != b.SessionID() {
		t.Errorf("10.0.0.2:80: owner %#x (err %v), want %#x", stat.EphemeralOwner, err, b.SessionID())
	}
	// b forgot the lost one: its Unregister leaves it, and so does its
	// anti-entropy.
	if err := b.Unregister(ctxT(t), name, "10.0.0.1:80"); !errors.Is(err, backend.ErrNotOwner) {
		t.Fatalf("former owner's Unregister: %v, want backend.ErrNotOwner", err)
	}
	if ok, _, err := raw.Exists(p); err != nil || !ok {
		t.Errorf("after the former owner's Unregister: exists=%v err=%v, want kept", ok, err)
	}
}

// TestAntiEntropyDropsTakenOver: a backend whose registration another
// backend took over learns it from its anti-entropy pass (within about a
// TTL): it stops holding it (counted lost) and never takes it back.
func TestAntiEntropyDropsTakenOver(t *testing.T) {
	const ttl = time.Second
	a, b := open(t, ttl), open(t, ttl)
	raw := rawConn(t)
	name := uniqueName(t)
	p := testPrefix + "/" + name + "/10.0.0.1:80"
	if err := a.Register(ctxT(t), name, "10.0.0.1:80", nil); err != nil {
		t.Fatal(err)
	}
	if err := b.Register(ctxT(t), name, "10.0.0.1:80", map[string]string{"by": "b"}); err != nil {
		t.Fatal(err)
	}
	st := waitSessionState(t, a, "1 lost", func(st backend.SessionState) bool { return st.Lost >= 1 })
	if st.Lost != 1 || st.Repairs != 0 {
		t.Errorf("SessionState = %+v, want 1 lost, no repairs", st)
	}
	// Erased behind everyone's back, it is written again by its owner
	// only: the former owner does not hold it any more.
	if err := raw.Delete(p, -1); err != nil {
		t.Fatal(err)
	}
	waitExists(t, raw, p, true)
	if _, stat, err := raw.Get(p); err != nil || stat.EphemeralOwner != b.SessionID() {
		t.Errorf("%s rewritten with owner %#x (err %v), want %#x", p, stat.EphemeralOwner, err, b.SessionID())
	}
	if st := a.SessionState(); st.Repairs != 0 {
		t.Errorf("former owner's SessionState = %+v, want no repairs", st)
	}
}

// TestDecodeData: both forms of a znode's data decode; the wrapped one
// carries Created.
func TestDecodeData(t *testing.T) {
	for _, tc := range []struct {
		data    string
		attrs   map[string]string
		created uint64
		bad     bool
	}{
		{data: ``},
		{data: `{}`},
		{data: `{"k":"v"}`, attrs: map[string]string{"k": "v"}},
		{data: `{"attrs":"x","created":"7"}`, attrs: map[string]string{"attrs": "x", "created": "7"}},
		{data: `{"attrs":{"k":"v"},"created":42}`, attrs: map[string]string{"k": "v"}, created: 42},
		{data: `{"attrs":{}}`},
		{data: ` { "attrs" : { "k" : "v" } , "created" : 9 } `, attrs: map[string]string{"k": "v"}, created: 9},
		{data: `{"attrs":{"k":1}}`, bad: true},
		{data: `{"attrs":{},"created":-1}`, bad: true},
		{data: `{"k":1}`, bad: true},
		{data: `[]`, bad: true},
	} {
		attrs, created, err := zookeeper.DecodeData([]byte(tc.data))
		if (err != nil) != tc.bad || !maps.Equal(attrs, tc.attrs) || created != tc.created {
			t.Errorf("DecodeData(%q) = %v, %d, %v; want %v, %d, error %v", tc.data, attrs, created, err, tc.attrs, tc.created, tc.bad)
		}
	}
}
