// Package dnsserver answers DNS queries for the services an agent knows,
// over UDP and TCP, from the agent's in-memory watch cache: every program
// on the host can find services through its ordinary resolver.
//
//	view := agent.NewView(a, agent.ViewConfig{}, dnsserver.Compile)
//	srv, err := dnsserver.Listen(dnsserver.Config{Addr: "127.0.0.1:8053", Cache: view})
//	if err != nil {
//		return err // the port is taken, say
//	}
//	defer view.Close()
//	defer srv.Close() // before view.Close: stops answering, then the view
//
// Names, relative to the zone (Config.Zone, default "discoverd."):
//
//	<svc>              A, AAAA: the IPs of the online instances; SRV: every instance
//	_<svc>._tcp        SRV: every instance
//	leader.<svc>       A, AAAA, SRV: the leader only; TXT: "created=N" "addr=host:port"
//	<hex>.addr         A or AAAA: the IP written in hex (8 or 32 digits), the SRV targets
//
// docs/API.md describes the answers in full: TTLs, negative answers,
// truncation, and how stale answers are served while the store is
// unreachable.
//
// How it is fast: a positive answer is copied from the records of its
// name packed once per change of the name (packed.go), in one of a few
// shuffled orders at a random rotation; UDP sockets (one per CPU) and
// TCP connections are read by loops of this package that parse a plain
// query in place and reuse their buffers (udp.go, tcp.go), so a query of
// a cached name is a parse, a map lookup, a copy and a write. Anything
// unusual goes through miekg/dns's parser and message types.
package dnsserver

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/miekg/dns"

	"github.com/flynn/discoverd/agent"
	"github.com/flynn/discoverd/api"
)

// Cache is what the server reads: the compiled form of a service name,
// from memory. *agent.View[*Service] implements it (agent.NewView with
// Compile).
type Cache interface {
	// Get returns the compiled instances of name and whether they may be
	// stale (the store is unreachable). It blocks only for a name it does
	// not hold yet. Errors with api.CodeInvalidArgument for a bad name;
	// anything else means no answer can be given.
	Get(ctx context.Context, name string) (svc *Service, stale bool, err error)
	// Len returns how many names the cache holds.
	Len() int
	// Evictions returns how many names it dropped to stay within its size.
	Evictions() uint64
}

var _ Cache = (*agent.View[*Service])(nil)

// Defaults of Config.
const (
	DefaultAddr          = "127.0.0.1:8053"
	DefaultZone          = "discoverd."
	DefaultTTL           = 5 * time.Second
	DefaultLookupTimeout = 5 * time.Second
	// LeaderTTL is the TTL of the leader.<svc> names, so that a resolver
	// does not hold on to a former leader.
	LeaderTTL = time.Second
)

// Sizes of messages.
const (
	// maxUDPSize bounds the UDP payload size taken from a client's EDNS0
	// option: the largest UDP payload over IPv4.
	maxUDPSize = 65507
	// advertisedUDPSize is the EDNS0 payload size of our replies (how large
	// a query we read).
	advertisedUDPSize = 4096
)

// Config configures a Server. Addr and Cache are required.
type Config struct {
	// Addr is the host:port of both the UDP and the TCP listener. A port 0
	// picks one free for both.
	Addr string
	// Zone is the domain served. Default DefaultZone.
	Zone string
	// TTL of the answers and of negative answers (the SOA minimum);
	// LeaderTTL for leader names. Default DefaultTTL.
	TTL time.Duration
	// LookupTimeout bounds how long a query for a name not cached yet
	// waits for the store. Default DefaultLookupTimeout.
	LookupTimeout time.Duration
	// Cache answers the lookups. Required.
	Cache Cache
	// Logger receives the server's logs. Default slog.Default().
	Logger *slog.Logger
	// Allow, if set, is asked whether the instances of a service name may
	// be given out (the agent's anonymous read rules); a name it refuses
	// is answered REFUSED. It must be safe for concurrent use and must not
	// block. Default: every name.
	Allow func(name string) bool
}

// Server is a running DNS server. Its methods are safe for concurrent use.
type Server struct {
	cache     Cache
	zone      string // lower case, fully qualified
	addrZone  string // ".addr." + zone: suffix of SRV targets
	ttl       uint32
	leaderTTL uint32
	lookup    time.Duration
	log       *slog.Logger
	metrics   *metrics
	allow     func(name string) bool

	servers  []*dns.Server  // one per UDP socket on a wildcard address
	udpConns []*net.UDPConn // the UDP sockets of an address: serveUDP
	slow     chan struct{}  // a semaphore: queries waiting for a first lookup
	ln       net.Listener   // TCP: serveTCP

	mu      sync.Mutex
	conns   map[net.Conn]struct{} // TCP connections open
	udpAddr net.Addr
	tcpAddr net.Addr

	ctx    context.Context // cancelled by Close: ends lookups in flight
	noWait context.Context // cancelled from the start: a lookup that must not block
	cancel context.CancelFunc
	wg     sync.WaitGroup // the read loops, TCP connections, waiting UDP queries

	closeOnce sync.Once
	closeErr  error
}

// Listen binds the UDP and TCP listeners of cfg.Addr (so an address in use
// is an error here), starts serving and returns once both serve. The
// caller must call Close. On a wildcard address (0.0.0.0, ::), UDP is
// served by miekg/dns's server, which replies from the address each query
// was sent to; otherwise by this package's faster read loops.
func Listen(cfg Config) (*Server, error) {
	if cfg.Cache == nil {
		return nil, errors.New("dnsserver: Config.Cache is required")
	}
	if cfg.Addr == "" {
		return nil, errors.New("dnsserver: Config.Addr is required")
	}
	if cfg.Zone == "" {
		cfg.Zone = DefaultZone
	}
	zone := dns.CanonicalName(cfg.Zone)
	if _, ok := dns.IsDomainName(zone); !ok || zone == "." {
		return nil, fmt.Errorf("dnsserver: zone %q is not a domain name", cfg.Zone)
	}
	if cfg.TTL == 0 {
		cfg.TTL = DefaultTTL
	}
	if cfg.TTL < time.Second {
		return nil, fmt.Errorf("dnsserver: TTL %v: must be at least 1s", cfg.TTL)
	}
	if cfg.LookupTimeout <= 0 {
		cfg.LookupTimeout = DefaultLookupTimeout
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	pcs, ln, err := listen(cfg.Addr, udpSockets())
	if err != nil {
		return nil, fmt.Errorf("dns listen: %w", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	noWait, stop := context.WithCancel(context.Background())
	stop()
	s := &Server{
		noWait:    noWait,
		slow:      make(chan struct{}, maxSlow),
		ln:        ln,
		conns:     make(map[net.Conn]struct{}),
		cache:     cfg.Cache,
		zone:      zone,
		addrZone:  ".addr." + zone,
		ttl:       uint32(cfg.TTL / time.Second),
		leaderTTL: uint32(LeaderTTL / time.Second),
		lookup:    cfg.LookupTimeout,
		log:       cfg.Logger,
		metrics:   newMetrics(cfg.Cache),
		allow:     cfg.Allow,
		udpAddr:   pcs[0].LocalAddr(),
		tcpAddr:   ln.Addr(),
		ctx:       ctx,
		cancel:    cancel,
	}
	started := make(chan struct{}, len(pcs))
	notify := func() { started <- struct{}{} }
	if s.udpAddr.(*net.UDPAddr).IP.IsUnspecified() {
		for _, pc := range pcs {
			s.servers = append(s.servers, &dns.Server{PacketConn: pc, Handler: s, UDPSize: advertisedUDPSize, NotifyStartedFunc: notify})
		}
	} else {
		for _, pc := range pcs {
			s.udpConns = append(s.udpConns, pc.(*net.UDPConn))
		}
	}
	n := len(s.servers)
	served := make(chan error, n)
	for _, srv := range s.servers {
		s.wg.Add(1)
		go func() { // stopped by Close
			defer s.wg.Done()
			err := srv.ActivateAndServe()
			served <- err
			if err != nil && s.ctx.Err() == nil {
				s.log.Error("dns: server stopped", "err", err)
			}
		}()
	}
	timer := time.NewTimer(10 * time.Second)
	defer timer.Stop()
	for range n {
		select {
		case <-started:
		case err := <-served:
			for _, pc := range pcs {
				pc.Close()
			}
			s.Close()
			return nil, fmt.Errorf("dns serve: %w", err)
		case <-timer.C:
			for _, pc := range pcs {
				pc.Close()
			}
			s.Close()
			return nil, errors.New("dns serve: not started after 10s")
		}
	}
	for _, pc := range s.udpConns {
		s.wg.Add(1)
		go s.serveUDP(pc) // stopped by Close
	}
	s.wg.Add(1)
	go s.serveTCP(ln) // stopped by Close
	s.log.Info("dns serving", "addr", s.udpAddr.String(), "zone", zone, "ttl", cfg.TTL)
	return s, nil
}

// listen binds n UDP sockets (n > 1 needs SO_REUSEPORT: the kernel then
// spreads clients over them, each read by its own goroutine) and one TCP
// listener on the same address; with port 0, on the same free port
// (retrying if the UDP port's TCP twin is taken).
func listen(addr string, n int) ([]net.PacketConn, net.Listener, error) {
	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, nil, err
	}
	lc := net.ListenConfig{}
	if n > 1 {
		lc.Control = reusePort
	}
	ctx := context.Background()
	for attempt := 1; ; attempt++ {
		pc, err := lc.ListenPacket(ctx, "udp", addr)
		if err != nil {
			return nil, nil, err
		}
		pcs := []net.PacketConn{pc}
		bound := pc.LocalAddr().String()
		for len(pcs) < n && err == nil {
			if pc, err = lc.ListenPacket(ctx, "udp", bound); err == nil {
				pcs = append(pcs, pc)
			}
		}
		var ln net.Listener
		if err == nil {
			ln, err = net.Listen("tcp", bound)
		}
		if err == nil {
			return pcs, ln, nil
		}
		for _, pc := range pcs {
			pc.Close()
		}
		if port != "0" || attempt == 10 {
			return nil, nil, err
		}
	}
}

// UDPAddr and TCPAddr are the addresses the server listens on.
func (s *Server) UDPAddr() net.Addr { return s.udpAddr }

// TCPAddr: see UDPAddr.
func (s *Server) TCPAddr() net.Addr { return s.tcpAddr }

// shutdownTimeout bounds the wait for queries in flight on Close.
const shutdownTimeout = 5 * time.Second

// Close stops both listeners, ends lookups in flight (they are answered
// SERVFAIL) and TCP connections, and waits for the server's goroutines.
// It is idempotent.
func (s *Server) Close() error {
	s.closeOnce.Do(func() {
		s.cancel()
		ctx, cancel := context.WithTimeout(context.Background(), shutdownTimeout)
		defer cancel()
		var errs []error
		for _, pc := range s.udpConns {
			if err := pc.Close(); err != nil {
				errs = append(errs, err)
			}
		}
		if err := s.ln.Close(); err != nil {
			errs = append(errs, err)
		}
		s.mu.Lock()
		for c := range s.conns {
			c.Close()
		}
		s.mu.Unlock()
		for _, srv := range s.servers {
			if err := srv.ShutdownContext(ctx); err != nil {
				errs = append(errs, err)
			}
		}
		s.wg.Wait()
		s.closeErr = errors.Join(errs...)
	})
	return s.closeErr
}

// outcome is what the metrics record of a reply.
type outcome struct {
	rcode     int
	truncated bool
	stale     bool
}

// errWouldBlock: answering needs a lookup that blocks (a name not cached
// yet), and the caller asked not to block.
var errWouldBlock = errors.New("dnsserver: the lookup would block")

// bufPool holds reply buffers of the largest message size.
var bufPool = sync.Pool{New: func() any { b := make([]byte, 0, dns.MaxMsgSize); return &b }}

// ServeDNS answers one query; miekg/dns's server calls it in a goroutine
// per UDP packet when the server listens on a wildcard address (see
// Listen). Other sockets are read by serveUDP and serveConn.
func (s *Server) ServeDNS(w dns.ResponseWriter, req *dns.Msg) {
	start := time.Now()
	_, tcp := w.RemoteAddr().(*net.TCPAddr)
	bp := bufPool.Get().(*[]byte)
	out, oc, _ := s.replyMsg(s.ctx, req, tcp, true, (*bp)[:0])
	if _, err := w.Write(out); err != nil {
		s.log.Debug("dns: reply not sent", "err", err, "client", w.RemoteAddr().String())
	}
	*bp = out[:0]
	bufPool.Put(bp)
	s.metrics.observe(qtypeOf(req), oc, time.Since(start))
}

func qtypeOf(req *dns.Msg) int {
	if len(req.Question) != 1 {
		return -1
	}
	return int(req.Question[0].Qtype)
}

// Reply returns the answer to req for a client over TCP (tcp) or UDP,
// and whether it was built from a possibly stale cache. It blocks only
// while a name not cached yet is looked up, at most until ctx is done or
// the lookup timeout. The reply always packs within the transport's size
// (the client's EDNS0 size over UDP, 512 bytes without, 64 KiB over TCP).
// It is the reply the server sends, unpacked.
func (s *Server) Reply(ctx context.Context, req *dns.Msg, tcp bool) (resp *dns.Msg, stale bool) {
	out, oc, _ := s.replyMsg(ctx, req, tcp, true, make([]byte, 0, 512))
	resp = new(dns.Msg)
	if err := resp.Unpack(out); err != nil {
		panic("dnsserver: a reply does not unpack: " + err.Error()) // a bug: FuzzReply looks for it
	}
	resp.Compress = true // as sent: it packs no larger than the reply sent
	return resp, oc.stale
}

// replyMsg appends to b the reply to req, a query miekg/dns parsed. With
// wait false, it returns errWouldBlock rather than wait for a lookup.
func (s *Server) replyMsg(ctx context.Context, req *dns.Msg, tcp, wait bool, b []byte) ([]byte, outcome, error) {
	m := new(dns.Msg)
	m.SetReply(req)
	switch {
	case req.Opcode != dns.OpcodeQuery:
		m.Rcode = dns.RcodeNotImplemented
		return s.pack(m, b)
	case len(req.Question) != 1:
		m.Question = nil
		m.Rcode = dns.RcodeFormatError
		return s.pack(m, b)
	}
	if opt := req.IsEdns0(); opt != nil && opt.Version() != 0 {
		m.SetEdns0(advertisedUDPSize, false)
		m.Rcode = dns.RcodeBadVers
		return s.pack(m, b)
	}
	q, ok := queryOf(req)
	if !ok { // a name too long to pack
		m.Question = nil
		m.Rcode = dns.RcodeFormatError
		return s.pack(m, b)
	}
	return s.reply(ctx, &q, tcp, wait, b)
}

// pack appends m to b; m is one of the server's own small replies, which
// always pack.
func (s *Server) pack(m *dns.Msg, b []byte) ([]byte, outcome, error) {
	out, err := m.PackBuffer(b[len(b):cap(b)])
	if err != nil {
		panic("dnsserver: a reply does not pack: " + err.Error())
	}
	return append(b, out...), outcome{rcode: m.Rcode, truncated: m.Truncated}, nil
}

// reply appends to b the reply to q over TCP (tcp) or UDP. A positive
// answer is copied from the packed records of its name (rrset); the rest
// (negative answers, errors, the apex and the addr names) is built as a
// dns.Msg. With wait false, it returns errWouldBlock rather than wait for
// the lookup of a name not cached yet.
func (s *Server) reply(ctx context.Context, q *query, tcp, wait bool, b []byte) ([]byte, outcome, error) {
	if q.class != dns.ClassINET && q.class != dns.ClassANY {
		return s.replyRcode(q, dns.RcodeRefused, b)
	}
	n, ok := s.parseName(q.name)
	if !ok {
		return s.replyRcode(q, dns.RcodeRefused, b)
	}
	ttl := s.ttl
	if n.form == formLeader {
		ttl = s.leaderTTL
	}
	switch n.form {
	case formInvalid:
		return s.negative(q, dns.RcodeNameError, ttl, false, b)
	case formApex:
		if q.qtype == dns.TypeSOA || q.qtype == dns.TypeANY {
			m := s.msg(q, dns.RcodeSuccess)
			m.Answer = append(m.Answer, s.soa(ttl))
			return s.pack(m, b)
		}
		return s.negative(q, dns.RcodeSuccess, ttl, false, b)
	case formAddr:
		a := addrRR(q.name, n.ip, ttl)
		if q.qtype == a.Header().Rrtype || q.qtype == dns.TypeANY {
			m := s.msg(q, dns.RcodeSuccess)
			m.Answer = append(m.Answer, a)
			return s.pack(m, b)
		}
		return s.negative(q, dns.RcodeSuccess, ttl, false, b)
	}
	if s.allow != nil && !s.allow(n.service) {
		return s.replyRcode(q, dns.RcodeRefused, b)
	}
	// A name held is answered without blocking; a name not held yet
	// starts its watch, and this first Get returns at once.
	svc, stale, err := s.cache.Get(s.noWait, n.service)
	if err != nil && api.ErrorCode(err) != api.CodeInvalidArgument {
		if !wait {
			return b, outcome{}, errWouldBlock
		}
		lctx, cancel := context.WithTimeout(ctx, s.lookup)
		svc, stale, err = s.cache.Get(lctx, n.service)
		cancel()
	}
	if err != nil {
		if api.ErrorCode(err) == api.CodeInvalidArgument {
			return s.negative(q, dns.RcodeNameError, ttl, false, b)
		}
		s.log.Debug("dns: lookup failed", "name", n.service, "err", err)
		m := s.msg(q, dns.RcodeServerFailure)
		m.Authoritative = false
		return s.pack(m, b)
	}
	k := kindOf(n.form, q.qtype, svc)
	var set *rrset
	if k != kindNone {
		set = s.rrset(svc, k)
	}
	if set == nil || set.n == 0 {
		return s.negative(q, dns.RcodeSuccess, ttl, stale, b)
	}
	start := len(b)
	b = q.appendQuestion(b)
	room := q.maxSize(tcp) - (len(b) - start)
	if q.edns {
		room -= optSize
	}
	an, recs := set.pick(room)
	b = append(b, recs...)
	room -= len(recs)
	tc := an < set.n
	ar := 0
	if !tc && set.glue != nil {
		b, ar = set.appendGlue(b, room)
	}
	if q.edns {
		b = appendOPT(b)
		ar++
	}
	q.setHeader(b[start:], dns.RcodeSuccess, tc, an, 0, ar)
	return b, outcome{rcode: dns.RcodeSuccess, truncated: tc, stale: stale}, nil
}

// kindOf is the RRset that answers qtype for a name of form f, or
// kindNone (no data).
func kindOf(f form, qtype uint16, svc *Service) kind {
	switch f {
	case formService:
		switch qtype {
		case dns.TypeA:
			return kindA
		case dns.TypeAAAA:
			return kindAAAA
		case dns.TypeSRV, dns.TypeANY:
			return kindSRV
		}
	case formSRV:
		if qtype == dns.TypeSRV || qtype == dns.TypeANY {
			return kindSRV
		}
	case formLeader:
		if svc.leader < 0 {
			return kindNone
		}
		ip := svc.instances[svc.leader].ip
		switch {
		case qtype == dns.TypeA && ip.Is4():
			return kindLeaderA
		case qtype == dns.TypeAAAA && ip.Is6():
			return kindLeaderAAAA
		case qtype == dns.TypeSRV || qtype == dns.TypeANY:
			return kindLeaderSRV
		case qtype == dns.TypeTXT:
			return kindLeaderTXT
		}
	}
	return kindNone
}

// msg returns a reply to q with rcode to build as a dns.Msg.
func (s *Server) msg(q *query, rcode int) *dns.Msg {
	m := &dns.Msg{
		MsgHdr: dns.MsgHdr{
			Id:               q.id,
			Response:         true,
			Authoritative:    true,
			RecursionDesired: q.flags&bitRD != 0,
			CheckingDisabled: q.flags&bitCD != 0,
			Rcode:            rcode,
		},
		Compress: true,
		Question: []dns.Question{{Name: q.name, Qtype: q.qtype, Qclass: q.class}},
	}
	if q.edns {
		m.SetEdns0(advertisedUDPSize, false)
	}
	return m
}

// replyRcode appends a reply to q with rcode and nothing else, not
// authoritative (REFUSED: a name we do not serve).
func (s *Server) replyRcode(q *query, rcode int, b []byte) ([]byte, outcome, error) {
	m := s.msg(q, rcode)
	m.Authoritative = false
	return s.pack(m, b)
}

// negative appends a negative answer to q with rcode and the zone's SOA
// in the authority section; its TTL is ttl, its minimum the zone's TTL.
func (s *Server) negative(q *query, rcode int, ttl uint32, stale bool, b []byte) ([]byte, outcome, error) {
	m := s.msg(q, rcode)
	m.Ns = append(m.Ns, s.soa(ttl))
	out, oc, err := s.pack(m, b)
	oc.stale = stale
	return out, oc, err
}

func (s *Server) soa(ttl uint32) *dns.SOA {
	return &dns.SOA{
		Hdr:     dns.RR_Header{Name: s.zone, Rrtype: dns.TypeSOA, Class: dns.ClassINET, Ttl: ttl},
		Ns:      "ns." + s.zone,
		Mbox:    "hostmaster." + s.zone,
		Serial:  1,
		Refresh: 3600,
		Retry:   600,
		Expire:  86400,
		Minttl:  s.ttl,
	}
}

func addrRR(owner string, ip netip.Addr, ttl uint32) dns.RR {
	if ip.Is4() {
		return &dns.A{Hdr: dns.RR_Header{Name: owner, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: ttl}, A: ip.AsSlice()}
	}
	return &dns.AAAA{Hdr: dns.RR_Header{Name: owner, Rrtype: dns.TypeAAAA, Class: dns.ClassINET, Ttl: ttl}, AAAA: ip.AsSlice()}
}

func (s *Server) target(in *instance) string {
	if in.inZone {
		return in.target + s.addrZone
	}
	return in.target
}
