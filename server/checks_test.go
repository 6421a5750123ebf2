package server_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/flynn/discoverd/agent"
	"github.com/flynn/discoverd/api"
	"github.com/flynn/discoverd/backend/etcd"
	"github.com/flynn/discoverd/backend/etcd/etcdtest"
	"github.com/flynn/discoverd/checks"
	"github.com/flynn/discoverd/internal/testkit"
	"github.com/flynn/discoverd/rpc"
	"github.com/flynn/discoverd/server"
)

// newChecksEnv is an agent with a health-check manager (real clock) and
// its front ends on a real etcd and a real listener.
func newChecksEnv(t *testing.T) (url, addr string) {
	t.Helper()
	srv := etcdtest.NewServer(t)
	log := testLogger(t)
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	b, err := etcd.Open(ctx, etcd.Config{Endpoints: srv.Endpoints(), TTL: 30 * time.Second, Logger: log})
	if err != nil {
		t.Fatalf("etcd.Open: %v", err)
	}
	t.Cleanup(func() { b.Close() })
	a, err := agent.New(agent.Config{Backend: b, TTL: 30 * time.Second, Logger: log})
	if err != nil {
		t.Fatalf("agent.New: %v", err)
	}
	t.Cleanup(func() { a.Close() })
	m, err := checks.New(checks.Config{Registrar: a.NewKeptSession(), File: filepath.Join(t.TempDir(), "checks.journal"), Logger: log})
	if err != nil {
		t.Fatalf("checks.New: %v", err)
	}
	t.Cleanup(func() { m.Close() })
	s, err := server.New(a, server.Options{Checks: m, Logger: log, Services: b})
	if err != nil {
		t.Fatalf("server.New: %v", err)
	}
	hs := httptest.NewServer(s)
	t.Cleanup(hs.Close)
	t.Cleanup(func() { s.Close() })
	return hs.URL, hs.Listener.Addr().String()
}

// eventually polls cond until it holds, failing after waitTimeout.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	ctx := callCtx(t)
	for !cond() {
		select {
		case <-ctx.Done():
			t.Fatalf("timed out waiting for %s", what)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

func TestHTTPCheckedRegistration(t *testing.T) {
	base, _ := newChecksEnv(t)
	target, _ := testkit.TCPTarget(t)
	inst := base + "/services/db/instances/" + target

	var st api.CheckStatus
	decode(t, mustDo(t, newRequest(t, http.MethodPut, inst,
		fmt.Sprintf(`{"attrs":{"role":"primary"},"check":{"tcp":%q,"interval":"1s","rise":1}}`, target))), http.StatusOK, &st)
	if st.State != api.CheckOffline || st.Check.TCP != target || st.Check.Interval != api.Duration(time.Second) || st.Check.Fall != 3 {
		t.Fatalf("PUT with a check answered %+v", st)
	}
	eventually(t, "the checked instance online", func() bool { return len(mustList(t, base, "db")) == 1 })
	// stored follows the store write: it may lag the instance's arrival.
	eventually(t, "the status to say stored", func() bool {
		decode(t, mustDo(t, newRequest(t, http.MethodGet, inst, "")), http.StatusOK, &st)
		return st.Stored
	})
	if st.State != api.CheckOnline || !st.Stored || st.LastResult != "pass" || len(st.Transitions) != 1 || st.Attrs["role"] != "primary" {
		t.Fatalf("GET instance: %+v", st)
	}

	t.Run("list", func(t *testing.T) {
		var list []api.CheckStatus
		decode(t, mustDo(t, newRequest(t, http.MethodGet, base+"/checks?service=db", "")), http.StatusOK, &list)
		if len(list) != 1 || list[0].Addr != target {
			t.Fatalf("GET /checks: %+v", list)
		}
	})
	t.Run("metrics", func(t *testing.T) {
		resp := mustDo(t, newRequest(t, http.MethodGet, base+"/metrics", ""))
		body, _ := io.ReadAll(resp.Body)
		for _, want := range []string{`discoverd_checks{state="online"} 1`, `discoverd_check_probe_duration_seconds_count{kind="tcp"}`, `discoverd_check_probes_total{result="pass"}`} {
			if !strings.Contains(string(body), want) {
				t.Errorf("metrics lack %s", want)
			}
		}
	})
	t.Run("PUT without the check is a conflict", func(t *testing.T) {
		wantError(t, mustDo(t, newRequest(t, http.MethodPut, inst, `{"attrs":{}}`)), http.StatusConflict, api.CodeConflict)
	})
	t.Run("bad checks are refused", func(t *testing.T) {
		for _, body := range []string{
			`{"check":{}}`,
			`{"check":{"tcp":"x"}}`,
			`{"check":{"http":"http://h/","tcp":"h:1"}}`,
			`{"check":{"tcp":"h:1","interval":"10"}}`,
			`{"check":{"tcp":"h:1","interval":"1ms"}}`,
			`{"check":{"tcp":"h:1","deregister_after":"5s"}}`,
			`{"check":{"tcp":"h:1","bogus":1}}`,
		} {
			e := wantError(t, mustDo(t, newRequest(t, http.MethodPut, base+"/services/x/instances/10.0.0.1:1", body)), http.StatusBadRequest, api.CodeInvalidArgument)
			t.Logf("%s: %s", body, e.Error)
		}
	})
	t.Run("DELETE removes it", func(t *testing.T) {
		resp := mustDo(t, newRequest(t, http.MethodDelete, inst, ""))
		if resp.StatusCode != http.StatusNoContent {
			t.Fatalf("DELETE: %s", resp.Status)
		}
		if list := mustList(t, base, "db"); len(list) != 0 {
			t.Fatalf("after DELETE: %+v", list)
		}
		wantError(t, mustDo(t, newRequest(t, http.MethodGet, inst, "")), http.StatusNotFound, api.CodeNotFound)
	})
}

func TestRPCCheckedRegistration(t *testing.T) {
	base, addr := newChecksEnv(t)
	target, _ := testkit.TCPTarget(t)
	c, err := rpc.Dial(callCtx(t), addr, rpc.Gob)
	if err != nil {
		t.Fatal(err)
	}
	var got string
	args := &api.Args{Name: "db", Addr: target, Check: &api.Check{TCP: target, Interval: api.Duration(time.Second), Rise: 1}}
	if err := c.Call(callCtx(t), api.MethodRegister, args, &got); err != nil || got != target {
		t.Fatalf("Register with a check: %q %v", got, err)
	}
	var plain string
	if err := c.Call(callCtx(t), api.MethodRegister, &api.Args{Name: "db", Addr: target}, &plain); codeOf(err) != api.CodeConflict {
		t.Fatalf("Register without the check of a checked registration: %v, want conflict", err)
	}
	c.Close() // the agent keeps it: the connection does not own it
	eventually(t, "the checked instance online", func() bool { return len(mustList(t, base, "db")) == 1 })

	other := mustDial(t, addr)
	if err := other.Call(callCtx(t), api.MethodUnregister, &api.Args{Name: "db", Addr: target}, &struct{}{}); err != nil {
		t.Fatalf("Unregister from another connection: %v", err)
	}
	if list := mustList(t, base, "db"); len(list) != 0 {
		t.Fatalf("after Unregister: %+v", list)
	}
	bad := &api.Args{Name: "db", Addr: target, Check: &api.Check{TCP: target, Rise: -1}}
	if err := other.Call(callCtx(t), api.MethodRegister, bad, &got); codeOf(err) != api.CodeInvalidArgument {
		t.Fatalf("bad check over RPC: %v", err)
	}
}

func TestChecksDisabled(t *testing.T) {
	e := newEnv(t, envConfig{})
	wantError(t, mustDo(t, newRequest(t, http.MethodPut, e.url+"/services/db/instances/10.0.0.1:1", `{"check":{"tcp":"10.0.0.1:1"}}`)),
		http.StatusServiceUnavailable, api.CodeUnavailable)
}

// GET /services counts the checked registrations that are not in the
// store beside the instances that are (the console's online / total).
func TestServicesCountOfflineChecks(t *testing.T) {
	base, _ := newChecksEnv(t)
	up, _ := testkit.TCPTarget(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	down := ln.Addr().String() // nothing listens there: its check fails
	ln.Close()
	for _, target := range []string{up, down} {
		resp := mustDo(t, newRequest(t, http.MethodPut, base+"/services/db/instances/"+target,
			fmt.Sprintf(`{"check":{"tcp":%q,"interval":"1s","rise":1}}`, target)))
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("PUT %s: %s", target, resp.Status)
		}
	}
	// The passing one's status says stored just after its store write:
	// wait for the count to settle.
	var list server.ServiceList
	eventually(t, "db with 1 instance and 1 offline", func() bool {
		decode(t, mustDo(t, newRequest(t, http.MethodGet, base+"/services", "")), http.StatusOK, &list)
		return len(list.Services) == 1 && list.Services[0].Name == "db" && list.Services[0].Instances == 1 && list.Services[0].Offline == 1
	})
	// Without a check failing, nothing is offline: the field is absent.
	resp := mustDo(t, newRequest(t, http.MethodDelete, base+"/services/db/instances/"+down, ""))
	if resp.StatusCode != http.StatusNoContent {
		t.Fatalf("DELETE: %s", resp.Status)
	}
	eventually(t, "no offline count", func() bool {
		resp := mustDo(t, newRequest(t, http.MethodGet, base+"/services", ""))
		body, _ := io.ReadAll(resp.Body)
		return strings.Contains(string(body), `"instances":1`) && !strings.Contains(string(body), `"offline"`)
	})
}
