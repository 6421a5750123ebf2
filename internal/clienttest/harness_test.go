package discoverd_test

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/flynn/discoverd/agent"
	"github.com/flynn/discoverd/backend/etcd"
	"github.com/flynn/discoverd/backend/etcd/embedded"
	discoverd "github.com/flynn/discoverd/client"
	"github.com/flynn/discoverd/server"
)

// wait bounds every wait: a wait that ends by timeout is a failure.
const wait = 15 * time.Second

// store is the embedded etcd shared by the package's tests; each test
// runs its own agent (its own lease) on it and uses its own service names.
var store *embedded.Server

func TestMain(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) int {
	dir, err := os.MkdirTemp("", "discoverd-client-test")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	store, err = embedded.Start(ctx, embedded.Config{Dir: dir, Logger: quiet()})
	cancel()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	code := m.Run()
	store.Close()
	if code == 0 {
		if err := goleak.Find(); err != nil {
			fmt.Fprintln(os.Stderr, "goleak:", err)
			return 1
		}
	}
	return code
}

func quiet() *slog.Logger {
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

// testAgent is a real agent (etcd backend, agent core, RPC/HTTP front end)
// serving on a loopback port; stop and start restart its front end on the
// same address, as an agent restart looks to a client.
type testAgent struct {
	Addr  string
	Agent *agent.Agent
	b     *etcd.Backend

	opts server.Options // Logger is set by start
	srv  *server.Server
	hs   *http.Server
	done chan struct{}
}

const agentTTL = 2 * time.Second

// newAgent starts an agent on a free loopback port, its front end
// configured by opts (at most one). The caller must close it.
func newAgent(opts ...server.Options) (*testAgent, error) {
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	b, err := etcd.Open(ctx, etcd.Config{Endpoints: store.Endpoints(), TTL: agentTTL, Logger: quiet()})
	if err != nil {
		return nil, fmt.Errorf("open backend: %w", err)
	}
	a, err := agent.New(agent.Config{Backend: b, TTL: agentTTL, ExternalIP: "127.0.0.2", Logger: quiet()})
	if err != nil {
		b.Close()
		return nil, fmt.Errorf("agent: %w", err)
	}
	ta := &testAgent{Agent: a, b: b, Addr: "127.0.0.1:0"}
	if len(opts) > 0 {
		ta.opts = opts[0]
	}
	if err := ta.start(); err != nil {
		ta.close()
		return nil, err
	}
	return ta, nil
}

// startAgent is newAgent for a test; t.Cleanup closes the agent.
func startAgent(t testing.TB, opts ...server.Options) *testAgent {
	t.Helper()
	ta, err := newAgent(opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ta.close)
	return ta
}

func (ta *testAgent) close() {
	ta.stop()
	ta.Agent.Close()
	ta.b.Close()
}

// start serves the agent on ta.Addr (a free port the first time).
func (ta *testAgent) start() error {
	ln, err := net.Listen("tcp", ta.Addr)
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	ta.Addr = ln.Addr().String()
	opts := ta.opts
	opts.Logger = quiet()
	srv, err := server.New(ta.Agent, opts)
	if err != nil {
		ln.Close()
		return fmt.Errorf("server: %w", err)
	}
	ta.srv, ta.hs, ta.done = srv, &http.Server{Handler: srv}, make(chan struct{})
	go func(hs *http.Server, done chan struct{}) {
		defer close(done)
		hs.Serve(ln)
	}(ta.hs, ta.done)
	return nil
}

// stop closes the front end: every client connection is cut (and its
// registrations withdrawn) and the port stops accepting.
func (ta *testAgent) stop() {
	if ta.srv == nil {
		return
	}
	ta.srv.Close()
	ta.hs.Close()
	<-ta.done
	ta.srv = nil
}

// newClient connects a client to ta with a short heartbeat interval and
// reconnection backoff; t.Cleanup closes it.
func newClient(t testing.TB, ta *testAgent, mod ...func(*discoverd.Config)) *discoverd.Client {
	t.Helper()
	cfg := discoverd.Config{
		Addr:              ta.Addr,
		HeartbeatInterval: agentTTL / 4,
		MinBackoff:        10 * time.Millisecond,
		MaxBackoff:        100 * time.Millisecond,
		Logger:            quiet(),
	}
	for _, f := range mod {
		f(&cfg)
	}
	c, err := discoverd.NewClientWithConfig(cfg)
	if err != nil {
		t.Fatalf("client: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// recv receives one value from ch within wait.
func recv[T any](t testing.TB, ch <-chan T, what string) T {
	t.Helper()
	select {
	case v, ok := <-ch:
		if !ok {
			t.Fatalf("%s: channel closed", what)
		}
		return v
	case <-time.After(wait):
		t.Fatalf("%s: nothing within %v", what, wait)
	}
	var zero T
	return zero
}

// noRecv asserts that nothing arrives on ch for a short while (used only
// to check that something does NOT happen, never to wait for an event).
func noRecv[T any](t testing.TB, ch <-chan T, d time.Duration, what string) {
	t.Helper()
	select {
	case v, ok := <-ch:
		t.Fatalf("%s: unexpected %v (open %v)", what, v, ok)
	case <-time.After(d):
	}
}

// waitUpdate reads updates from ch until one satisfies ok.
func waitUpdate(t testing.TB, ch chan *discoverd.ServiceUpdate, what string, ok func(*discoverd.ServiceUpdate) bool) *discoverd.ServiceUpdate {
	t.Helper()
	deadline := time.After(wait)
	for {
		select {
		case u, open := <-ch:
			if !open {
				t.Fatalf("%s: watch channel closed", what)
			}
			if ok(u) {
				return u
			}
		case <-deadline:
			t.Fatalf("%s: no matching update within %v", what, wait)
		}
	}
}

func online(addr string) func(*discoverd.ServiceUpdate) bool {
	return func(u *discoverd.ServiceUpdate) bool { return u.Online && u.Addr == addr }
}

func offline(addr string) func(*discoverd.ServiceUpdate) bool {
	return func(u *discoverd.ServiceUpdate) bool { return !u.Online && u.Addr == addr }
}
