package server_test

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/flynn/discoverd/api"
	"github.com/flynn/discoverd/rpc"
	"github.com/flynn/discoverd/server"
)

func newRequest(t testing.TB, method, url, body string) *http.Request {
	t.Helper()
	var r io.Reader
	if body != "" {
		r = strings.NewReader(body)
	}
	req, err := http.NewRequestWithContext(callCtx(t), method, url, r)
	if err != nil {
		t.Fatal(err)
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	return req
}

func mustDo(t testing.TB, req *http.Request) *http.Response {
	t.Helper()
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", req.Method, req.URL, err)
	}
	t.Cleanup(func() { resp.Body.Close() })
	return resp
}

// decode reads a JSON response with the given status into v.
func decode(t testing.TB, resp *http.Response, status int, v any) {
	t.Helper()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("read body: %v", err)
	}
	if resp.StatusCode != status {
		t.Fatalf("%s %s: status %d %s, want %d", resp.Request.Method, resp.Request.URL, resp.StatusCode, body, status)
	}
	if ct := resp.Header.Get("Content-Type"); v != nil && ct != "application/json" {
		t.Fatalf("Content-Type %q, want application/json", ct)
	}
	if v != nil {
		if err := json.Unmarshal(body, v); err != nil {
			t.Fatalf("decode %s: %v", body, err)
		}
	}
}

// wantError checks that resp is a JSON error with the status and code.
func wantError(t testing.TB, resp *http.Response, status int, code api.Code) server.ErrorBody {
	t.Helper()
	var e server.ErrorBody
	decode(t, resp, status, &e)
	if e.Code != code || e.Error == "" {
		t.Fatalf("error body %+v, want code %s and a message", e, code)
	}
	return e
}

func mustPut(t testing.TB, base, name, addr, body string) string {
	t.Helper()
	var got struct{ Name, Addr string }
	decode(t, mustDo(t, newRequest(t, http.MethodPut, base+"/services/"+name+"/instances/"+addr, body)), http.StatusOK, &got)
	if got.Name != name {
		t.Fatalf("PUT answered %+v", got)
	}
	return got.Addr
}

func mustList(t testing.TB, base, name string) []server.Instance {
	t.Helper()
	var list []server.Instance
	decode(t, mustDo(t, newRequest(t, http.MethodGet, base+"/services/"+name, "")), http.StatusOK, &list)
	return list
}

// watchUntilCurrent subscribes to name over RPC and reads the snapshot.
// Lists are served from the agent's watch cache, which applies a write a
// moment after the store acknowledged it; a test that lists right after a
// write first waits for the write's update on this stream.
func watchUntilCurrent(t testing.TB, e *env, name string) *stream {
	t.Helper()
	s := mustStream(t, mustDial(t, e.addr), api.MethodSubscribe, name)
	for u := s.next(); !u.IsSentinel(); u = s.next() {
	}
	return s
}

func TestHTTPRegisterListUnregister(t *testing.T) {
	e := newEnv(t, envConfig{})
	if got := mustList(t, e.url, "web"); got == nil || len(got) != 0 {
		t.Fatalf("list of an unknown service = %#v, want []", got)
	}
	w := watchUntilCurrent(t, e, "web")
	if addr := mustPut(t, e.url, "web", "10.0.0.1:80", `{"attrs":{"v":"1"}}`); addr != "10.0.0.1:80" {
		t.Fatalf("PUT returned addr %q", addr)
	}
	if addr := mustPut(t, e.url, "web", ":81", ""); addr != "10.9.9.9:81" { // empty body, expanded addr
		t.Fatalf("PUT :81 returned addr %q", addr)
	}
	w.next()
	w.next()
	list := mustList(t, e.url, "web")
	if len(list) != 2 || list[0].Addr != "10.0.0.1:80" || list[0].Attrs["v"] != "1" || list[0].Created == 0 ||
		list[1].Addr != "10.9.9.9:81" || list[1].Attrs == nil || list[1].Created <= list[0].Created {
		t.Fatalf("list = %+v", list)
	}

	// A second PUT replaces the attributes and keeps created. The body is
	// JSON whatever the Content-Type says (curl -d sends a form type).
	req := newRequest(t, http.MethodPut, e.url+"/services/web/instances/10.0.0.1:80", `{"attrs":{"v":"2"}}`)
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	decode(t, mustDo(t, req), http.StatusOK, nil)
	w.next()
	again := mustList(t, e.url, "web")
	if again[0].Attrs["v"] != "2" || again[0].Created != list[0].Created {
		t.Fatalf("after the attribute update: %+v (created before: %d)", again[0], list[0].Created)
	}

	resp := mustDo(t, newRequest(t, http.MethodDelete, e.url+"/services/web/instances/10.0.0.1:80", ""))
	if resp.StatusCode != http.StatusNoContent {
		t.Fatalf("DELETE: status %d", resp.StatusCode)
	}
	w.next()
	if list := mustList(t, e.url, "web"); len(list) != 1 || list[0].Addr != "10.9.9.9:81" {
		t.Fatalf("list after DELETE = %+v", list)
	}
	resp = mustDo(t, newRequest(t, http.MethodDelete, e.url+"/services/web/instances/10.0.0.1:80", ""))
	wantError(t, resp, http.StatusNotFound, api.CodeNotFound)
}

func TestHTTPLeader(t *testing.T) {
	e := newEnv(t, envConfig{})
	wantError(t, mustDo(t, newRequest(t, http.MethodGet, e.url+"/services/db/leader", "")), http.StatusNotFound, api.CodeNotFound)
	w := watchUntilCurrent(t, e, "db")
	mustPut(t, e.url, "db", "10.0.0.1:5432", "")
	mustPut(t, e.url, "db", "10.0.0.2:5432", "")
	w.next()
	w.next()
	var leader server.Instance
	decode(t, mustDo(t, newRequest(t, http.MethodGet, e.url+"/services/db/leader", "")), http.StatusOK, &leader)
	if leader.Addr != "10.0.0.1:5432" || leader.Name != "db" || leader.Created == 0 {
		t.Fatalf("leader = %+v", leader)
	}
}

func TestHTTPBadRequests(t *testing.T) {
	e := newEnv(t, envConfig{opts: server.Options{MaxBodySize: 1 << 10}})
	attrs := make(map[string]string)
	for i := range api.MaxAttrs + 1 {
		attrs[fmt.Sprint("k", i)] = "v"
	}
	tooMany, _ := json.Marshal(map[string]any{"attrs": attrs})
	for _, tc := range []struct {
		name, method, path, body string
		status                   int
		code                     api.Code
	}{
		{"bad name", "PUT", "/services/-web/instances/10.0.0.1:80", "{}", 400, api.CodeInvalidArgument},
		{"long name", "PUT", "/services/" + strings.Repeat("a", api.MaxNameLen+1) + "/instances/10.0.0.1:80", "{}", 400, api.CodeInvalidArgument},
		{"addr without port", "PUT", "/services/web/instances/10.0.0.1", "{}", 400, api.CodeInvalidArgument},
		{"port out of range", "PUT", "/services/web/instances/10.0.0.1:70000", "{}", 400, api.CodeInvalidArgument},
		{"not JSON", "PUT", "/services/web/instances/10.0.0.1:80", "attrs=1", 400, api.CodeInvalidArgument},
		{"unknown field", "PUT", "/services/web/instances/10.0.0.1:80", `{"attr":{}}`, 400, api.CodeInvalidArgument},
		{"trailing data", "PUT", "/services/web/instances/10.0.0.1:80", `{} {}`, 400, api.CodeInvalidArgument},
		{"too many attrs", "PUT", "/services/web/instances/10.0.0.1:80", string(tooMany), 400, api.CodeInvalidArgument},
		{"oversized body", "PUT", "/services/web/instances/10.0.0.1:80", `{"attrs":{"k":"` + strings.Repeat("v", 2<<10) + `"}}`, 413, api.CodeInvalidArgument},
		{"bad name on DELETE", "DELETE", "/services/we%20b/instances/10.0.0.1:80", "", 400, api.CodeInvalidArgument},
		{"bad name on GET", "GET", "/services/-web", "", 400, api.CodeInvalidArgument},
		{"bad name on leader", "GET", "/services/-web/leader", "", 400, api.CodeInvalidArgument},
		{"duplicate key", "PUT", "/services/web/instances/10.0.0.1:80", `{"attrs":{},"attrs":{}}`, 400, api.CodeInvalidArgument},
		{"duplicate attr", "PUT", "/services/web/instances/10.0.0.1:80", `{"attrs":{"k":"1","k":"2"}}`, 400, api.CodeInvalidArgument},
		{"unknown path", "GET", "/nope", "", 404, api.CodeNotFound},
		{"unknown path with PUT", "PUT", "/nope", "{}", 404, api.CodeNotFound},
		{"method not allowed on the service list", "PUT", "/services", "{}", 405, api.CodeInvalidArgument},
		{"method not allowed", "POST", "/services/web", "{}", 405, api.CodeInvalidArgument},
		{"method not allowed on health", "DELETE", "/health", "", 405, api.CodeInvalidArgument},
		{"GET on the RPC path", "GET", rpc.DefaultPath, "", 405, api.CodeInvalidArgument},
	} {
		t.Run(tc.name, func(t *testing.T) {
			wantError(t, mustDo(t, newRequest(t, tc.method, e.url+tc.path, tc.body)), tc.status, tc.code)
		})
	}
}

func TestHealth(t *testing.T) {
	e := newEnv(t, envConfig{})
	var ok struct{ Status string }
	decode(t, mustDo(t, newRequest(t, http.MethodGet, e.url+"/health", "")), http.StatusOK, &ok)
	if ok.Status != "ok" {
		t.Fatalf("health = %+v", ok)
	}

	t.Run("store down", func(t *testing.T) {
		e := newEnv(t, envConfig{opts: server.Options{HealthTimeout: time.Second}})
		// Closing the agent's store connection is what a lost store looks
		// like to /health.
		if err := e.etcd.Close(); err != nil {
			t.Fatal(err)
		}
		var body struct{ Status, Error, Code string }
		decode(t, mustDo(t, newRequest(t, http.MethodGet, e.url+"/health", "")), http.StatusServiceUnavailable, &body)
		if body.Status != "unavailable" || body.Code != string(api.CodeUnavailable) || body.Error == "" {
			t.Fatalf("health with the store down = %+v", body)
		}
	})
}

// scrape returns the value of the sample whose line starts with prefix
// (metric name and labels), or -1.
func scrape(t testing.TB, base, prefix string) float64 {
	t.Helper()
	resp := mustDo(t, newRequest(t, http.MethodGet, base+"/metrics", ""))
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /metrics: status %d", resp.StatusCode)
	}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if rest, ok := strings.CutPrefix(line, prefix); ok && strings.HasPrefix(rest, " ") {
			v, err := strconv.ParseFloat(strings.TrimSpace(rest), 64)
			if err != nil {
				t.Fatalf("metric line %q: %v", line, err)
			}
			return v
		}
	}
	return -1
}

func TestMetrics(t *testing.T) {
	e := newEnv(t, envConfig{})
	for _, name := range []string{
		"discoverd_registrations", "discoverd_sessions", "discoverd_subscribers", "discoverd_watches",
		"discoverd_events_fanned_out_total", "discoverd_slow_subscribers_cut_total", "discoverd_backend_errors_total",
		"discoverd_rpc_streams", "discoverd_sse_streams",
		"discoverd_store_session_up", "discoverd_store_sessions_established_total",
	} {
		if v := scrape(t, e.url, name); v < 0 {
			t.Errorf("metric %s missing", name)
		}
	}
	if v := scrape(t, e.url, "discoverd_registrations"); v != 0 {
		t.Fatalf("discoverd_registrations = %v before any registration", v)
	}
	if v := scrape(t, e.url, "discoverd_store_session_up"); v != 1 {
		t.Errorf("discoverd_store_session_up = %v with a live etcd lease, want 1", v)
	}
	if v := scrape(t, e.url, "discoverd_store_sessions_established_total"); v != 1 {
		t.Errorf("discoverd_store_sessions_established_total = %v, want 1", v)
	}

	c := mustDial(t, e.addr)
	mustRegister(t, c, "web", "10.0.0.1:80", nil)
	mustPut(t, e.url, "web", "10.0.0.2:80", "")
	sub := mustStream(t, c, api.MethodSubscribe, "web")
	for u := sub.next(); !u.IsSentinel(); u = sub.next() {
	}

	if v := scrape(t, e.url, "discoverd_registrations"); v != 2 {
		t.Errorf("discoverd_registrations = %v, want 2", v)
	}
	if v := scrape(t, e.url, "discoverd_subscribers"); v != 1 {
		t.Errorf("discoverd_subscribers = %v, want 1", v)
	}
	if v := scrape(t, e.url, "discoverd_rpc_streams"); v != 1 {
		t.Errorf("discoverd_rpc_streams = %v, want 1", v)
	}
	if v := scrape(t, e.url, `discoverd_rpc_calls_total{code="ok",method="Agent.Register"}`); v != 1 {
		t.Errorf("Register calls = %v, want 1", v)
	}
	if v := scrape(t, e.url, `discoverd_rpc_call_duration_seconds_count{method="Agent.Register"}`); v != 1 {
		t.Errorf("Register latency count = %v, want 1", v)
	}
	if v := scrape(t, e.url, `discoverd_http_requests_total{code="200",method="PUT",route="/services/{name}/instances/{addr}"}`); v != 1 {
		t.Errorf("PUT requests = %v, want 1", v)
	}
	if v := scrape(t, e.url, `discoverd_http_request_duration_seconds_count{method="PUT",route="/services/{name}/instances/{addr}"}`); v != 1 {
		t.Errorf("PUT latency count = %v, want 1", v)
	}
	before := scrape(t, e.url, "discoverd_events_fanned_out_total")
	mustPut(t, e.url, "web", "10.0.0.3:80", "")
	sub.next()
	if after := scrape(t, e.url, "discoverd_events_fanned_out_total"); after <= before {
		t.Errorf("discoverd_events_fanned_out_total did not move: %v then %v", before, after)
	}
	var bad string
	c.Call(callCtx(t), api.MethodRegister, &api.Args{Name: "-"}, &bad)
	if v := scrape(t, e.url, `discoverd_rpc_calls_total{code="invalid_argument",method="Agent.Register"}`); v != 1 {
		t.Errorf("failed Register calls = %v, want 1", v)
	}
}

// sseEvent is one Server-Sent Event.
type sseEvent struct {
	id, event, data string
}

// sseReader reads events from an SSE response.
type sseReader struct {
	t    testing.TB
	resp *http.Response
	sc   *bufio.Scanner
}

func sseRequest(t testing.TB, url string) *http.Request {
	req, err := http.NewRequestWithContext(context.Background(), http.MethodGet, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Accept", "text/event-stream")
	return req
}

// openSSE starts an SSE stream; its reads are bounded by a deadline on
// the response (cancelled by t.Cleanup).
func openSSE(t testing.TB, url string) *sseReader {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*waitTimeout)
	t.Cleanup(cancel)
	req := sseRequest(t, url).WithContext(ctx)
	resp := mustDo(t, req)
	if resp.StatusCode != http.StatusOK || resp.Header.Get("Content-Type") != "text/event-stream" {
		body, _ := io.ReadAll(resp.Body)
		t.Fatalf("GET %s: status %d, Content-Type %q: %s", url, resp.StatusCode, resp.Header.Get("Content-Type"), body)
	}
	return &sseReader{t: t, resp: resp, sc: bufio.NewScanner(resp.Body)}
}

// next returns the next event; ok is false at the end of the stream.
func (r *sseReader) next() (ev sseEvent, ok bool) {
	r.t.Helper()
	for r.sc.Scan() {
		line := r.sc.Text()
		switch {
		case line == "":
			if ev != (sseEvent{}) {
				return ev, true
			}
		case strings.HasPrefix(line, ":"): // comment
		case strings.HasPrefix(line, "id: "):
			ev.id = line[4:]
		case strings.HasPrefix(line, "event: "):
			ev.event = line[7:]
		case strings.HasPrefix(line, "data: "):
			ev.data = line[6:]
		default:
			r.t.Fatalf("unexpected SSE line %q", line)
		}
	}
	return sseEvent{}, false
}

func (r *sseReader) mustNext() sseEvent {
	r.t.Helper()
	ev, ok := r.next()
	if !ok {
		r.t.Fatalf("SSE stream ended: %v", r.sc.Err())
	}
	return ev
}

func instanceData(t testing.TB, ev sseEvent) server.Instance {
	t.Helper()
	var in server.Instance
	if err := json.Unmarshal([]byte(ev.data), &in); err != nil {
		t.Fatalf("event data %q: %v", ev.data, err)
	}
	return in
}

func TestSSEServices(t *testing.T) {
	e := newEnv(t, envConfig{})
	mustPut(t, e.url, "web", "10.0.0.1:80", `{"attrs":{"v":"1"}}`)
	r := openSSE(t, e.url+"/services/web")

	ids := map[string]bool{}
	check := func(ev sseEvent, event string) sseEvent {
		t.Helper()
		if ev.event != event || ev.id == "" || ids[ev.id] {
			t.Fatalf("event %+v, want %q with a new id", ev, event)
		}
		ids[ev.id] = true
		return ev
	}
	if in := instanceData(t, check(r.mustNext(), "online")); in.Addr != "10.0.0.1:80" || in.Attrs["v"] != "1" || in.Created == 0 {
		t.Fatalf("snapshot instance %+v", in)
	}
	check(r.mustNext(), "current")

	mustPut(t, e.url, "web", "10.0.0.2:80", "")
	if in := instanceData(t, check(r.mustNext(), "online")); in.Addr != "10.0.0.2:80" {
		t.Fatalf("live instance %+v", in)
	}
	mustDo(t, newRequest(t, http.MethodDelete, e.url+"/services/web/instances/10.0.0.1:80", ""))
	if in := instanceData(t, check(r.mustNext(), "offline")); in.Addr != "10.0.0.1:80" {
		t.Fatalf("offline instance %+v", in)
	}
	if v := scrape(t, e.url, "discoverd_sse_streams"); v != 1 {
		t.Errorf("discoverd_sse_streams = %v, want 1", v)
	}

	// A reconnection with Last-Event-ID starts over with the snapshot.
	req := sseRequest(t, e.url+"/services/web")
	req.Header.Set("Last-Event-ID", "3")
	resp := mustDo(t, req)
	r2 := &sseReader{t: t, resp: resp, sc: bufio.NewScanner(resp.Body)}
	if in := instanceData(t, r2.mustNext()); in.Addr != "10.0.0.2:80" {
		t.Fatalf("snapshot after reconnect %+v", in)
	}
	if ev := r2.mustNext(); ev.event != "current" {
		t.Fatalf("after the snapshot: %+v", ev)
	}
	resp.Body.Close()

	// Closing the server ends the stream.
	if err := e.srv.Close(); err != nil {
		t.Fatal(err)
	}
	for {
		ev, ok := r.next()
		if !ok {
			break
		}
		if ev.event != "error" {
			t.Fatalf("after Close: %+v", ev)
		}
	}
}

func TestSSELeader(t *testing.T) {
	e := newEnv(t, envConfig{})
	r := openSSE(t, e.url+"/services/db/leader")
	if ev := r.mustNext(); ev.event != "leader" || ev.data != "null" {
		t.Fatalf("leader of an empty service: %+v", ev)
	}
	mustPut(t, e.url, "db", "10.0.0.1:5432", "")
	if in := instanceData(t, r.mustNext()); in.Addr != "10.0.0.1:5432" {
		t.Fatalf("leader %+v", in)
	}
	mustPut(t, e.url, "db", "10.0.0.2:5432", "")
	mustDo(t, newRequest(t, http.MethodDelete, e.url+"/services/db/instances/10.0.0.1:5432", ""))
	if in := instanceData(t, r.mustNext()); in.Addr != "10.0.0.2:5432" {
		t.Fatalf("leader after the first left %+v", in)
	}
	mustDo(t, newRequest(t, http.MethodDelete, e.url+"/services/db/instances/10.0.0.2:5432", ""))
	if ev := r.mustNext(); ev.event != "leader" || ev.data != "null" {
		t.Fatalf("leader after the last left: %+v", ev)
	}
}

// TestSSESlowClientIsCut: a client that stops reading is cut off by the
// agent's bounded queue (and told why), and does not hold up others.
func TestSSESlowClientIsCut(t *testing.T) {
	// The write timeout is longer than the test, so that only the agent's
	// queue bound can cut the client off.
	e := newEnv(t, envConfig{subscriberBuffer: 4, opts: server.Options{WriteTimeout: 10 * waitTimeout}})
	// The slow client's receive buffer is set small before it connects, so
	// that the TCP window, and with it what the server can write ahead,
	// stays small.
	dialer := &net.Dialer{Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) {
			serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4<<10)
		})
		return errors.Join(err, serr)
	}}
	slowClient := &http.Client{Transport: &http.Transport{DialContext: dialer.DialContext}}
	t.Cleanup(slowClient.CloseIdleConnections)
	ctx, cancel := context.WithTimeout(context.Background(), 3*waitTimeout)
	defer cancel()
	resp, err := slowClient.Do(sseRequest(t, e.url+"/services/web").WithContext(ctx))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	slow := &sseReader{t: t, resp: resp, sc: bufio.NewScanner(resp.Body)}
	if ev := slow.mustNext(); ev.event != "current" {
		t.Fatalf("first event %+v", ev)
	}
	fast := openSSE(t, e.url+"/services/web")
	if ev := fast.mustNext(); ev.event != "current" {
		t.Fatalf("first event %+v", ev)
	}

	// Attribute updates of 32 KiB each until the agent cuts the slow
	// client off; the fast one sees every update.
	pad := strings.Repeat("x", api.MaxAttrValueLen)
	cut := false
	for i := 0; i < 1000 && !cut; i++ {
		attrs := map[string]string{"n": fmt.Sprint(i)}
		for k := range 32 {
			attrs[fmt.Sprint("pad", k)] = pad
		}
		body, _ := json.Marshal(map[string]any{"attrs": attrs})
		mustPut(t, e.url, "web", "10.0.0.1:80", string(body))
		if in := instanceData(t, fast.mustNext()); in.Attrs["n"] != fmt.Sprint(i) {
			t.Fatalf("fast client got n=%s, want %d", in.Attrs["n"], i)
		}
		cut = scrape(t, e.url, "discoverd_slow_subscribers_cut_total") >= 1
	}
	if !cut {
		t.Fatal("the slow client was never cut off")
	}
	// Draining the slow client now: what was buffered, then an error event
	// that says why, then the end.
	var last sseEvent
	for {
		ev, ok := slow.next()
		if !ok {
			break
		}
		last = ev
	}
	var body server.ErrorBody
	if last.event != "error" || json.Unmarshal([]byte(last.data), &body) != nil || body.Code != api.CodeResourceExhausted {
		t.Fatalf("last event of the slow client: %q (id %s), want an error event with resource_exhausted", last.event, last.id)
	}
}
