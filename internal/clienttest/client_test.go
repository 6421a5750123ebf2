package discoverd_test

import (
	"context"
	"errors"
	"maps"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/flynn/discoverd/api"
	discoverd "github.com/flynn/discoverd/client"

	"github.com/flynn/discoverd/internal/testkit"
)

func TestRegisterFindUnregister(t *testing.T) {
	ta := startAgent(t)
	owner, watcher := newClient(t, ta), newClient(t, ta)
	name := testkit.ServiceName(t, "web")

	set, err := watcher.NewServiceSet(name)
	if err != nil {
		t.Fatalf("NewServiceSet: %v", err)
	}
	defer set.Close()
	updates := set.Watch(false)

	attrs := map[string]string{"v": "1"}
	if err := owner.RegisterWithAttributes(name, "127.0.0.1:1001", attrs); err != nil {
		t.Fatalf("RegisterWithAttributes: %v", err)
	}
	attrs["v"] = "mutated after the call" // the client keeps its own copy
	if err := owner.Register(name, "127.0.0.1:1002"); err != nil {
		t.Fatalf("Register: %v", err)
	}
	u1 := waitUpdate(t, updates, "first online", online("127.0.0.1:1001"))
	waitUpdate(t, updates, "second online", online("127.0.0.1:1002"))
	if u1.Name != name || u1.Attrs["v"] != "1" || u1.Created == 0 {
		t.Fatalf("update = %+v", u1)
	}

	services, err := watcher.Services(name, wait)
	if err != nil {
		t.Fatalf("Services: %v", err)
	}
	if len(services) != 2 {
		t.Fatalf("Services = %d instances, want 2", len(services))
	}
	s := services[0]
	if s.Addr != "127.0.0.1:1001" || s.Host != "127.0.0.1" || s.Port != "1001" || s.Name != name ||
		s.Attrs["v"] != "1" || s.Created != u1.Created || services[1].Created <= s.Created {
		t.Fatalf("Services = %+v, %+v; want oldest first with host, port and attrs", s, services[1])
	}
	if got := set.Addrs(); !slices.Equal(got, []string{"127.0.0.1:1001", "127.0.0.1:1002"}) {
		t.Fatalf("Addrs = %v", got)
	}

	t.Run("re-registering updates the attributes", func(t *testing.T) {
		if err := owner.RegisterWithAttributes(name, "127.0.0.1:1001", map[string]string{"v": "2"}); err != nil {
			t.Fatal(err)
		}
		u := waitUpdate(t, updates, "attribute update", online("127.0.0.1:1001"))
		if u.Attrs["v"] != "2" || u.Created != u1.Created {
			t.Fatalf("update = %+v, want v=2 and the same Created", u)
		}
	})

	t.Run("Unregister withdraws at once", func(t *testing.T) {
		if err := owner.Unregister(name, "127.0.0.1:1001"); err != nil {
			t.Fatal(err)
		}
		waitUpdate(t, updates, "offline", offline("127.0.0.1:1001"))
		if err := owner.Unregister(name, "127.0.0.1:1001"); !errors.Is(err, discoverd.ErrUnknownRegistration) {
			t.Fatalf("second Unregister = %v, want ErrUnknownRegistration", err)
		}
		if api.ErrorCode(discoverd.ErrUnknownRegistration) != api.CodeNotFound {
			t.Fatal("ErrUnknownRegistration does not carry CodeNotFound")
		}
	})

	t.Run("UnregisterAll withdraws the rest", func(t *testing.T) {
		if err := owner.UnregisterAll(); err != nil {
			t.Fatal(err)
		}
		waitUpdate(t, updates, "offline", offline("127.0.0.1:1002"))
		if got := set.Services(); len(got) != 0 {
			t.Fatalf("Services after UnregisterAll = %v", got)
		}
	})
}

func TestRegisterErrors(t *testing.T) {
	ta := startAgent(t)
	c := newClient(t, ta)
	for _, tc := range []struct{ name, addr string }{
		{"", "127.0.0.1:1"},
		{"bad name", "127.0.0.1:1"},
		{"web", "127.0.0.1:0"},
		{"web", "no-port"},
	} {
		err := c.Register(tc.name, tc.addr)
		if !errors.Is(err, &api.Error{Code: api.CodeInvalidArgument}) {
			t.Errorf("Register(%q, %q) = %v, want CodeInvalidArgument", tc.name, tc.addr, err)
		}
	}
	if _, err := c.NewServiceSet("bad name"); !errors.Is(err, &api.Error{Code: api.CodeInvalidArgument}) {
		t.Errorf("NewServiceSet(bad name) = %v, want CodeInvalidArgument", err)
	}
	if _, err := c.Services(testkit.ServiceName(t, "empty"), 50*time.Millisecond); !errors.Is(err, discoverd.ErrTimeout) {
		t.Errorf("Services of an empty service = %v, want ErrTimeout", err)
	}
}

func TestExpandedAddress(t *testing.T) {
	ta := startAgent(t)
	c := newClient(t, ta)
	name := testkit.ServiceName(t, "db")
	set, err := c.RegisterWithSet(name, ":5432", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer set.Close()
	if got := set.SelfAddr(); got != "127.0.0.2:5432" {
		t.Fatalf("SelfAddr = %q, want the agent's EXTERNAL_IP expansion", got)
	}
	if l := set.Leader(); l == nil || l.Addr != "127.0.0.2:5432" {
		t.Fatalf("Leader = %+v, want self", l)
	}
	if got := set.Services(); len(got) != 0 {
		t.Fatalf("Services = %v, want self left out", got)
	}
	updates := set.Watch(true)
	waitUpdate(t, updates, "self in the replay", online("127.0.0.2:5432"))
	// Unregister accepts the address as registered or as expanded.
	if err := c.Unregister(name, "127.0.0.2:5432"); err != nil {
		t.Fatalf("Unregister(expanded) = %v", err)
	}
	waitUpdate(t, updates, "self offline", offline("127.0.0.2:5432"))

	t.Run("RegisterInstance returns it", func(t *testing.T) {
		got, err := c.RegisterInstance(name, ":5433", map[string]string{"k": "v"})
		if err != nil || got != "127.0.0.2:5433" {
			t.Fatalf("RegisterInstance = %q, %v; want the agent's EXTERNAL_IP expansion", got, err)
		}
		if u := waitUpdate(t, updates, "online", online("127.0.0.2:5433")); u.Attrs["k"] != "v" {
			t.Fatalf("registered %+v", u)
		}
		if got, err := c.RegisterInstance(name, "127.0.0.1:5434", nil); err != nil || got != "127.0.0.1:5434" {
			t.Fatalf("RegisterInstance = %q, %v; want the address as given", got, err)
		}
		if err := c.Unregister(name, ":5433"); err != nil {
			t.Fatal(err)
		}
		waitUpdate(t, updates, "offline", offline("127.0.0.2:5433"))
	})
}

func TestNewClientAddress(t *testing.T) {
	ta := startAgent(t)
	t.Setenv("DISCOVERD", "tcp://"+ta.Addr)
	c, err := discoverd.NewClient()
	if err != nil {
		t.Fatalf("NewClient with DISCOVERD=tcp://...: %v", err)
	}
	if c.Addr() != ta.Addr {
		t.Errorf("Addr = %q, want %q", c.Addr(), ta.Addr)
	}
	if err := c.Register(testkit.ServiceName(t, "x"), "127.0.0.1:1"); err != nil {
		t.Error(err)
	}
	c.Close()
	// After Close, calls fail with the sentinel itself.
	if err := c.Register(testkit.ServiceName(t, "x"), "127.0.0.1:2"); err != discoverd.ErrClosed {
		t.Errorf("Register after Close = %v, want ErrClosed", err)
	}
	if _, err := c.NewServiceSet(testkit.ServiceName(t, "x")); err != discoverd.ErrClosed {
		t.Errorf("NewServiceSet after Close = %v, want ErrClosed", err)
	}
	if _, err := c.Subscribe(context.Background(), testkit.ServiceName(t, "x")); err != discoverd.ErrClosed {
		t.Errorf("Subscribe after Close = %v, want ErrClosed", err)
	}
	if _, err := c.Services(testkit.ServiceName(t, "x"), time.Second); err != discoverd.ErrClosed {
		t.Errorf("Services after Close = %v, want ErrClosed", err)
	}
	if err := c.Close(); err != nil {
		t.Errorf("second Close = %v", err)
	}

	c, err = discoverd.NewClientWithAddr(ta.Addr)
	if err != nil {
		t.Fatalf("NewClientWithAddr: %v", err)
	}
	c.Close()
	//lint:ignore SA1019 the deprecated name is kept for go-discoverd programs; this tests it
	c, err = discoverd.NewClientUsingAddress(ta.Addr) // go-discoverd's older name
	if err != nil {
		t.Fatalf("NewClientUsingAddress: %v", err)
	}
	c.Close()

	ta.stop() // nothing listens there now
	if _, err := discoverd.NewClientWithAddr(ta.Addr); err == nil {
		t.Fatal("NewClientWithAddr to a closed port succeeded")
	}
}

func TestDefaultClient(t *testing.T) {
	ta := startAgent(t)
	name := testkit.ServiceName(t, "svc")
	t.Setenv("DISCOVERD", ta.Addr)
	t.Cleanup(func() {
		if discoverd.DefaultClient != nil {
			discoverd.DefaultClient.Close()
			discoverd.DefaultClient = nil
		}
	})
	// The package-level functions connect lazily (to DISCOVERD).
	if err := discoverd.Register(name, "127.0.0.1:2001"); err != nil {
		t.Fatalf("Register: %v", err)
	}
	first := discoverd.DefaultClient
	if first == nil {
		t.Fatal("DefaultClient not set by Register")
	}
	if err := discoverd.RegisterWithAttributes(name, "127.0.0.1:2002", map[string]string{"a": "b"}); err != nil {
		t.Fatalf("RegisterWithAttributes: %v", err)
	}
	services, err := discoverd.Services(name, wait)
	if err != nil || len(services) == 0 {
		t.Fatalf("Services = %v, %v", services, err)
	}
	set, err := discoverd.NewServiceSet(name)
	if err != nil {
		t.Fatalf("NewServiceSet: %v", err)
	}
	updates := set.Watch(true)
	waitUpdate(t, updates, "first", online("127.0.0.1:2001"))
	waitUpdate(t, updates, "second", online("127.0.0.1:2002"))
	if err := discoverd.Unregister(name, "127.0.0.1:2001"); err != nil {
		t.Fatalf("Unregister: %v", err)
	}
	waitUpdate(t, updates, "first offline", offline("127.0.0.1:2001"))
	if err := discoverd.UnregisterAll(); err != nil {
		t.Fatalf("UnregisterAll: %v", err)
	}
	waitUpdate(t, updates, "second offline", offline("127.0.0.1:2002"))

	self, err := discoverd.RegisterWithSet(name, "127.0.0.1:2003", nil)
	if err != nil {
		t.Fatalf("RegisterWithSet: %v", err)
	}
	if self.SelfAddr() != "127.0.0.1:2003" {
		t.Fatalf("SelfAddr = %q", self.SelfAddr())
	}
	// go-discoverd's types: RegisterAndStandby returns a chan *Service.
	var standby chan *discoverd.Service
	standby, err = discoverd.RegisterAndStandby(testkit.ServiceName(t, "solo"), "127.0.0.1:2004", nil)
	if err != nil {
		t.Fatalf("RegisterAndStandby: %v", err)
	}
	if l := recv(t, standby, "standby of the only instance"); l.Addr != "127.0.0.1:2004" {
		t.Fatalf("standby fired with %+v", l)
	}

	// As in go-discoverd, Connect leaves an existing default client (and
	// its registrations and sets) alone, whatever the address.
	if err := discoverd.Connect("127.0.0.1:1"); err != nil {
		t.Fatalf("Connect: %v", err)
	}
	if discoverd.DefaultClient != first {
		t.Fatal("Connect replaced the default client")
	}
	if err := discoverd.Register(name, "127.0.0.1:2005"); err != nil {
		t.Fatalf("Register after Connect: %v", err)
	}
	waitUpdate(t, updates, "a registration after Connect", online("127.0.0.1:2005"))
	waitUpdate(t, self.Watch(true), "the earlier registration, still online", online("127.0.0.1:2003"))

	// Once it is closed and cleared, Connect makes a new one.
	first.Close()
	discoverd.DefaultClient = nil
	if err := discoverd.Connect(""); err != nil { // "" = DISCOVERD
		t.Fatalf(`Connect(""): %v`, err)
	}
	if discoverd.DefaultClient == nil || discoverd.DefaultClient == first {
		t.Fatal("Connect did not make a new default client")
	}
}

func TestHeartbeats(t *testing.T) {
	ta := startAgent(t)
	name := testkit.ServiceName(t, "hb")
	obs := newClient(t, ta)
	set, err := obs.NewServiceSet(name)
	if err != nil {
		t.Fatal(err)
	}
	defer set.Close()
	updates := set.Watch(false)

	t.Run("keep a registration alive past the TTL", func(t *testing.T) {
		c := newClient(t, ta) // heartbeats every TTL/4
		if err := c.Register(name, "127.0.0.1:3001"); err != nil {
			t.Fatal(err)
		}
		waitUpdate(t, updates, "online", online("127.0.0.1:3001"))
		noRecv(t, updates, 2*agentTTL, "updates while heartbeating")
	})

	t.Run("register again when the agent forgot", func(t *testing.T) {
		// Heartbeats slower than the TTL: the agent expires the
		// registration, and the next heartbeat (CodeNotFound) registers
		// it again.
		c := newClient(t, ta, func(cfg *discoverd.Config) { cfg.HeartbeatInterval = agentTTL * 3 / 2 })
		if err := c.Register(name, "127.0.0.1:3002"); err != nil {
			t.Fatal(err)
		}
		first := waitUpdate(t, updates, "online", online("127.0.0.1:3002"))
		waitUpdate(t, updates, "expired", offline("127.0.0.1:3002"))
		again := waitUpdate(t, updates, "registered again", online("127.0.0.1:3002"))
		if again.Created <= first.Created {
			t.Fatalf("Created %d after re-registration, want > %d", again.Created, first.Created)
		}
	})
}

// TestLeaderElection runs three contenders; the leader dies in turn and
// the next oldest takes over, as seen by Leaders (of an observer and of a
// contender's own set) and by RegisterAndStandby.
func TestLeaderElection(t *testing.T) {
	ta := startAgent(t)
	name := testkit.ServiceName(t, "leader")
	obs := newClient(t, ta)
	oset, err := obs.NewServiceSet(name)
	if err != nil {
		t.Fatal(err)
	}
	defer oset.Close()
	leaders := oset.Leaders()
	if l := recv(t, leaders, "initial leader"); l != nil {
		t.Fatalf("initial leader = %+v, want nil", l)
	}

	addrs := []string{"127.0.0.1:4001", "127.0.0.1:4002", "127.0.0.1:4003"}
	var clients []*discoverd.Client
	var standbys []<-chan *discoverd.Service
	for i, addr := range addrs {
		c := newClient(t, ta)
		ch, err := c.RegisterAndStandby(name, addr, nil)
		if err != nil {
			t.Fatal(err)
		}
		clients = append(clients, c)
		standbys = append(standbys, ch)
		if i == 0 {
			// Only the first registration changes the leader.
			if l := recv(t, leaders, "leader"); l == nil || l.Addr != addrs[0] {
				t.Fatalf("leader = %+v, want %s", l, addrs[0])
			}
		}
	}
	// The last contender also follows the leader through its own set.
	self, err := clients[2].RegisterWithSet(name, addrs[2], nil)
	if err != nil {
		t.Fatal(err)
	}
	selfLeaders := self.Leaders()
	if l := recv(t, selfLeaders, "contender's view"); l.Addr != addrs[0] {
		t.Fatalf("contender sees leader %s, want %s", l.Addr, addrs[0])
	}
	if got := self.Addrs(); !slices.Equal(got, addrs[:2]) {
		t.Fatalf("contender's Addrs = %v, want the others %v", got, addrs[:2])
	}

	first := recv(t, standbys[0], "standby of the oldest")
	if first.Addr != addrs[0] || first.Created == 0 {
		t.Fatalf("standby 0 fired with %+v", first)
	}
	var token uint = first.Created
	for i := range addrs {
		if i > 0 {
			l := recv(t, standbys[i], "standby of the next oldest")
			if l.Addr != addrs[i] || l.Created <= token {
				t.Fatalf("standby %d fired with %+v; want %s with a larger fencing token than %d", i, l, addrs[i], token)
			}
			token = l.Created
		}
		for j := i + 1; j < len(addrs); j++ {
			select {
			case l := <-standbys[j]:
				t.Fatalf("standby %d fired with %+v while %s leads", j, l, addrs[i])
			default:
			}
		}
		if l := oset.Leader(); l == nil || l.Addr != addrs[i] {
			t.Fatalf("Leader = %+v, want %s", l, addrs[i])
		}
		clients[i].Close() // the leader dies: its connection closes
		want := ""
		if i+1 < len(addrs) {
			want = addrs[i+1]
		}
		l := recv(t, leaders, "next leader")
		if (l == nil) != (want == "") || (l != nil && l.Addr != want) {
			t.Fatalf("after %s died, leader = %+v, want %q", addrs[i], l, want)
		}
		if want != "" {
			if l := recv(t, selfLeaders, "contender's next leader"); l.Addr != want {
				t.Fatalf("contender sees leader %s, want %s", l.Addr, want)
			}
		}
	}
	if _, ok := <-standbys[2]; ok {
		t.Fatal("standby channel not closed after firing")
	}
}

func TestFilterAndSelect(t *testing.T) {
	ta := startAgent(t)
	name := testkit.ServiceName(t, "db")
	owner := newClient(t, ta)
	instances := []struct {
		addr  string
		attrs map[string]string
	}{
		{"127.0.0.1:5001", map[string]string{"role": "primary", "zone": "a"}},
		{"127.0.0.1:5002", map[string]string{"role": "replica", "zone": "a"}},
		{"127.0.0.1:5003", map[string]string{"role": "replica", "zone": "b"}},
	}
	for _, in := range instances {
		if err := owner.RegisterWithAttributes(name, in.addr, in.attrs); err != nil {
			t.Fatal(err)
		}
	}
	c := newClient(t, ta)
	set, err := c.NewServiceSet(name)
	if err != nil {
		t.Fatal(err)
	}
	defer set.Close()

	addrsOf := func(ss []*discoverd.Service) []string {
		var out []string
		for _, s := range ss {
			out = append(out, s.Addr)
		}
		return out
	}
	for _, tc := range []struct {
		sel  map[string]string
		want []string
	}{
		{nil, []string{"127.0.0.1:5001", "127.0.0.1:5002", "127.0.0.1:5003"}},
		{map[string]string{"role": "replica"}, []string{"127.0.0.1:5002", "127.0.0.1:5003"}},
		{map[string]string{"role": "replica", "zone": "b"}, []string{"127.0.0.1:5003"}},
		{map[string]string{"zone": "c"}, nil},
		{map[string]string{"missing": ""}, nil},
	} {
		if got := addrsOf(set.Select(tc.sel)); !slices.Equal(got, tc.want) {
			t.Errorf("Select(%v) = %v, want %v", tc.sel, got, tc.want)
		}
	}

	updates := set.Watch(false)
	leaders := set.Leaders()
	recv(t, leaders, "initial leader")

	set.Filter(map[string]string{"role": "replica"})
	if got := set.Addrs(); !slices.Equal(got, []string{"127.0.0.1:5002", "127.0.0.1:5003"}) {
		t.Fatalf("Addrs after Filter = %v", got)
	}
	if u := recv(t, updates, "filtered out"); u.Online || u.Addr != "127.0.0.1:5001" {
		t.Fatalf("update after Filter = %+v, want the primary offline", u)
	}
	if l := recv(t, leaders, "leader of the filtered set"); l.Addr != "127.0.0.1:5002" {
		t.Fatalf("leader of replicas = %s", l.Addr)
	}

	// A change that makes an instance match joins it to the set.
	if err := owner.RegisterWithAttributes(name, "127.0.0.1:5001", map[string]string{"role": "replica"}); err != nil {
		t.Fatal(err)
	}
	waitUpdate(t, updates, "joined by attribute change", online("127.0.0.1:5001"))
	if l := recv(t, leaders, "oldest replica leads"); l.Addr != "127.0.0.1:5001" {
		t.Fatalf("leader = %s", l.Addr)
	}
	// And one that makes it stop matching removes it.
	if err := owner.RegisterWithAttributes(name, "127.0.0.1:5002", map[string]string{"role": "primary"}); err != nil {
		t.Fatal(err)
	}
	waitUpdate(t, updates, "left by attribute change", offline("127.0.0.1:5002"))

	// Widening the filter brings everything back.
	set.Filter(nil)
	waitUpdate(t, updates, "back after widening", online("127.0.0.1:5002"))
	if got := set.Addrs(); len(got) != 3 {
		t.Fatalf("Addrs after Filter(nil) = %v", got)
	}
}

// TestSlowWatcherDoesNotStall checks that a watcher that never reads is
// cut off without slowing the set, the other watchers or the client.
func TestSlowWatcherDoesNotStall(t *testing.T) {
	ta := startAgent(t)
	name := testkit.ServiceName(t, "busy")
	c := newClient(t, ta, func(cfg *discoverd.Config) { cfg.WatchBuffer = 4 })
	set, err := c.NewServiceSet(name)
	if err != nil {
		t.Fatal(err)
	}
	defer set.Close()
	stalled := set.Watch(false)
	stalledLeaders := set.Leaders() // never read either
	reader := set.Watch(false)

	owner := newClient(t, ta)
	const n = 40
	for i := range n {
		addr := "127.0.0.1:" + strconv.Itoa(6000+i)
		if err := owner.Register(name, addr); err != nil {
			t.Fatal(err)
		}
		waitUpdate(t, reader, "reader sees "+addr, online(addr))
	}
	// The stalled watcher got its buffer's worth, then its channel closed.
	got := 0
	for range stalled {
		got++
	}
	if got != 4 {
		t.Fatalf("stalled watcher received %d updates before being cut off, want 4", got)
	}
	// The Leaders channel kept only recent values; the last is current.
	var last *discoverd.Service
	for len(stalledLeaders) > 0 {
		last = <-stalledLeaders
	}
	if l := set.Leader(); last == nil || l == nil || last.Addr != l.Addr {
		t.Fatalf("last queued leader %+v, want the current %+v", last, l)
	}
	// Unwatch of a cut-off channel is harmless; a new watcher resyncs.
	set.Unwatch(stalled)
	if again := set.Watch(true); len(again) != n {
		t.Fatalf("Watch(true) replays %d updates, want %d", len(again), n)
	}
	set.Unwatch(reader)
	if _, ok := <-reader; ok {
		t.Fatal("Unwatch did not close the channel")
	}
}

// TestReconnect restarts the agent's front end on the same address: the
// clients reconnect, registrations come back, and a set reports what
// changed while it was away.
func TestReconnect(t *testing.T) {
	ta := startAgent(t)
	name := testkit.ServiceName(t, "svc")
	stay := newClient(t, ta) // its registration must come back
	gone := newClient(t, ta) // closed while the agent is away
	watcher := newClient(t, ta)
	if err := stay.RegisterWithAttributes(name, "127.0.0.1:7001", map[string]string{"k": "v"}); err != nil {
		t.Fatal(err)
	}
	if err := gone.Register(name, "127.0.0.1:7002"); err != nil {
		t.Fatal(err)
	}
	set, err := watcher.NewServiceSet(name)
	if err != nil {
		t.Fatal(err)
	}
	defer set.Close()
	updates := set.Watch(true)
	before := waitUpdate(t, updates, "stay online", online("127.0.0.1:7001"))
	waitUpdate(t, updates, "gone online", online("127.0.0.1:7002"))
	events := watcher.WatchReconnects()
	stayEvents := stay.WatchReconnects()

	ta.stop()
	if ev := recv(t, events, "conn event"); ev.Status != discoverd.ConnStatusDisconnected {
		t.Fatalf("first event = %v, want disconnected", ev.Status)
	}
	if ev := recv(t, events, "conn event"); ev.Status != discoverd.ConnStatusConnectFailed {
		t.Fatalf("second event = %v, want connect_failed", ev.Status)
	}
	// While disconnected, calls fail fast, with the sentinel itself (as
	// go-discoverd did: programs compare with ==).
	if err := watcher.Register(name, "127.0.0.1:7009"); err != discoverd.ErrDisconnected {
		t.Fatalf("Register while disconnected = %v, want ErrDisconnected", err)
	}
	if _, err := watcher.NewServiceSet(name); err != discoverd.ErrDisconnected {
		t.Fatalf("NewServiceSet while disconnected = %v, want ErrDisconnected", err)
	}
	if _, err := watcher.Subscribe(context.Background(), name); err != discoverd.ErrDisconnected {
		t.Fatalf("Subscribe while disconnected = %v, want ErrDisconnected", err)
	}
	if api.ErrorCode(discoverd.ErrDisconnected) != api.CodeUnavailable {
		t.Fatal("ErrDisconnected does not carry CodeUnavailable")
	}
	gone.Close()
	// A new instance appears while the watcher is away.
	sess := ta.Agent.NewSession(0)
	defer sess.Close()
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	if _, err := sess.Register(ctx, api.Args{Name: name, Addr: "127.0.0.1:7003"}); err != nil {
		t.Fatal(err)
	}

	if err := ta.start(); err != nil {
		t.Fatal(err)
	}
	for ev := range events {
		if ev.Status == discoverd.ConnStatusConnected {
			break
		}
	}
	for ev := range stayEvents {
		if ev.Status == discoverd.ConnStatusConnected {
			break
		}
	}
	// The watcher converges on {stay (registered again), new}, seeing
	// gone's departure and new's arrival, and never gone coming back.
	view := map[string]*discoverd.ServiceUpdate{"127.0.0.1:7001": before, "127.0.0.1:7002": before}
	sawGoneOffline := false
	deadline := time.After(wait)
	for {
		if _, ok := view["127.0.0.1:7002"]; !ok && view["127.0.0.1:7003"] != nil &&
			view["127.0.0.1:7001"] != nil && view["127.0.0.1:7001"].Created > before.Created {
			break
		}
		select {
		case u := <-updates:
			switch {
			case u.Addr == "127.0.0.1:7002" && u.Online:
				t.Fatal("gone came back")
			case u.Addr == "127.0.0.1:7002":
				sawGoneOffline = true
			}
			if u.Online {
				view[u.Addr] = u
			} else {
				delete(view, u.Addr)
			}
		case <-deadline:
			t.Fatalf("view after reconnect = %v", slices.Collect(maps.Keys(view)))
		}
	}
	if !sawGoneOffline {
		t.Fatal("no offline update for the instance that vanished")
	}
	if got := view["127.0.0.1:7001"]; got.Attrs["k"] != "v" {
		t.Fatalf("re-registered with attrs %v, want the original ones", got.Attrs)
	}
	got := set.Addrs()
	slices.Sort(got)
	if !slices.Equal(got, []string{"127.0.0.1:7001", "127.0.0.1:7003"}) {
		t.Fatalf("Addrs after reconnect = %v", got)
	}
	// The restored client works as before.
	if err := watcher.Register(name, "127.0.0.1:7004"); err != nil {
		t.Fatalf("Register after reconnect: %v", err)
	}
	waitUpdate(t, updates, "new registration", online("127.0.0.1:7004"))
	watcher.UnwatchReconnects(events)
	if _, ok := <-events; ok {
		for range events {
		}
	}
}

func TestSubscribeStream(t *testing.T) {
	ta := startAgent(t)
	name := testkit.ServiceName(t, "raw")
	c := newClient(t, ta)
	if err := c.Register(name, "127.0.0.1:8001"); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	s, err := c.Subscribe(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	if u := recv(t, s.Updates(), "snapshot"); !u.Online || u.Addr != "127.0.0.1:8001" {
		t.Fatalf("first = %+v", u)
	}
	if u := recv(t, s.Updates(), "sentinel"); !u.IsSentinel() {
		t.Fatalf("second = %+v, want the sentinel", u)
	}
	if err := c.Unregister(name, "127.0.0.1:8001"); err != nil {
		t.Fatal(err)
	}
	if u := recv(t, s.Updates(), "live"); u.Online || u.Addr != "127.0.0.1:8001" {
		t.Fatalf("third = %+v", u)
	}
	cancel()
	for range s.Updates() {
	}
	if !errors.Is(s.Err(), context.Canceled) {
		t.Fatalf("Err after cancel = %v", s.Err())
	}
	s.Close()
}

// TestNoStoreDependencies: an application linking the client links no
// store client.
func TestNoStoreDependencies(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", "github.com/flynn/discoverd/client/...").CombinedOutput()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, out)
	}
	for _, dep := range strings.Fields(string(out)) {
		if strings.HasPrefix(dep, "go.etcd.io/") || strings.Contains(dep, "go-zookeeper") ||
			dep == "github.com/flynn/discoverd/agent" || strings.HasPrefix(dep, "github.com/flynn/discoverd/backend") {
			t.Errorf("the client depends on %s", dep)
		}
	}
}

func TestServiceSetClose(t *testing.T) {
	ta := startAgent(t)
	c := newClient(t, ta)
	set, err := c.NewServiceSet(testkit.ServiceName(t, "s"))
	if err != nil {
		t.Fatal(err)
	}
	updates, leaders := set.Watch(true), set.Leaders()
	<-leaders // the current leader (none)
	if err := set.Close(); err != nil {
		t.Fatalf("Close = %v", err)
	}
	if _, ok := <-updates; ok {
		t.Fatal("Watch channel open after Close")
	}
	if _, ok := <-leaders; ok {
		t.Fatal("Leaders channel open after Close")
	}
	if _, ok := <-set.Watch(true); ok {
		t.Fatal("Watch after Close returned an open channel")
	}
	if _, ok := <-set.Leaders(); ok {
		t.Fatal("Leaders after Close returned an open channel")
	}
	set.Unwatch(updates) // already closed: ignored
	if err := set.Close(); err != nil {
		t.Fatalf("second Close = %v", err)
	}
}

func TestStreamSlowReader(t *testing.T) {
	ta := startAgent(t)
	name := testkit.ServiceName(t, "s")
	c := newClient(t, ta, func(cfg *discoverd.Config) { cfg.WatchBuffer = 2 })
	s, err := c.Subscribe(context.Background(), name)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	for i := range 5 {
		if err := c.Register(name, "127.0.0.1:"+strconv.Itoa(9100+i)); err != nil {
			t.Fatal(err)
		}
	}
	// Not reading: the sentinel plus live updates overflow the buffer.
	select {
	case <-s.Done():
	case <-time.After(wait):
		t.Fatal("stream not ended")
	}
	if !errors.Is(s.Err(), discoverd.ErrSlowReader) {
		t.Fatalf("Err = %v, want ErrSlowReader", s.Err())
	}
}

func TestConnStatusString(t *testing.T) {
	for s, want := range map[discoverd.ConnStatus]string{
		discoverd.ConnStatusConnected:     "connected",
		discoverd.ConnStatusDisconnected:  "disconnected",
		discoverd.ConnStatusConnectFailed: "connect_failed",
		discoverd.ConnStatus(42):          "unknown",
	} {
		if got := s.String(); got != want {
			t.Errorf("%d.String() = %q, want %q", s, got, want)
		}
	}
}
