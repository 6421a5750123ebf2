package dnsserver_test

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/flynn/discoverd/agent"
	"github.com/flynn/discoverd/api"
	"github.com/flynn/discoverd/backend/etcd"
	"github.com/flynn/discoverd/backend/etcd/etcdtest"
	"github.com/flynn/discoverd/dnsserver"

	"github.com/flynn/discoverd/internal/testkit"
)

// etcdtest.VerifyTestMain is goleak's check with a grace period for the
// peer connections of a stopped etcd member.
func TestMain(m *testing.M) { etcdtest.VerifyTestMain(m) }

// wait bounds every wait: reaching it is a failure, never a pass.
const wait = 15 * time.Second

// testTTL differs from the default, so that the tests see it is used.
const testTTL = 7

func quiet() *slog.Logger {
	return slog.New(slog.NewTextHandler(discard{}, &slog.HandlerOptions{Level: slog.LevelError}))
}

type discard struct{}

func (discard) Write(p []byte) (int, error) { return len(p), nil }

// env is a real agent on a real etcd, its DNS view and server, and one
// session to register with.
type env struct {
	agent *agent.Agent
	view  *agent.View[*dnsserver.Service]
	srv   *dnsserver.Server
	sess  *agent.Session
	addr  string
}

// mustEnv starts an agent on the etcd at endpoints, and a DNS server on a
// free port; probe is the view's store probe period.
func mustEnv(tb testing.TB, endpoints []string, probe time.Duration) *env {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	b, err := etcd.Open(ctx, etcd.Config{Endpoints: endpoints, TTL: time.Minute, Logger: quiet()})
	if err != nil {
		tb.Fatalf("etcd.Open: %v", err)
	}
	tb.Cleanup(func() { b.Close() })
	// A TTL longer than any test: the session's registrations get no
	// heartbeat, and must not expire while a loaded machine registers 300.
	a, err := agent.New(agent.Config{Backend: b, TTL: time.Hour, Logger: quiet()})
	if err != nil {
		tb.Fatalf("agent.New: %v", err)
	}
	tb.Cleanup(func() { a.Close() })
	view := agent.NewView(a, agent.ViewConfig{Probe: probe}, dnsserver.Compile)
	tb.Cleanup(view.Close)
	srv, err := dnsserver.Listen(dnsserver.Config{
		Addr:          "127.0.0.1:0",
		TTL:           testTTL * time.Second,
		LookupTimeout: time.Second,
		Cache:         view,
		Logger:        quiet(),
	})
	if err != nil {
		tb.Fatalf("dnsserver.Listen: %v", err)
	}
	tb.Cleanup(func() { srv.Close() })
	sess := a.NewSession(0)
	tb.Cleanup(sess.Close)
	return &env{agent: a, view: view, srv: srv, sess: sess, addr: srv.UDPAddr().String()}
}

func (e *env) register(tb testing.TB, name string, addrs ...string) {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	for _, addr := range addrs {
		if _, err := e.sess.Register(ctx, api.Args{Name: name, Addr: addr}); err != nil {
			tb.Fatalf("Register %s %s: %v", name, addr, err)
		}
	}
}

// query asks name/qtype over network ("udp" or "tcp"), with EDNS0 size
// edns (0: no EDNS0).
func query(tb testing.TB, addr, network, name string, qtype uint16, edns uint16) *dns.Msg {
	tb.Helper()
	m := new(dns.Msg)
	m.SetQuestion(name, qtype)
	if edns > 0 {
		m.SetEdns0(edns, false)
	}
	c := &dns.Client{Net: network, Timeout: wait, UDPSize: max(edns, dns.MinMsgSize)}
	resp, _, err := c.Exchange(m, addr)
	if err != nil {
		tb.Fatalf("%s %s %s: %v", network, name, dns.TypeToString[qtype], err)
	}
	return resp
}

// queryRaw asks over UDP and returns the reply and its size on the wire.
func queryRaw(tb testing.TB, addr, name string, qtype uint16, edns uint16) (*dns.Msg, int) {
	tb.Helper()
	m := new(dns.Msg)
	m.SetQuestion(name, qtype)
	if edns > 0 {
		m.SetEdns0(edns, false)
	}
	out, err := m.Pack()
	if err != nil {
		tb.Fatal(err)
	}
	conn, err := net.Dial("udp", addr)
	if err != nil {
		tb.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(wait))
	if _, err := conn.Write(out); err != nil {
		tb.Fatal(err)
	}
	buf := make([]byte, 65536)
	n, err := conn.Read(buf)
	if err != nil {
		tb.Fatalf("reading the reply to %s: %v", name, err)
	}
	resp := new(dns.Msg)
	if err := resp.Unpack(buf[:n]); err != nil {
		tb.Fatalf("unpacking the reply to %s: %v", name, err)
	}
	return resp, n
}

// answers returns the answer records' data as strings (A/AAAA: the IP;
// SRV: "port target"; TXT: the strings joined by spaces), sorted.
func answers(tb testing.TB, m *dns.Msg) []string {
	tb.Helper()
	var out []string
	for _, rr := range m.Answer {
		switch rr := rr.(type) {
		case *dns.A:
			out = append(out, rr.A.String())
		case *dns.AAAA:
			out = append(out, rr.AAAA.String())
		case *dns.SRV:
			if rr.Priority != 0 || rr.Weight != 1 {
				tb.Errorf("SRV %v: want priority 0, weight 1", rr)
			}
			out = append(out, fmt.Sprintf("%d %s", rr.Port, rr.Target))
		case *dns.TXT:
			out = append(out, strings.Join(rr.Txt, " "))
		default:
			tb.Errorf("unexpected answer record %v", rr)
		}
	}
	slices.Sort(out)
	return out
}

func ttls(m *dns.Msg) []uint32 {
	var out []uint32
	for _, rr := range m.Answer {
		out = append(out, rr.Header().Ttl)
	}
	return slices.Compact(out)
}

// TestNames asks every name form over UDP and TCP.
func TestNames(t *testing.T) {
	srv := etcdtest.NewServer(t)
	e := mustEnv(t, srv.Endpoints(), time.Second)
	// The leader is the first registered.
	e.register(t, "web", "10.0.0.1:80", "10.0.0.2:81", "[fd00::1]:82", "db.example.com:5432")
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	leader, ok, err := e.agent.LeaderOf(ctx, "web")
	if err != nil || !ok {
		t.Fatalf("LeaderOf: %v %v", ok, err)
	}
	const (
		t1 = "0a000001.addr.discoverd."
		t2 = "0a000002.addr.discoverd."
		t6 = "fd000000000000000000000000000001.addr.discoverd."
	)
	allSRV := []string{"5432 db.example.com.", "80 " + t1, "81 " + t2, "82 " + t6}
	for _, tc := range []struct {
		name  string
		qname string
		qtype uint16
		rcode int
		want  []string
		ttl   uint32
	}{
		{"A", "web.discoverd.", dns.TypeA, dns.RcodeSuccess, []string{"10.0.0.1", "10.0.0.2"}, testTTL},
		{"A in any case of the zone", "web.DiscoverD.", dns.TypeA, dns.RcodeSuccess, []string{"10.0.0.1", "10.0.0.2"}, testTTL},
		{"AAAA", "web.discoverd.", dns.TypeAAAA, dns.RcodeSuccess, []string{"fd00::1"}, testTTL},
		{"SRV", "web.discoverd.", dns.TypeSRV, dns.RcodeSuccess, allSRV, testTTL},
		{"SRV of _svc._tcp", "_web._tcp.discoverd.", dns.TypeSRV, dns.RcodeSuccess, allSRV, testTTL},
		{"A of _svc._tcp: no data", "_web._tcp.discoverd.", dns.TypeA, dns.RcodeSuccess, nil, 0},
		{"TXT of svc: no data", "web.discoverd.", dns.TypeTXT, dns.RcodeSuccess, nil, 0},
		{"leader A", "leader.web.discoverd.", dns.TypeA, dns.RcodeSuccess, []string{"10.0.0.1"}, 1},
		{"leader AAAA: no data", "leader.web.discoverd.", dns.TypeAAAA, dns.RcodeSuccess, nil, 0},
		{"leader SRV", "leader.web.discoverd.", dns.TypeSRV, dns.RcodeSuccess, []string{"80 " + t1}, 1},
		{"leader TXT", "leader.web.discoverd.", dns.TypeTXT, dns.RcodeSuccess,
			[]string{fmt.Sprintf("created=%d addr=10.0.0.1:80", leader.Created)}, 1},
		{"target A", t1, dns.TypeA, dns.RcodeSuccess, []string{"10.0.0.1"}, testTTL},
		{"target AAAA", t6, dns.TypeAAAA, dns.RcodeSuccess, []string{"fd00::1"}, testTTL},
		{"service names are case sensitive", "WEB.discoverd.", dns.TypeA, dns.RcodeSuccess, nil, 0},
		{"no instance", "nothing.discoverd.", dns.TypeA, dns.RcodeSuccess, nil, 0},
		{"no leader", "leader.nothing.discoverd.", dns.TypeA, dns.RcodeSuccess, nil, 0},
		{"invalid service name", "-web.discoverd.", dns.TypeA, dns.RcodeNameError, nil, 0},
		{"invalid service name in SRV form", "_-web._tcp.discoverd.", dns.TypeSRV, dns.RcodeNameError, nil, 0},
		{"outside the zone", "web.example.com.", dns.TypeA, dns.RcodeRefused, nil, 0},
		{"zone as a label elsewhere", "web.discoverd.example.", dns.TypeA, dns.RcodeRefused, nil, 0},
		{"apex SOA", "discoverd.", dns.TypeSOA, dns.RcodeSuccess, nil, testTTL},
	} {
		for _, network := range []string{"udp", "tcp"} {
			t.Run(tc.name+"/"+network, func(t *testing.T) {
				m := query(t, e.addr, network, tc.qname, tc.qtype, 0)
				if m.Rcode != tc.rcode {
					t.Fatalf("rcode %s, want %s", dns.RcodeToString[m.Rcode], dns.RcodeToString[tc.rcode])
				}
				if m.Truncated {
					t.Errorf("TC set")
				}
				if tc.qtype == dns.TypeSOA {
					if len(m.Answer) != 1 || m.Answer[0].Header().Rrtype != dns.TypeSOA {
						t.Fatalf("answer %v, want the zone's SOA", m.Answer)
					}
					return
				}
				if got := answers(t, m); !slices.Equal(got, tc.want) {
					t.Fatalf("answers %q, want %q", got, tc.want)
				}
				if tc.rcode == dns.RcodeRefused {
					if m.Authoritative || len(m.Ns) > 0 {
						t.Errorf("REFUSED with AA %v and authority %v", m.Authoritative, m.Ns)
					}
					return
				}
				if !m.Authoritative {
					t.Errorf("AA not set")
				}
				if len(tc.want) > 0 {
					if got := ttls(m); !slices.Equal(got, []uint32{tc.ttl}) {
						t.Errorf("TTLs %v, want %d", got, tc.ttl)
					}
					return
				}
				wantNegative(t, m, strings.HasPrefix(tc.qname, "leader."))
			})
		}
	}

	t.Run("SRV targets in the additional section", func(t *testing.T) {
		m := query(t, e.addr, "udp", "web.discoverd.", dns.TypeSRV, 0)
		var extra []string
		for _, rr := range m.Extra {
			extra = append(extra, rr.String())
		}
		slices.Sort(extra)
		want := []string{
			t1 + "\t7\tIN\tA\t10.0.0.1",
			t2 + "\t7\tIN\tA\t10.0.0.2",
			t6 + "\t7\tIN\tAAAA\tfd00::1",
		}
		if !slices.Equal(extra, want) {
			t.Fatalf("additional %q, want %q", extra, want)
		}
	})

	t.Run("metrics", func(t *testing.T) {
		queries := e.srv.Collectors()[0].(*prometheus.CounterVec)
		for _, l := range [][2]string{{"A", "NOERROR"}, {"A", "REFUSED"}, {"A", "NXDOMAIN"}, {"TXT", "NOERROR"}, {"SRV", "NXDOMAIN"}} {
			if n := testutil.ToFloat64(queries.WithLabelValues(l[0], l[1])); n == 0 {
				t.Errorf("no query counted with type %s, rcode %s", l[0], l[1])
			}
		}
		if n := testutil.CollectAndCount(e.srv.Collectors()[1]); n != 1 {
			t.Fatalf("latency histogram: %d series", n)
		}
	})
}

// wantNegative checks a negative answer: no answer, the zone's SOA in the
// authority section with the configured TTL as its minimum; its own TTL is
// 1 s for leader names (negative caching lasts the smaller of the two).
func wantNegative(tb testing.TB, m *dns.Msg, leader bool) {
	tb.Helper()
	if len(m.Answer) != 0 {
		tb.Fatalf("answer %v, want none", m.Answer)
	}
	if len(m.Ns) != 1 {
		tb.Fatalf("authority %v, want the zone's SOA", m.Ns)
	}
	soa, ok := m.Ns[0].(*dns.SOA)
	if !ok || soa.Hdr.Name != "discoverd." {
		tb.Fatalf("authority %v, want the zone's SOA", m.Ns[0])
	}
	wantTTL := uint32(testTTL)
	if leader {
		wantTTL = 1
	}
	if soa.Minttl != testTTL || soa.Hdr.Ttl != wantTTL {
		tb.Fatalf("SOA minimum %d TTL %d, want %d and %d", soa.Minttl, soa.Hdr.Ttl, testTTL, wantTTL)
	}
}

// TestTruncation: with 300 instances, a UDP answer fills the client's
// EDNS0 buffer (512 bytes without EDNS0), in a new random order each time,
// with TC set whenever records were left out; TCP carries them all.
func TestTruncation(t *testing.T) {
	srv := etcdtest.NewServer(t)
	e := mustEnv(t, srv.Endpoints(), time.Second)
	var addrs []string
	for i := range 300 {
		addrs = append(addrs, fmt.Sprintf("10.1.%d.%d:%d", i/250, i%250+1, 1000+i))
	}
	e.register(t, "big", addrs...)

	for _, tc := range []struct {
		qtype   uint16
		edns    uint16
		limit   int
		all, tc bool
	}{
		{dns.TypeA, 0, 512, false, true},
		{dns.TypeA, 1232, 1232, false, true},
		{dns.TypeA, 4096, 4096, false, true},
		{dns.TypeA, 8192, 8192, true, false},
		{dns.TypeSRV, 0, 512, false, true},
		{dns.TypeSRV, 4096, 4096, false, true},
		{dns.TypeSRV, 16384, 16384, true, false},
		{dns.TypeA, 100, 512, false, true}, // below 512 counts as 512
	} {
		t.Run(fmt.Sprintf("%s/edns=%d", dns.TypeToString[tc.qtype], tc.edns), func(t *testing.T) {
			m, size := queryRaw(t, e.addr, "big.discoverd.", tc.qtype, tc.edns)
			if size > tc.limit {
				t.Fatalf("%d bytes, more than %d", size, tc.limit)
			}
			if m.Truncated != tc.tc {
				t.Fatalf("TC %v, want %v (%d answers)", m.Truncated, tc.tc, len(m.Answer))
			}
			if got := len(m.Answer); tc.all && got != 300 || !tc.all && (got == 0 || got >= 300) {
				t.Fatalf("%d answers in %d bytes", got, size)
			}
			// Filled: one more record would not have fitted.
			if !tc.all {
				rr := 16
				if tc.qtype == dns.TypeSRV {
					rr = 12 + 6 + len("0a010001.addr.discoverd.") + 1
				}
				if size+rr <= tc.limit {
					t.Fatalf("%d answers in %d bytes: room for one more in %d", len(m.Answer), size, tc.limit)
				}
			}
		})
	}

	t.Run("shuffled per query", func(t *testing.T) {
		first := query(t, e.addr, "udp", "big.discoverd.", dns.TypeA, 0)
		for range 5 {
			again := query(t, e.addr, "udp", "big.discoverd.", dns.TypeA, 0)
			if !slices.EqualFunc(first.Answer, again.Answer, func(a, b dns.RR) bool { return a.String() == b.String() }) {
				return
			}
		}
		t.Fatal("6 answers in the same order")
	})

	t.Run("TCP carries every instance", func(t *testing.T) {
		for _, qtype := range []uint16{dns.TypeA, dns.TypeSRV} {
			m := query(t, e.addr, "tcp", "big.discoverd.", qtype, 0)
			if len(m.Answer) != 300 || m.Truncated {
				t.Fatalf("%s over TCP: %d answers, TC %v", dns.TypeToString[qtype], len(m.Answer), m.Truncated)
			}
			got := answers(t, m)
			if qtype == dns.TypeA {
				var want []string
				for _, a := range addrs {
					h, _, _ := net.SplitHostPort(a)
					want = append(want, h)
				}
				slices.Sort(want)
				if !slices.Equal(got, want) {
					t.Fatalf("TCP answers differ from the registrations")
				}
			}
		}
	})

	if n := testutil.ToFloat64(e.srv.Collectors()[2]); n == 0 {
		t.Fatal("no truncation counted")
	}
}

// TestChangeVisibleAtOnce: a registration or removal acknowledged by the
// agent is in the next answer, even for a name already cached.
func TestChangeVisibleAtOnce(t *testing.T) {
	srv := etcdtest.NewServer(t)
	e := mustEnv(t, srv.Endpoints(), time.Second)
	if m := query(t, e.addr, "udp", "api.discoverd.", dns.TypeA, 0); len(m.Answer) != 0 {
		t.Fatalf("answers %v before any registration", m.Answer)
	}
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	for i := range 5 {
		addr := fmt.Sprintf("10.2.0.%d:80", i+1)
		e.register(t, "api", addr)
		m := query(t, e.addr, "udp", "api.discoverd.", dns.TypeA, 0)
		if len(m.Answer) != i+1 {
			t.Fatalf("after registering %s: answers %v", addr, answers(t, m))
		}
		if m := query(t, e.addr, "tcp", "leader.api.discoverd.", dns.TypeA, 0); !slices.Equal(answers(t, m), []string{"10.2.0.1"}) {
			t.Fatalf("leader after registering %s: %v", addr, answers(t, m))
		}
	}
	if err := e.sess.Unregister(ctx, api.Args{Name: "api", Addr: "10.2.0.1:80"}); err != nil {
		t.Fatal(err)
	}
	if m := query(t, e.addr, "udp", "leader.api.discoverd.", dns.TypeA, 0); !slices.Equal(answers(t, m), []string{"10.2.0.2"}) {
		t.Fatalf("leader after unregistering 10.2.0.1: %v", answers(t, m))
	}
	if m := query(t, e.addr, "udp", "api.discoverd.", dns.TypeA, 0); len(m.Answer) != 4 {
		t.Fatalf("after unregistering 10.2.0.1: %v", answers(t, m))
	}
}

// TestStaleDuringOutage: while the store is down, cached names are still
// answered (and counted as stale); names never asked get SERVFAIL; once
// the store is back, answers are fresh again.
func TestStaleDuringOutage(t *testing.T) {
	cluster := etcdtest.NewCluster(t, 1)
	e := mustEnv(t, cluster.Endpoints(), 50*time.Millisecond)
	e.register(t, "web", "10.0.0.1:80")
	stale := e.srv.Collectors()[3]
	if m := query(t, e.addr, "udp", "web.discoverd.", dns.TypeA, 0); len(m.Answer) != 1 {
		t.Fatalf("answers %v", m.Answer)
	}
	if n := testutil.ToFloat64(stale); n != 0 {
		t.Fatalf("%v stale answers with the store up", n)
	}

	cluster.Member(0).Stop()
	eventually(t, "answers counted stale", func() bool {
		m := query(t, e.addr, "udp", "web.discoverd.", dns.TypeA, 0)
		if m.Rcode != dns.RcodeSuccess || !slices.Equal(answers(t, m), []string{"10.0.0.1"}) {
			t.Fatalf("during the outage: %s %v", dns.RcodeToString[m.Rcode], answers(t, m))
		}
		return testutil.ToFloat64(stale) > 0
	})
	for _, network := range []string{"udp", "tcp"} {
		if m := query(t, e.addr, network, "never-asked.discoverd.", dns.TypeA, 0); m.Rcode != dns.RcodeServerFailure {
			t.Fatalf("uncached name during the outage over %s: %s, want SERVFAIL", network, dns.RcodeToString[m.Rcode])
		}
	}

	if err := cluster.Member(0).Restart(); err != nil {
		t.Fatal(err)
	}
	eventually(t, "fresh answers after the outage", func() bool {
		before := testutil.ToFloat64(stale)
		m := query(t, e.addr, "udp", "web.discoverd.", dns.TypeA, 0)
		return len(m.Answer) == 1 && testutil.ToFloat64(stale) == before
	})
	eventually(t, "the name never asked answered once the store is back", func() bool {
		return query(t, e.addr, "udp", "never-asked.discoverd.", dns.TypeA, 0).Rcode == dns.RcodeSuccess
	})
}

// eventually polls cond until it holds, failing tb after wait.
func eventually(tb testing.TB, what string, cond func() bool) {
	tb.Helper()
	testkit.Eventually(tb, wait, what, cond)
}
