package checks_test

import (
	"context"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/flynn/discoverd/agent"
	"github.com/flynn/discoverd/api"
	"github.com/flynn/discoverd/backend/etcd"
	"github.com/flynn/discoverd/backend/etcd/embedded"
	"github.com/flynn/discoverd/backend/etcd/etcdtest"
	"github.com/flynn/discoverd/checks"
	"github.com/jonboulle/clockwork"
	clientv3 "go.etcd.io/etcd/client/v3"
)

func TestMain(m *testing.M) { etcdtest.VerifyTestMain(m) }

// wait bounds every wait; a wait that ends by timeout is a failure.
const wait = 15 * time.Second

func quiet() *slog.Logger {
	return slog.New(slog.NewTextHandler(discard{}, &slog.HandlerOptions{Level: slog.LevelError}))
}

type discard struct{}

func (discard) Write(p []byte) (int, error) { return len(p), nil }

func ctxT(tb testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	tb.Cleanup(cancel)
	return ctx
}

// env is one agent on a real embedded etcd, with a check manager on a
// fake clock.
type env struct {
	t     *testing.T
	srv   *embedded.Server
	agent *agent.Agent
	sess  *agent.Session
	clock *clockwork.FakeClock
	m     *checks.Manager
	file  string
	etcd  *clientv3.Client
}

func newEnv(t *testing.T) *env {
	t.Helper()
	srv := etcdtest.NewServer(t)
	e := &env{t: t, srv: srv, file: filepath.Join(t.TempDir(), "checks.journal")}
	ctx := ctxT(t)
	b, err := etcd.Open(ctx, etcd.Config{Endpoints: srv.Endpoints(), TTL: 10 * time.Second, Logger: quiet()})
	if err != nil {
		t.Fatalf("etcd.Open: %v", err)
	}
	t.Cleanup(func() { b.Close() })
	e.agent, err = agent.New(agent.Config{Backend: b, Logger: quiet()})
	if err != nil {
		t.Fatalf("agent.New: %v", err)
	}
	t.Cleanup(func() { e.agent.Close() })
	e.sess = e.agent.NewKeptSession()
	t.Cleanup(e.sess.Close)
	e.etcd, err = clientv3.New(clientv3.Config{Endpoints: srv.Endpoints(), DialTimeout: wait, Logger: nil})
	if err != nil {
		t.Fatalf("etcd client: %v", err)
	}
	t.Cleanup(func() { e.etcd.Close() })
	e.clock = clockwork.NewFakeClock()
	e.open()
	return e
}

// open starts a manager on e's journal (again, after close: a restart).
func (e *env) open() {
	e.t.Helper()
	m, err := checks.NewWithClock(checks.Config{Registrar: e.sess, File: e.file, Logger: quiet()}, e.clock)
	if err != nil {
		e.t.Fatalf("checks.NewWithClock: %v", err)
	}
	e.m = m
	e.t.Cleanup(func() { m.Close() })
}

// step moves the fake clock past the longest period, so that each of the
// n checks probes exactly once, and waits until every probe's result is
// applied (each runner waits on its next timer again).
func (e *env) step(n int) {
	e.t.Helper()
	ctx := ctxT(e.t)
	if err := e.clock.BlockUntilContext(ctx, n); err != nil {
		e.t.Fatalf("checks not waiting on the clock: %v", err)
	}
	before := e.m.Stats().Probes
	e.clock.Advance(11*time.Second + time.Millisecond) // interval 10 s + 10 %
	for e.m.Stats().Probes < before+uint64(n) {
		select {
		case <-ctx.Done():
			e.t.Fatalf("probes did not run: %d of %d", e.m.Stats().Probes-before, n)
		case <-time.After(2 * time.Millisecond):
		}
	}
	if err := e.clock.BlockUntilContext(ctx, n); err != nil {
		e.t.Fatalf("probe results not applied: %v", err)
	}
}

func (e *env) status(name, addr string) api.CheckStatus {
	e.t.Helper()
	st, ok := e.m.Status(name, addr)
	if !ok {
		e.t.Fatalf("no checked registration %s/%s", name, addr)
	}
	return st
}

// instances returns the addresses of name in the store, as the agent's
// cache shows them, and their Created.
func (e *env) instances(name string) map[string]uint {
	e.t.Helper()
	ups, err := e.agent.Instances(ctxT(e.t), name)
	if err != nil {
		e.t.Fatalf("Instances: %v", err)
	}
	out := map[string]uint{}
	for _, u := range ups {
		out[u.Addr] = u.Created
	}
	return out
}

// revision is the etcd store's current revision: it moves with every
// write.
func (e *env) revision() int64 {
	e.t.Helper()
	resp, err := e.etcd.Get(ctxT(e.t), "/discoverd-checks-test-revision")
	if err != nil {
		e.t.Fatalf("etcd get: %v", err)
	}
	return resp.Header.Revision
}

func (e *env) add(args api.Args) string {
	e.t.Helper()
	addr, err := e.m.Add(ctxT(e.t), args)
	if err != nil {
		e.t.Fatalf("Add: %v", err)
	}
	return addr
}

// tcpServer is a real TCP listener that accepts and closes connections,
// and can be stopped and started again on the same port.
type tcpServer struct {
	t    *testing.T
	addr string
	ln   net.Listener
	done chan struct{}
}

func newTCPServer(t *testing.T) *tcpServer {
	s := &tcpServer{t: t}
	s.start("127.0.0.1:0")
	t.Cleanup(s.stop)
	return s
}

func (s *tcpServer) start(addr string) {
	s.t.Helper()
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		s.t.Fatalf("listen %s: %v", addr, err)
	}
	s.ln, s.addr, s.done = ln, ln.Addr().String(), make(chan struct{})
	go func() {
		defer close(s.done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
}

func (s *tcpServer) stop() {
	if s.ln != nil {
		s.ln.Close()
		<-s.done
		s.ln = nil
	}
}

func TestRiseFallAndNoWritesWhileStateHolds(t *testing.T) {
	e := newEnv(t)
	srv := newTCPServer(t)
	addr := e.add(api.Args{Name: "db", Addr: srv.addr, Attrs: map[string]string{"k": "v"},
		Check: &api.Check{TCP: srv.addr, Interval: api.Duration(10 * time.Second)}})

	st := e.status("db", addr)
	if st.State != api.CheckOffline || st.Stored || st.Check.Rise != 2 || st.Check.Fall != 3 || st.Check.Timeout != api.Duration(5*time.Second) {
		t.Fatalf("new checked registration: %+v", st)
	}
	e.step(1)
	if st := e.status("db", addr); st.State != api.CheckOffline || st.LastResult != "pass" || st.Passes != 1 {
		t.Fatalf("after one pass (rise 2): %+v", st)
	}
	if got := e.instances("db"); len(got) != 0 {
		t.Fatalf("in the store before rise: %v", got)
	}
	e.step(1)
	if st := e.status("db", addr); st.State != api.CheckOnline || !st.Stored {
		t.Fatalf("after rise: %+v", st)
	}
	first := e.instances("db")
	if _, ok := first[addr]; !ok {
		t.Fatalf("online but not in the store: %v", first)
	}

	t.Run("no store write while the state holds", func(t *testing.T) {
		rev, writes := e.revision(), e.m.Stats().StoreWrites
		for range 5 {
			e.step(1)
		}
		if got := e.revision(); got != rev {
			t.Fatalf("store revision moved from %d to %d while the check kept passing", rev, got)
		}
		if got := e.m.Stats().StoreWrites; got != writes {
			t.Fatalf("store writes: %d, then %d", writes, got)
		}
	})

	t.Run("failing goes offline after fall", func(t *testing.T) {
		port := srv.addr
		srv.stop()
		e.step(1)
		e.step(1)
		if st := e.status("db", addr); st.State != api.CheckOnline || st.Fails != 2 || st.LastError == "" {
			t.Fatalf("after 2 failures (fall 3): %+v", st)
		}
		e.step(1)
		st := e.status("db", addr)
		if st.State != api.CheckOffline || st.Stored {
			t.Fatalf("after fall: %+v", st)
		}
		if got := e.instances("db"); len(got) != 0 {
			t.Fatalf("still in the store after fall: %v", got)
		}
		rev := e.revision()
		e.step(1)
		if got := e.revision(); got != rev {
			t.Fatalf("store written while offline: revision %d -> %d", rev, got)
		}

		srv.start(port)
		e.step(1)
		e.step(1)
		if st := e.status("db", addr); st.State != api.CheckOnline {
			t.Fatalf("after recovery and rise: %+v", st)
		}
		again := e.instances("db")
		if again[addr] <= first[addr] {
			t.Fatalf("back online with Created %d, not after the first registration's %d", again[addr], first[addr])
		}
		tr := e.status("db", addr).Transitions
		if len(tr) != 3 || tr[0].To != api.CheckOnline || tr[1].To != api.CheckOffline || tr[2].To != api.CheckOnline {
			t.Fatalf("transitions: %+v", tr)
		}
	})
}

func TestHTTPCheck(t *testing.T) {
	e := newEnv(t)
	var status atomic.Int32
	status.Store(http.StatusOK)
	hs := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/healthz" {
			http.NotFound(w, r)
			return
		}
		w.WriteHeader(int(status.Load()))
	}))
	defer hs.Close()
	addr := strings.TrimPrefix(hs.URL, "http://")
	e.add(api.Args{Name: "web", Addr: addr, Check: &api.Check{HTTP: hs.URL + "/healthz", Rise: 1, Fall: 1}})
	e.step(1)
	if st := e.status("web", addr); st.State != api.CheckOnline {
		t.Fatalf("200: %+v", st)
	}
	status.Store(http.StatusFound) // 3xx passes, and is not followed
	e.step(1)
	if st := e.status("web", addr); st.State != api.CheckOnline {
		t.Fatalf("302: %+v", st)
	}
	status.Store(http.StatusInternalServerError)
	e.step(1)
	st := e.status("web", addr)
	if st.State != api.CheckOffline || !strings.Contains(st.LastError, "500") {
		t.Fatalf("500: %+v", st)
	}
	if got := e.instances("web"); len(got) != 0 {
		t.Fatalf("in the store after a 500: %v", got)
	}
	hist := e.m.Stats().Latency["http"]
	if hist.Count != 3 {
		t.Fatalf("http latency observations: %d, want 3", hist.Count)
	}
}

func TestFlappingIsDamped(t *testing.T) {
	e := newEnv(t)
	srv := newTCPServer(t)
	port := srv.addr
	addr := e.add(api.Args{Name: "db", Addr: port, Check: &api.Check{TCP: port, Rise: 1, Fall: 1}})
	// Each step is 11 s: 5 changes fall within 60 s.
	e.step(1) // 1: online
	srv.stop()
	e.step(1) // 2: offline
	srv.start(port)
	e.step(1) // 3: online
	srv.stop()
	e.step(1) // 4: offline
	if st := e.status("db", addr); st.State != api.CheckOffline || len(st.Transitions) != 4 {
		t.Fatalf("after 4 changes: %+v", st)
	}
	srv.start(port)
	e.step(1) // the 5th change within a minute
	st := e.status("db", addr)
	if st.State != api.CheckFlapping || st.Stored || st.HeldUntil.IsZero() {
		t.Fatalf("5th change: not held as flapping: %+v", st)
	}
	if got := e.instances("db"); len(got) != 0 {
		t.Fatalf("flapping instance in the store: %v", got)
	}
	if s := e.m.Stats(); s.Flapping != 1 || s.Damped != 1 {
		t.Fatalf("stats: %+v", s)
	}
	hold := st.HeldUntil.Sub(e.clock.Now())
	// Passing all along, it stays out for the hold (1 min), then comes
	// back.
	steps := 0
	for e.status("db", addr).State == api.CheckFlapping {
		e.step(1)
		steps++
		if steps > 10 {
			t.Fatalf("still flapping after %d steps", steps)
		}
	}
	if steps*11 < int(hold/time.Second) {
		t.Fatalf("back after %d steps of 11 s, before the hold of %v", steps, hold)
	}
	if st := e.status("db", addr); st.State != api.CheckOnline || !st.Stored {
		t.Fatalf("after the hold: %+v", st)
	}

	t.Run("second episode holds longer", func(t *testing.T) {
		var st api.CheckStatus
		for i := range 6 {
			if i%2 == 0 {
				srv.stop()
			} else {
				srv.start(port)
			}
			e.step(1)
			if st = e.status("db", addr); st.State == api.CheckFlapping {
				break
			}
		}
		if st.State != api.CheckFlapping {
			t.Fatalf("not flapping again: %+v", st)
		}
		if again := st.HeldUntil.Sub(e.clock.Now()); again != 2*hold {
			t.Fatalf("second hold %v, want twice the first (%v)", again, hold)
		}
	})
}

func TestRestartKeepsCheckedRegistrations(t *testing.T) {
	e := newEnv(t)
	srv := newTCPServer(t)
	addr := e.add(api.Args{Name: "db", Addr: srv.addr, Attrs: map[string]string{"role": "primary"},
		Check: &api.Check{TCP: srv.addr, Rise: 1}})
	gone := e.add(api.Args{Name: "db", Addr: "127.0.0.1:1", Check: &api.Check{TCP: "127.0.0.1:1"}})
	if err := e.m.Remove(ctxT(t), "db", gone); err != nil {
		t.Fatalf("Remove: %v", err)
	}
	e.step(1)
	if st := e.status("db", addr); st.State != api.CheckOnline {
		t.Fatalf("before restart: %+v", st)
	}
	if err := e.m.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	e.open()
	st := e.status("db", addr)
	if st.State != api.CheckOffline || st.Attrs["role"] != "primary" || st.Check.TCP != srv.addr || st.Check.Rise != 1 {
		t.Fatalf("after restart: %+v", st)
	}
	if list := e.m.List(""); len(list) != 1 {
		t.Fatalf("after restart: %d checked registrations, want 1 (one was removed)", len(list))
	}
	e.step(1)
	if st := e.status("db", addr); st.State != api.CheckOnline || !st.Stored {
		t.Fatalf("after restart and rise: %+v", st)
	}
}

func TestRemove(t *testing.T) {
	e := newEnv(t)
	srv := newTCPServer(t)
	addr := e.add(api.Args{Name: "db", Addr: srv.addr, Check: &api.Check{TCP: srv.addr, Rise: 1}})
	e.step(1)
	if got := e.instances("db"); len(got) != 1 {
		t.Fatalf("not online: %v", got)
	}
	if err := e.m.Remove(ctxT(t), "db", addr); err != nil {
		t.Fatalf("Remove: %v", err)
	}
	if got := e.instances("db"); len(got) != 0 {
		t.Fatalf("still in the store after Remove: %v", got)
	}
	if err := e.m.Remove(ctxT(t), "db", addr); api.ErrorCode(err) != api.CodeNotFound {
		t.Fatalf("second Remove: %v, want not_found", err)
	}
}

func TestUpdateKeepsState(t *testing.T) {
	e := newEnv(t)
	srv := newTCPServer(t)
	args := api.Args{Name: "db", Addr: srv.addr, Attrs: map[string]string{"v": "1"}, Check: &api.Check{TCP: srv.addr, Rise: 1}}
	addr := e.add(args)
	e.step(1)
	rev := e.revision()
	e.add(args) // the same again: nothing changes
	if got := e.revision(); got != rev {
		t.Fatalf("re-adding the same registration wrote the store")
	}
	args.Attrs = map[string]string{"v": "2"}
	e.add(args)
	if st := e.status("db", addr); st.State != api.CheckOnline || st.Attrs["v"] != "2" {
		t.Fatalf("after update: %+v", st)
	}
	ups, err := e.agent.Instances(ctxT(t), "db")
	if err != nil || len(ups) != 1 || ups[0].Attrs["v"] != "2" {
		t.Fatalf("store after an attribute update: %v %v", ups, err)
	}
}

func TestAddRefusesBadInput(t *testing.T) {
	e := newEnv(t)
	for _, args := range []api.Args{
		{Name: "db", Addr: "127.0.0.1:5432"},
		{Name: "db", Addr: "127.0.0.1:5432", Check: &api.Check{}},
		{Name: "-db", Addr: "127.0.0.1:5432", Check: &api.Check{TCP: "127.0.0.1:5432"}},
		{Name: "db", Addr: ":5432", Check: &api.Check{TCP: "127.0.0.1:5432"}}, // no external IP
		{Name: "db", Addr: "127.0.0.1:5432", Check: &api.Check{HTTP: "ftp://x/"}},
	} {
		if _, err := e.m.Add(ctxT(t), args); api.ErrorCode(err) != api.CodeInvalidArgument {
			t.Errorf("Add(%+v): %v, want invalid_argument", args, err)
		}
	}
}

func TestDeregisterAfter(t *testing.T) {
	e := newEnv(t)
	addr := e.add(api.Args{Name: "db", Addr: "127.0.0.1:1", Check: &api.Check{TCP: "127.0.0.1:1", DeregisterAfter: api.Duration(time.Minute)}})
	for range 6 { // failing for 55 s
		e.step(1)
	}
	ctx := ctxT(t)
	if err := e.clock.BlockUntilContext(ctx, 1); err != nil {
		t.Fatal(err)
	}
	e.clock.Advance(11*time.Second + time.Millisecond) // failing for 66 s
	for e.m.Has("db", addr) {
		select {
		case <-ctx.Done():
			t.Fatal("not dropped after deregister_after")
		case <-time.After(2 * time.Millisecond):
		}
	}
	e.m.Close()
	e.open()
	if list := e.m.List(""); len(list) != 0 {
		t.Fatalf("dropped registration restored: %+v", list)
	}
}

// TestConcurrentAddRemove: Adds, updates and Removes of the same keys from
// many goroutines, while probes run and the clock moves, leave the
// manager, the store and the journal in agreement.
func TestConcurrentAddRemove(t *testing.T) {
	e := newEnv(t)
	srv := newTCPServer(t)
	const keys, workers, ops = 8, 8, 40
	addrOf := func(i int) string { return "127.0.0.1:" + strconv.Itoa(20000+i) }
	stop := make(chan struct{})
	ticked := make(chan struct{})
	go func() { // moves the clock while the workers run
		defer close(ticked)
		for {
			select {
			case <-stop:
				return
			case <-time.After(time.Millisecond):
				e.clock.Advance(3 * time.Second)
			}
		}
	}()
	var wg sync.WaitGroup
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for op := range ops {
				i := (w*ops + op*7) % keys
				if op%3 == 2 {
					err := e.m.Remove(ctxT(t), "svc", addrOf(i))
					if err != nil && api.ErrorCode(err) != api.CodeNotFound {
						t.Errorf("Remove: %v", err)
					}
					continue
				}
				args := api.Args{Name: "svc", Addr: addrOf(i), Attrs: map[string]string{"op": strconv.Itoa(op % 2)},
					Check: &api.Check{TCP: srv.addr, Rise: 1, Fall: 1}}
				if _, err := e.m.Add(ctxT(t), args); err != nil {
					t.Errorf("Add: %v", err)
				}
			}
		}()
	}
	wg.Wait()
	close(stop)
	<-ticked

	held := map[string]string{}
	for _, st := range e.m.List("svc") {
		held[st.Addr] = st.Attrs["op"]
	}
	if err := e.m.Close(); err != nil {
		t.Fatal(err)
	}
	e.open()
	for _, st := range e.m.List("svc") {
		if op, ok := held[st.Addr]; !ok || op != st.Attrs["op"] {
			t.Errorf("restored %s with op %q; held before: %v", st.Addr, st.Attrs["op"], held)
		}
		delete(held, st.Addr)
	}
	if len(held) != 0 {
		t.Errorf("not restored: %v", held)
	}
	// Whatever is in the store is held (store writes of removed checks
	// never land after their removal).
	e.m.Close()
	for addr := range e.instances("svc") {
		if !e.m.Has("svc", addr) {
			t.Errorf("store holds %s, which no check holds", addr)
		}
	}
}

// TestMaxInFlight: probes beyond the cap wait for a slot; the target
// never sees more at once.
func TestMaxInFlight(t *testing.T) {
	e := newEnv(t)
	e.m.Close()
	m, err := checks.NewWithClock(checks.Config{Registrar: e.sess, MaxInFlight: 2, Logger: quiet()}, e.clock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	e.m = m

	release := make(chan struct{})
	var mu sync.Mutex
	inflight, most := 0, 0
	arrived := make(chan struct{}, 16)
	hs := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		inflight++
		most = max(most, inflight)
		mu.Unlock()
		arrived <- struct{}{}
		<-release
		mu.Lock()
		inflight--
		mu.Unlock()
	}))
	defer hs.Close()
	const n = 6
	for i := range n {
		e.add(api.Args{Name: "web", Addr: "10.0.0.1:" + strconv.Itoa(1000+i), Check: &api.Check{HTTP: hs.URL, Rise: 1}})
	}
	ctx := ctxT(t)
	if err := e.clock.BlockUntilContext(ctx, n); err != nil {
		t.Fatal(err)
	}
	e.clock.Advance(11 * time.Second)
	for range 2 {
		select {
		case <-arrived:
		case <-ctx.Done():
			t.Fatal("probes did not arrive")
		}
	}
	if s := m.Stats(); s.InFlight != 2 || s.MaxInFlight != 2 {
		t.Fatalf("in flight %d of %d, want 2 of 2", s.InFlight, s.MaxInFlight)
	}
	close(release)
	for m.Stats().Probes < n {
		select {
		case <-ctx.Done():
			t.Fatalf("only %d probes done", m.Stats().Probes)
		case <-time.After(2 * time.Millisecond):
		}
	}
	mu.Lock()
	defer mu.Unlock()
	if most != 2 {
		t.Fatalf("the target saw %d probes at once, the cap is 2", most)
	}
}

// TestNoTakeover: a checked registration does not take over one that a
// connection holds; it goes to the store once that one is gone.
func TestNoTakeover(t *testing.T) {
	e := newEnv(t)
	srv := newTCPServer(t)
	conn := e.agent.NewSession(0)
	defer conn.Close()
	if _, err := conn.Register(ctxT(t), api.Args{Name: "db", Addr: srv.addr, Attrs: map[string]string{"by": "conn"}}); err != nil {
		t.Fatal(err)
	}
	addr := e.add(api.Args{Name: "db", Addr: srv.addr, Attrs: map[string]string{"by": "check"}, Check: &api.Check{TCP: srv.addr, Rise: 1}})
	e.step(1)
	st := e.status("db", addr)
	if st.State != api.CheckOnline || st.Stored || !strings.Contains(st.StoreError, "conflict") {
		t.Fatalf("check passing while a connection holds the key: %+v", st)
	}
	if ups, err := e.agent.Instances(ctxT(t), "db"); err != nil || len(ups) != 1 || ups[0].Attrs["by"] != "conn" {
		t.Fatalf("store: %+v %v", ups, err)
	}
	conn.Close()
	e.step(1) // the write is owed: retried after this probe
	if st := e.status("db", addr); !st.Stored || st.StoreError != "" {
		t.Fatalf("after the connection left: %+v", st)
	}
	if ups, err := e.agent.Instances(ctxT(t), "db"); err != nil || len(ups) != 1 || ups[0].Attrs["by"] != "check" {
		t.Fatalf("store: %+v %v", ups, err)
	}
}
