package server_test

import (
	"bufio"
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/flynn/discoverd/api"
	"github.com/flynn/discoverd/rpc"
	"github.com/flynn/discoverd/server"

	"github.com/flynn/discoverd/internal/testkit"
)

// rawRequest writes head (and body) on a new TCP connection to addr and
// returns the connection and a reader of what the agent answers.
func rawRequest(t *testing.T, addr, head string) (net.Conn, *bufio.Reader) {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, waitTimeout)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if _, err := io.WriteString(c, head); err != nil {
		t.Fatal(err)
	}
	_ = c.SetDeadline(time.Now().Add(waitTimeout))
	return c, bufio.NewReader(c)
}

// A request whose body stalls is answered (408, or the answer of a handler
// that does not read the body) once BodyTimeout has passed, and its
// connection is closed; SSE streams live on past BodyTimeout.
func TestStalledBodies(t *testing.T) {
	const bodyTimeout = 300 * time.Millisecond
	e := newEnv(t, envConfig{opts: server.Options{BodyTimeout: bodyTimeout}})
	sse := openSSE(t, e.url+"/services/web")
	if ev := sse.mustNext(); ev.event != "current" {
		t.Fatalf("first SSE event %+v", ev)
	}
	for _, tc := range []struct {
		name, head string
		status     int
	}{
		{"PUT", "PUT /services/web/instances/10.0.0.1:80 HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{", http.StatusRequestTimeout},
		{"chunked PUT", "PUT /services/web/instances/10.0.0.1:80 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n{\r\n", http.StatusRequestTimeout},
		{"DELETE with a body", "DELETE /services/web/instances/10.0.0.9:80 HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{", http.StatusNotFound},
		{"GET with a body", "GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{", http.StatusOK},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, br := rawRequest(t, e.addr, tc.head)
			resp, err := http.ReadResponse(br, nil)
			if err != nil {
				t.Fatalf("no answer: %v", err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != tc.status {
				t.Fatalf("status %d %s, want %d", resp.StatusCode, body, tc.status)
			}
			if tc.status == http.StatusRequestTimeout {
				var eb server.ErrorBody
				if err := json.Unmarshal(body, &eb); err != nil || eb.Code != api.CodeInvalidArgument {
					t.Fatalf("body %s, want a JSON error with invalid_argument", body)
				}
			}
			// The connection is closed: its body never came.
			if _, err := c.Read(make([]byte, 1)); err == nil {
				t.Fatal("connection still open after its body stalled")
			}
		})
	}
	// The SSE stream opened before all that is still served.
	mustPut(t, e.url, "web", "10.0.0.1:80", "")
	if ev := sse.mustNext(); ev.event != "online" {
		t.Fatalf("SSE event after the stalls: %+v", ev)
	}
}

// The router's own errors are JSON too, with the Allow header kept.
func TestRouterErrorsAreJSON(t *testing.T) {
	e := newEnv(t, envConfig{})
	resp := mustDo(t, newRequest(t, http.MethodGet, e.url+rpc.DefaultPath, ""))
	if got := resp.Header.Get("Allow"); got != http.MethodConnect {
		t.Errorf("Allow %q, want CONNECT", got)
	}
	wantError(t, resp, http.StatusMethodNotAllowed, api.CodeInvalidArgument)
	resp = mustDo(t, newRequest(t, http.MethodPost, e.url+"/services/web/instances/10.0.0.1:80", "{}"))
	if got := resp.Header.Get("Allow"); !strings.Contains(got, "PUT") || !strings.Contains(got, "DELETE") {
		t.Errorf("Allow %q, want PUT and DELETE", got)
	}
	wantError(t, resp, http.StatusMethodNotAllowed, api.CodeInvalidArgument)
}

// The HTTP registration cap applies per client address: one that reached
// it is refused, another address still registers.
func TestHTTPRegistrationCapPerAddress(t *testing.T) {
	e := newEnv(t, envConfig{opts: server.Options{MaxHTTPRegistrationsPerAddr: 2}})
	from := func(ip string) *http.Client {
		d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(ip)}}
		c := &http.Client{Transport: &http.Transport{DialContext: d.DialContext}}
		t.Cleanup(c.CloseIdleConnections)
		return c
	}
	put := func(c *http.Client, addr string) *http.Response {
		resp, err := c.Do(newRequest(t, http.MethodPut, e.url+"/services/web/instances/"+addr, ""))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { resp.Body.Close() })
		return resp
	}
	a, b := from("127.0.0.1"), from("127.0.0.2")
	for _, addr := range []string{"10.0.0.1:80", "10.0.0.2:80"} {
		decode(t, put(a, addr), http.StatusOK, nil)
	}
	e1 := wantError(t, put(a, "10.0.0.3:80"), http.StatusTooManyRequests, api.CodeResourceExhausted)
	if !strings.Contains(e1.Error, "127.0.0.1") {
		t.Errorf("error %q does not name the client address", e1.Error)
	}
	decode(t, put(a, "10.0.0.1:80"), http.StatusOK, nil) // a heartbeat of one it holds
	decode(t, put(b, "10.0.0.3:80"), http.StatusOK, nil)
	// An unregistered one frees its place.
	decode(t, mustDo(t, newRequest(t, http.MethodDelete, e.url+"/services/web/instances/10.0.0.2:80", "")), http.StatusNoContent, nil)
	decode(t, put(a, "10.0.0.4:80"), http.StatusOK, nil)
}

// limitedServer serves srv on 127.0.0.1 behind a ConnLimiter of max
// connections.
func limitedServer(t *testing.T, h http.Handler, max int) (*server.ConnLimiter, string) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	l := &server.ConnLimiter{Max: max, Logger: testLogger(t)}
	hs := &http.Server{Handler: h}
	served := make(chan struct{})
	go func() {
		defer close(served)
		hs.Serve(l.Listen(ln))
	}()
	t.Cleanup(func() {
		hs.Close()
		select {
		case <-served:
		case <-time.After(waitTimeout):
			t.Error("Serve did not return")
		}
	})
	return l, ln.Addr().String()
}

// Connections beyond the cap are refused with a reason (RPC: in the
// CONNECT status; HTTP: a 503 JSON error), counted, and the connections
// within it go on being served; a closed one frees its slot.
func TestConnectionCap(t *testing.T) {
	e := newEnv(t, envConfig{})
	l, addr := limitedServer(t, e.srv, 2)
	registered := mustDial(t, addr)
	mustRegister(t, registered, "web", "10.0.0.1:80", nil)
	idle, err := net.DialTimeout("tcp", addr, waitTimeout)
	if err != nil {
		t.Fatal(err)
	}
	defer idle.Close()
	waitFor(t, "both connections counted", func() bool { return l.Open() == 2 })

	_, err = rpc.Dial(callCtx(t), addr, rpc.Gob)
	if err == nil || !strings.Contains(err.Error(), "503 unavailable") || !strings.Contains(err.Error(), "limit of 2 client connections") {
		t.Fatalf("RPC dial beyond the cap: %v, want the reason", err)
	}
	_, br := rawRequest(t, addr, "GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	var eb server.ErrorBody
	if err := json.NewDecoder(resp.Body).Decode(&eb); err != nil || resp.StatusCode != http.StatusServiceUnavailable || eb.Code != api.CodeUnavailable {
		t.Fatalf("HTTP beyond the cap: %d %+v %v", resp.StatusCode, eb, err)
	}
	if l.Refused() != 2 {
		t.Errorf("Refused() = %d, want 2", l.Refused())
	}
	// The registered client is still served.
	var got string
	if err := registered.Call(callCtx(t), api.MethodRegister, &api.Args{Name: "web", Addr: "10.0.0.1:80"}, &got); err != nil {
		t.Fatalf("heartbeat of a client within the cap: %v", err)
	}
	idle.Close()
	waitFor(t, "a new connection after one closed", func() bool {
		c, err := rpc.Dial(callCtx(t), addr, rpc.Gob)
		if err != nil {
			return false
		}
		c.Close()
		return true
	})
}

// The refusals in progress are bounded: beyond MaxRefusing, an excess
// connection is closed at once, and none is held longer than RefuseTimeout.
func TestConnectionCapRefusalsAreBounded(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	l := &server.ConnLimiter{Max: 1, MaxRefusing: 2, RefuseTimeout: 200 * time.Millisecond, Logger: testLogger(t)}
	lln := l.Listen(ln)
	accepted := make(chan net.Conn, 1)
	go func() {
		defer close(accepted)
		c, err := lln.Accept()
		if err == nil {
			accepted <- c
		}
		for err == nil { // refuse until closed
			var c net.Conn
			if c, err = lln.Accept(); err == nil {
				c.Close()
			}
		}
	}()
	first, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer first.Close()
	c := recvConn(t, accepted)
	defer c.Close()
	// Silent connections beyond the cap: each is closed within
	// RefuseTimeout, or at once.
	for i := range 5 {
		s, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		_ = s.SetReadDeadline(time.Now().Add(waitTimeout))
		if n, err := s.Read(make([]byte, 1)); err == nil {
			t.Fatalf("silent connection %d got %d bytes, want a close", i, n)
		} else if ne, ok := err.(net.Error); ok && ne.Timeout() {
			t.Fatalf("silent connection %d held for %v", i, waitTimeout)
		}
		s.Close()
	}
	if err := lln.Close(); err != nil {
		t.Fatal(err)
	}
	for range accepted {
	}
}

func recvConn(t *testing.T, ch <-chan net.Conn) net.Conn {
	t.Helper()
	select {
	case c := <-ch:
		return c
	case <-time.After(waitTimeout):
		t.Fatal("no connection accepted")
		panic("unreachable")
	}
}

// waitFor polls cond until it holds, for up to waitTimeout.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	testkit.Eventually(t, waitTimeout, what, cond)
}

// While the agent starts, /health answers 503 "starting", every RPC call
// fails at once with unavailable, and Close ends those connections.
func TestStarting(t *testing.T) {
	st := server.NewStarting(testLogger(t))
	_, addr := limitedServer(t, st, 16)
	var h struct{ Status, Error, Code string }
	resp, err := http.Get("http://" + addr + "/health")
	if err != nil {
		t.Fatal(err)
	}
	decode(t, resp, http.StatusServiceUnavailable, &h)
	resp.Body.Close()
	if h.Status != "starting" || h.Code != string(api.CodeUnavailable) {
		t.Fatalf("/health while starting: %+v", h)
	}
	resp, err = http.Get("http://" + addr + "/health/ready")
	if err != nil {
		t.Fatal(err)
	}
	decode(t, resp, http.StatusServiceUnavailable, &h)
	resp.Body.Close()
	if h.Status != "starting" {
		t.Fatalf("/health/ready while starting: %+v", h)
	}
	resp, err = http.Get("http://" + addr + "/health/live")
	if err != nil {
		t.Fatal(err)
	}
	decode(t, resp, http.StatusOK, &h)
	resp.Body.Close()
	if h.Status != "starting" {
		t.Fatalf("/health/live while starting: %+v", h)
	}
	resp, err = http.Get("http://" + addr + "/services/web")
	if err != nil {
		t.Fatal(err)
	}
	wantError(t, resp, http.StatusServiceUnavailable, api.CodeUnavailable)
	resp.Body.Close()

	c := mustDial(t, addr)
	var got string
	err = c.Call(callCtx(t), api.MethodRegister, &api.Args{Name: "web", Addr: "10.0.0.1:80"}, &got)
	if codeOf(err) != api.CodeUnavailable || !strings.Contains(err.Error(), "starting") {
		t.Fatalf("Register while starting: %v, want unavailable", err)
	}
	ch := make(chan *api.ServiceUpdate, 1)
	sc, err := c.Stream(callCtx(t), api.MethodSubscribe, &api.Args{Name: "web"}, ch)
	if err != nil {
		t.Fatal(err)
	}
	for range ch {
	}
	if codeOf(sc.Err()) != api.CodeUnavailable {
		t.Fatalf("Subscribe while starting: %v, want unavailable", sc.Err())
	}
	if err := st.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	select {
	case <-c.Done():
	case <-time.After(waitTimeout):
		t.Fatal("start-up RPC connection still open after Close")
	}
}

// An RPC connection with no call, stream or live registration is closed
// after RPCIdleTimeout; one whose registrations live is kept.
func TestIdleRPCConnections(t *testing.T) {
	const idle = 200 * time.Millisecond
	e := newEnv(t, envConfig{opts: server.Options{RPCIdleTimeout: idle, TTL: time.Hour}})
	registered := mustDial(t, e.addr)
	mustRegister(t, registered, "web", "10.0.0.1:80", nil)
	bare := mustDial(t, e.addr)
	var got string
	err := bare.Call(callCtx(t), api.MethodRegister, &api.Args{Name: "-bad", Addr: "10.0.0.1:80"}, &got)
	if codeOf(err) != api.CodeInvalidArgument {
		t.Fatalf("bad Register: %v", err)
	}
	select {
	case <-bare.Done():
	case <-time.After(waitTimeout):
		t.Fatalf("connection without registrations still open %v after its last call", waitTimeout)
	}
	select {
	case <-registered.Done():
		t.Fatal("connection holding a registration closed as idle")
	case <-time.After(10 * idle):
	}
	if err := registered.Call(callCtx(t), api.MethodHeartbeat, &api.Args{Name: "web", Addr: "10.0.0.1:80"}, &struct{}{}); err != nil {
		t.Fatalf("heartbeat after idling: %v", err)
	}
}
