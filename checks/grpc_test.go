package checks_test

import (
	"net"
	"strings"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/flynn/discoverd/api"
)

// TestGRPCCheck: a real gRPC server's standard health service decides
// the state, for the server as a whole and for one service.
func TestGRPCCheck(t *testing.T) {
	e := newEnv(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer()
	hs := health.NewServer()
	healthpb.RegisterHealthServer(gs, hs)
	done := make(chan struct{})
	go func() { defer close(done); gs.Serve(ln) }()
	defer func() { gs.Stop(); <-done }()
	addr := ln.Addr().String()
	hs.SetServingStatus("pkg.DB", healthpb.HealthCheckResponse_NOT_SERVING)

	e.add(api.Args{Name: "grpc", Addr: addr, Check: &api.Check{GRPC: addr, Rise: 1, Fall: 1}})
	e.add(api.Args{Name: "grpcsvc", Addr: addr, Check: &api.Check{GRPC: addr + "/pkg.DB", Rise: 1, Fall: 1}})
	e.step(2)
	if st := e.status("grpc", addr); st.State != api.CheckOnline {
		t.Fatalf("server SERVING: %+v", st)
	}
	if st := e.status("grpcsvc", addr); st.State != api.CheckOffline || !strings.Contains(st.LastError, "NOT_SERVING") {
		t.Fatalf("service NOT_SERVING: %+v", st)
	}
	hs.SetServingStatus("pkg.DB", healthpb.HealthCheckResponse_SERVING)
	hs.SetServingStatus("", healthpb.HealthCheckResponse_NOT_SERVING)
	e.step(2)
	if st := e.status("grpcsvc", addr); st.State != api.CheckOnline {
		t.Fatalf("service SERVING: %+v", st)
	}
	if st := e.status("grpc", addr); st.State != api.CheckOffline {
		t.Fatalf("server NOT_SERVING: %+v", st)
	}
	gs.Stop()
	<-done
	done = make(chan struct{})
	close(done)
	e.step(2)
	if st := e.status("grpcsvc", addr); st.State != api.CheckOffline || st.LastError == "" {
		t.Fatalf("server gone: %+v", st)
	}
	if h := e.m.Stats().Latency["grpc"]; h.Count != 6 {
		t.Fatalf("grpc latency observations: %d, want 6", h.Count)
	}
}
