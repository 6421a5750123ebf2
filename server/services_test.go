package server_test

import (
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/flynn/discoverd/api"
	"github.com/flynn/discoverd/internal/buildinfo"
	"github.com/flynn/discoverd/server"
)

func listServices(t testing.TB, base, query string) server.ServiceList {
	t.Helper()
	var list server.ServiceList
	decode(t, mustDo(t, newRequest(t, http.MethodGet, base+"/services"+query, "")), http.StatusOK, &list)
	return list
}

func summary(list server.ServiceList) string {
	var b strings.Builder
	for _, s := range list.Services {
		fmt.Fprintf(&b, "%s:%d:%s ", s.Name, s.Instances, s.Leader)
	}
	return b.String() + "next=" + list.Next
}

func TestListServices(t *testing.T) {
	e := newEnv(t, envConfig{})
	if got := summary(listServices(t, e.url, "")); got != "next=" {
		t.Fatalf("empty store: %s", got)
	}
	mustPut(t, e.url, "web", "10.0.0.2:80", "")
	mustPut(t, e.url, "web", "10.0.0.1:80", `{"attrs":{"v":"1"}}`)
	mustPut(t, e.url, "db", "10.0.1.1:5432", "")

	list := listServices(t, e.url, "")
	if got := summary(list); got != "db:1:10.0.1.1:5432 web:2:10.0.0.2:80 next=" {
		t.Fatalf("GET /services: %s", got)
	}
	leader := mustList(t, e.url, "web")[0]
	if w := list.Services[1]; w.LeaderCreated != leader.Created || w.Leader != leader.Addr {
		t.Fatalf("listed leader %+v, /services/web lists %+v first", w, leader)
	}
	if got := summary(listServices(t, e.url, "?limit=1")); got != "db:1:10.0.1.1:5432 next=db" {
		t.Fatalf("first page of 1: %s", got)
	}
	if got := summary(listServices(t, e.url, "?limit=1&after=db")); got != "web:2:10.0.0.2:80 next=" {
		t.Fatalf("second page of 1: %s", got)
	}

	for _, q := range []string{"?limit=0", "?limit=x", "?limit=1001", "?after=" + strings.Repeat("a", api.MaxNameLen+1)} {
		wantError(t, mustDo(t, newRequest(t, http.MethodGet, e.url+"/services"+q, "")), http.StatusBadRequest, api.CodeInvalidArgument)
	}

	t.Run("store that cannot list", func(t *testing.T) {
		srv, err := server.New(e.agent, server.Options{Logger: testLogger(t)})
		if err != nil {
			t.Fatal(err)
		}
		defer srv.Close()
		rec := httptest.NewRecorder()
		srv.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/services", nil))
		if rec.Code != http.StatusNotImplemented {
			t.Fatalf("status %d, want 501; body %s", rec.Code, rec.Body)
		}
	})
}

func TestHealthLiveAndReady(t *testing.T) {
	e := newEnv(t, envConfig{opts: server.Options{HealthTimeout: time.Second}})
	status := func(path string) int {
		t.Helper()
		resp := mustDo(t, newRequest(t, http.MethodGet, e.url+path, ""))
		resp.Body.Close()
		return resp.StatusCode
	}
	for _, p := range []string{"/health", "/health/live", "/health/ready"} {
		if got := status(p); got != http.StatusOK {
			t.Fatalf("GET %s = %d, want 200", p, got)
		}
	}
	// The store goes away: not ready, still alive.
	if err := e.etcd.Close(); err != nil {
		t.Fatal(err)
	}
	for p, want := range map[string]int{"/health": 503, "/health/ready": 503, "/health/live": 200} {
		if got := status(p); got != want {
			t.Errorf("store down: GET %s = %d, want %d", p, got, want)
		}
	}
	// Stopping: not alive.
	e.srv.Close()
	rec := httptest.NewRecorder()
	e.srv.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/health/live", nil))
	if rec.Code != http.StatusServiceUnavailable || !strings.Contains(rec.Body.String(), "stopping") {
		t.Fatalf("stopping: /health/live = %d %s", rec.Code, rec.Body)
	}
}

func TestBuildInfoMetric(t *testing.T) {
	e := newEnv(t, envConfig{})
	b := buildinfo.Read()
	line := fmt.Sprintf("discoverd_build_info{goversion=%q,revision=%q,version=%q}", b.GoVersion, b.ShortRevision(), b.Version)
	if v := scrape(t, e.url, line); v != 1 {
		t.Fatalf("%s = %v, want 1", line, v)
	}
}
