package main

import (
	"context"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// TestDNSServes: the agent started with -dns answers DNS for what is
// registered through RPC, and exports the DNS metrics.
func TestDNSServes(t *testing.T) {
	m := testMain(t)
	m.DNS = "127.0.0.1:0"
	mustStart(t, m)
	c := mustRegister(t, m.Addr().String()) // web 10.0.0.1:80
	defer c.Close()

	q := new(dns.Msg)
	q.SetQuestion("web.discoverd.", dns.TypeA)
	for _, network := range []string{"udp", "tcp"} {
		resp, _, err := (&dns.Client{Net: network, Timeout: waitTimeout}).Exchange(q, m.DNSAddr())
		if err != nil {
			t.Fatalf("%s: %v", network, err)
		}
		if len(resp.Answer) != 1 || resp.Answer[0].(*dns.A).A.String() != "10.0.0.1" {
			t.Fatalf("%s: answer %v, want web's 10.0.0.1", network, resp.Answer)
		}
	}

	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, "GET", "http://"+m.Addr().String()+"/metrics", nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	for _, want := range []string{
		`discoverd_dns_queries_total{rcode="NOERROR",type="A"} 2`,
		"discoverd_dns_cached_names 1",
		"discoverd_dns_query_duration_seconds_count 2",
	} {
		if !strings.Contains(string(body), want) {
			t.Errorf("/metrics lacks %q", want)
		}
	}
}

// TestDNSFlags: -dns, -dns-domain and -dns-ttl, and a DNS port in use.
func TestDNSFlags(t *testing.T) {
	getenv := func(string) string { return "" }
	m := NewMain()
	if err := m.ParseFlags(nil, getenv, io.Discard); err != nil {
		t.Fatal(err)
	}
	if m.DNS != "127.0.0.1:8053" || m.DNSDomain != "discoverd." || m.DNSTTL != 5*time.Second {
		t.Fatalf("defaults: %q %q %v", m.DNS, m.DNSDomain, m.DNSTTL)
	}
	m = NewMain()
	if err := m.ParseFlags([]string{"-dns", "", "-dns-ttl", "0s"}, getenv, io.Discard); err != nil {
		t.Fatalf("-dns '' disables DNS, its other flags unchecked: %v", err)
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"-dns-ttl", "100ms"}, "-dns-ttl"},
		{[]string{"-dns-domain", "a..b"}, "-dns-domain"},
		{[]string{"-dns-domain", "."}, "-dns-domain"},
	} {
		if err := NewMain().ParseFlags(tc.args, getenv, io.Discard); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("ParseFlags(%q) = %v, want an error about %s", tc.args, err, tc.want)
		}
	}

	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	m = testMain(t)
	m.DNS = pc.LocalAddr().String()
	ctx, cancel := context.WithTimeout(context.Background(), 3*waitTimeout)
	defer cancel()
	err = m.Start(ctx)
	if err == nil {
		m.Close()
		t.Fatal("Start with the DNS port in use succeeded")
	}
	if !strings.Contains(err.Error(), "address already in use") {
		t.Fatalf("Start: %v, want address already in use", err)
	}
}
