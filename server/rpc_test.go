package server_test

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/flynn/discoverd/api"
	"github.com/flynn/discoverd/rpc"
	"github.com/flynn/discoverd/server"
)

// The RPC service "Agent" publishes exactly its five methods, by their
// go-discoverd names; the functions behind them are not reachable under
// other names.
func TestRPCServiceNames(t *testing.T) {
	e := newEnv(t, envConfig{})
	c := mustDial(t, e.addr)
	ctx := callCtx(t)
	mustRegister(t, c, "web", "10.0.0.1:80", nil)
	if err := c.Call(ctx, api.MethodHeartbeat, &api.Args{Name: "web", Addr: "10.0.0.1:80"}, &struct{}{}); err != nil {
		t.Errorf("%s: %v", api.MethodHeartbeat, err)
	}
	for _, m := range []string{api.MethodSubscribe, api.MethodLeader} {
		if u := mustStream(t, c, m, "web").next(); u.Addr != "10.0.0.1:80" {
			t.Errorf("%s: first update %+v", m, u)
		}
	}
	if err := c.Call(ctx, api.MethodUnregister, &api.Args{Name: "web", Addr: "10.0.0.1:80"}, &struct{}{}); err != nil {
		t.Errorf("%s: %v", api.MethodUnregister, err)
	}
	for _, m := range []string{"Agent.register", "Agent.subscribe", "Agent.leader", "Agent.Stream", "Agent.Pump", "Agent.OpenStream"} {
		err := c.Call(ctx, m, &api.Args{Name: "web"}, &struct{}{})
		var se rpc.ServerError
		if !errors.As(err, &se) || !strings.Contains(err.Error(), "can't find method") {
			t.Errorf("Call(%s) = %v, want the unknown-method error", m, err)
		}
	}
	mustRegister(t, c, "web", "10.0.0.1:80", nil) // the connection lives on
}

// New refuses an RPC server on which one of the service's names is taken.
func TestNewWithTakenRPCName(t *testing.T) {
	e := newEnv(t, envConfig{})
	rs := rpc.NewServer()
	err := rpc.RegisterStream(rs, api.MethodLeader, func(ctx context.Context, args *api.Args, st rpc.Stream) error { return nil })
	if err != nil {
		t.Fatal(err)
	}
	if s, err := server.New(e.agent, server.Options{RPC: rs, Logger: testLogger(t)}); err == nil {
		s.Close()
		t.Fatal("New accepted an RPC server that already has Agent.Leader")
	}
}

// A stream that fails to open gives its slot back at once, and an open
// stream is counted in discoverd_rpc_streams until its handler returns.
func TestRPCStreamSlotsAndGauge(t *testing.T) {
	e := newEnv(t, envConfig{opts: server.Options{MaxStreamsPerConn: 1}})
	c := mustDial(t, e.addr)
	for range 2 {
		bad := mustStream(t, c, api.MethodSubscribe, "bad/name")
		if err := bad.end(); codeOf(err) != api.CodeInvalidArgument {
			t.Fatalf("Subscribe(bad/name) ended with %v, want invalid_argument", err)
		}
	}
	if v := scrape(t, e.url, "discoverd_rpc_streams"); v != 0 {
		t.Errorf("discoverd_rpc_streams = %v after streams that failed to open, want 0", v)
	}
	s := mustStream(t, c, api.MethodLeader, "web")
	if u := s.next(); !u.IsSentinel() {
		t.Fatalf("Leader(web) first update %+v, want the empty one", u)
	}
	if v := scrape(t, e.url, "discoverd_rpc_streams"); v != 1 {
		t.Errorf("discoverd_rpc_streams = %v with one stream open, want 1", v)
	}
	s.call.Close()
	if err := s.end(); err != nil {
		t.Fatalf("Leader ended with %v after Close, want EOS", err)
	}
	// The handler returned before the stream's end was written.
	if v := scrape(t, e.url, "discoverd_rpc_streams"); v != 0 {
		t.Errorf("discoverd_rpc_streams = %v after the stream ended, want 0", v)
	}
	if u := mustStream(t, c, api.MethodSubscribe, "web").next(); !u.IsSentinel() {
		t.Errorf("Subscribe(web) after the slot was freed: %+v", u)
	}
}
