package dnsserver

import (
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"time"

	"github.com/miekg/dns"
)

// maxSlow bounds the UDP queries waiting for the first lookup of their
// name (each in its own goroutine); beyond it, such a query is answered
// SERVFAIL at once, so that a flood of new names while the store is slow
// cannot pile up goroutines.
const maxSlow = 256

// serveUDP reads queries from pc and answers each in this goroutine; a
// query of a name already cached allocates only its name as a string: a
// plain query is parsed in place (parseQuery) and its reply built in a
// buffer reused from query to query. A query that needs the first lookup of its name
// goes to a goroutine of its own (at most maxSlow at once). It returns
// when pc is closed.
//
// It serves only a socket bound to one address: replies leave from the
// address the socket is bound to, which for a wildcard bind may not be
// the address the query was sent to (miekg/dns's server, used then, reads
// the destination of each packet).
func (s *Server) serveUDP(pc *net.UDPConn) {
	defer s.wg.Done()
	in := make([]byte, dns.MaxMsgSize)
	out := make([]byte, 0, dns.MaxMsgSize)
	for {
		n, from, err := pc.ReadFromUDPAddrPort(in)
		if err != nil {
			if s.ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return
			}
			s.log.Debug("dns: udp read", "err", err) // the next packet may do
			continue
		}
		start := time.Now()
		pkt := in[:n]
		var q query
		var (
			reply []byte
			oc    outcome
			qtype = -1
		)
		if parseQuery(pkt, &q) {
			qtype = int(q.qtype)
			reply, oc, err = s.reply(s.ctx, &q, false, false, out[:0])
		} else {
			var ok bool
			reply, qtype, oc, ok, err = s.replyPacket(pkt, false, false, out[:0])
			if !ok {
				continue // no reply: not a query, or not even a header
			}
		}
		if errors.Is(err, errWouldBlock) {
			s.slowUDP(pc, from, pkt, start)
			continue
		}
		if _, err := pc.WriteToUDPAddrPort(reply, from); err != nil {
			s.log.Debug("dns: reply not sent", "err", err, "client", from.String())
		}
		s.metrics.observe(qtype, oc, time.Since(start))
	}
}

// replyPacket answers a packet parseQuery did not take, through
// miekg/dns's parser, as miekg/dns's server does: no reply to a response
// or to fewer bytes than a header, FORMERR to a packet that does not
// parse. It returns the reply, the question's type (-1 if none) and
// false when there is no reply.
func (s *Server) replyPacket(pkt []byte, tcp, wait bool, b []byte) ([]byte, int, outcome, bool, error) {
	if len(pkt) < headerSize || binary.BigEndian.Uint16(pkt[2:])&bitQR != 0 {
		return nil, -1, outcome{}, false, nil
	}
	req := new(dns.Msg)
	if err := req.Unpack(pkt); err != nil {
		m := new(dns.Msg)
		m.Id = binary.BigEndian.Uint16(pkt)
		m.Response = true
		m.Opcode = int(binary.BigEndian.Uint16(pkt[2:]) >> 11 & 0xF)
		m.Rcode = dns.RcodeFormatError
		out, oc, err := s.pack(m, b)
		return out, -1, oc, true, err
	}
	out, oc, err := s.replyMsg(s.ctx, req, tcp, wait, b)
	return out, qtypeOf(req), oc, true, err
}

// slowUDP answers pkt from client in a goroutine of its own, which may
// wait for the lookup; or SERVFAIL at once when maxSlow already wait.
func (s *Server) slowUDP(pc *net.UDPConn, client netip.AddrPort, pkt []byte, start time.Time) {
	pkt = append([]byte(nil), pkt...)
	select {
	case s.slow <- struct{}{}:
	default:
		m := new(dns.Msg)
		if err := m.Unpack(pkt); err == nil {
			r := new(dns.Msg)
			r.SetRcode(m, dns.RcodeServerFailure)
			if out, err := r.Pack(); err == nil {
				pc.WriteToUDPAddrPort(out, client)
			}
			s.metrics.observe(qtypeOf(m), outcome{rcode: dns.RcodeServerFailure}, time.Since(start))
		}
		return
	}
	s.wg.Add(1)
	go func() { // ends with the lookup, at most the lookup timeout; Close cuts it short
		defer s.wg.Done()
		defer func() { <-s.slow }()
		bp := bufPool.Get().(*[]byte)
		defer bufPool.Put(bp)
		var q query
		var (
			reply []byte
			oc    outcome
			qtype = -1
			err   error
		)
		if parseQuery(pkt, &q) {
			qtype = int(q.qtype)
			reply, oc, err = s.reply(s.ctx, &q, false, true, (*bp)[:0])
		} else {
			var ok bool
			if reply, qtype, oc, ok, err = s.replyPacket(pkt, false, true, (*bp)[:0]); !ok {
				return
			}
		}
		if err != nil {
			return // not errWouldBlock: wait is true
		}
		if _, err := pc.WriteToUDPAddrPort(reply, client); err != nil {
			s.log.Debug("dns: reply not sent", "err", err, "client", client.String())
		}
		*bp = reply[:0]
		s.metrics.observe(qtype, oc, time.Since(start))
	}()
}
