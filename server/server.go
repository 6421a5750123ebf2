// Package server is the agent's front ends on one listener: the rpcplus
// compatible RPC receiver named "Agent" (mounted at rpc.DefaultPath), an
// HTTP/JSON API with Server-Sent Events streams, /health and /metrics.
// It holds no discovery logic: validation, limits and semantics are the
// agent's, so RPC and HTTP callers get the same answers.
//
//	a, _ := agent.New(agent.Config{Backend: b})
//	srv, _ := server.New(a, server.Options{})
//	hs := &http.Server{Handler: srv}
//	go hs.Serve(ln)
//	...
//	srv.Close()            // ends RPC connections and SSE streams
//	hs.Shutdown(ctx)
//	a.Close()
package server

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/flynn/discoverd/acl"
	"github.com/flynn/discoverd/agent"
	"github.com/flynn/discoverd/api"
	"github.com/flynn/discoverd/backend"
	"github.com/flynn/discoverd/rpc"
	"github.com/prometheus/client_golang/prometheus"
)

// Agent is what the front ends need of the agent. *agent.Agent implements
// it.
type Agent interface {
	NewSession(maxRegistrations int) *agent.Session
	NewSharedSession(maxRegistrations int) *agent.Session
	Subscribe(ctx context.Context, name string) (*agent.Subscription, error)
	Leader(ctx context.Context, name string) (*agent.Subscription, error)
	Instances(ctx context.Context, name string) ([]api.ServiceUpdate, error)
	LeaderOf(ctx context.Context, name string) (api.ServiceUpdate, bool, error)
	Ping(ctx context.Context) error
	Stats() agent.Stats
}

var _ Agent = (*agent.Agent)(nil)

// Options configures a Server. The zero value is usable: every field has a
// default.
type Options struct {
	// MaxStreamsPerConn caps the concurrent Subscribe and Leader streams of
	// one RPC connection; one more fails with CodeResourceExhausted. New
	// sets it, with that error, on the RPC server (rpc.Server's
	// MaxStreamsPerConn and TooManyStreams), which refuses the stream
	// before starting it. Default api.DefaultMaxStreamsPerConn.
	MaxStreamsPerConn int
	// MaxRegistrationsPerConn caps the registrations one RPC connection
	// holds; 0 means the agent's default.
	MaxRegistrationsPerConn int
	// MaxHTTPRegistrations caps the registrations made over HTTP, which
	// share one session; one more is answered 429 with
	// CodeResourceExhausted. Default DefaultMaxHTTPRegistrations.
	MaxHTTPRegistrations int
	// MaxHTTPRegistrationsPerAddr caps the HTTP registrations of one
	// client address (IP): those it PUT within the last TTL and did not
	// DELETE. One more is answered 429 with CodeResourceExhausted, so one
	// client cannot use up MaxHTTPRegistrations for all. Default
	// DefaultMaxHTTPRegistrationsPerAddr.
	MaxHTTPRegistrationsPerAddr int
	// TTL is the agent's registration TTL (agent.Config.TTL): how long an
	// HTTP registration outlives its last PUT, and how long after its last
	// Register or Heartbeat an RPC connection may hold registrations.
	// Default api.DefaultTTL.
	TTL time.Duration
	// BodyTimeout bounds the time a request body may take to arrive,
	// from the end of its header; a body still incomplete then is answered
	// 408 (or, when the handler does not read it, the connection is
	// closed). Requests without a body, SSE streams among them, are not
	// affected. Default DefaultBodyTimeout.
	BodyTimeout time.Duration
	// RPCIdleTimeout closes an RPC connection with no call, no stream and
	// no registration for that long (rpc.Server.IdleTimeout, with a
	// KeepIdle that keeps connections whose registrations may be alive).
	// Negative means never. Default DefaultRPCIdleTimeout.
	RPCIdleTimeout time.Duration
	// Conns, if set, is the limiter of the agent's listener; its counts
	// are exported on /metrics.
	Conns *ConnLimiter
	// MaxSSEStreams caps the concurrent SSE streams of the whole server;
	// one more is answered 429 with CodeResourceExhausted. Default
	// DefaultMaxSSEStreams.
	MaxSSEStreams int
	// CallTimeout bounds each unary RPC call (Register, Heartbeat,
	// Unregister) on the server's side: a call still waiting for the
	// store after it fails with CodeUnavailable, which frees its slot on
	// the connection. Default DefaultCallTimeout.
	CallTimeout time.Duration
	// MaxBodySize caps the body of a PUT request, in bytes. Default
	// DefaultMaxBodySize.
	MaxBodySize int64
	// SSEKeepAlive is how often an idle SSE stream gets a comment line, so
	// that proxies keep it open and a vanished client is noticed. Default
	// 25 s.
	SSEKeepAlive time.Duration
	// WriteTimeout bounds each write to an SSE client; a client that does
	// not read for that long is disconnected. Default 10 s.
	WriteTimeout time.Duration
	// HealthTimeout bounds the store ping of GET /health. Default 2 s.
	HealthTimeout time.Duration
	// Services lists the services of the store for GET /services; nil
	// answers 501. Main sets it to the backend when it implements
	// backend.Lister.
	Services backend.Lister
	// Store names the agent's store for GET /agent (the web console's
	// agent panel), as main logs it; "" leaves it blank.
	Store string
	// RPC tunes the RPC server (message size, stream buffer, calls per
	// connection); nil means rpc.NewServer() with its defaults, and its
	// Logger then Logger. New sets its MaxStreamsPerConn and
	// TooManyStreams (see MaxStreamsPerConn).
	RPC *rpc.Server
	// Checks runs the health checks of checked registrations (a PUT or
	// Register with a check); nil refuses them with CodeUnavailable.
	Checks Checker
	// Logger receives the front ends' logs. Default slog.Default().
	Logger *slog.Logger
	// ACL, if set, holds the access rules in force, read at each request
	// (its owner swaps them on reload); nil, or a nil *acl.ACL in it,
	// allows everything. See auth.go.
	ACL *atomic.Pointer[acl.ACL]
}

// Defaults of Options.
const (
	// DefaultMaxBodySize is the default cap on a PUT body: room for the
	// largest valid set of attributes (api.MaxAttrs keys and values at
	// their limits) with JSON quoting.
	DefaultMaxBodySize = 256 << 10
	// DefaultMaxHTTPRegistrations is the default cap on the registrations
	// made over HTTP.
	DefaultMaxHTTPRegistrations = 10000
	// DefaultMaxSSEStreams is the default cap on concurrent SSE streams.
	DefaultMaxSSEStreams = 1024
	// DefaultCallTimeout is the default bound on a unary RPC call. It is
	// well below the default TTL (api.DefaultTTL), so that calls stuck on
	// an unreachable store free their connection's slots long before its
	// registrations would expire for want of heartbeats.
	DefaultCallTimeout = 5 * time.Second
	// DefaultMaxHTTPRegistrationsPerAddr is the default cap on the HTTP
	// registrations of one client address.
	DefaultMaxHTTPRegistrationsPerAddr = 1000
	// DefaultBodyTimeout is the default bound on the arrival of a request
	// body.
	DefaultBodyTimeout = 10 * time.Second
	// DefaultRPCIdleTimeout is the default idle time after which an RPC
	// connection without calls, streams or registrations is closed.
	DefaultRPCIdleTimeout = 5 * time.Minute
)

// Server serves the agent over RPC and HTTP. It is an http.Handler; mount
// it at "/" of the agent's listener. Its methods are safe for concurrent
// use.
type Server struct {
	agent   Agent
	opts    Options
	log     *slog.Logger
	rpc     *rpc.Server
	mux     *http.ServeMux
	metrics *metrics
	auth    auth

	// ctx is cancelled by Close; it ends SSE streams and connection
	// watchers.
	ctx    context.Context
	cancel context.CancelFunc

	httpSession *agent.Session // shared by every HTTP registration
	httpQuota   *httpQuota     // HTTP registrations per client address

	mu         sync.Mutex
	closed     bool
	conns      map[uint64]*connState // RPC connections that made a call
	sseStreams int                   // SSE streams open now
	wg         sync.WaitGroup        // connection watchers and SSE handlers

	closeOnce sync.Once
	closeErr  error
}

// New returns a Server for a. It registers the RPC receiver "Agent" on its
// RPC server and mounts it at rpc.DefaultPath. Call Close when done; the
// caller still owns a.
func New(a Agent, opts Options) (*Server, error) {
	if a == nil {
		return nil, errors.New("server: nil agent")
	}
	if opts.MaxStreamsPerConn <= 0 {
		opts.MaxStreamsPerConn = api.DefaultMaxStreamsPerConn
	}
	if opts.MaxBodySize <= 0 {
		opts.MaxBodySize = DefaultMaxBodySize
	}
	if opts.MaxHTTPRegistrations <= 0 {
		opts.MaxHTTPRegistrations = DefaultMaxHTTPRegistrations
	}
	if opts.MaxSSEStreams <= 0 {
		opts.MaxSSEStreams = DefaultMaxSSEStreams
	}
	if opts.CallTimeout <= 0 {
		opts.CallTimeout = DefaultCallTimeout
	}
	if opts.SSEKeepAlive <= 0 {
		opts.SSEKeepAlive = 25 * time.Second
	}
	if opts.WriteTimeout <= 0 {
		opts.WriteTimeout = 10 * time.Second
	}
	if opts.HealthTimeout <= 0 {
		opts.HealthTimeout = 2 * time.Second
	}
	if opts.MaxHTTPRegistrationsPerAddr <= 0 {
		opts.MaxHTTPRegistrationsPerAddr = DefaultMaxHTTPRegistrationsPerAddr
	}
	if opts.TTL <= 0 {
		opts.TTL = api.DefaultTTL
	}
	if opts.BodyTimeout <= 0 {
		opts.BodyTimeout = DefaultBodyTimeout
	}
	if opts.RPCIdleTimeout == 0 {
		opts.RPCIdleTimeout = DefaultRPCIdleTimeout
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	rs := opts.RPC
	if rs == nil {
		rs = rpc.NewServer()
		rs.Logger = opts.Logger
	}
	rs.MaxStreamsPerConn = opts.MaxStreamsPerConn
	rs.TooManyStreams = func(limit int) error {
		return api.Errorf(api.CodeResourceExhausted, "connection already has %d streams open, the limit", limit)
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &Server{
		agent:   a,
		opts:    opts,
		log:     opts.Logger,
		rpc:     rs,
		mux:     http.NewServeMux(),
		ctx:     ctx,
		cancel:  cancel,
		conns:   make(map[uint64]*connState),
		metrics: newMetrics(a, opts.Conns),
	}
	rs.IdleTimeout = max(opts.RPCIdleTimeout, 0)
	rs.KeepIdle = s.keepIdle
	s.initAuth()
	if err := s.registerRPC(rs); err != nil {
		cancel()
		return nil, fmt.Errorf("server: register rpc receiver: %w", err)
	}
	s.httpSession = a.NewSharedSession(opts.MaxHTTPRegistrations)
	s.httpQuota = newHTTPQuota(opts.MaxHTTPRegistrationsPerAddr, opts.TTL)
	s.routes()
	return s, nil
}

// ServeHTTP dispatches to the RPC upgrade, the HTTP API, /health and
// /metrics. Every error it answers is a JSON ErrorBody, 404 and 405 for
// paths and methods it does not serve included. A request body must arrive
// within BodyTimeout.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	s.limitBody(w, r)
	if _, pattern := s.mux.Handler(r); pattern == "" {
		w = &jsonErrors{ResponseWriter: w, method: r.Method, path: r.URL.Path}
	}
	s.mux.ServeHTTP(w, r)
}

// Registry returns the Prometheus registry behind GET /metrics, so that an
// embedding program can add its own collectors.
func (s *Server) Registry() *prometheus.Registry { return s.metrics.reg }

// Close is Shutdown without a bound on the wait.
func (s *Server) Close() error { return s.Shutdown(context.Background()) }

// Shutdown closes every RPC connection (their sessions then unregister
// what they held), ends every SSE stream, withdraws the HTTP registrations
// and waits for its goroutines and handlers to return; the wait for the
// RPC methods ends early when ctx is done, and Shutdown then returns that
// error (the methods finish on their own; a later call waits again). It
// does not close the agent. Later RPC upgrades and SSE requests are
// refused. The work is done once; later calls return its error.
func (s *Server) Shutdown(ctx context.Context) error {
	s.closeOnce.Do(func() {
		s.mu.Lock()
		s.closed = true
		s.mu.Unlock()
		s.cancel()
		s.closeErr = s.rpc.Close(ctx)
		s.wg.Wait()
		s.httpSession.Close()
	})
	return s.closeErr
}

// track adds one goroutine or handler to the set Close waits for. It
// returns false when the server is closed; the caller must then not start.
func (s *Server) track() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	s.wg.Add(1)
	return true
}

// wireError returns err in the form the front ends send: the *api.Error in
// its chain (so the text is "code: message"), or, for anything else, a
// CodeInternal error whose detail goes to the log only.
func (s *Server) wireError(op string, err error) *api.Error {
	var e *api.Error
	if errors.As(err, &e) {
		return e
	}
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return api.Errorf(api.CodeUnavailable, "%s: %v", op, err)
	}
	s.log.Error("request failed", "op", op, "err", err)
	return api.Errorf(api.CodeInternal, "%s failed; see the agent's log", op)
}
