package dnsserver_test

import (
	"fmt"
	"net"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/flynn/discoverd/dnsserver"
)

// BenchmarkUDP times one query and its reply over loopback UDP, against a
// server on a static cache (the agent's cache is a map lookup away):
// what a query costs the server, plus a client's write and read.
// go test -run '^$' -bench UDP -cpuprofile cpu.out ./dnsserver profiles it.
func BenchmarkUDP(b *testing.B) {
	var big []string
	for i := range 300 {
		big = append(big, fmt.Sprintf("10.1.%d.%d:%d", i/250, i%250+1, 1000+i))
	}
	cache := staticCache{
		"web3":   compiled("web3", "10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"),
		"big300": compiled("big300", big...),
	}
	srv, err := dnsserver.Listen(dnsserver.Config{Addr: "127.0.0.1:0", Cache: cache, Logger: quiet()})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { srv.Close() })
	for _, bc := range []struct {
		name  string
		qname string
		qtype uint16
		edns  uint16
	}{
		{"3/A", "web3.discoverd.", dns.TypeA, 0},
		{"300/A/edns4096", "big300.discoverd.", dns.TypeA, 4096},
		{"300/SRV/edns4096", "big300.discoverd.", dns.TypeSRV, 4096},
	} {
		b.Run(bc.name, func(b *testing.B) {
			m := new(dns.Msg)
			m.SetQuestion(bc.qname, bc.qtype)
			if bc.edns > 0 {
				m.SetEdns0(bc.edns, false)
			}
			q, err := m.Pack()
			if err != nil {
				b.Fatal(err)
			}
			conn, err := net.Dial("udp", srv.UDPAddr().String())
			if err != nil {
				b.Fatal(err)
			}
			defer conn.Close()
			buf := make([]byte, 65536)
			b.ReportAllocs()
			for b.Loop() {
				conn.SetReadDeadline(time.Now().Add(5 * time.Second))
				if _, err := conn.Write(q); err != nil {
					b.Fatal(err)
				}
				if _, err := conn.Read(buf); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
