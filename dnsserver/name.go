package dnsserver

import (
	"net/netip"
	"strings"

	"github.com/flynn/discoverd/api"
)

// form is the kind of a name in the zone.
type form int

const (
	formInvalid form = iota // in the zone, but no name we serve (NXDOMAIN)
	formApex                // the zone itself
	formService             // <svc>
	formSRV                 // _<svc>._tcp
	formLeader              // leader.<svc>
	formAddr                // <hex>.addr
)

// name is a parsed query name.
type name struct {
	form    form
	service string     // formService, formSRV, formLeader
	ip      netip.Addr // formAddr
}

// parseName parses qname (fully qualified, as asked) against the zone. It
// reports false for a name outside the zone. The zone and the keywords
// (leader, _tcp, addr) match in any case; service names are case
// sensitive, as everywhere in discoverd. The special forms take
// precedence: a service whose name starts with "leader." is reachable by
// its SRV name only.
func (s *Server) parseName(qname string) (name, bool) {
	lower := strings.ToLower(qname)
	if lower == s.zone {
		return name{form: formApex}, true
	}
	if !strings.HasSuffix(lower, s.zone) || len(lower) <= len(s.zone) || lower[len(lower)-len(s.zone)-1] != '.' {
		return name{}, false
	}
	rel := qname[:len(qname)-len(s.zone)-1]
	lrel := lower[:len(rel)]
	n := name{form: formService, service: rel}
	switch {
	case strings.HasPrefix(lrel, "_") && strings.HasSuffix(lrel, "._tcp"):
		n.form, n.service = formSRV, rel[1:len(rel)-len("._tcp")]
	case strings.HasPrefix(lrel, "leader."):
		n.form, n.service = formLeader, rel[len("leader."):]
	case strings.HasSuffix(lrel, ".addr"):
		if ip, ok := parseAddrLabel(lrel[:len(lrel)-len(".addr")]); ok {
			return name{form: formAddr, ip: ip}, true
		}
	}
	if api.ValidateName(n.service) != nil {
		return name{form: formInvalid}, true
	}
	return n, true
}
