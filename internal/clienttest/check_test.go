package discoverd_test

import (
	"net"
	"testing"
	"time"

	"github.com/flynn/discoverd/api"
	"github.com/flynn/discoverd/checks"
	discoverd "github.com/flynn/discoverd/client"
	"github.com/flynn/discoverd/internal/testkit"
)

// TestRegisterChecked: a registration handed to the agent with a check
// outlives its client and the TTL without heartbeats, goes offline when
// its check fails, and UnregisterChecked from another client removes it.
func TestRegisterChecked(t *testing.T) {
	ta := startAgent(t)
	m, err := checks.New(checks.Config{Registrar: ta.Agent.NewKeptSession(), ExternalIP: "127.0.0.2", Logger: quiet()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	ta.stop()
	ta.opts.Checks = m
	if err := ta.start(); err != nil {
		t.Fatal(err)
	}

	target, stop := testkit.TCPTarget(t)
	_, port, _ := net.SplitHostPort(target)

	name := testkit.ServiceName(t, "db")
	watcher := newClient(t, ta)
	set, err := watcher.NewServiceSet(name)
	if err != nil {
		t.Fatal(err)
	}
	defer set.Close()
	updates := set.Watch(false)

	owner := newClient(t, ta)
	got, err := owner.RegisterChecked(name, ":"+port, map[string]string{"k": "v"},
		discoverd.Check{TCP: target, Interval: api.Duration(time.Second), Rise: 1, Fall: 1})
	if err != nil || got != "127.0.0.2:"+port {
		t.Fatalf("RegisterChecked: %q %v", got, err)
	}
	owner.Close() // the agent keeps it
	u := waitUpdate(t, updates, "checked instance online", online(got))
	if u.Attrs["k"] != "v" {
		t.Fatalf("update %+v", u)
	}
	noRecv(t, updates, 2*agentTTL, "a checked registration without heartbeats, past the TTL")

	stop()
	waitUpdate(t, updates, "offline once its check fails", offline(got))

	if _, err := watcher.RegisterChecked(name, got, nil, discoverd.Check{}); api.ErrorCode(err) != api.CodeInvalidArgument {
		t.Fatalf("RegisterChecked without a target: %v", err)
	}
	if err := watcher.UnregisterChecked(name, ":"+port); err != nil {
		t.Fatalf("UnregisterChecked: %v", err)
	}
	if err := watcher.UnregisterChecked(name, got); api.ErrorCode(err) != api.CodeNotFound {
		t.Fatalf("UnregisterChecked again: %v, want not_found", err)
	}
}
