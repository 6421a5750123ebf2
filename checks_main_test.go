package main

import (
	"encoding/json"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/flynn/discoverd/api"
	"github.com/flynn/discoverd/backend/etcd/etcdtest"
	"github.com/flynn/discoverd/internal/testkit"
	"github.com/flynn/discoverd/server"
)

// TestCheckedRegistrationCLIAndRestart: "register -check-tcp -detach"
// hands a registration to the agent, which keeps it online while the
// check passes, shows it in "services -json", keeps it across a restart
// (from its data dir), and "unregister" removes it.
func TestCheckedRegistrationCLIAndRestart(t *testing.T) {
	eps := etcdtest.NewServer(t).Endpoints()
	dataDir := filepath.Join(t.TempDir(), "data")
	start := func() *Main {
		m := testMain(t)
		m.Etcd, m.DataDir = eps, dataDir
		mustStart(t, m)
		return m
	}
	target := tcpTargetAddr(t)
	m := start()
	addr := m.Addr().String()

	code, out, errOut := cliRun(t, addr, "register", "-check-tcp", target, "-interval", "1s", "-rise", "1", "-detach", "db", target, "role=primary")
	if code != 0 || !strings.Contains(out, "kept by the agent") {
		t.Fatalf("register -detach: exit %d, %q %q", code, out, errOut)
	}
	waitListed(t, addr, "db", target)
	code, out, _ = cliRun(t, addr, "services", "-json", "db")
	var list []server.Instance
	if err := json.Unmarshal([]byte(out), &list); code != 0 || err != nil || len(list) != 1 {
		t.Fatalf("services -json: exit %d, %s (%v)", code, out, err)
	}
	if c := list[0].Check; c == nil || c.State != api.CheckOnline || c.Check.TCP != target || list[0].Attrs["role"] != "primary" {
		t.Fatalf("services -json: %s", out)
	}

	t.Run("without -detach: until interrupted", func(t *testing.T) {
		other := tcpTargetAddr(t)
		b := startCommand(t, addr, "register", "-check-tcp", other, "-interval", "1s", "-rise", "1", "web", other)
		if l := b.line(t); !strings.HasPrefix(l, "registered web "+other+" with a tcp check") {
			t.Fatalf("first line %q", l)
		}
		waitListed(t, addr, "web", other)
		if code, rest := b.stop(t); code != 0 || len(rest) != 1 || rest[0] != "unregistered web "+other {
			t.Fatalf("stop: exit %d, %q; stderr %s", code, rest, b.stderr)
		}
		if code, out, _ := cliRun(t, addr, "services", "web"); code != 0 || out != "" {
			t.Fatalf("services after the command stopped: exit %d, %q", code, out)
		}
	})

	if err := m.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	m = start()
	addr = m.Addr().String()
	waitListed(t, addr, "db", target)

	if code, out, errOut := cliRun(t, addr, "unregister", "db", target); code != 0 || !strings.Contains(out, "unregistered") {
		t.Fatalf("unregister: exit %d, %q %q", code, out, errOut)
	}
	if code, out, _ := cliRun(t, addr, "services", "db"); code != 0 || out != "" {
		t.Fatalf("services after unregister: exit %d, %q", code, out)
	}
	if code, _, errOut := cliRun(t, addr, "unregister", "db", target); code != 1 || !strings.Contains(errOut, "keeps no registration") {
		t.Fatalf("second unregister: exit %d, %q", code, errOut)
	}
}

func TestRegisterCheckFlagErrors(t *testing.T) {
	for _, args := range [][]string{
		{"register", "-detach", "db", "10.0.0.1:1"},
		{"register", "-interval", "5s", "db", "10.0.0.1:1"},
		{"register", "-check-tcp", "nohost", "db", "10.0.0.1:1"},
		{"register", "-check-grpc", "nohost/pkg.Svc", "db", "10.0.0.1:1"},
		{"register", "-check-http", "http://h/", "-check-tcp", "h:1", "db", "10.0.0.1:1"},
		{"unregister", "db"},
	} {
		if code, _, errOut := cliRun(t, "127.0.0.1:1", args...); code != 2 || !strings.Contains(errOut, "usage:") {
			t.Errorf("%q: exit %d, %q; want 2 with usage", args, code, errOut)
		}
	}
}

// waitListed waits until "services NAME" lists addr.
func waitListed(t *testing.T, agentAddr, name, addr string) {
	t.Helper()
	deadline := time.After(waitTimeout)
	for {
		if code, out, _ := cliRun(t, agentAddr, "services", name); code == 0 && strings.TrimSpace(out) == addr {
			return
		}
		select {
		case <-deadline:
			t.Fatalf("%s %s never listed", name, addr)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func tcpTargetAddr(t *testing.T) string {
	addr, _ := testkit.TCPTarget(t)
	return addr
}
