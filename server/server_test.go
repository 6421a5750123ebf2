package server_test

import (
	"context"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/flynn/discoverd/agent"
	"github.com/flynn/discoverd/api"
	"github.com/flynn/discoverd/backend/etcd"
	"github.com/flynn/discoverd/backend/etcd/embedded"
	"github.com/flynn/discoverd/backend/etcd/etcdtest"
	"github.com/flynn/discoverd/rpc"
	"github.com/flynn/discoverd/server"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// waitTimeout bounds every wait for an event that must happen.
const waitTimeout = 10 * time.Second

// env is one agent with its front ends, served on a real listener, on a
// real etcd.
type env struct {
	etcd      *embedded.Server // nil when the env shares another's etcd
	endpoints []string
	agent     *agent.Agent
	srv       *server.Server
	http      *httptest.Server
	addr      string // host:port of the listener
	url       string // http://host:port
}

type envConfig struct {
	ttl              time.Duration
	subscriberBuffer int // agent.Config.SubscriberBuffer
	opts             server.Options
	endpoints        []string // nil: a new embedded etcd
}

// newEnv starts an etcd (unless cfg.endpoints is set), a backend, an agent
// and a Server on 127.0.0.1:0; t.Cleanup stops them in reverse order.
func newEnv(t testing.TB, cfg envConfig) *env {
	t.Helper()
	if cfg.ttl == 0 {
		cfg.ttl = 30 * time.Second // longer than any wait: nothing expires by accident
	}
	eps := cfg.endpoints
	var embedded *embedded.Server
	if eps == nil {
		embedded = etcdtest.NewServer(t)
		eps = embedded.Endpoints()
	}
	log := testLogger(t)
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	b, err := etcd.Open(ctx, etcd.Config{Endpoints: eps, TTL: cfg.ttl, Logger: log})
	if err != nil {
		t.Fatalf("etcd.Open: %v", err)
	}
	t.Cleanup(func() { b.Close() })
	a, err := agent.New(agent.Config{
		Backend: b, TTL: cfg.ttl, ExternalIP: "10.9.9.9", SubscriberBuffer: cfg.subscriberBuffer, Logger: log,
	})
	if err != nil {
		t.Fatalf("agent.New: %v", err)
	}
	t.Cleanup(func() { a.Close() })
	if cfg.opts.Logger == nil {
		cfg.opts.Logger = log
	}
	if cfg.opts.Services == nil {
		cfg.opts.Services = b // as main wires it
	}
	srv, err := server.New(a, cfg.opts)
	if err != nil {
		t.Fatalf("server.New: %v", err)
	}
	hs := httptest.NewServer(srv)
	t.Cleanup(hs.Close)
	t.Cleanup(func() {
		if err := srv.Close(); err != nil {
			t.Errorf("server Close: %v", err)
		}
	})
	return &env{etcd: embedded, endpoints: eps, agent: a, srv: srv, http: hs, addr: hs.Listener.Addr().String(), url: hs.URL}
}

func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(tbWriter{t}, &slog.HandlerOptions{Level: slog.LevelWarn}))
}

// tbWriter sends log lines to t.Log.
type tbWriter struct{ t testing.TB }

func (w tbWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

func mustDial(t testing.TB, addr string) *rpc.Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	c, err := rpc.Dial(ctx, addr, rpc.Gob)
	if err != nil {
		t.Fatalf("rpc.Dial %s: %v", addr, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func callCtx(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	t.Cleanup(cancel)
	return ctx
}

func mustRegister(t testing.TB, c *rpc.Client, name, addr string, attrs map[string]string) string {
	t.Helper()
	var got string
	if err := c.Call(callCtx(t), api.MethodRegister, &api.Args{Name: name, Addr: addr, Attrs: attrs}, &got); err != nil {
		t.Fatalf("Register %s %s: %v", name, addr, err)
	}
	return got
}

// stream is an RPC stream under test.
type stream struct {
	t    testing.TB
	ch   chan *api.ServiceUpdate
	call *rpc.StreamCall
}

func mustStream(t testing.TB, c *rpc.Client, method, name string) *stream {
	t.Helper()
	ch := make(chan *api.ServiceUpdate, 64)
	sc, err := c.Stream(context.Background(), method, &api.Args{Name: name}, ch)
	if err != nil {
		t.Fatalf("%s %s: %v", method, name, err)
	}
	s := &stream{t: t, ch: ch, call: sc}
	t.Cleanup(func() { sc.Close() })
	return s
}

// next returns the next update, failing the test if the stream ends or
// nothing arrives in time.
func (s *stream) next() api.ServiceUpdate {
	s.t.Helper()
	select {
	case u, ok := <-s.ch:
		if !ok {
			s.t.Fatalf("stream ended: %v", s.call.Err())
		}
		return *u
	case <-time.After(waitTimeout):
		s.t.Fatalf("no update within %v", waitTimeout)
	}
	panic("unreachable")
}

// end waits for the stream to end and returns its error.
func (s *stream) end() error {
	s.t.Helper()
	deadline := time.After(waitTimeout)
	for {
		select {
		case _, ok := <-s.ch:
			if !ok {
				return s.call.Err()
			}
		case <-deadline:
			s.t.Fatalf("stream did not end within %v", waitTimeout)
		}
	}
}

// codeOf returns the api code of an error received over the wire.
func codeOf(err error) api.Code {
	if err == nil {
		return ""
	}
	return api.ErrorCode(api.ParseError(err.Error()))
}

func TestRPCRegisterSubscribeUnregister(t *testing.T) {
	e := newEnv(t, envConfig{})
	c := mustDial(t, e.addr)

	if got := mustRegister(t, c, "web", "10.0.0.1:80", map[string]string{"v": "1"}); got != "10.0.0.1:80" {
		t.Fatalf("Register returned %q, want the address", got)
	}
	t.Run("expands :port", func(t *testing.T) {
		if got := mustRegister(t, c, "expand", ":8080", nil); got != "10.9.9.9:8080" {
			t.Fatalf("Register :8080 returned %q, want 10.9.9.9:8080", got)
		}
		// Heartbeat and Unregister accept the short form too.
		if err := c.Call(callCtx(t), api.MethodHeartbeat, &api.Args{Name: "expand", Addr: ":8080"}, &struct{}{}); err != nil {
			t.Fatalf("Heartbeat :8080: %v", err)
		}
		if err := c.Call(callCtx(t), api.MethodUnregister, &api.Args{Name: "expand", Addr: ":8080"}, &struct{}{}); err != nil {
			t.Fatalf("Unregister :8080: %v", err)
		}
	})

	sub := mustStream(t, mustDial(t, e.addr), api.MethodSubscribe, "web")
	u := sub.next()
	if u.Name != "web" || u.Addr != "10.0.0.1:80" || !u.Online || u.Attrs["v"] != "1" || u.Created == 0 {
		t.Fatalf("snapshot update = %+v", u)
	}
	created := u.Created
	if u := sub.next(); !u.IsSentinel() {
		t.Fatalf("after the snapshot got %+v, want the sentinel", u)
	}

	mustRegister(t, c, "web", "10.0.0.2:80", nil)
	if u := sub.next(); u.Addr != "10.0.0.2:80" || !u.Online || u.Created <= created {
		t.Fatalf("live update = %+v, want 10.0.0.2:80 online with a later Created", u)
	}

	// Re-registering with new attributes keeps Created and sends one update.
	mustRegister(t, c, "web", "10.0.0.1:80", map[string]string{"v": "2"})
	if u := sub.next(); u.Addr != "10.0.0.1:80" || u.Attrs["v"] != "2" || u.Created != created {
		t.Fatalf("attr update = %+v, want v=2 and Created %d", u, created)
	}

	if err := c.Call(callCtx(t), api.MethodHeartbeat, &api.Args{Name: "web", Addr: "10.0.0.1:80"}, &struct{}{}); err != nil {
		t.Fatalf("Heartbeat: %v", err)
	}
	err := c.Call(callCtx(t), api.MethodHeartbeat, &api.Args{Name: "web", Addr: "10.0.0.3:80"}, &struct{}{})
	if codeOf(err) != api.CodeNotFound {
		t.Fatalf("Heartbeat of an unknown registration: %v, want not_found", err)
	}

	if err := c.Call(callCtx(t), api.MethodUnregister, &api.Args{Name: "web", Addr: "10.0.0.2:80"}, &struct{}{}); err != nil {
		t.Fatalf("Unregister: %v", err)
	}
	if u := sub.next(); u.Addr != "10.0.0.2:80" || u.Online {
		t.Fatalf("after Unregister got %+v, want 10.0.0.2:80 offline", u)
	}
	err = c.Call(callCtx(t), api.MethodUnregister, &api.Args{Name: "web", Addr: "10.0.0.2:80"}, &struct{}{})
	if codeOf(err) != api.CodeNotFound {
		t.Fatalf("second Unregister: %v, want not_found", err)
	}

	// Closing the stream ends it cleanly (EOS).
	sub.call.Close()
	if err := sub.end(); err != nil {
		t.Fatalf("stream closed by the client ended with %v, want nil", err)
	}
}

// TestRPCJSONCodec: the same methods over rpcplus's JSON flavour.
func TestRPCJSONCodec(t *testing.T) {
	e := newEnv(t, envConfig{})
	c, err := rpc.Dial(callCtx(t), e.addr, rpc.JSON)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	sub := mustStream(t, c, api.MethodSubscribe, "web")
	if u := sub.next(); !u.IsSentinel() {
		t.Fatalf("snapshot of an empty service: %+v", u)
	}
	if got := mustRegister(t, c, "web", "10.0.0.1:80", map[string]string{"k": "v"}); got != "10.0.0.1:80" {
		t.Fatalf("Register = %q", got)
	}
	if u := sub.next(); u.Addr != "10.0.0.1:80" || u.Attrs["k"] != "v" || !u.Online {
		t.Fatalf("update %+v", u)
	}
	err = c.Call(callCtx(t), api.MethodHeartbeat, &api.Args{Name: "web", Addr: "10.0.0.2:80"}, &struct{}{})
	if codeOf(err) != api.CodeNotFound {
		t.Fatalf("Heartbeat of an unknown registration: %v", err)
	}
}

func TestRPCLeader(t *testing.T) {
	e := newEnv(t, envConfig{})
	c := mustDial(t, e.addr)
	ls := mustStream(t, mustDial(t, e.addr), api.MethodLeader, "db")
	if u := ls.next(); !u.IsSentinel() {
		t.Fatalf("leader of an empty service = %+v, want the empty update", u)
	}
	mustRegister(t, c, "db", "10.0.0.1:5432", nil)
	first := ls.next()
	if first.Addr != "10.0.0.1:5432" {
		t.Fatalf("leader = %+v, want 10.0.0.1:5432", first)
	}
	mustRegister(t, c, "db", "10.0.0.2:5432", nil) // younger: not the leader
	if err := c.Call(callCtx(t), api.MethodUnregister, &api.Args{Name: "db", Addr: "10.0.0.1:5432"}, &struct{}{}); err != nil {
		t.Fatalf("Unregister: %v", err)
	}
	if u := ls.next(); u.Addr != "10.0.0.2:5432" || u.Created <= first.Created {
		t.Fatalf("leader after the first left = %+v, want 10.0.0.2:5432", u)
	}
}

func TestRPCErrorsCarryCodes(t *testing.T) {
	e := newEnv(t, envConfig{})
	c := mustDial(t, e.addr)
	tooMany := make(map[string]string)
	for i := range api.MaxAttrs + 1 {
		tooMany[strings.Repeat("k", i+1)] = "v"
	}
	for _, tc := range []struct {
		name string
		args api.Args
	}{
		{"empty name", api.Args{Addr: "10.0.0.1:80"}},
		{"bad name", api.Args{Name: "-web", Addr: "10.0.0.1:80"}},
		{"long name", api.Args{Name: strings.Repeat("a", api.MaxNameLen+1), Addr: "10.0.0.1:80"}},
		{"name with a slash", api.Args{Name: "we/b", Addr: "10.0.0.1:80"}},
		{"empty addr", api.Args{Name: "web"}},
		{"bad addr", api.Args{Name: "web", Addr: "nope"}},
		{"no port", api.Args{Name: "web", Addr: "10.0.0.1"}},
		{"port 0", api.Args{Name: "web", Addr: "10.0.0.1:0"}},
		{"port too big", api.Args{Name: "web", Addr: "10.0.0.1:65536"}},
		{"port only, 0", api.Args{Name: "web", Addr: ":0"}},
		{"long addr", api.Args{Name: "web", Addr: strings.Repeat("a", api.MaxAddrLen) + ":80"}},
		{"too many attrs", api.Args{Name: "web", Addr: "10.0.0.1:80", Attrs: tooMany}},
		{"value too long", api.Args{Name: "web", Addr: "10.0.0.1:80", Attrs: map[string]string{"k": strings.Repeat("v", api.MaxAttrValueLen+1)}}},
		{"key too long", api.Args{Name: "web", Addr: "10.0.0.1:80", Attrs: map[string]string{strings.Repeat("k", api.MaxAttrKeyLen+1): ""}}},
		{"empty key", api.Args{Name: "web", Addr: "10.0.0.1:80", Attrs: map[string]string{"": "v"}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var addr string
			err := c.Call(callCtx(t), api.MethodRegister, &tc.args, &addr)
			if codeOf(err) != api.CodeInvalidArgument {
				t.Fatalf("Register(%+v) = %v, want invalid_argument", tc.args.Name, err)
			}
			if tc.args.Attrs != nil {
				return // Heartbeat and Unregister take no attributes
			}
			for _, m := range []string{api.MethodHeartbeat, api.MethodUnregister} {
				if err := c.Call(callCtx(t), m, &tc.args, &struct{}{}); codeOf(err) != api.CodeInvalidArgument {
					t.Fatalf("%s(%+v) = %v, want invalid_argument", m, tc.args.Name, err)
				}
			}
		})
	}
	for _, m := range []string{api.MethodSubscribe, api.MethodLeader} {
		t.Run("bad name on "+m, func(t *testing.T) {
			s := mustStream(t, c, m, "bad/name")
			if err := s.end(); codeOf(err) != api.CodeInvalidArgument {
				t.Fatalf("%s(bad/name) ended with %v, want invalid_argument", m, err)
			}
		})
	}
	// The connection survives all of it.
	mustRegister(t, c, "web", "10.0.0.1:80", nil)
}

// TestConnectionCloseUnregisters: registrations belong to their
// connection; a subscriber on another agent sees them go offline when it
// closes, long before the TTL.
func TestConnectionCloseUnregisters(t *testing.T) {
	e1 := newEnv(t, envConfig{ttl: time.Minute})
	e2 := newEnv(t, envConfig{ttl: time.Minute, endpoints: e1.endpoints})

	sub := mustStream(t, mustDial(t, e2.addr), api.MethodSubscribe, "web")
	if u := sub.next(); !u.IsSentinel() {
		t.Fatalf("snapshot of an empty service: %+v", u)
	}
	c := mustDial(t, e1.addr)
	mustRegister(t, c, "web", "10.0.0.1:80", nil)
	mustRegister(t, c, "web", "10.0.0.2:80", nil)
	for range 2 {
		if u := sub.next(); !u.Online {
			t.Fatalf("want online updates, got %+v", u)
		}
	}
	c.Close()
	gone := map[string]bool{}
	for range 2 {
		u := sub.next() // waitTimeout (10 s) is far below the TTL (1 min)
		if u.Online {
			t.Fatalf("after the connection closed got %+v, want offline", u)
		}
		gone[u.Addr] = true
	}
	if !gone["10.0.0.1:80"] || !gone["10.0.0.2:80"] {
		t.Fatalf("offline: %v, want both", gone)
	}
}

func TestStreamCapPerConnection(t *testing.T) {
	e := newEnv(t, envConfig{opts: server.Options{MaxStreamsPerConn: 2}})
	c := mustDial(t, e.addr)
	s1 := mustStream(t, c, api.MethodSubscribe, "a")
	s2 := mustStream(t, c, api.MethodLeader, "b")
	s1.next() // both are running: they hold their slots
	s2.next()

	s3 := mustStream(t, c, api.MethodSubscribe, "c")
	if err := s3.end(); codeOf(err) != api.CodeResourceExhausted {
		t.Fatalf("third stream ended with %v, want resource_exhausted", err)
	}
	// Another connection has its own slots.
	other := mustStream(t, mustDial(t, e.addr), api.MethodSubscribe, "c")
	other.next()

	// A closed stream gives its slot back. The rpc layer releases it once
	// the stream's end is written, before the client can see that end.
	s1.call.Close()
	if err := s1.end(); err != nil {
		t.Fatalf("s1 ended with %v", err)
	}
	s4 := mustStream(t, c, api.MethodSubscribe, "d")
	if u := s4.next(); !u.IsSentinel() {
		t.Fatalf("stream after a slot was freed: %+v", u)
	}
}

// TestServerCloseEndsStreams: Close ends RPC streams and connections; later
// upgrades fail.
func TestServerCloseEndsStreams(t *testing.T) {
	e := newEnv(t, envConfig{})
	c := mustDial(t, e.addr)
	s := mustStream(t, c, api.MethodSubscribe, "web")
	s.next()
	if err := e.srv.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	s.end() // any end: the connection is gone
	select {
	case <-c.Done():
	case <-time.After(waitTimeout):
		t.Fatal("client connection still open after server Close")
	}
	// The upgrade itself is refused (503), so no call can be made.
	if c2, err := rpc.Dial(callCtx(t), e.addr, rpc.Gob); err == nil {
		c2.Close()
		t.Fatal("rpc.Dial after server Close succeeded")
	} else if !strings.Contains(err.Error(), "503") {
		t.Errorf("rpc.Dial after server Close: %v, want the upgrade refused with 503", err)
	}
	// New SSE streams are refused.
	resp := mustDo(t, sseRequest(t, e.url+"/services/web"))
	wantError(t, resp, http.StatusServiceUnavailable, api.CodeUnavailable)
}
