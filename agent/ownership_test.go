package agent_test

import (
	"errors"
	"testing"
	"time"

	"github.com/flynn/discoverd/agent"
	"github.com/flynn/discoverd/api"
	"github.com/flynn/discoverd/backend/etcd/etcdtest"
)

// TestOwnership: a registration belongs to the session that registered it
// last. Another session's Heartbeat and Unregister are refused
// (permission_denied) and change nothing; a takeover moves it; the former
// owner's Close leaves it. The shared (HTTP) class never takes one over
// from a connection (conflict), while a connection takes over from it.
func TestOwnership(t *testing.T) {
	srv := etcdtest.NewServer(t)
	a := mustAgent(t, mustBackend(t, srv, 10*time.Second), agent.Config{})
	first, second := a.NewSession(0), a.NewSession(0)
	defer second.Close()
	shared := a.NewSharedSession(-1)
	defer shared.Close()
	web := agent.Args{Name: "web", Addr: "10.0.0.1:80"}

	wantCode := func(err error, code api.Code, what string) {
		t.Helper()
		if !errors.Is(err, &api.Error{Code: code}) {
			t.Fatalf("%s: %v, want %s", what, err, code)
		}
	}
	present := func(what string) api.ServiceUpdate {
		t.Helper()
		list, err := a.Instances(ctxT(t), "web")
		if err != nil {
			t.Fatalf("Instances: %v", err)
		}
		for _, u := range list {
			if u.Addr == web.Addr {
				return u
			}
		}
		t.Fatalf("%s: %s not listed (%v)", what, web.Addr, list)
		return api.ServiceUpdate{}
	}

	mustRegister(t, first, web.Name, web.Addr, map[string]string{"by": "first"})
	created := present("after Register").Created
	wantCode(second.Heartbeat(ctxT(t), web), api.CodePermissionDenied, "Heartbeat from another session")
	wantCode(second.Unregister(ctxT(t), web), api.CodePermissionDenied, "Unregister from another session")
	wantCode(shared.Unregister(ctxT(t), web), api.CodeConflict, "Unregister from the shared session")
	if _, err := shared.Register(ctxT(t), agent.Args{Name: web.Name, Addr: web.Addr, Attrs: map[string]string{"by": "http"}}); err == nil {
		t.Fatal("the shared session took over a connection's registration")
	} else {
		wantCode(err, api.CodeConflict, "Register from the shared session")
	}
	if u := present("after the refused calls"); u.Attrs["by"] != "first" {
		t.Fatalf("attrs %v after refused calls, want the owner's", u.Attrs)
	}

	// A takeover keeps the fencing token; the former owner is refused and
	// its Close leaves the registration to the new owner.
	mustRegister(t, second, web.Name, web.Addr, map[string]string{"by": "second"})
	if u := present("after the takeover"); u.Created != created || u.Attrs["by"] != "second" {
		t.Fatalf("after the takeover: %+v, want Created %d and the new owner's attrs", u, created)
	}
	wantCode(first.Heartbeat(ctxT(t), web), api.CodePermissionDenied, "Heartbeat from the former owner")
	wantCode(first.Unregister(ctxT(t), web), api.CodePermissionDenied, "Unregister from the former owner")
	first.Close()
	present("after the former owner's Close")
	if err := second.Heartbeat(ctxT(t), web); err != nil {
		t.Fatalf("the owner's Heartbeat: %v", err)
	}

	// The shared class holds its own registrations, and a connection may
	// take one over.
	mustRegister(t, shared, "web", "10.0.0.2:80", nil)
	wantCode(second.Unregister(ctxT(t), agent.Args{Name: "web", Addr: "10.0.0.2:80"}), api.CodePermissionDenied, "a connection's Unregister of an HTTP registration")
	mustRegister(t, second, "web", "10.0.0.2:80", nil)
	wantCode(shared.Heartbeat(ctxT(t), agent.Args{Name: "web", Addr: "10.0.0.2:80"}), api.CodeConflict, "the shared session's Heartbeat after a connection took it over")
	if err := second.Unregister(ctxT(t), web); err != nil {
		t.Fatalf("the owner's Unregister: %v", err)
	}
}

// TestOwnershipAcrossAgents: a registration taken over through another
// agent is left alone by its former owner: the former owner's Unregister
// is refused and deletes nothing, and within about a TTL its own agent
// learns of the takeover (the backend's anti-entropy) and no longer
// answers its heartbeats.
func TestOwnershipAcrossAgents(t *testing.T) {
	srv := etcdtest.NewServer(t)
	const ttl = 2 * time.Second
	a1 := mustAgent(t, mustBackend(t, srv, ttl), agent.Config{TTL: time.Minute})
	a2 := mustAgent(t, mustBackend(t, srv, ttl), agent.Config{TTL: time.Minute})
	former, owner := a1.NewSession(0), a2.NewSession(0)
	defer owner.Close()
	web := agent.Args{Name: "web", Addr: "10.0.0.1:80"}

	mustRegister(t, former, web.Name, web.Addr, map[string]string{"by": "a1"})
	mustRegister(t, owner, web.Name, web.Addr, map[string]string{"by": "a2"})
	err := former.Unregister(ctxT(t), web)
	if !errors.Is(err, &api.Error{Code: api.CodePermissionDenied}) {
		t.Fatalf("former owner's Unregister: %v, want permission_denied", err)
	}
	list, err := a2.Instances(ctxT(t), "web")
	if err != nil || len(list) != 1 || list[0].Attrs["by"] != "a2" {
		t.Fatalf("after the former owner's Unregister: %v, %v; want the new owner's registration", list, err)
	}

	// A second one, left to the anti-entropy.
	other := agent.Args{Name: "web", Addr: "10.0.0.2:80"}
	mustRegister(t, former, other.Name, other.Addr, nil)
	mustRegister(t, owner, other.Name, other.Addr, map[string]string{"by": "a2"})
	deadline := time.Now().Add(4*ttl + 10*time.Second)
	for former.Heartbeat(ctxT(t), other) == nil {
		if time.Now().After(deadline) {
			t.Fatalf("the former owner's agent still answers its heartbeats %v after the takeover", 4*ttl+10*time.Second)
		}
		time.Sleep(50 * time.Millisecond) // polling: the anti-entropy has no signal to wait on
	}
	if err := former.Heartbeat(ctxT(t), other); !errors.Is(err, &api.Error{Code: api.CodeNotFound}) {
		t.Fatalf("former owner's Heartbeat after the pass: %v, want not_found", err)
	}
	former.Close()
	list, err = a2.Instances(ctxT(t), "web")
	if err != nil || len(list) != 2 {
		t.Fatalf("after the former owner's Close: %v, %v; want both registrations kept", list, err)
	}
	if st := a1.Stats(); st.Store == nil || st.Store.Lost < 1 {
		t.Errorf("former owner's store stats %+v, want Lost >= 1", st.Store)
	}
}

// TestTakeoverBackThroughFormerAgent: a registration taken over through
// another agent, then registered again (same attributes) by a new session
// of the first agent, is written back to the store on the first agent's
// session, although that agent believed it still held it unchanged.
func TestTakeoverBackThroughFormerAgent(t *testing.T) {
	srv := etcdtest.NewServer(t)
	a1 := mustAgent(t, mustBackend(t, srv, time.Minute), agent.Config{TTL: time.Minute})
	a2 := mustAgent(t, mustBackend(t, srv, time.Minute), agent.Config{TTL: time.Minute})
	first, second, other := a1.NewSession(0), a1.NewSession(0), a2.NewSession(0)
	defer first.Close()
	attrs := map[string]string{"v": "1"}
	mustRegister(t, first, "web", "10.0.0.1:80", attrs)
	mustRegister(t, other, "web", "10.0.0.1:80", attrs)  // through a2
	mustRegister(t, second, "web", "10.0.0.1:80", attrs) // back through a1
	// a2's session no longer owns it in the store: closing it leaves it.
	other.Close()
	list, err := a1.Instances(ctxT(t), "web")
	if err != nil || len(list) != 1 {
		t.Fatalf("after the takeover back and the other owner's Close: %v, %v; want the registration kept", list, err)
	}
	second.Close()
	deadline := time.Now().Add(10 * time.Second)
	for {
		list, err := a2.Instances(ctxT(t), "web")
		if err == nil && len(list) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("after its owner's Close the registration is still listed: %v, %v", list, err)
		}
		time.Sleep(20 * time.Millisecond) // polling another agent's cache: nothing to wait on
	}
}
