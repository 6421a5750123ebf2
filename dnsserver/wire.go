package dnsserver

import (
	"encoding/binary"

	"github.com/miekg/dns"
)

// query is a query with one question, as the server answers it.
type query struct {
	id    uint16
	flags uint16 // the query's RD and CD bits, echoed in the reply
	wire  []byte // the question's name as asked, packed (uncompressed)
	name  string // the same, in presentation form
	qtype uint16
	class uint16
	edns  bool   // the query had an OPT record (version 0)
	size  uint16 // its UDP payload size
}

// Header bits.
const (
	bitQR = 1 << 15
	bitAA = 1 << 10
	bitTC = 1 << 9
	bitRD = 1 << 8
	bitCD = 1 << 4
)

const headerSize = 12

// parseQuery parses p as a plain query: opcode QUERY, one question whose
// name has only letters, digits, '-' and '_' in its labels (every name
// the zone serves), no other record than one EDNS0 OPT of version 0 with
// no option but a cookie or padding, and nothing after it. It reports false for anything else, which the caller
// hands to miekg/dns's full parser. q.wire is a slice of p.
func parseQuery(p []byte, q *query) bool {
	if len(p) < headerSize {
		return false
	}
	flags := binary.BigEndian.Uint16(p[2:])
	if flags&bitQR != 0 || flags>>11&0xF != dns.OpcodeQuery ||
		binary.BigEndian.Uint16(p[4:]) != 1 || binary.BigEndian.Uint16(p[6:]) != 0 ||
		binary.BigEndian.Uint16(p[8:]) != 0 {
		return false
	}
	arcount := binary.BigEndian.Uint16(p[10:])
	if arcount > 1 {
		return false
	}
	var name [255]byte
	k := 0
	off := headerSize
	for {
		if off >= len(p) {
			return false
		}
		l := int(p[off])
		off++
		if l == 0 {
			break
		}
		if l > 63 || off+l > len(p) || k+l+1 > len(name) {
			return false // a pointer, or too long
		}
		for _, c := range p[off : off+l] {
			if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '-' || c == '_') {
				return false
			}
		}
		k += copy(name[k:], p[off:off+l])
		name[k] = '.'
		k++
		off += l
	}
	if k == 0 || off+4 > len(p) {
		return false // the root: no name of the zone
	}
	*q = query{
		id:    binary.BigEndian.Uint16(p),
		flags: flags & (bitRD | bitCD),
		wire:  p[headerSize:off],
		qtype: binary.BigEndian.Uint16(p[off:]),
		class: binary.BigEndian.Uint16(p[off+2:]),
	}
	off += 4
	if arcount == 1 {
		// OPT: the root name, type, UDP size, extended rcode, version,
		// flags, options (read past, not used).
		if off+11 > len(p) || p[off] != 0 || binary.BigEndian.Uint16(p[off+1:]) != dns.TypeOPT || p[off+6] != 0 {
			return false
		}
		q.edns, q.size = true, binary.BigEndian.Uint16(p[off+3:])
		end := off + 11 + int(binary.BigEndian.Uint16(p[off+9:]))
		if end > len(p) {
			return false
		}
		// Each option: code, length, data; they must fill the data.
		// Only a cookie or padding (which take any data) is read past:
		// other options go to miekg/dns, which checks their data.
		for off += 11; off < end; {
			if off+4 > end {
				return false
			}
			if code := binary.BigEndian.Uint16(p[off:]); code != dns.EDNS0COOKIE && code != dns.EDNS0PADDING {
				return false
			}
			off += 4 + int(binary.BigEndian.Uint16(p[off+2:]))
		}
	}
	if off != len(p) {
		return false
	}
	q.name = string(name[:k])
	return true
}

// queryOf returns req as a query: req has one question, and an OPT record
// of version 0 if any. False if the question's name does not pack.
func queryOf(req *dns.Msg) (query, bool) {
	q := req.Question[0]
	buf := make([]byte, 256)
	n, err := dns.PackDomainName(q.Name, buf, 0, nil, false)
	if err != nil {
		return query{}, false
	}
	out := query{id: req.Id, wire: buf[:n], name: q.Name, qtype: q.Qtype, class: q.Qclass}
	if req.RecursionDesired {
		out.flags |= bitRD
	}
	if req.CheckingDisabled {
		out.flags |= bitCD
	}
	if opt := req.IsEdns0(); opt != nil {
		out.edns, out.size = true, opt.UDPSize()
	}
	return out, true
}

// maxSize is the largest reply q may get over UDP or TCP.
func (q *query) maxSize(tcp bool) int {
	switch {
	case tcp:
		return dns.MaxMsgSize
	case q.edns:
		return min(max(int(q.size), dns.MinMsgSize), maxUDPSize)
	default:
		return dns.MinMsgSize
	}
}

// appendQuestion appends a reply's header (counts left zero: see
// setHeader) and q's question to b.
func (q *query) appendQuestion(b []byte) []byte {
	b = append(b, make([]byte, headerSize)...)
	b = append(b, q.wire...)
	b = binary.BigEndian.AppendUint16(b, q.qtype)
	return binary.BigEndian.AppendUint16(b, q.class)
}

// setHeader fills the header of reply b to q: an authoritative answer
// with rcode (4 bits) and the given section counts.
func (q *query) setHeader(b []byte, rcode int, tc bool, an, ns, ar int) {
	flags := bitQR | bitAA | q.flags | uint16(rcode&0xF)
	if tc {
		flags |= bitTC
	}
	binary.BigEndian.PutUint16(b, q.id)
	binary.BigEndian.PutUint16(b[2:], flags)
	binary.BigEndian.PutUint16(b[4:], 1)
	binary.BigEndian.PutUint16(b[6:], uint16(an))
	binary.BigEndian.PutUint16(b[8:], uint16(ns))
	binary.BigEndian.PutUint16(b[10:], uint16(ar))
}

// optSize is the size of the OPT record of a reply.
const optSize = 11

// appendOPT appends the OPT record of a reply: our UDP payload size,
// version 0, no flag, no option.
func appendOPT(b []byte) []byte {
	b = append(b, 0) // the root
	b = binary.BigEndian.AppendUint16(b, dns.TypeOPT)
	b = binary.BigEndian.AppendUint16(b, advertisedUDPSize)
	b = binary.BigEndian.AppendUint32(b, 0)
	return binary.BigEndian.AppendUint16(b, 0)
}
