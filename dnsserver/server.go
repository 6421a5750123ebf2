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
package dnsserver

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/netip"
	"strings"
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
	// minRRSize is a lower bound of the packed size of an answer record
	// (an A record whose owner name is compressed): more than
	// (size-header)/minRRSize records never fit in size bytes.
	minRRSize = 16
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

	servers []*dns.Server // one per UDP socket, then TCP
	udpAddr net.Addr
	tcpAddr net.Addr

	ctx    context.Context // cancelled by Close: ends lookups in flight
	cancel context.CancelFunc
	wg     sync.WaitGroup // the two serve goroutines

	closeOnce sync.Once
	closeErr  error
}

// Listen binds the UDP and TCP listeners of cfg.Addr (so an address in use
// is an error here), starts serving and returns once both serve. The
// caller must call Close.
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
	s := &Server{
		cache:     cfg.Cache,
		zone:      zone,
		addrZone:  ".addr." + zone,
		ttl:       uint32(cfg.TTL / time.Second),
		leaderTTL: uint32(LeaderTTL / time.Second),
		lookup:    cfg.LookupTimeout,
		log:       cfg.Logger,
		metrics:   newMetrics(cfg.Cache),
		udpAddr:   pcs[0].LocalAddr(),
		tcpAddr:   ln.Addr(),
		ctx:       ctx,
		cancel:    cancel,
	}
	n := len(pcs) + 1
	started := make(chan struct{}, n)
	notify := func() { started <- struct{}{} }
	for _, pc := range pcs {
		s.servers = append(s.servers, &dns.Server{PacketConn: pc, Handler: s, UDPSize: advertisedUDPSize, NotifyStartedFunc: notify})
	}
	// Unlimited queries per TCP connection: miekg/dns closes a connection
	// after 128 by default, dropping the queries a client has pipelined
	// beyond them (they time out at the client).
	s.servers = append(s.servers, &dns.Server{Listener: ln, Handler: s, NotifyStartedFunc: notify, MaxTCPQueries: -1})
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
			cancel()
			for _, pc := range pcs {
				pc.Close()
			}
			ln.Close()
			s.wg.Wait()
			return nil, fmt.Errorf("dns serve: %w", err)
		case <-timer.C:
			s.Close()
			return nil, errors.New("dns serve: not started after 10s")
		}
	}
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

// ServeDNS answers one query; the dns.Server calls it in a goroutine per
// UDP packet or TCP connection.
func (s *Server) ServeDNS(w dns.ResponseWriter, req *dns.Msg) {
	start := time.Now()
	_, tcp := w.RemoteAddr().(*net.TCPAddr)
	resp, stale := s.Reply(s.ctx, req, tcp)
	if err := w.WriteMsg(resp); err != nil {
		s.log.Debug("dns: reply not sent", "err", err, "client", w.RemoteAddr().String())
	}
	s.metrics.observe(req, resp, stale, time.Since(start))
}

// Reply returns the answer to req for a client over TCP (tcp) or UDP,
// and whether it was built from a possibly stale cache. It blocks only
// while a name not cached yet is looked up, at most until ctx is done or
// the lookup timeout. The reply always packs within the transport's size
// (the client's EDNS0 size over UDP, 512 bytes without, 64 KiB over TCP).
func (s *Server) Reply(ctx context.Context, req *dns.Msg, tcp bool) (resp *dns.Msg, stale bool) {
	m := new(dns.Msg)
	m.SetReply(req)
	m.RecursionAvailable = false
	m.Compress = true
	if req.Opcode != dns.OpcodeQuery {
		m.Rcode = dns.RcodeNotImplemented
		return m, false
	}
	if len(req.Question) != 1 {
		m.Question = nil
		m.Rcode = dns.RcodeFormatError
		return m, false
	}
	maxSize := dns.MinMsgSize
	if opt := req.IsEdns0(); opt != nil {
		m.SetEdns0(advertisedUDPSize, false)
		if opt.Version() != 0 {
			m.Rcode = dns.RcodeBadVers
			return m, false
		}
		maxSize = min(max(int(opt.UDPSize()), dns.MinMsgSize), maxUDPSize)
	}
	if tcp {
		maxSize = dns.MaxMsgSize
	}
	q := req.Question[0]
	if q.Qclass != dns.ClassINET && q.Qclass != dns.ClassANY {
		m.Rcode = dns.RcodeRefused
		return m, false
	}
	n, ok := s.parseName(q.Name)
	if !ok {
		m.Rcode = dns.RcodeRefused
		return m, false
	}
	m.Authoritative = true
	ttl := s.ttl
	if n.form == formLeader {
		ttl = s.leaderTTL
	}
	var svc *Service
	switch n.form {
	case formInvalid:
		return s.negative(m, dns.RcodeNameError, ttl), false
	case formApex:
		if q.Qtype == dns.TypeSOA || q.Qtype == dns.TypeANY {
			m.Answer = append(m.Answer, s.soa(ttl))
			return m, false
		}
		return s.negative(m, dns.RcodeSuccess, ttl), false
	case formAddr:
		a := addrRR(q.Name, n.ip, ttl)
		if q.Qtype == a.Header().Rrtype || q.Qtype == dns.TypeANY {
			m.Answer = append(m.Answer, a)
			return m, false
		}
		return s.negative(m, dns.RcodeSuccess, ttl), false
	}
	lctx, cancel := context.WithTimeout(ctx, s.lookup)
	svc, stale, err := s.cache.Get(lctx, n.service)
	cancel()
	if err != nil {
		if api.ErrorCode(err) == api.CodeInvalidArgument {
			return s.negative(m, dns.RcodeNameError, ttl), false
		}
		s.log.Debug("dns: lookup failed", "name", n.service, "err", err)
		m.Authoritative = false
		m.Rcode = dns.RcodeServerFailure
		return m, false
	}
	answered := false
	switch n.form {
	case formService:
		switch q.Qtype {
		case dns.TypeA:
			answered = s.fill(m, q.Name, svc, svc.v4, dns.TypeA, ttl, maxSize)
		case dns.TypeAAAA:
			answered = s.fill(m, q.Name, svc, svc.v6, dns.TypeAAAA, ttl, maxSize)
		case dns.TypeSRV, dns.TypeANY:
			answered = s.fill(m, q.Name, svc, svc.srv, dns.TypeSRV, ttl, maxSize)
		}
	case formSRV:
		if q.Qtype == dns.TypeSRV || q.Qtype == dns.TypeANY {
			answered = s.fill(m, q.Name, svc, svc.srv, dns.TypeSRV, ttl, maxSize)
		}
	case formLeader:
		if svc.leader < 0 {
			break
		}
		one := []int{svc.leader}
		in := &svc.instances[svc.leader]
		switch {
		case q.Qtype == dns.TypeA && in.ip.Is4(), q.Qtype == dns.TypeAAAA && in.ip.Is6():
			answered = s.fill(m, q.Name, svc, one, q.Qtype, ttl, maxSize)
		case q.Qtype == dns.TypeSRV || q.Qtype == dns.TypeANY:
			answered = s.fill(m, q.Name, svc, one, dns.TypeSRV, ttl, maxSize)
		case q.Qtype == dns.TypeTXT:
			m.Answer = append(m.Answer, &dns.TXT{
				Hdr: dns.RR_Header{Name: q.Name, Rrtype: dns.TypeTXT, Class: dns.ClassINET, Ttl: ttl},
				Txt: []string{fmt.Sprintf("created=%d", in.created), "addr=" + in.addr},
			})
			m.Truncate(maxSize)
			answered = true
		}
	}
	if !answered {
		s.negative(m, dns.RcodeSuccess, ttl)
	}
	return m, stale
}

// negative turns m into a negative answer with rcode and the zone's SOA
// in the authority section; its TTL is ttl, its minimum the zone's TTL.
func (s *Server) negative(m *dns.Msg, rcode int, ttl uint32) *dns.Msg {
	m.Rcode = rcode
	m.Answer = nil
	m.Ns = append(m.Ns[:0], s.soa(ttl))
	return m
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

// fill puts in m's answer section records of type typ (A, AAAA or SRV)
// for the instances svc.instances[idx[...]], in a random order, as many
// as fit in maxSize bytes, and sets TC if any was left out. For SRV, the
// addresses of the targets in the zone follow in the additional section,
// as many as fit (leaving one out does not set TC: the client can ask for
// the target). It reports false when idx is empty (no data).
//
// Sizes are counted exactly rather than by packing: m holds only the
// question (and OPT) so far, every owner name is the question's and packs
// as a 2-byte pointer to it, and an SRV target packs uncompressed
// (RFC 2782); a glue record is counted with its owner uncompressed (an
// upper bound: it packs as a pointer to the SRV target).
func (s *Server) fill(m *dns.Msg, owner string, svc *Service, idx []int, typ uint16, ttl uint32, maxSize int) bool {
	n := len(idx)
	if n == 0 {
		return false
	}
	m.Compress = true
	opt := m.IsEdns0()
	room := maxSize - m.Len()
	hdr := dns.RR_Header{Name: owner, Rrtype: typ, Class: dns.ClassINET, Ttl: ttl}
	fits := min(n, room/minRRSize+1)
	m.Answer = make([]dns.RR, 0, fits)
	var (
		as   []dns.A
		aaaa []dns.AAAA
		srvs []dns.SRV
	)
	switch typ {
	case dns.TypeA:
		as = make([]dns.A, 0, fits)
	case dns.TypeAAAA:
		aaaa = make([]dns.AAAA, 0, fits)
	case dns.TypeSRV:
		srvs = make([]dns.SRV, 0, fits)
	}
	perm := make([]int, n)
	for i := range perm {
		perm[i] = i
	}
	k := 0
	for ; k < n; k++ {
		j := k + rand.IntN(n-k) // a Fisher-Yates step: perm[k] is a random one of the rest
		perm[k], perm[j] = perm[j], perm[k]
		in := &svc.instances[idx[perm[k]]]
		var rr dns.RR
		switch typ {
		case dns.TypeA:
			room -= 2 + 10 + 4
			as = append(as, dns.A{Hdr: hdr, A: in.ipBytes})
			rr = &as[len(as)-1]
		case dns.TypeAAAA:
			room -= 2 + 10 + 16
			aaaa = append(aaaa, dns.AAAA{Hdr: hdr, AAAA: in.ipBytes})
			rr = &aaaa[len(aaaa)-1]
		case dns.TypeSRV:
			t := s.target(in)
			room -= 2 + 10 + 6 + len(t) + 1
			srvs = append(srvs, dns.SRV{Hdr: hdr, Priority: 0, Weight: 1, Port: in.port, Target: t})
			rr = &srvs[len(srvs)-1]
		}
		if room < 0 {
			break
		}
		m.Answer = append(m.Answer, rr)
	}
	m.Truncated = k < n
	if typ != dns.TypeSRV || m.Truncated {
		return true
	}
	var glue []dns.RR
	seen := make(map[string]bool, len(m.Answer))
	for _, rr := range m.Answer {
		t := rr.(*dns.SRV).Target
		if seen[t] || !strings.HasSuffix(t, s.addrZone) {
			continue
		}
		seen[t] = true
		ip, ok := parseAddrLabel(t[:len(t)-len(s.addrZone)])
		if !ok {
			continue
		}
		size := len(t) + 1 + 10 + 4
		if ip.Is6() {
			size += 12
		}
		if size > room {
			continue
		}
		room -= size
		glue = append(glue, addrRR(t, ip, s.ttl))
	}
	if len(glue) > 0 {
		if opt != nil {
			glue = append(glue, opt)
		}
		m.Extra = glue
	}
	return true
}

func (s *Server) target(in *instance) string {
	if in.inZone {
		return in.target + s.addrZone
	}
	return in.target
}
