package faults_test

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/flynn/discoverd/backend/etcd/etcdtest"
)

// TestAgentKilled: the discoverd process that clients registered through
// is SIGKILLed and restarted on the same port, twice: at once, and after
// the store has expired its lease. Each time every client (Go client
// library) reconnects and every live registration is back in the store,
// on the new process's lease, within one heartbeat interval of the
// restart; a subscriber on another agent sees at most one offline/online
// pair per instance, and ends with the exact set.
//
// What happens to Created (and so to the leader) depends on which comes
// first, and the test checks both cases: registered again before the
// dead agent's lease expires, an instance's key never leaves the store
// and keeps its Created (no event at all); after the expiry, it is a new
// registration with a new, larger Created, and leadership may move to
// whichever instance registered again first.
func TestAgentKilled(t *testing.T) {
	srv := etcdtest.NewServer(t)
	eps := srv.Endpoints()
	addr := freeAddr(t)
	_, lb := newLog(t, "discoverd")
	args := []string{"-etcd", strings.Join(eps, ","), "-bind", addr, "-ttl", ttl.String()}
	p := startProc(t, lb, args...)

	other := startNode(t, eps, ttl)
	const name = "killed"
	w := newWatcher(t, other.Addr, name)

	logger, _ := newLog(t, "clients")
	const clients = 20
	hb := ttl / 2 // the client library's default ratio to the TTL
	want := make(map[string]bool)
	for i := range clients {
		c := newClient(t, addr, hb, logger)
		a := fmt.Sprintf("10.0.0.%d:80", i+1)
		if err := c.RegisterWithAttributes(name, a, map[string]string{"i": fmt.Sprint(i)}); err != nil {
			t.Fatal(err)
		}
		want[a] = true
	}
	w.waitSet(t, want, time.Now().Add(wait), "before the kill")

	leaderOf := func() (string, uint) {
		ctx, cancel := context.WithTimeout(context.Background(), wait)
		defer cancel()
		u, ok, err := other.Agent.LeaderOf(ctx, name)
		if err != nil || !ok {
			t.Fatalf("LeaderOf: %+v %v %v", u, ok, err)
		}
		return u.Addr, u.Created
	}

	for _, phase := range []struct {
		what         string
		afterExpiry  bool // restart only once the store has dropped the killed agent's lease
		wantNewCount int  // instances that must come back with a new Created (-1: any)
	}{
		{"restart at once", false, -1},
		{"restart after the TTL", true, clients},
	} {
		old := storeKeys(t, eps, name)
		if !sameAddrs(old, want) {
			t.Fatalf("%s: store before the kill:\n%s", phase.what, diffAddrs(old, want))
		}
		var oldLease int64
		for _, k := range old {
			oldLease = k.Lease
		}
		oldLeader, oldLeaderCreated := leaderOf()

		killed := time.Now()
		p.kill(t)
		if phase.afterExpiry {
			w.waitSet(t, map[string]bool{}, time.Now().Add(wait), phase.what+": expiry of the killed agent's lease")
			t.Logf("%s: every instance offline at the other agent %v after SIGKILL (TTL %v)",
				phase.what, time.Since(killed).Round(10*time.Millisecond), ttl)
		}
		p = startProc(t, lb, args...)
		serving := time.Now()

		// Back in the store, on the new process's lease, within one
		// heartbeat interval of the restart.
		waitStore(t, eps, name, serving.Add(hb), phase.what+": registrations back within one heartbeat interval", func(keys map[string]stored) string {
			if !sameAddrs(keys, want) {
				return "\n" + diffAddrs(keys, want)
			}
			for a, k := range keys {
				if k.Lease == oldLease {
					return a + " is still on the killed agent's lease"
				}
			}
			return ""
		})
		t.Logf("%s: every registration back %v after the restart", phase.what, time.Since(serving).Round(10*time.Millisecond))
		w.waitSet(t, want, time.Now().Add(converge), phase.what+": subscriber on the other agent")

		// At most one offline/online pair per instance, in that order, and
		// Created changes exactly for the instances that went offline.
		final := w.current()
		type count struct{ off, on int }
		counts := make(map[string]*count)
		for _, e := range w.eventsSince(killed) {
			c := counts[e.Addr]
			if c == nil {
				c = &count{}
				counts[e.Addr] = c
			}
			if e.Online {
				c.on++
				if c.off == 0 {
					t.Errorf("%s: %s came online again without going offline (attributes changed?)", phase.what, e.Addr)
				}
			} else {
				c.off++
			}
		}
		renewed := 0
		for a := range want {
			c := counts[a]
			if c == nil {
				c = &count{}
			}
			if c.off > 1 || c.on != c.off {
				t.Errorf("%s: %s went offline %d times and online %d times, want at most one pair", phase.what, a, c.off, c.on)
			}
			switch {
			case c.off == 1 && final[a].Created <= uint(old[a].Created):
				t.Errorf("%s: %s came back with Created %d, not after %d", phase.what, a, final[a].Created, old[a].Created)
			case c.off == 0 && final[a].Created != uint(old[a].Created):
				t.Errorf("%s: %s never went offline but its Created changed from %d to %d", phase.what, a, old[a].Created, final[a].Created)
			}
			if c.off == 1 {
				renewed++
			}
		}
		if phase.wantNewCount >= 0 && renewed != phase.wantNewCount {
			t.Errorf("%s: %d instances came back with a new Created, want %d", phase.what, renewed, phase.wantNewCount)
		}
		newLeader, newLeaderCreated := leaderOf()
		t.Logf("%s: %d of %d instances went offline once and came back with a new Created; leader %s (Created %d) -> %s (Created %d)",
			phase.what, renewed, clients, oldLeader, oldLeaderCreated, newLeader, newLeaderCreated)
	}
}
