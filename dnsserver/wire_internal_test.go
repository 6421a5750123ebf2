package dnsserver

import (
	"testing"

	"github.com/miekg/dns"
)

// FuzzParseQuery: whatever parseQuery takes, miekg/dns's parser reads
// the same query from it. (An internal test: parseQuery is the fast path
// of the read loops, and a difference would answer another question.)
func FuzzParseQuery(f *testing.F) {
	for _, tc := range []struct {
		name  string
		qtype uint16
		edns  uint16
	}{
		{"web.discoverd.", dns.TypeA, 0},
		{"_web._tcp.DiscoverD.", dns.TypeSRV, 4096},
		{"leader.web.discoverd.", dns.TypeTXT, 1232},
		{"0a000001.addr.discoverd.", dns.TypeA, 0},
	} {
		m := new(dns.Msg)
		m.SetQuestion(tc.name, tc.qtype)
		if tc.edns > 0 {
			m.SetEdns0(tc.edns, true)
		}
		p, err := m.Pack()
		if err != nil {
			f.Fatal(err)
		}
		f.Add(p)
	}
	f.Fuzz(func(t *testing.T, p []byte) {
		var q query
		if !parseQuery(p, &q) {
			return
		}
		m := new(dns.Msg)
		if err := m.Unpack(p); err != nil {
			t.Fatalf("parseQuery took what miekg/dns does not: %v", err)
		}
		if m.Response || m.Opcode != dns.OpcodeQuery || len(m.Question) != 1 {
			t.Fatalf("parseQuery took %v", m)
		}
		mq := m.Question[0]
		if m.Id != q.id || mq.Name != q.name || mq.Qtype != q.qtype || mq.Qclass != q.class {
			t.Fatalf("parseQuery read id %d %q %d %d, miekg/dns %d %q %d %d",
				q.id, q.name, q.qtype, q.class, m.Id, mq.Name, mq.Qtype, mq.Qclass)
		}
		opt := m.IsEdns0()
		if (opt != nil) != q.edns || opt != nil && (opt.UDPSize() != q.size || opt.Version() != 0) {
			t.Fatalf("parseQuery read EDNS0 %v size %d, miekg/dns %v", q.edns, q.size, opt)
		}
	})
}
