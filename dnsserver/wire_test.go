package dnsserver_test

import (
	"bufio"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/flynn/discoverd/api"
	"github.com/flynn/discoverd/backend/etcd/etcdtest"
	"github.com/flynn/discoverd/dnsserver"
)

// TestPackedAnswersFollowChanges: answers are copied from records packed
// once per change of a name; a registration or a removal acknowledged by
// the agent is in the next answer of every kind, over UDP and TCP.
func TestPackedAnswersFollowChanges(t *testing.T) {
	srv := etcdtest.NewServer(t)
	e := mustEnv(t, srv.Endpoints(), time.Second)
	// Registered before any query: the first query of the name waits
	// for its lookup (over UDP, outside the read loop).
	e.register(t, "pack", "10.5.0.1:80")
	const (
		t1 = "0a050001.addr.discoverd."
		t2 = "0a050002.addr.discoverd."
		t6 = "fd000000000000000000000000000005.addr.discoverd."
	)
	type want struct {
		qname string
		qtype uint16
		data  []string
	}
	check := func(t *testing.T, step string, wants []want) {
		t.Helper()
		for _, w := range wants {
			for _, network := range []string{"udp", "tcp"} {
				// Twice: the second is answered from the packed form
				// the first one built.
				for range 2 {
					m := query(t, e.addr, network, w.qname, w.qtype, 0)
					if got := answers(t, m); m.Rcode != dns.RcodeSuccess || !slices.Equal(got, w.data) {
						t.Fatalf("%s: %s %s over %s: %s %q, want %q", step, w.qname, dns.TypeToString[w.qtype], network,
							dns.RcodeToString[m.Rcode], got, w.data)
					}
				}
			}
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	leaderTXT := func() string {
		l, ok, err := e.agent.LeaderOf(ctx, "pack")
		if err != nil || !ok {
			t.Fatalf("LeaderOf: %v %v", ok, err)
		}
		return fmt.Sprintf("created=%d addr=%s", l.Created, l.Addr)
	}
	check(t, "one instance", []want{
		{"pack.discoverd.", dns.TypeA, []string{"10.5.0.1"}},
		{"pack.discoverd.", dns.TypeAAAA, nil},
		{"_pack._tcp.discoverd.", dns.TypeSRV, []string{"80 " + t1}},
		{"leader.pack.discoverd.", dns.TypeTXT, []string{leaderTXT()}},
	})
	first := leaderTXT()

	e.register(t, "pack", "10.5.0.2:81", "[fd00::5]:82")
	check(t, "after registering two more", []want{
		{"pack.discoverd.", dns.TypeA, []string{"10.5.0.1", "10.5.0.2"}},
		{"pack.discoverd.", dns.TypeAAAA, []string{"fd00::5"}},
		{"_pack._tcp.discoverd.", dns.TypeSRV, []string{"80 " + t1, "81 " + t2, "82 " + t6}},
		{"leader.pack.discoverd.", dns.TypeA, []string{"10.5.0.1"}},
		{"leader.pack.discoverd.", dns.TypeTXT, []string{first}},
	})

	for _, addr := range []string{"10.5.0.1:80", "[fd00::5]:82"} {
		if err := e.sess.Unregister(ctx, api.Args{Name: "pack", Addr: addr}); err != nil {
			t.Fatal(err)
		}
	}
	next := leaderTXT()
	if next == first || !strings.HasSuffix(next, "addr=10.5.0.2:81") {
		t.Fatalf("leader after unregistering the first: %s", next)
	}
	check(t, "after unregistering two", []want{
		{"pack.discoverd.", dns.TypeA, []string{"10.5.0.2"}},
		{"pack.discoverd.", dns.TypeAAAA, nil},
		{"_pack._tcp.discoverd.", dns.TypeSRV, []string{"81 " + t2}},
		{"leader.pack.discoverd.", dns.TypeA, []string{"10.5.0.2"}},
		{"leader.pack.discoverd.", dns.TypeTXT, []string{next}},
	})
}

// TestTruncatedAnswersSpread: a truncated UDP answer holds distinct
// instances, each a registered one, and the answers of successive
// queries reach every instance.
func TestTruncatedAnswersSpread(t *testing.T) {
	srv := etcdtest.NewServer(t)
	e := mustEnv(t, srv.Endpoints(), time.Second)
	registered := map[string]bool{}
	var addrs []string
	for i := range 300 {
		addrs = append(addrs, fmt.Sprintf("10.6.%d.%d:80", i/250, i%250+1))
		registered[fmt.Sprintf("10.6.%d.%d", i/250, i%250+1)] = true
	}
	e.register(t, "spread", addrs...)
	seen := map[string]bool{}
	// 29 of 300 records fit 512 bytes: after 300 answers, an instance
	// is missed with a probability of about (1 - 29/300)^300 < 1e-13.
	for range 300 {
		m := query(t, e.addr, "udp", "spread.discoverd.", dns.TypeA, 0)
		if !m.Truncated || len(m.Answer) == 0 {
			t.Fatalf("TC %v with %d answers", m.Truncated, len(m.Answer))
		}
		got := answers(t, m)
		if len(slices.Compact(slices.Clone(got))) != len(got) {
			t.Fatalf("an instance twice in one answer: %q", got)
		}
		for _, ip := range got {
			if !registered[ip] {
				t.Fatalf("answer %s was never registered", ip)
			}
			seen[ip] = true
		}
	}
	if len(seen) != len(registered) {
		t.Fatalf("300 answers reached %d of the %d instances", len(seen), len(registered))
	}

	t.Run("SRV with every target in the additional section", func(t *testing.T) {
		m := query(t, e.addr, "udp", "spread.discoverd.", dns.TypeSRV, 65000)
		if m.Truncated || len(m.Answer) != 300 {
			t.Fatalf("TC %v with %d answers", m.Truncated, len(m.Answer))
		}
		glue := 0
		for _, rr := range m.Extra {
			if a, ok := rr.(*dns.A); ok {
				if !registered[a.A.String()] || a.Hdr.Ttl != testTTL {
					t.Fatalf("glue %v", a)
				}
				glue++
			}
		}
		if glue != 300 || m.IsEdns0() == nil {
			t.Fatalf("%d glue records, OPT %v", glue, m.IsEdns0())
		}
	})
}

// TestTCPPipelined: queries written back to back on one connection are
// all answered, in order.
func TestTCPPipelined(t *testing.T) {
	srv := etcdtest.NewServer(t)
	e := mustEnv(t, srv.Endpoints(), time.Second)
	e.register(t, "pipe", "10.7.0.1:80")
	query(t, e.addr, "udp", "pipe.discoverd.", dns.TypeA, 0) // cached
	conn, err := net.Dial("tcp", e.srv.TCPAddr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(wait))
	const n = 200
	var batch []byte
	for i := range n {
		m := new(dns.Msg)
		m.SetQuestion("pipe.discoverd.", dns.TypeA)
		if i%10 == 9 {
			m.SetQuestion("-bad.discoverd.", dns.TypeA) // a negative answer among them
		}
		m.Id = uint16(i)
		out, err := m.Pack()
		if err != nil {
			t.Fatal(err)
		}
		batch = binary.BigEndian.AppendUint16(batch, uint16(len(out)))
		batch = append(batch, out...)
	}
	if _, err := conn.Write(batch); err != nil {
		t.Fatal(err)
	}
	r := bufio.NewReader(conn)
	for i := range n {
		var l [2]byte
		if _, err := io.ReadFull(r, l[:]); err != nil {
			t.Fatalf("reply %d: %v", i, err)
		}
		buf := make([]byte, binary.BigEndian.Uint16(l[:]))
		if _, err := io.ReadFull(r, buf); err != nil {
			t.Fatalf("reply %d: %v", i, err)
		}
		m := new(dns.Msg)
		if err := m.Unpack(buf); err != nil {
			t.Fatalf("reply %d: %v", i, err)
		}
		wantRcode, wantN := dns.RcodeSuccess, 1
		if i%10 == 9 {
			wantRcode, wantN = dns.RcodeNameError, 0
		}
		if m.Id != uint16(i) || m.Rcode != wantRcode || len(m.Answer) != wantN {
			t.Fatalf("reply %d: id %d, %s, %d answers", i, m.Id, dns.RcodeToString[m.Rcode], len(m.Answer))
		}
	}
}

// TestMalformedUDP: what is not a query gets no reply or FORMERR, as from
// miekg/dns's server, and the server goes on answering.
func TestMalformedUDP(t *testing.T) {
	srv := etcdtest.NewServer(t)
	e := mustEnv(t, srv.Endpoints(), time.Second)
	conn, err := net.Dial("udp", e.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	send := func(p []byte) {
		t.Helper()
		if _, err := conn.Write(p); err != nil {
			t.Fatal(err)
		}
	}
	send([]byte{1, 2, 3})                                    // shorter than a header: no reply
	send([]byte{0, 1, 0x80, 0, 0, 1, 0, 0, 0, 0, 0, 0})      // a response: no reply
	send([]byte{0, 2, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 3, 'a'}) // a question cut short: FORMERR
	conn.SetReadDeadline(time.Now().Add(wait))
	buf := make([]byte, 512)
	n, err := conn.Read(buf)
	if err != nil {
		t.Fatal(err)
	}
	m := new(dns.Msg)
	if err := m.Unpack(buf[:n]); err != nil || m.Id != 2 || m.Rcode != dns.RcodeFormatError {
		t.Fatalf("reply %v (%v), want FORMERR to id 2", m, err)
	}
	if m := query(t, e.addr, "udp", "x.discoverd.", dns.TypeA, 0); m.Rcode != dns.RcodeSuccess {
		t.Fatalf("after malformed packets: %s", dns.RcodeToString[m.Rcode])
	}
}

// TestWildcardAddress: on a wildcard address, UDP is served by
// miekg/dns's server (it replies from the address each query was sent
// to), with the same answers.
func TestWildcardAddress(t *testing.T) {
	var big []string
	for i := range 300 {
		big = append(big, fmt.Sprintf("10.1.%d.%d:%d", i/250, i%250+1, 1000+i))
	}
	cache := staticCache{"big": compiled("big", big...), "web": compiled("web", "10.0.0.1:80")}
	srv, err := dnsserver.Listen(dnsserver.Config{Addr: "0.0.0.0:0", Cache: cache, Logger: quiet()})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	_, port, _ := net.SplitHostPort(srv.UDPAddr().String())
	addr := net.JoinHostPort("127.0.0.1", port)
	if m := query(t, addr, "udp", "web.discoverd.", dns.TypeA, 0); !slices.Equal(answers(t, m), []string{"10.0.0.1"}) {
		t.Fatalf("answers %q", answers(t, m))
	}
	m, size := queryRaw(t, addr, "big.discoverd.", dns.TypeA, 1232)
	if !m.Truncated || size > 1232 || size+16 <= 1232 {
		t.Fatalf("TC %v, %d answers in %d bytes", m.Truncated, len(m.Answer), size)
	}
	if m := query(t, addr, "tcp", "big.discoverd.", dns.TypeA, 0); len(m.Answer) != 300 {
		t.Fatalf("%d answers over TCP", len(m.Answer))
	}
}
