package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/flynn/discoverd/api"
	"github.com/flynn/discoverd/backend"
	"github.com/flynn/discoverd/backend/etcd"
	"github.com/flynn/discoverd/backend/etcd/etcdtest"
	"github.com/flynn/discoverd/rpc"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	if os.Getenv(agentChildEnv) != "" {
		runAgentChild() // the test binary as a real agent process; see startAgent
		return
	}
	goleak.VerifyTestMain(m)
}

const waitTimeout = 10 * time.Second

// testMain returns a Main on 127.0.0.1:0 with an embedded etcd on free
// ports in a temporary directory.
func testMain(t *testing.T) *Main {
	t.Helper()
	m := NewMain()
	m.Bind = "127.0.0.1:0"
	m.DataDir = filepath.Join(t.TempDir(), "etcd")
	m.EtcdClientAddr, m.EtcdPeerAddr = "", ""
	m.TTL = time.Minute // longer than any wait: what vanishes did not expire
	m.DNS = ""          // tests that run several agents cannot share -dns's default port
	m.Logger = slog.New(slog.NewTextHandler(tbWriter{t}, &slog.HandlerOptions{Level: slog.LevelWarn}))
	return m
}

type tbWriter struct{ t testing.TB }

func (w tbWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

func mustStart(t *testing.T, m *Main) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*waitTimeout)
	defer cancel()
	if err := m.Start(ctx); err != nil {
		t.Fatalf("Start: %v", err)
	}
	t.Cleanup(func() { m.Close() })
}

func mustRegister(t *testing.T, addr string) *rpc.Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	c := mustRPC(t, addr)
	var got string
	if err := c.Call(ctx, api.MethodRegister, &api.Args{Name: "web", Addr: "10.0.0.1:80"}, &got); err != nil {
		t.Fatalf("Register: %v", err)
	}
	return c
}

func TestEmbeddedAgentServes(t *testing.T) {
	m := testMain(t)
	mustStart(t, m)
	base := "http://" + m.Addr().String()

	// Lists come from the agent's watch cache, a moment behind the store:
	// wait for the registration on a stream before listing.
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	watcher, err := rpc.Dial(ctx, m.Addr().String(), rpc.Gob)
	if err != nil {
		t.Fatal(err)
	}
	defer watcher.Close()
	updates := make(chan *api.ServiceUpdate, 4)
	sc, err := watcher.Stream(ctx, api.MethodSubscribe, &api.Args{Name: "web"}, updates)
	if err != nil {
		t.Fatal(err)
	}
	defer sc.Close()
	next := func() *api.ServiceUpdate {
		t.Helper()
		select {
		case u, ok := <-updates:
			if !ok {
				t.Fatalf("stream ended: %v", sc.Err())
			}
			return u
		case <-ctx.Done():
			t.Fatal("no update in time")
		}
		panic("unreachable")
	}
	if u := next(); !u.IsSentinel() {
		t.Fatalf("first update %+v, want the sentinel", u)
	}
	mustRegister(t, m.Addr().String())
	if u := next(); u.Addr != "10.0.0.1:80" || !u.Online {
		t.Fatalf("update %+v, want the registration", u)
	}

	resp, err := http.Get(base + "/services/web")
	if err != nil {
		t.Fatal(err)
	}
	var list []struct{ Addr string }
	err = json.NewDecoder(resp.Body).Decode(&list)
	resp.Body.Close()
	if err != nil || len(list) != 1 || list[0].Addr != "10.0.0.1:80" {
		t.Fatalf("GET /services/web: %+v, %v", list, err)
	}
	resp, err = http.Get(base + "/health")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("/health: %d", resp.StatusCode)
	}

	if err := m.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if c, err := net.DialTimeout("tcp", m.Addr().String(), waitTimeout); err == nil {
		c.Close()
		t.Fatal("listener still open after Close")
	}
}

// TestCloseRemovesRegistrationsAtOnce: a graceful stop revokes the agent's
// lease, so an observer on the same etcd sees its registrations deleted
// long before the TTL.
func TestCloseRemovesRegistrationsAtOnce(t *testing.T) {
	eps := etcdtest.NewServer(t).Endpoints()
	m := testMain(t)
	m.Etcd = eps
	mustStart(t, m)

	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	observer, err := etcd.Open(ctx, etcd.Config{Endpoints: eps, TTL: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	defer observer.Close()
	s, err := observer.Subscribe(ctx, "web")
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	next := func() backend.Event {
		t.Helper()
		select {
		case ev, ok := <-s.Events():
			if !ok {
				t.Fatalf("observer stream ended: %v", s.Err())
			}
			return ev
		case <-time.After(waitTimeout): // far below the TTL (1 min)
			t.Fatalf("no event within %v", waitTimeout)
		}
		panic("unreachable")
	}
	if ev := next(); ev.Type != backend.Current {
		t.Fatalf("first event %+v, want current", ev)
	}
	mustRegister(t, m.Addr().String())
	if ev := next(); ev.Type != backend.Put || ev.Instance.Addr != "10.0.0.1:80" {
		t.Fatalf("event %+v, want the registration", ev)
	}
	if err := m.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if ev := next(); ev.Type != backend.Delete || ev.Instance.Addr != "10.0.0.1:80" {
		t.Fatalf("event %+v, want its deletion", ev)
	}
}

func TestStartErrors(t *testing.T) {
	t.Run("port in use", func(t *testing.T) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		m := testMain(t)
		m.Bind = ln.Addr().String()
		err = m.Start(context.Background())
		if err == nil || !strings.Contains(err.Error(), "address already in use") {
			t.Fatalf("Start on a taken port: %v", err)
		}
		if m.embedded != nil {
			t.Fatal("embedded etcd started although the listener failed")
		}
	})
	t.Run("store unreachable", func(t *testing.T) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		dead := ln.Addr().String()
		ln.Close() // nothing listens there now
		m := testMain(t)
		m.Etcd = []string{"http://" + dead}
		m.StoreTimeout = time.Second
		err = m.Start(context.Background())
		if err == nil || !strings.Contains(err.Error(), "etcd unreachable") {
			t.Fatalf("Start with etcd down: %v", err)
		}
		// Nothing is left bound.
		l2, err := net.Listen("tcp", m.ln.Addr().String())
		if err != nil {
			t.Fatalf("listener not released after a failed Start: %v", err)
		}
		l2.Close()
	})
}

func TestParseFlags(t *testing.T) {
	env := map[string]string{"HOME": "/home/u", "EXTERNAL_IP": "10.1.1.1"}
	getenv := func(k string) string { return env[k] }
	for _, tc := range []struct {
		name    string
		args    []string
		check   func(*Main) bool
		wantErr string
	}{
		{"defaults", nil, func(m *Main) bool {
			return m.Bind == "127.0.0.1:1111" && m.Etcd == nil && m.ZooKeeper == nil && m.TTL == 10*time.Second &&
				m.DataDir == "/home/u/.local/state/discoverd/etcd" && m.EtcdClientAddr == DefaultEtcdClientAddr &&
				m.EtcdPeerAddr == DefaultEtcdPeerAddr && m.ExternalIP == "10.1.1.1" && m.LogLevel == slog.LevelInfo &&
				m.StoreTimeout == DefaultStoreTimeout && m.MaxConns == 0 && m.RPCIdleTimeout == 5*time.Minute &&
				m.BodyTimeout == 10*time.Second && m.MaxHTTPRegistrationsPerAddr == 1000
		}, ""},
		{"limits", []string{"-max-conns", "500", "-rpc-idle-timeout", "0", "-http-body-timeout", "3s", "-http-registrations-per-addr", "7"}, func(m *Main) bool {
			return m.MaxConns == 500 && m.RPCIdleTimeout == 0 && m.BodyTimeout == 3*time.Second && m.MaxHTTPRegistrationsPerAddr == 7
		}, ""},
		{"negative max-conns", []string{"-max-conns", "-1"}, nil, "-max-conns"},
		{"zero body timeout", []string{"-http-body-timeout", "0s"}, nil, "-http-body-timeout"},
		{"zero per-addr cap", []string{"-http-registrations-per-addr", "0"}, nil, "-http-registrations-per-addr"},
		{"etcd list", []string{"-etcd", "http://a:2379, http://b:2379,"}, func(m *Main) bool {
			return reflect.DeepEqual(m.Etcd, []string{"http://a:2379", "http://b:2379"})
		}, ""},
		{"zookeeper", []string{"-zookeeper", "a:2181,b:2181", "-ttl", "5s", "-log-level", "DEBUG"}, func(m *Main) bool {
			return reflect.DeepEqual(m.ZooKeeper, []string{"a:2181", "b:2181"}) && m.TTL == 5*time.Second && m.LogLevel == slog.LevelDebug
		}, ""},
		{"external-ip overrides env", []string{"-external-ip", "10.2.2.2"}, func(m *Main) bool { return m.ExternalIP == "10.2.2.2" }, ""},
		{"both stores", []string{"-etcd", "http://a:2379", "-zookeeper", "a:2181"}, nil, "mutually exclusive"},
		{"unknown flag", []string{"-nope"}, nil, "not defined"},
		{"bad ttl", []string{"-ttl", "10"}, nil, "-ttl"},
		{"short ttl", []string{"-ttl", "100ms"}, nil, "at least 1s"},
		{"bad log level", []string{"-log-level", "loud"}, nil, "log-level"},
		{"bad external ip", []string{"-external-ip", "not an ip"}, nil, "external IP"},
		{"positional", []string{"serve"}, nil, "unknown command"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := NewMain()
			err := m.ParseFlags(tc.args, getenv, io.Discard)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("ParseFlags(%q) = %v, want an error with %q", tc.args, err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("ParseFlags(%q): %v", tc.args, err)
			}
			if !tc.check(m) {
				t.Fatalf("ParseFlags(%q) gave %+v", tc.args, m)
			}
		})
	}
	t.Run("help", func(t *testing.T) {
		var out bytes.Buffer
		if err := NewMain().ParseFlags([]string{"-h"}, getenv, &out); !errors.Is(err, flag.ErrHelp) {
			t.Fatalf("-h: %v", err)
		}
		if !strings.Contains(out.String(), "-etcd-client-addr") {
			t.Fatalf("usage does not list the flags:\n%s", out.String())
		}
	})
}

// TestRunExitCodes: run prints one line "discoverd: <reason>" and returns
// non-zero when the agent cannot start.
func TestRunExitCodes(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	for _, tc := range []struct {
		name string
		args []string
		code int
		want string
	}{
		{"bad flag", []string{"-nope"}, 2, "discoverd: flag provided but not defined: -nope\n"},
		{"both stores", []string{"-etcd", "http://a:1", "-zookeeper", "a:1"}, 2, "discoverd: -etcd and -zookeeper are mutually exclusive\n"},
		{"port in use", []string{"-bind", ln.Addr().String(), "-data-dir", t.TempDir()}, 1, "address already in use"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			code := run(context.Background(), tc.args, func(string) string { return "" }, &stdout, &stderr)
			if code != tc.code {
				t.Fatalf("exit code %d, want %d; stderr:\n%s", code, tc.code, stderr.String())
			}
			last := lastLine(stderr.String())
			if !strings.HasPrefix(last, "discoverd: ") || !strings.Contains(last+"\n", tc.want) {
				t.Fatalf("last stderr line %q, want one line with %q", last, tc.want)
			}
		})
	}
}

func lastLine(s string) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	return lines[len(lines)-1]
}

func TestConnBudget(t *testing.T) {
	for _, tc := range []struct {
		limit uint64
		want  int
	}{
		{64, minConns}, {256, 112}, {1024, 784}, {4096, 3472}, {16384, 14224}, {20000, maxDefaultConns}, {1 << 20, maxDefaultConns},
	} {
		if got := connBudget(tc.limit); got != tc.want {
			t.Errorf("connBudget(%d) = %d, want %d", tc.limit, got, tc.want)
		}
	}
}
