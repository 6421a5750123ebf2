package faults_test

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/flynn/discoverd/api"
	"github.com/flynn/discoverd/backend/etcd/etcdtest"
	discoverd "github.com/flynn/discoverd/client"
	"github.com/flynn/discoverd/rpc"
)

// fleet is what the etcd scenarios run: two in-process agents on one
// etcd cluster (each configured with every member), clients of the Go
// client library registering through them, and subscribers on both.
type fleet struct {
	t        *testing.T
	cluster  *etcdtest.Cluster
	eps      []string
	name     string
	nodes    []*node
	watchers []*watcher
	logger   *slog.Logger

	mu      sync.Mutex
	want    map[string]bool              // acknowledged registrations that must be online
	acked   map[string]time.Time         // when each registration was acknowledged
	clients map[string]*discoverd.Client // by registered address
	next    int
}

func newFleet(t *testing.T, name string, watchersPerNode int) *fleet {
	cl := etcdtest.NewCluster(t, 3)
	f := &fleet{t: t, cluster: cl, eps: cl.Endpoints(), name: name, want: make(map[string]bool), acked: make(map[string]time.Time), clients: make(map[string]*discoverd.Client)}
	f.logger, _ = newLog(t, "clients")
	for range 2 {
		f.nodes = append(f.nodes, startNode(t, f.eps, ttl))
	}
	for _, n := range f.nodes {
		for range watchersPerNode {
			f.watchers = append(f.watchers, newWatcher(t, n.Addr, name))
		}
	}
	return f
}

// register starts count new clients, alternately on each agent, and
// registers one instance through each, retrying what an application
// retries, while during runs. It returns when every registration is
// acknowledged (failing the test otherwise) and when during has returned,
// with the time of the last acknowledgement.
func (f *fleet) register(count int, during func()) time.Time {
	t := f.t
	var wg sync.WaitGroup
	errs := make(chan error, count)
	acks := make(chan time.Time, count)
	deadline := time.Now().Add(wait)
	for range count {
		f.mu.Lock()
		i := f.next
		f.next++
		f.mu.Unlock()
		n := f.nodes[i%len(f.nodes)]
		c := newClient(t, n.Addr, ttl/4, f.logger)
		addr := fmt.Sprintf("10.0.%d.%d:80", i/250, i%250+1)
		wg.Go(func() {
			if err := registerRetry(c, f.name, addr, nil, deadline); err != nil {
				errs <- err
				return
			}
			now := time.Now()
			acks <- now
			f.mu.Lock()
			f.want[addr] = true
			f.acked[addr] = now
			f.clients[addr] = c
			f.mu.Unlock()
		})
	}
	if during != nil {
		during()
	}
	wg.Wait()
	close(errs)
	close(acks)
	for err := range errs {
		t.Fatalf("a registration was not acknowledged: %v", err)
	}
	var last time.Time
	for a := range acks {
		if a.After(last) {
			last = a
		}
	}
	return last
}

func (f *fleet) wanted() map[string]bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := make(map[string]bool, len(f.want))
	for a := range f.want {
		out[a] = true
	}
	return out
}

// converged checks that every subscriber and the store hold exactly the
// wanted set by deadline, and that the subscribers agree with the store
// on each instance's Created.
func (f *fleet) converged(deadline time.Time, what string) {
	t := f.t
	t.Helper()
	want := f.wanted()
	for _, w := range f.watchers {
		w.waitSet(t, want, deadline, what)
	}
	keys := waitStore(t, f.eps, f.name, deadline, what, exactly(want))
	for i, w := range f.watchers {
		for a, u := range w.current() {
			if int64(u.Created) != keys[a].Created {
				t.Errorf("%s: subscriber %d has %s with Created %d, the store %d", what, i, a, u.Created, keys[a].Created)
			}
		}
	}
}

// lostAcked returns the offline events subscribers saw for registrations
// after they had been acknowledged to their client. (A registration whose
// call failed may have been written all the same: the agent withdraws it,
// and it may show up online then offline before the client's retry lands.
// That is not a lost registration.)
func (f *fleet) lostAcked() []event {
	f.mu.Lock()
	defer f.mu.Unlock()
	var lost []event
	for _, w := range f.watchers {
		for _, e := range w.eventsSince(time.Time{}) {
			if at, ok := f.acked[e.Addr]; ok && !e.Online && e.At.After(at) {
				lost = append(lost, e)
			}
		}
	}
	return lost
}

// flaps counts the offline events of registrations not yet acknowledged.
func (f *fleet) flaps() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	n := 0
	for _, w := range f.watchers {
		for _, e := range w.eventsSince(time.Time{}) {
			if at, ok := f.acked[e.Addr]; !e.Online && (!ok || !e.At.After(at)) {
				n++
			}
		}
	}
	return n
}

// waitQuorum blocks until the running members answer a linearizable read
// (the cluster has a quorum and a leader) and returns when that was.
func waitQuorum(t *testing.T, eps []string) time.Time {
	t.Helper()
	cli, err := clientv3.New(clientv3.Config{Endpoints: eps, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	deadline := time.Now().Add(wait)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		_, err := cli.Get(ctx, "quorum-probe")
		cancel()
		if err == nil {
			return time.Now()
		}
		if time.Now().After(deadline) {
			t.Fatalf("no quorum within %v: %v", wait, err)
		}
	}
}

// TestEtcdMemberLoss: while two agents serve registering clients and
// subscribers, one etcd member stops (a follower, then, once it is back,
// the raft leader). Registrations made meanwhile are retried by their
// clients as an application would; none is lost, nothing goes offline,
// and every subscriber holds exactly the acknowledged set within 5 s of
// the cluster having a quorum again.
func TestEtcdMemberLoss(t *testing.T) {
	f := newFleet(t, "member-loss", 2)

	last := f.register(40, nil)
	f.converged(last.Add(converge), "before any fault")

	// A follower stops: the cluster keeps its quorum.
	leader := f.cluster.Leader()
	if leader < 0 {
		t.Fatal("the cluster has no leader")
	}
	follower := (leader + 1) % 3
	last = f.register(30, func() { f.cluster.Member(follower).Stop() })
	f.converged(last.Add(converge), "with a follower stopped")
	if err := f.cluster.Member(follower).Restart(); err != nil {
		t.Fatal(err)
	}

	// The leader stops: the others elect a new one.
	leader = f.cluster.Leader()
	if leader < 0 {
		t.Fatal("the cluster has no leader")
	}
	var quorum time.Time
	last = f.register(30, func() {
		f.cluster.Member(leader).Stop()
		var rest []string
		for i := range 3 {
			if i != leader {
				rest = append(rest, f.cluster.Member(i).Endpoint())
			}
		}
		quorum = waitQuorum(t, rest)
	})
	f.converged(maxTime(quorum, last).Add(converge), "with the leader stopped")
	if l := f.cluster.Leader(); l == leader || l < 0 {
		t.Errorf("leader after the stop: member %d (was %d)", l, leader)
	}
	if err := f.cluster.Member(leader).Restart(); err != nil {
		t.Fatal(err)
	}
	f.converged(time.Now().Add(converge), "with every member back")

	// The backend keeps its lease through the election (etcd extends
	// every lease when it elects a leader), so no acknowledged
	// registration may go offline.
	if lost := f.lostAcked(); len(lost) != 0 {
		t.Errorf("subscribers saw %d acknowledged registrations go offline: %+v", len(lost), lost)
	}
	t.Logf("offline events of registrations whose call had failed (withdrawn by the agent, then registered again): %d", f.flaps())
	total := 0
	for i, n := range f.nodes {
		st := n.Agent.Stats()
		total += st.Registrations
		if st.Expired != 0 {
			t.Errorf("agent %d expired %d registrations", i, st.Expired)
		}
		t.Logf("agent %d: %d registrations, %d backend errors; log: %d lease losses, %d broken watches",
			i, st.Registrations, st.BackendErrors, n.Log.count("etcd lease lost"), n.Log.count("backend watch broken"))
	}
	if want := len(f.wanted()); total != want || want != 100 {
		t.Errorf("agents hold %d registrations; %d acknowledged, want 100", total, want)
	}
}

func maxTime(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

// TestEtcdUnavailable: every etcd member stops for 3×TTL under two agents.
// Meanwhile the agents accept heartbeats (nothing expires), serve their
// last known state to subscribers old and new (no offline event), and
// /health says 503; some clients die. When the members are back, every
// live registration is stored again on a new lease within 5 s, and those
// of the dead clients are gone.
func TestEtcdUnavailable(t *testing.T) {
	f := newFleet(t, "outage", 1)
	f.register(20, nil)
	// A client speaking raw RPC on each agent, heartbeating by hand.
	var raw []*rpc.Client
	for i, n := range f.nodes {
		c := mustDial(t, n.Addr, rpc.Gob)
		a := fmt.Sprintf("10.9.0.%d:80", i+1)
		var got string
		mustCall(t, c, api.MethodRegister, &api.Args{Name: f.name, Addr: a}, &got)
		f.mu.Lock()
		f.want[a] = true
		f.mu.Unlock()
		raw = append(raw, c)
	}
	hb := startHeartbeats(t, raw, f.name)
	f.converged(time.Now().Add(converge), "before the outage")
	before := storeKeys(t, f.eps, f.name)
	all := f.wanted()

	// The outage.
	outage := time.Now()
	var wg sync.WaitGroup
	for i := range 3 {
		wg.Go(f.cluster.Member(i).Stop)
	}
	wg.Wait()

	// Clients die: 3 on each agent (clients alternate between agents).
	dead := make(map[string]bool)
	f.mu.Lock()
	for i := range 6 {
		a := fmt.Sprintf("10.0.%d.%d:80", i/250, i%250+1)
		f.clients[a].Close()
		dead[a] = true
		delete(f.want, a)
	}
	f.mu.Unlock()

	// During the outage: the last known state, for new subscribers and
	// lookups too; /health says the store is gone (its probe waits up to
	// 2 s, so both agents are asked at once).
	healths := make(chan string, len(f.nodes))
	for i, n := range f.nodes {
		go func() {
			code, err := healthCode(n.Addr)
			if err == nil && code != http.StatusServiceUnavailable {
				err = fmt.Errorf("status %d", code)
			}
			if err != nil {
				healths <- fmt.Sprintf("agent %d: /health during the outage: %v, want 503", i, err)
				return
			}
			healths <- ""
		}()
	}
	for i, n := range f.nodes {
		w := newWatcher(t, n.Addr, f.name)
		if got := w.current(); !sameAddrs(got, all) {
			t.Errorf("agent %d: a new subscriber's snapshot during the outage:\n%s", i, diffAddrs(got, all))
		}
		var list []json.RawMessage
		resp, err := http.Get("http://" + n.Addr + "/services/" + f.name)
		if err != nil {
			t.Fatal(err)
		}
		json.NewDecoder(resp.Body).Decode(&list)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK || len(list) != len(all) {
			t.Errorf("agent %d: GET /services during the outage: %d with %d instances, want 200 with %d", i, resp.StatusCode, len(list), len(all))
		}
	}
	for range f.nodes {
		if msg := <-healths; msg != "" {
			t.Error(msg)
		}
	}

	// The outage lasts 3×TTL, heartbeats going on.
	select {
	case <-time.After(time.Until(outage.Add(3 * ttl))):
	case <-hb.failed:
	}
	for i, w := range f.watchers {
		if evs := w.eventsSince(outage); len(evs) != 0 {
			t.Errorf("subscriber %d saw %d events during the outage: %+v", i, len(evs), evs)
		}
	}
	for i, n := range f.nodes {
		if st := n.Agent.Stats(); st.Expired != 0 {
			t.Errorf("agent %d expired %d registrations during the outage", i, st.Expired)
		}
	}
	t.Logf("outage of %v", time.Since(outage).Round(10*time.Millisecond))

	// The members come back together (a member alone has no quorum).
	for i := range 3 {
		wg.Go(func() {
			if err := f.cluster.Member(i).Restart(); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	back := time.Now()
	live := f.wanted()
	keys := waitStore(t, f.eps, f.name, back.Add(converge), "live registrations stored again on a new lease", func(keys map[string]stored) string {
		if !sameAddrs(keys, live) {
			return "\n" + diffAddrs(keys, live)
		}
		for a, k := range keys {
			if k.Lease == before[a].Lease {
				return a + " is still on the lease it had before the outage"
			}
		}
		return ""
	})
	t.Logf("store holds exactly the %d live registrations, on new leases, %v after the members were back",
		len(keys), time.Since(back).Round(10*time.Millisecond))
	// Subscribers follow once the agents hold their leases again: the
	// deletions of the clients that died during the outage are held back
	// for the stall grace (2 s) after the lease was renewed and restored,
	// which is about when the store was seen to converge, so the deadline
	// counts from then, not from the members' restart.
	f.converged(time.Now().Add(converge), "after the outage")

	// After the outage, subscribers saw each dead client go once. The
	// live ones should not move at all: their keys are still in the store
	// (etcd extends every lease when it elects a leader) until the old
	// lease expires, about a TTL after the cluster is back. An agent that
	// stores them again later than that makes each of its instances go
	// offline and come back with a new Created (leadership moves).
	var flaps []string
	for i, w := range f.watchers {
		offline := make(map[string]int)
		for _, e := range w.eventsSince(outage) {
			switch {
			case !e.Online:
				offline[e.Addr]++
			case dead[e.Addr]:
				t.Errorf("subscriber %d: dead client %s online again", i, e.Addr)
			default:
				flaps = append(flaps, fmt.Sprintf("subscriber %d: %s offline, then online with Created %d (was %d)", i, e.Addr, e.Created, before[e.Addr].Created))
			}
		}
		for a := range dead {
			if offline[a] != 1 {
				t.Errorf("subscriber %d: dead client %s went offline %d times, want 1", i, a, offline[a])
			}
		}
	}
	if len(flaps) > 0 {
		t.Errorf("%d live registrations went offline and came back after the outage:\n%s", len(flaps), strings.Join(flaps, "\n"))
	}
	if err := hb.stop(); err != nil {
		t.Errorf("a heartbeat failed: %v", err)
	}
	for i, n := range f.nodes {
		if code := health(t, n.Addr); code != http.StatusOK {
			t.Errorf("agent %d: /health = %d after the outage", i, code)
		}
		st := n.Agent.Stats()
		t.Logf("agent %d: %d registrations, %d expired, %d backend errors; log: %d lease losses, %d renewals, %d broken watches",
			i, st.Registrations, st.Expired, st.BackendErrors,
			n.Log.count("etcd lease lost"), n.Log.count("etcd lease renewed"), n.Log.count("backend watch broken"))
	}
}

// heartbeats heartbeats the registrations 10.9.0.<i+1>:80 of raw clients
// by hand, every TTL/4, until stop.
type heartbeats struct {
	quit   chan struct{}
	done   chan struct{}
	failed chan struct{} // closed at the first failure
	err    error         // the first failure; read after done
}

func startHeartbeats(t *testing.T, raw []*rpc.Client, name string) *heartbeats {
	h := &heartbeats{quit: make(chan struct{}), done: make(chan struct{}), failed: make(chan struct{})}
	go func() {
		defer close(h.done)
		tick := time.NewTicker(ttl / 4)
		defer tick.Stop()
		for {
			for i, c := range raw {
				a := fmt.Sprintf("10.9.0.%d:80", i+1)
				if err := call(c, api.MethodHeartbeat, &api.Args{Name: name, Addr: a}, &struct{}{}); err != nil {
					h.err = fmt.Errorf("heartbeat of %s at %v: %w", a, time.Now().Format("15:04:05.000"), err)
					close(h.failed)
					return
				}
			}
			select {
			case <-tick.C:
			case <-h.quit:
				return
			}
		}
	}()
	t.Cleanup(func() { h.stop() })
	return h
}

// stop stops the heartbeats and returns the first failure. It is
// idempotent.
func (h *heartbeats) stop() error {
	select {
	case <-h.quit:
	default:
		close(h.quit)
	}
	<-h.done
	return h.err
}
