package dialer_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/flynn/discoverd/api"
	discoverd "github.com/flynn/discoverd/client"
	"github.com/flynn/discoverd/client/dialer"
	"github.com/flynn/discoverd/client/internal/agenttest"
)

// The tests and the example run against one real agent (see agenttest),
// each test with service names of its own.
func TestMain(m *testing.M) { os.Exit(agenttest.Main(m)) }

// newClient connects a client to the agent (DISCOVERD); t.Cleanup closes it.
func newClient(t testing.TB) *discoverd.Client {
	t.Helper()
	c, err := discoverd.NewClientWithConfig(discoverd.Config{
		Addr:       os.Getenv("DISCOVERD"),
		MinBackoff: 10 * time.Millisecond,
		MaxBackoff: 100 * time.Millisecond,
	})
	if err != nil {
		t.Fatalf("client: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// serviceName returns a service name unique to the test.
func serviceName(t testing.TB, suffix string) string {
	n := strings.NewReplacer("/", "-", "_", "-").Replace(t.Name())
	return strings.ToLower(n) + "-" + suffix
}

func TestDialer(t *testing.T) {
	c := newClient(t)
	name := serviceName(t, "api")

	// Two real HTTP instances of the service, each answering its name.
	for _, id := range []string{"a", "b"} {
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			fmt.Fprint(w, id)
		}))
		t.Cleanup(srv.Close)
		if err := c.Register(name, srv.Listener.Addr().String()); err != nil {
			t.Fatal(err)
		}
	}

	t.Run("http client resolves service names", func(t *testing.T) {
		hc := dialer.NewHTTPClient(c)
		defer hc.CloseIdleConnections()
		seen := map[string]bool{}
		for range 20 {
			// Fresh connections so that both instances get picked.
			req, _ := http.NewRequest("GET", "http://"+name+"/", nil)
			req.Close = true
			resp, err := hc.Do(req)
			if err != nil {
				t.Fatalf("GET: %v", err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			seen[string(body)] = true
		}
		if !seen["a"] || !seen["b"] {
			t.Fatalf("instances reached: %v, want both", seen)
		}
	})

	d := dialer.New(c, nil)
	defer d.Close()
	t.Run("name:port ignores the port", func(t *testing.T) {
		conn, err := d.Dial("tcp", name+":1")
		if err != nil {
			t.Fatal(err)
		}
		conn.Close()
	})
	t.Run("IP literals are dialled as is", func(t *testing.T) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		conn, err := d.DialContext(context.Background(), "tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		conn.Close()
	})
	t.Run("no instances", func(t *testing.T) {
		if _, err := d.Dial("tcp", serviceName(t, "none")); !errors.Is(err, dialer.ErrNoInstances) {
			t.Fatalf("Dial = %v, want ErrNoInstances", err)
		}
	})
	t.Run("custom dial function", func(t *testing.T) {
		var dialled string
		d := dialer.New(c, func(network, addr string) (net.Conn, error) {
			dialled = addr
			return net.Dial(network, addr)
		})
		defer d.Close()
		conn, err := d.Dial("tcp", name)
		if err != nil {
			t.Fatal(err)
		}
		conn.Close()
		if host, _, _ := net.SplitHostPort(dialled); host != "127.0.0.1" {
			t.Fatalf("dialled %q", dialled)
		}
	})
	d.Close()
	if _, err := d.Dial("tcp", name); err == nil {
		t.Fatal("Dial after Close succeeded")
	}
}

// TestDialerBoundsItsStreams: a Dialer holds at most MaxCachedNames of its
// client's streams, and none for names without instances, so that the
// application can still open ServiceSets of its own however many names it
// dials.
func TestDialerBoundsItsStreams(t *testing.T) {
	// More names than the agent's cap of streams per connection (its
	// default: the agent runs with default options).
	const streams = api.DefaultMaxStreamsPerConn
	c := newClient(t)
	d := dialer.New(c, func(network, addr string) (net.Conn, error) {
		conn, peer := net.Pipe()
		peer.Close()
		return conn, nil
	})
	defer d.Close()
	names := streams + 32

	t.Run("names without instances", func(t *testing.T) {
		for i := range names {
			if _, err := d.Dial("tcp", serviceName(t, strconv.Itoa(i))); !errors.Is(err, dialer.ErrNoInstances) {
				t.Fatalf("Dial #%d = %v, want ErrNoInstances", i, err)
			}
		}
		set, err := c.NewServiceSet(serviceName(t, "mine"))
		if err != nil {
			t.Fatalf("NewServiceSet after the dials = %v", err)
		}
		set.Close()
	})
	t.Run("names with instances", func(t *testing.T) {
		for i := range names {
			name := serviceName(t, strconv.Itoa(i))
			if err := c.Register(name, "127.0.0.1:9400"); err != nil {
				t.Fatal(err)
			}
			conn, err := d.Dial("tcp", name)
			if err != nil {
				t.Fatalf("Dial #%d = %v", i, err)
			}
			conn.Close()
		}
		set, err := c.NewServiceSet(serviceName(t, "mine"))
		if err != nil {
			t.Fatalf("NewServiceSet after the dials = %v", err)
		}
		set.Close()
	})
}
