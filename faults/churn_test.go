package faults_test

import (
	"bytes"
	"encoding/gob"
	"fmt"
	"io"
	"net"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/flynn/discoverd/api"
	"github.com/flynn/discoverd/backend/etcd/etcdtest"
	"github.com/flynn/discoverd/rpc"
)

// TestConnectionChurn: 10,000 connections are opened and dropped in
// batches, in every way a client can misbehave, while connections that
// went silent (half-open, or stuck in the middle of a frame) stay open.
// The agent keeps serving a well-behaved client and subscriber
// throughout, expires the registrations of the silent ones after the
// TTL, and once everything is closed holds no session, registration,
// subscription or goroutine of them.
func TestConnectionChurn(t *testing.T) {
	srv := etcdtest.NewServer(t)
	eps := srv.Endpoints()
	n := startNode(t, eps, ttl)
	logger, _ := newLog(t, "client")
	const name = "churn"

	steady := newClient(t, n.Addr, ttl/4, logger)
	if err := steady.Register(name, "10.0.0.1:1"); err != nil {
		t.Fatal(err)
	}
	w := newWatcher(t, n.Addr, name)
	w.waitSet(t, map[string]bool{"10.0.0.1:1": true}, time.Now().Add(wait), "setup")
	control := mustDial(t, n.Addr, rpc.Gob)
	var got string
	mustCall(t, control, api.MethodRegister, &api.Args{Name: "control", Addr: "10.9.0.1:1"}, &got)
	mustCall(t, control, api.MethodUnregister, &api.Args{Name: "control", Addr: "10.9.0.1:1"}, &struct{}{})

	base := n.Agent.Stats()
	baseGoroutines := runtime.NumGoroutine()

	// A Register request, whole and cut in half.
	frame := func(addr string) []byte {
		var buf bytes.Buffer
		enc := gob.NewEncoder(&buf)
		enc.Encode(reqHeader{ServiceMethod: api.MethodRegister, Seq: 1})
		enc.Encode(api.Args{Name: name, Addr: addr})
		return buf.Bytes()
	}
	half := func(addr string) []byte { f := frame(addr); return f[:len(f)/2] }

	// Connections that go silent and stay open during the churn.
	var held []net.Conn
	hold := func(c net.Conn) { held = append(held, c) }
	const silentRegistered = 50
	for range 100 { // upgraded, then silent
		hold(dialRaw(t, n.Addr))
	}
	for i := range silentRegistered { // registered, then silent: no heartbeat
		c := dialRaw(t, n.Addr)
		if err := c.send(api.MethodRegister, 1, api.Args{Name: name, Addr: fmt.Sprintf("10.1.0.%d:1", i+1)}); err != nil {
			t.Fatal(err)
		}
		var got string
		if h, err := c.recv(&got); err != nil || h.Error != "" {
			t.Fatalf("silent client's Register: %+v %v", h, err)
		}
		hold(c)
	}
	for i := range 100 { // half a frame, then hang
		c := dialRaw(t, n.Addr)
		if _, err := c.Write(half(fmt.Sprintf("10.2.0.%d:1", i+1))); err != nil {
			t.Fatal(err)
		}
		hold(c)
	}
	for range 50 { // TCP only, not even an HTTP request
		c, err := net.DialTimeout("tcp", n.Addr, wait)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		hold(c)
	}

	// The churn: 10,000 connections in batches of 250, each opened and
	// dropped in one of these ways.
	const total, batch = 10000, 250
	churn := func(i int) error {
		conn, err := net.DialTimeout("tcp", n.Addr, wait)
		if err != nil {
			return err
		}
		defer conn.Close()
		switch i % 8 {
		case 0: // plain TCP, dropped at once
			return nil
		case 1: // half an HTTP request
			_, err := io.WriteString(conn, "CONNECT /_goRPC_ HT")
			return err
		}
		br, err := upgrade(conn, "application/vnd.flynn.rpc-hijack+gob")
		if err != nil {
			return err
		}
		switch i % 8 {
		case 2, 3: // register, then drop the connection (the process died)
			c := &rawConn{Conn: conn, br: br, enc: gob.NewEncoder(conn), dec: gob.NewDecoder(br)}
			if err := c.send(api.MethodRegister, 1, api.Args{Name: name, Addr: fmt.Sprintf("10.3.%d.%d:%d", i/250%250, i%250, 1+i/62500)}); err != nil {
				return err
			}
			var got string
			h, err := c.recv(&got)
			if err == nil && h.Error != "" {
				err = fmt.Errorf("register: %s", h.Error)
			}
			return err
		case 4: // subscribe, then drop the connection without CloseStream
			c := &rawConn{Conn: conn, br: br, enc: gob.NewEncoder(conn), dec: gob.NewDecoder(br)}
			if err := c.send(api.MethodSubscribe, 1, api.Args{Name: name}); err != nil {
				return err
			}
			_, err := c.recv(nil)
			return err
		case 5: // half a frame, then drop
			_, err := conn.Write(half("10.4.0.1:1"))
			return err
		}
		return nil // upgraded, then dropped
	}
	start := time.Now()
	for b := 0; b < total; b += batch {
		var wg sync.WaitGroup
		errs := make(chan error, batch)
		for i := b; i < b+batch; i++ {
			wg.Go(func() {
				if err := churn(i); err != nil {
					errs <- fmt.Errorf("connection %d: %w", i, err)
				}
			})
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Fatal(err)
		}
		// Others are served between (and during) the batches.
		args := &api.Args{Name: "control", Addr: fmt.Sprintf("10.9.0.1:%d", b/batch+2)}
		mustCall(t, control, api.MethodRegister, args, &got)
		mustCall(t, control, api.MethodUnregister, args, &struct{}{})
	}
	t.Logf("%d connections opened and dropped in %v", total, time.Since(start).Round(time.Millisecond))

	// Every registration of the dropped connections is gone, and those of
	// the silent ones expired while their connections are still open: only
	// the steady client's remains. The subscriber is still current.
	steadyOnly := map[string]bool{"10.0.0.1:1": true}
	w.waitSet(t, steadyOnly, time.Now().Add(wait), "after the churn")
	waitStore(t, eps, name, time.Now().Add(wait), "after the churn", exactly(steadyOnly))
	if st := n.Agent.Stats(); st.Expired != base.Expired+silentRegistered {
		t.Errorf("%d registrations expired, want the %d of the silent connections", st.Expired-base.Expired, silentRegistered)
	}
	if n.Log.count("registration expired") != silentRegistered {
		t.Errorf("%d expiry lines in the log, want %d", n.Log.count("registration expired"), silentRegistered)
	}

	// Close the silent connections: the agent is back where it started.
	for _, c := range held {
		c.Close()
	}
	deadline := time.NewTimer(wait)
	defer deadline.Stop()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		st := n.Agent.Stats()
		g := runtime.NumGoroutine()
		if st.Sessions == base.Sessions && st.Registrations == base.Registrations &&
			st.Subscribers == base.Subscribers && g <= baseGoroutines+10 {
			t.Logf("after the churn: %d sessions, %d registrations, %d subscribers, %d goroutines (%d before)",
				st.Sessions, st.Registrations, st.Subscribers, g, baseGoroutines)
			break
		}
		select {
		case <-tick.C:
		case <-deadline.C:
			t.Fatalf("after the churn: stats %+v, %d goroutines; want sessions %d, registrations %d, subscribers %d, about %d goroutines",
				st, g, base.Sessions, base.Registrations, base.Subscribers, baseGoroutines)
		}
	}
	if st := n.Agent.Stats(); st.Expired != base.Expired+silentRegistered {
		t.Errorf("the steady client's registration expired during the churn (expired %d)", st.Expired-base.Expired)
	}
	w.waitSet(t, steadyOnly, time.Now().Add(wait), "at the end")
}
