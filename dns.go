package main

import (
	"flag"
	"fmt"
	"time"

	"github.com/miekg/dns"

	"github.com/flynn/discoverd/agent"
	"github.com/flynn/discoverd/dnsserver"
)

// dnsMain is the DNS front end of Main: its settings ("-dns",
// "-dns-domain", "-dns-ttl") and its running pieces. Main embeds it.
type dnsMain struct {
	// DNS is the host:port of the DNS server, UDP and TCP ("-dns"); empty
	// disables it.
	DNS string
	// DNSDomain is the zone it serves ("-dns-domain").
	DNSDomain string
	// DNSTTL is the TTL of its answers, and of its negative answers
	// ("-dns-ttl"); leader names get dnsserver.LeaderTTL.
	DNSTTL time.Duration

	dnsView   *agent.View[*dnsserver.Service]
	dnsServer *dnsserver.Server
}

func defaultDNS() dnsMain {
	return dnsMain{DNS: dnsserver.DefaultAddr, DNSDomain: dnsserver.DefaultZone, DNSTTL: dnsserver.DefaultTTL}
}

func (d *dnsMain) dnsFlags(fs *flag.FlagSet) {
	fs.StringVar(&d.DNS, "dns", d.DNS, "`host:port` of the DNS server, UDP and TCP (empty: no DNS)")
	fs.StringVar(&d.DNSDomain, "dns-domain", d.DNSDomain, "DNS `zone` served")
	fs.DurationVar(&d.DNSTTL, "dns-ttl", d.DNSTTL, "TTL of DNS answers and of negative answers (leader names: 1s)")
}

func (d *dnsMain) validateDNS() error {
	if d.DNS == "" {
		return nil
	}
	if _, ok := dns.IsDomainName(d.DNSDomain); !ok || dns.Fqdn(d.DNSDomain) == "." {
		return fmt.Errorf("-dns-domain %q: not a domain name", d.DNSDomain)
	}
	if d.DNSTTL < time.Second || d.DNSTTL > 24*time.Hour {
		return fmt.Errorf("-dns-ttl %v: must be from 1s to 24h", d.DNSTTL)
	}
	return nil
}

// startDNS starts the DNS server on the agent's cache and exports its
// metrics; after the agent and the front ends.
func (m *Main) startDNS() error {
	if m.DNS == "" {
		return nil
	}
	m.dnsView = agent.NewView(m.agent, agent.ViewConfig{}, dnsserver.Compile)
	srv, err := dnsserver.Listen(dnsserver.Config{
		Addr:   m.DNS,
		Zone:   m.DNSDomain,
		TTL:    m.DNSTTL,
		Cache:  m.dnsView,
		Logger: m.Logger.With("component", "dns"),
		Allow:  m.server.AllowAnonymousRead,
	})
	if err != nil {
		return err
	}
	m.dnsServer = srv
	for _, c := range srv.Collectors() {
		if err := m.server.Registry().Register(c); err != nil {
			return fmt.Errorf("dns metrics: %w", err)
		}
	}
	return nil
}

// DNSAddr is the address of the DNS server (UDP and TCP); "" without one.
// Valid after Start.
func (m *Main) DNSAddr() string {
	if m.dnsServer == nil {
		return ""
	}
	return m.dnsServer.UDPAddr().String()
}

// closeDNS stops the DNS server, then its view of the agent; before the
// agent.
func (m *Main) closeDNS() error {
	var err error
	if m.dnsServer != nil {
		err = m.dnsServer.Close()
	}
	if m.dnsView != nil {
		m.dnsView.Close()
	}
	return err
}
