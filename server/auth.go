package server

import (
	"context"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/flynn/discoverd/acl"
	"github.com/flynn/discoverd/api"
	"github.com/flynn/discoverd/rpc"
)

// TokenCookie is the cookie an HTTP request may carry its token in, when
// it cannot set an Authorization header (a browser's EventSource). The
// Authorization header wins when both are present.
const TokenCookie = "discoverd_token"

// right is what a request asks to do with a service name.
type right int

const (
	rightRead     right = iota // look up, watch, DNS
	rightRegister              // register, heartbeat, unregister over HTTP
)

func (r right) String() string {
	if r == rightRegister {
		return "register"
	}
	return "read"
}

// auth is the server's access control: the ACL in force (swapped by its
// owner on reload), the denial metric and the rate limit of denial logs.
type auth struct {
	acl    func() *acl.ACL
	denied *prometheus.CounterVec
	logLim logLimiter
}

// initAuth wires access control into s: the RPC server records each
// connection's credential from its CONNECT request, and denials are
// counted on /metrics. HTTP routes are checked by authorize (handle).
func (s *Server) initAuth() {
	s.auth.acl = func() *acl.ACL { return nil }
	if p := s.opts.ACL; p != nil {
		s.auth.acl = p.Load
	}
	s.auth.denied = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "discoverd_acl_denied_total",
		Help: "Requests refused by the ACL (-acl-file), by front end (rpc, http, dns) and right (register, read).",
	}, []string{"front", "right"})
	s.metrics.reg.MustRegister(s.auth.denied)
	s.rpc.ConnContext = func(ctx context.Context, r *http.Request) context.Context {
		cred, err := credentialOf(r, false)
		return context.WithValue(ctx, credKey{}, connCred{cred, err})
	}
}

type credKey struct{}

// connCred is the credential an RPC connection presented in its CONNECT
// request, or the error that made it unusable.
type connCred struct {
	cred acl.Credential
	err  error
}

// credentialOf reads the bearer token of r: the Authorization header, or
// (with cookie) the TokenCookie cookie. No token is the anonymous
// credential; an Authorization header that is not "Bearer <token>" is an
// error.
func credentialOf(r *http.Request, cookie bool) (acl.Credential, error) {
	if h := r.Header.Get("Authorization"); h != "" {
		scheme, token, _ := strings.Cut(h, " ")
		token = strings.TrimSpace(token)
		if !strings.EqualFold(scheme, "Bearer") || token == "" {
			return acl.Credential{}, api.Errorf(api.CodePermissionDenied, `the Authorization header must be "Bearer <token>"`)
		}
		return acl.NewCredential(token), nil
	}
	if cookie {
		if c, err := r.Cookie(TokenCookie); err == nil && c.Value != "" {
			return acl.NewCredential(c.Value), nil
		}
	}
	return acl.Credential{}, nil
}

// check decides one request of front (rpc, http) from remote, which
// presented cred (or credErr), to use rt on the service name. It returns
// nil when allowed, else a permission_denied *api.Error; a denial is
// counted, and a denied write is logged (rate-limited) with the token's
// name, never the token.
func (s *Server) check(front, remote string, cred acl.Credential, credErr error, rt right, name string) error {
	a := s.auth.acl()
	if a == nil {
		return nil
	}
	var err error
	p := a.Principal(cred)
	switch {
	case credErr != nil:
		err = credErr
	case !p.Known:
		err = api.Errorf(api.CodePermissionDenied, "the token presented is not in the agent's ACL file")
	case rt == rightRegister && !p.CanRegister(name):
		err = api.Errorf(api.CodePermissionDenied, "%s may not register service %q", p.Describe(cred), name)
	case rt == rightRead && !p.CanRead(name):
		err = api.Errorf(api.CodePermissionDenied, "%s may not read service %q", p.Describe(cred), name)
	default:
		return nil
	}
	s.auth.denied.WithLabelValues(front, rt.String()).Inc()
	if rt == rightRegister {
		if ok, suppressed := s.auth.logLim.allow(time.Now()); ok {
			s.log.Warn("write denied by the ACL", "front", front, "remote", remote, "who", p.Describe(cred),
				"name", name, "suppressed_since_last", suppressed)
		}
	}
	return err
}

// checkRPC checks a call of the RPC connection in ctx.
func (s *Server) checkRPC(ctx context.Context, rt right, name string) error {
	if s.auth.acl() == nil {
		return nil
	}
	cc, _ := ctx.Value(credKey{}).(connCred)
	remote := ""
	if c := rpc.ConnFromContext(ctx); c != nil {
		remote = c.RemoteAddr()
	}
	return s.check("rpc", remote, cc.cred, cc.err, rt, name)
}

// allowRPC returns the argument check of a unary call: validate, then the
// ACL's rt on name for the connection in ctx.
func (s *Server) allowRPC(ctx context.Context, rt right, name string, validate func() error) func() error {
	return func() error {
		if err := validate(); err != nil {
			return err
		}
		return s.checkRPC(ctx, rt, name)
	}
}

// authorize wraps the handler of pattern with the ACL check of its
// service name: a pattern with a {name} wildcard needs the read right for
// GET and HEAD, the register right for any other method. Other patterns
// (health, metrics, the listing, which filters itself) are not checked.
func (s *Server) authorize(pattern string, h http.HandlerFunc) http.HandlerFunc {
	if !strings.Contains(pattern, "{name}") {
		return h
	}
	rt := rightRegister
	if method, _, _ := strings.Cut(pattern, " "); method == http.MethodGet || method == http.MethodHead {
		rt = rightRead
	}
	return func(w http.ResponseWriter, r *http.Request) {
		if s.auth.acl() != nil {
			// A bad name is a bad request whoever sends it, as on RPC
			// (allowRPC): 400 before the ACL's 403.
			name := r.PathValue("name")
			if err := api.ValidateName(name); err != nil {
				s.writeError(w, "authorize", err)
				return
			}
			cred, credErr := credentialOf(r, true)
			if err := s.check("http", r.RemoteAddr, cred, credErr, rt, name); err != nil {
				s.writeError(w, "authorize", err)
				return
			}
		}
		h(w, r)
	}
}

// readable returns whether the HTTP request r may read each service name
// (for listings, which leave out what it may not read), or the error that
// denies r everything.
func (s *Server) readable(r *http.Request) (func(name string) bool, error) {
	a := s.auth.acl()
	if a == nil {
		return func(string) bool { return true }, nil
	}
	cred, err := credentialOf(r, true)
	p := a.Principal(cred)
	if err == nil && !p.Known {
		err = api.Errorf(api.CodePermissionDenied, "the token presented is not in the agent's ACL file")
	}
	if err != nil {
		s.auth.denied.WithLabelValues("http", rightRead.String()).Inc()
		return nil, err
	}
	return p.CanRead, nil
}

// AllowAnonymousRead reports whether a request without a token may read
// the service name (the DNS front end's dnsserver.Config.Allow); a refusal
// is counted on /metrics. Safe for concurrent use; it does not block.
func (s *Server) AllowAnonymousRead(name string) bool {
	a := s.auth.acl()
	if a == nil || a.Anonymous().CanRead(name) {
		return true
	}
	s.auth.denied.WithLabelValues("dns", rightRead.String()).Inc()
	return false
}

// logLimiter lets through at most logBurst lines per second and counts
// the others.
type logLimiter struct {
	mu         sync.Mutex
	window     time.Time
	n          int
	suppressed int
}

const logBurst = 5

func (l *logLimiter) allow(now time.Time) (ok bool, suppressed int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if now.Sub(l.window) >= time.Second {
		l.window, l.n = now, 0
	}
	if l.n >= logBurst {
		l.suppressed++
		return false, 0
	}
	l.n++
	suppressed, l.suppressed = l.suppressed, 0
	return true, suppressed
}
