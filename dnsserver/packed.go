package dnsserver

import (
	"encoding/binary"
	"math/rand/v2"
	"sort"
	"strconv"

	"github.com/miekg/dns"
)

// A positive answer is copied from records packed once per change of a
// name, never built per query: the server answers at the rate of a
// lookup and a memcpy, whatever the number of instances.
//
// Every answer record's owner is the question's name, which a reply
// always carries at offset 12 (right after the header), so each packs as
// the 2-byte pointer 0xC00C whatever the name's length or case: the
// packed records fit every reply. SRV targets and glue owners pack
// uncompressed (RFC 2782 forbids compressing the target; a glue owner
// could point at its SRV target, but that offset varies with the order).

// kind is one positive answer's RRset.
type kind int

const (
	kindA          kind = iota // <svc> A
	kindAAAA                   // <svc> AAAA
	kindSRV                    // <svc> and _<svc>._tcp SRV
	kindLeaderA                // leader.<svc> A
	kindLeaderAAAA             // leader.<svc> AAAA
	kindLeaderSRV              // leader.<svc> SRV
	kindLeaderTXT              // leader.<svc> TXT
	numKinds
	kindNone kind = -1 // no data
)

// maxOrders bounds the shuffled orders packed per RRset; orderBytes bounds
// their total size (a large RRset gets fewer).
const (
	maxOrders  = 8
	orderBytes = 256 << 10
)

// rrset is the packed form of one kind of answer of one Service. Each
// order is a random permutation of the records, packed twice over, so
// that any rotation of it is one contiguous slice: a query picks an order
// and a rotation at random and copies as many records from there as fit,
// so every answer is in one of (orders × records) orders, and a
// truncated one holds a random window of a random permutation.
type rrset struct {
	srv    *Server // whose zone and TTLs it was packed with
	n      int     // records
	size   int     // the size of every record when they are all alike, else 0
	orders []order
	// glue holds the address records of the SRV targets in the zone, each
	// once, for the additional section; glueOff[i] is where record i
	// starts (len(glueOff) = records + 1).
	glue    []byte
	glueOff []int
}

type order struct {
	data []byte // the n records in this order, twice
	off  []int  // off[i] is where record i of data starts; len 2n+1
}

// rrset returns svc's packed RRset of kind k, packing it on first use.
// Concurrent first uses may each pack it; one wins, both are correct.
func (s *Server) rrset(svc *Service, k kind) *rrset {
	if r := svc.packed[k].Load(); r != nil && r.srv == s {
		return r
	}
	r := s.packSet(svc, k)
	svc.packed[k].Store(r)
	return r
}

// packSet builds svc's RRset of kind k.
func (s *Server) packSet(svc *Service, k kind) *rrset {
	var idx []int
	ttl := s.ttl
	switch k {
	case kindA:
		idx = svc.v4
	case kindAAAA:
		idx = svc.v6
	case kindSRV:
		idx = svc.srv
	default:
		idx = []int{svc.leader}
		ttl = s.leaderTTL
	}
	r := &rrset{srv: s}
	recs := make([][]byte, 0, len(idx))
	total := 0
	var scratch [256]byte
	for _, ix := range idx {
		in := &svc.instances[ix]
		var rec []byte
		switch k {
		case kindA, kindAAAA, kindLeaderA, kindLeaderAAAA:
			rec = appendRRHeader(nil, ptrQuestion, rrType(in.ip), ttl)
			rec = appendRdata(rec, in.ipBytes)
		case kindSRV, kindLeaderSRV:
			rec = appendRRHeader(nil, ptrQuestion, dns.TypeSRV, ttl)
			rd := binary.BigEndian.AppendUint16(scratch[:0], 0) // priority
			rd = binary.BigEndian.AppendUint16(rd, 1)           // weight
			rd = binary.BigEndian.AppendUint16(rd, in.port)
			var ok bool
			if rd, ok = appendName(rd, s.target(in)); !ok {
				continue // the zone makes it too long a name
			}
			rec = appendRdata(rec, rd)
		case kindLeaderTXT:
			rec = appendRRHeader(nil, ptrQuestion, dns.TypeTXT, ttl)
			rd := appendTXT(scratch[:0], "created="+strconv.FormatUint(uint64(in.created), 10))
			rd = appendTXT(rd, "addr="+in.addr)
			rec = appendRdata(rec, rd)
		}
		recs = append(recs, rec)
		total += len(rec)
	}
	r.n = len(recs)
	if len(recs) > 0 {
		r.size = len(recs[0])
		for _, rec := range recs {
			if len(rec) != r.size {
				r.size = 0
				break
			}
		}
	}
	orders := 1
	if len(recs) > 1 {
		orders = max(1, min(maxOrders, orderBytes/(2*total)))
	}
	perm := make([]int, len(recs))
	for i := range perm {
		perm[i] = i
	}
	for range orders {
		rand.Shuffle(len(perm), func(i, j int) { perm[i], perm[j] = perm[j], perm[i] })
		o := order{data: make([]byte, 0, 2*total), off: make([]int, 0, 2*len(recs)+1)}
		for range 2 {
			for _, i := range perm {
				o.off = append(o.off, len(o.data))
				o.data = append(o.data, recs[i]...)
			}
		}
		o.off = append(o.off, len(o.data))
		r.orders = append(r.orders, o)
	}
	if k == kindSRV || k == kindLeaderSRV {
		seen := make(map[string]bool)
		for _, ix := range idx {
			in := &svc.instances[ix]
			if !in.inZone || seen[in.target] {
				continue
			}
			seen[in.target] = true
			g, ok := appendName(r.glue, s.target(in))
			if !ok {
				continue
			}
			r.glueOff = append(r.glueOff, len(r.glue))
			r.glue = appendRRHeader(g, nil, rrType(in.ip), s.ttl)
			r.glue = appendRdata(r.glue, in.ipBytes)
		}
		r.glueOff = append(r.glueOff, len(r.glue))
	}
	return r
}

// pick returns the records of a random order and rotation that fit in
// room bytes: how many, and their bytes (a slice of r's data: read-only).
func (r *rrset) pick(room int) (int, []byte) {
	if r.n == 0 || room <= 0 {
		return 0, nil
	}
	o := &r.orders[0]
	if len(r.orders) > 1 {
		o = &r.orders[rand.IntN(len(r.orders))]
	}
	start := rand.IntN(r.n)
	base := o.off[start]
	var k int
	if r.size > 0 {
		k = min(r.n, room/r.size)
	} else {
		// The most records from start that fit: offsets grow with k.
		k = sort.Search(r.n+1, func(k int) bool { return o.off[start+k]-base > room }) - 1
	}
	return k, o.data[base:o.off[start+k]]
}

// appendGlue appends the glue records that fit in room bytes, and
// returns how many it appended.
func (r *rrset) appendGlue(b []byte, room int) ([]byte, int) {
	n := len(r.glueOff) - 1
	if n <= 0 {
		return b, 0
	}
	if len(r.glue) <= room {
		return append(b, r.glue...), n
	}
	added := 0
	for i := range n {
		rec := r.glue[r.glueOff[i]:r.glueOff[i+1]]
		if len(rec) <= room {
			b = append(b, rec...)
			room -= len(rec)
			added++
		}
	}
	return b, added
}

// ptrQuestion is a compressed name pointing at the question's name.
var ptrQuestion = []byte{0xC0, 12}

func rrType(ip interface{ Is4() bool }) uint16 {
	if ip.Is4() {
		return dns.TypeA
	}
	return dns.TypeAAAA
}

// appendRRHeader appends a record's owner (a packed name, or nil for the
// caller to have appended it), type, class IN and TTL; appendRdata then
// appends its length and data.
func appendRRHeader(b, owner []byte, typ uint16, ttl uint32) []byte {
	b = append(b, owner...)
	b = binary.BigEndian.AppendUint16(b, typ)
	b = binary.BigEndian.AppendUint16(b, dns.ClassINET)
	return binary.BigEndian.AppendUint32(b, ttl)
}

func appendRdata(b, rdata []byte) []byte {
	b = binary.BigEndian.AppendUint16(b, uint16(len(rdata)))
	return append(b, rdata...)
}

// appendName appends name (fully qualified) uncompressed; false if it is
// not a name that packs (longer than 255 bytes).
func appendName(b []byte, name string) ([]byte, bool) {
	var buf [256]byte
	n, err := dns.PackDomainName(name, buf[:], 0, nil, false)
	if err != nil {
		return b, false
	}
	return append(b, buf[:n]...), true
}

// appendTXT appends s as character-strings of at most 255 bytes each.
func appendTXT(b []byte, s string) []byte {
	for {
		n := min(len(s), 255)
		b = append(b, byte(n))
		b = append(b, s[:n]...)
		if s = s[n:]; s == "" {
			return b
		}
	}
}
