package dnsserver

import (
	"encoding/hex"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"sync/atomic"

	"github.com/miekg/dns"

	"github.com/flynn/discoverd/api"
)

// Service is the DNS form of one service name's online instances,
// compiled once per change of the name (Compile) and shared, read-only,
// by every query until the next change. The wire form of each answer is
// packed on the first query that needs it and kept with the Service, so
// a change of the name (a new Service) is what invalidates it.
type Service struct {
	name      string
	instances []instance // oldest first
	v4, v6    []int      // indexes of the instances with an IPv4 / IPv6 host
	srv       []int      // indexes of the instances that can be an SRV target
	leader    int        // index of the leader; -1 when there is none

	packed [numKinds]atomic.Pointer[rrset] // by kind, built by Server.rrset
}

// instance is one online instance, parsed.
type instance struct {
	addr    string     // host:port as registered
	ip      netip.Addr // the host, when it is an IP address (IPv4 unmapped)
	ipBytes net.IP     // ip as 4 or 16 bytes, shared by every answer
	port    uint16
	target  string // SRV target: the host name (FQDN), or a label of the zone's addr names for an IP
	inZone  bool   // target is a label to complete with ".addr.<zone>"
	created uint
}

// Compile turns the online instances of name (oldest first) and its leader
// (the zero ServiceUpdate when there is none) into a Service. It is the
// compile function of the agent's view (agent.NewView) that feeds the
// server; it never fails: an instance that cannot be put in DNS is left
// out.
func Compile(name string, instances []api.ServiceUpdate, leader api.ServiceUpdate) *Service {
	s := &Service{name: name, instances: make([]instance, 0, len(instances)), leader: -1}
	for _, u := range instances {
		in, ok := parseInstance(u)
		if !ok {
			continue
		}
		i := len(s.instances)
		s.instances = append(s.instances, in)
		switch {
		case in.ip.Is4():
			s.v4 = append(s.v4, i)
		case in.ip.Is6():
			s.v6 = append(s.v6, i)
		}
		s.srv = append(s.srv, i)
		if leader.Addr != "" && u.Addr == leader.Addr && u.Created == leader.Created {
			s.leader = i
		}
	}
	return s
}

func parseInstance(u api.ServiceUpdate) (instance, bool) {
	host, port, err := net.SplitHostPort(u.Addr)
	if err != nil {
		return instance{}, false
	}
	p, err := strconv.ParseUint(port, 10, 16)
	if err != nil || p == 0 {
		return instance{}, false
	}
	in := instance{addr: u.Addr, port: uint16(p), created: u.Created}
	if ip, err := netip.ParseAddr(host); err == nil {
		in.ip = ip.Unmap()
		in.ipBytes = in.ip.AsSlice()
		in.target, in.inZone = addrLabel(in.ip), true
		return in, true
	}
	in.target = dns.Fqdn(strings.ToLower(host))
	if _, ok := dns.IsDomainName(in.target); !ok {
		return instance{}, false
	}
	return in, true
}

// addrLabel is the label of ip's name under the zone's "addr" names: 8 hex
// digits for IPv4, 32 for IPv6 (as Consul's <hex>.addr names).
func addrLabel(ip netip.Addr) string {
	b := ip.AsSlice()
	return hex.EncodeToString(b)
}

// parseAddrLabel is the inverse of addrLabel.
func parseAddrLabel(label string) (netip.Addr, bool) {
	if len(label) != 8 && len(label) != 32 {
		return netip.Addr{}, false
	}
	b, err := hex.DecodeString(label)
	if err != nil {
		return netip.Addr{}, false
	}
	ip, ok := netip.AddrFromSlice(b)
	return ip, ok
}
