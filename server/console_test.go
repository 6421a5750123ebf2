package server_test

import (
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/flynn/discoverd/backend/etcd/etcdtest"
	"github.com/flynn/discoverd/server"
)

// getAgentInfo reads GET /agent.
func getAgentInfo(t *testing.T, url string) server.AgentInfo {
	t.Helper()
	resp, err := http.Get(url + "/agent")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /agent: %d %s", resp.StatusCode, body)
	}
	var info server.AgentInfo
	if err := json.Unmarshal(body, &info); err != nil {
		t.Fatalf("GET /agent: %v in %s", err, body)
	}
	return info
}

// GET /agent describes the agent and its store, and reports a store
// outage in its body (still 200) until the store is back.
func TestAgentInfo(t *testing.T) {
	cluster := etcdtest.NewCluster(t, 1)
	e := newEnv(t, envConfig{
		endpoints: cluster.Endpoints(),
		opts:      server.Options{Store: "etcd test", TTL: 30 * time.Second, HealthTimeout: 300 * time.Millisecond},
	})
	mustPut(t, e.url, "web", "10.0.0.1:80", "")
	info := getAgentInfo(t, e.url)
	if info.Store != "etcd test" || info.StoreHealth != "ok" || info.StoreError != "" ||
		info.Registrations != 1 || info.TTLSeconds != 30 || info.Version == "" || info.GoVersion == "" {
		t.Fatalf("GET /agent = %+v, want store ok, 1 registration, TTL 30", info)
	}
	if info.Session == nil || !info.Session.Live || info.Session.Established != 1 {
		t.Fatalf("GET /agent session = %+v, want live, established once", info.Session)
	}

	cluster.Member(0).Stop()
	waitFor(t, "GET /agent to report the outage", func() bool {
		return getAgentInfo(t, e.url).StoreHealth == "unavailable"
	})
	if info := getAgentInfo(t, e.url); info.StoreError == "" {
		t.Fatalf("GET /agent during the outage = %+v, want a reason", info)
	}
	if err := cluster.Member(0).Restart(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "GET /agent to report the store back", func() bool {
		return getAgentInfo(t, e.url).StoreHealth == "ok"
	})
}

// The console is served at /ui/ with its policy headers; /ui redirects
// there.
func TestConsoleRoute(t *testing.T) {
	e := newEnv(t, envConfig{})
	for _, tc := range []struct{ path, ctype string }{
		{"/ui/", "text/html"},
		{"/ui/console.js", "javascript"},
		{"/ui/console.css", "text/css"},
	} {
		resp, err := http.Get(e.url + tc.path)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK || !strings.Contains(resp.Header.Get("Content-Type"), tc.ctype) ||
			!strings.Contains(resp.Header.Get("Content-Security-Policy"), "default-src 'none'") {
			t.Errorf("GET %s: %d %q, CSP %q", tc.path, resp.StatusCode, resp.Header.Get("Content-Type"),
				resp.Header.Get("Content-Security-Policy"))
		}
	}
	resp, err := http.Get(e.url + "/ui")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.Request.URL.Path != "/ui/" || resp.StatusCode != http.StatusOK {
		t.Errorf("GET /ui ended at %s with %d, want /ui/ and 200", resp.Request.URL.Path, resp.StatusCode)
	}
}
