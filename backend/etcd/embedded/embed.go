// Package embedded runs an etcd server inside this process: the agent's
// zero-setup store and every test's. It is a package of its own so that
// importing the etcd backend links only etcd's client.
//
//	srv, err := embedded.Start(ctx, embedded.Config{Dir: dir})
//	if err != nil {
//		return err
//	}
//	defer srv.Close()
//	b, err := etcd.Open(ctx, etcd.Config{Endpoints: srv.Endpoints(), TTL: 10 * time.Second})
package embedded

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"go.etcd.io/etcd/client/pkg/v3/transport"
	"go.etcd.io/etcd/server/v3/embed"
	"google.golang.org/grpc"
)

// Config configures an etcd server run inside this process.
type Config struct {
	// Dir is the data directory (created if missing, mode 0700). Required.
	// Restarting on the same Dir resumes the member with its data.
	Dir string
	// ClientAddr and PeerAddr are the host:port the server listens on for
	// clients and for raft peers. Empty picks a free port on 127.0.0.1.
	ClientAddr, PeerAddr string
	// Name is the member name. Default "default".
	Name string
	// InitialCluster lists every member of a new cluster as
	// "name=http://host:port,..." (peer URLs). Default: this member alone.
	// It is ignored when Dir already holds a member.
	InitialCluster string
	// HeartbeatInterval and ElectionTimeout are raft's timing. Defaults:
	// 50 ms and 500 ms for a single member (fast start, and leases as short
	// as 1 s), 100 ms and 1 s (etcd's defaults) for a cluster. The smallest
	// lease TTL etcd grants is 1.5 × ElectionTimeout, rounded up to seconds.
	HeartbeatInterval, ElectionTimeout time.Duration
	// Logger receives etcd's errors, and its warnings (those that explain
	// a wait, such as a slow disk or a locked database, included) at warn
	// level. Default slog.Default().
	Logger *slog.Logger
	// OnFatal is called, on an etcd goroutine, when etcd meets an error it
	// cannot go on from (it would call os.Exit(1) itself, for example when
	// it cannot purge its WAL for want of file descriptors), with that
	// error. It must not return: it is the embedding program's chance to
	// report the reason its own way and exit. If it returns, or is nil,
	// the process exits with status 1 after the error was logged.
	OnFatal func(error)
	// ClientTLS, if set, serves clients over TLS (https endpoints).
	ClientTLS *TLS
}

// TLS is the server side of TLS on the client port: PEM files of the
// server's certificate and key and, with ClientCertAuth, of the CAs whose
// client certificates etcd requires (and, with auth enabled, takes the
// common name of as the user name).
type TLS struct {
	CertFile, KeyFile string
	TrustedCAFile     string
	ClientCertAuth    bool
}

// Server is an etcd server running in this process. Its methods are safe
// for concurrent use.
type Server struct {
	etcd       *embed.Etcd
	endpoints  []string
	closing    context.CancelFunc // ends client streams, so that Close need not wait for them
	closingCtx context.Context
	quiet      *atomic.Bool // set on Close: etcd's shutdown errors are noise
	closeOnce  sync.Once

	done     chan struct{} // closed when the server stopped by itself; see Done
	err      error         // why; set before done is closed
	watchEnd chan struct{} // closed when the watching goroutine returns
}

// startAttempts bounds the retries when a port picked as free was taken
// by someone else before etcd bound it.
const startAttempts = 3

// Start starts an etcd server and blocks until it serves clients
// (for a cluster member: until it has joined the cluster), ctx is done, or
// it fails. On error nothing is left running. The caller must Close the
// server.
//
// The server compacts its history every 5 minutes, keeping 5 minutes of
// it (watchers further behind recover by re-reading, see Subscribe), and
// bounds its disk use (see wal.go).
func Start(ctx context.Context, cfg Config) (*Server, error) {
	if cfg.Dir == "" {
		return nil, errors.New("etcd: embedded server: Config.Dir is required")
	}
	if err := checkDataDir(cfg.Dir); err != nil {
		return nil, fmt.Errorf("etcd: embedded server: %w", err)
	}
	picked := cfg.ClientAddr == "" || cfg.PeerAddr == ""
	for attempt := 1; ; attempt++ {
		e, err := start(ctx, cfg)
		if err == nil {
			return e, nil
		}
		if !picked || !isAddrInUse(err) || attempt == startAttempts || ctx.Err() != nil {
			return nil, fmt.Errorf("etcd: embedded server: %w", err)
		}
	}
}

// start makes one attempt: it picks the addresses, configures the server
// (its identity, raft timing, disk bounds, logging and how Close ends
// client streams), starts it and waits until it is ready.
func start(ctx context.Context, cfg Config) (*Server, error) {
	clientURL, peerURL, err := listenURLs(cfg)
	if err != nil {
		return nil, err
	}
	ec := etcdConfig(cfg, clientURL, peerURL)
	limitDiskUse(ec)
	quiet := new(atomic.Bool)
	lastWarn := new(atomic.Pointer[string])
	ec.ZapLoggerBuilder = embed.NewZapLoggerBuilder(serverLogger(cfg.Logger, quiet, lastWarn, cfg.OnFatal))
	// etcd's Close waits (up to its request timeout, over 5 s) for client
	// streams to end, and watch and lease keepalive streams never end by
	// themselves: end them when Close starts.
	closingCtx, closing := context.WithCancel(context.Background())
	ec.GRPCAdditionalServerOptions = []grpc.ServerOption{grpc.ChainStreamInterceptor(endStreamsOn(closingCtx))}

	e, err := startEtcd(ctx, ec, lastWarn)
	if err != nil {
		closing()
		return nil, err
	}
	if err := awaitReady(ctx, e, lastWarn); err != nil {
		quiet.Store(true)
		closing()
		e.Close()
		return nil, err
	}
	em := &Server{etcd: e, endpoints: []string{clientURL.String()}, closing: closing, closingCtx: closingCtx,
		quiet: quiet, done: make(chan struct{}), watchEnd: make(chan struct{})}
	go em.watch() // stopped by Close
	return em, nil
}

// listenURLs returns the client and peer URLs of cfg, a free loopback
// port for each one it leaves empty.
func listenURLs(cfg Config) (client, peer url.URL, err error) {
	clientAddr, peerAddr := cfg.ClientAddr, cfg.PeerAddr
	if clientAddr == "" {
		if clientAddr, err = freeLoopbackAddr(); err != nil {
			return client, peer, err
		}
	}
	if peerAddr == "" {
		if peerAddr, err = freeLoopbackAddr(); err != nil {
			return client, peer, err
		}
	}
	client = url.URL{Scheme: "http", Host: clientAddr}
	if cfg.ClientTLS != nil {
		client.Scheme = "https"
	}
	return client, url.URL{Scheme: "http", Host: peerAddr}, nil
}

// etcdConfig returns the server's configuration: its name, URLs and
// cluster, and its raft timing (faster for a single member, which has no
// network between members to wait for, unless cfg sets it).
func etcdConfig(cfg Config, clientURL, peerURL url.URL) *embed.Config {
	ec := embed.NewConfig()
	ec.Dir = cfg.Dir
	ec.Name = cmp.Or(cfg.Name, "default")
	ec.ListenClientUrls = []url.URL{clientURL}
	ec.AdvertiseClientUrls = []url.URL{clientURL}
	ec.ListenPeerUrls = []url.URL{peerURL}
	ec.AdvertisePeerUrls = []url.URL{peerURL}
	ec.InitialCluster = cfg.InitialCluster
	if t := cfg.ClientTLS; t != nil {
		ec.ClientTLSInfo = transport.TLSInfo{CertFile: t.CertFile, KeyFile: t.KeyFile,
			TrustedCAFile: t.TrustedCAFile, ClientCertAuth: t.ClientCertAuth}
	}
	if ec.InitialCluster == "" {
		ec.InitialCluster = ec.InitialClusterFromName(ec.Name)
	}
	tick, election := 100*time.Millisecond, time.Second
	if !strings.Contains(ec.InitialCluster, ",") {
		tick, election = 50*time.Millisecond, 500*time.Millisecond
	}
	if cfg.HeartbeatInterval > 0 {
		tick = cfg.HeartbeatInterval
	}
	if cfg.ElectionTimeout > 0 {
		election = cfg.ElectionTimeout
	}
	ec.TickMs = uint(tick.Milliseconds())
	ec.ElectionMs = uint(election.Milliseconds())
	ec.EnableGRPCGateway = false
	// embed.NewConfig leaves it 0, which makes etcd warn about every
	// request; etcd's own command line defaults to this.
	ec.WarningUnaryRequestDuration = embed.DefaultWarningUnaryRequestDuration
	ec.LogLevel = "info" // the core below forwards warnings and errors, and the info lines that explain a wait
	return ec
}

// limitDiskUse keeps the data dir small under registration churn
// (docs/OPERATIONS.md, "Embedded etcd's disk use"): history is compacted
// every embedRetention, keeping that much (a watcher further behind
// re-reads, see Subscribe); the database is bounded by embedQuotaBytes and
// defragmented at start when that frees embedDefragMB; WAL segments are
// preallocated at walSegmentBytes (wal.go), at most MaxWalFiles of them
// kept.
func limitDiskUse(ec *embed.Config) {
	ec.AutoCompactionMode = embed.CompactorModePeriodic
	ec.AutoCompactionRetention = embedRetention.String()
	ec.QuotaBackendBytes = embedQuotaBytes
	ec.BootstrapDefragThresholdMegabytes = embedDefragMB
	ec.MaxWalFiles = embedMaxWALs
	ec.MaxSnapFiles = embedMaxWALs
}

// awaitReady waits until e serves clients (for a cluster member: until it
// joined the cluster), stops, fails, or ctx is done. The caller stops e
// after an error.
func awaitReady(ctx context.Context, e *embed.Etcd, lastWarn *atomic.Pointer[string]) error {
	select {
	case <-e.Server.ReadyNotify():
		return nil
	case <-e.Server.StopNotify():
		return errors.New("server stopped before it was ready")
	case err := <-e.Err():
		if err == nil {
			err = errors.New("server stopped before it was ready")
		}
		return err
	case <-ctx.Done():
		return fmt.Errorf("waiting for the server to be ready: %w%s", ctx.Err(), lastWarning(lastWarn))
	}
}

// startGrace is how long startEtcd waits, once its ctx is done, for
// StartEtcd to return so that it can stop the server cleanly.
const startGrace = time.Second

// startEtcd runs embed.StartEtcd, which does not take a context and can
// block for long (replaying a large WAL) or for ever (a database locked by
// a process that started after checkDataDir looked), and returns when it
// does or when ctx is done. In the latter case it waits up to startGrace
// for StartEtcd and closes what it started; after that its goroutine is
// left to finish on its own and close it: the caller is giving up on the
// start, and normally the process is about to exit.
func startEtcd(ctx context.Context, ec *embed.Config, lastWarn *atomic.Pointer[string]) (*embed.Etcd, error) {
	type result struct {
		e   *embed.Etcd
		err error
	}
	started := make(chan result, 1)
	go func() {
		e, err := embed.StartEtcd(ec)
		started <- result{e, err}
	}()
	select {
	case r := <-started:
		return r.e, r.err
	case <-ctx.Done():
	}
	// Give a start that is about to finish a moment to, so that it is
	// stopped cleanly rather than with the process.
	grace := time.NewTimer(startGrace)
	defer grace.Stop()
	select {
	case r := <-started:
		if r.err == nil {
			r.e.Close()
		}
	case <-grace.C:
		go func() { // ends when StartEtcd does
			if r := <-started; r.err == nil {
				r.e.Close()
			}
		}()
	}
	return nil, fmt.Errorf("starting: %w%s", ctx.Err(), lastWarning(lastWarn))
}

// lastWarning is ", last etcd warning: <message>" for the last warning
// etcd logged, or "".
func lastWarning(p *atomic.Pointer[string]) string {
	if w := p.Load(); w != nil {
		return " (last etcd warning: " + *w + ")"
	}
	return ""
}

// watch waits until the server stops by itself or fails to serve, and
// then records why and closes done; or until Close.
func (e *Server) watch() {
	defer close(e.watchEnd)
	var err error
	select {
	case <-e.closingCtx.Done():
		return
	case err = <-e.etcd.Err():
		if err == nil {
			err = errors.New("server stopped")
		}
	case <-e.etcd.Server.StopNotify():
		err = errors.New("server stopped")
	}
	if e.closingCtx.Err() != nil {
		return // Close raced with the failure: not worth reporting
	}
	e.err = fmt.Errorf("etcd: embedded server: %w", err)
	close(e.done)
}

// Done is closed when the server has stopped by itself (a fatal error, or
// a listener that failed), not when Close stops it; Err then says why. The
// embedding program should stop: its store is gone.
func (e *Server) Done() <-chan struct{} { return e.done }

// Err returns why the server stopped by itself, once Done is closed, and
// nil before.
func (e *Server) Err() error {
	select {
	case <-e.done:
		return e.err
	default:
		return nil
	}
}

// endStreamsOn returns a gRPC stream interceptor that cancels the context
// of every stream when ctx is done.
func endStreamsOn(ctx context.Context) grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
		sctx, cancel := context.WithCancel(ss.Context())
		defer cancel()
		stop := context.AfterFunc(ctx, cancel)
		defer stop()
		return handler(srv, &ctxStream{ServerStream: ss, ctx: sctx})
	}
}

type ctxStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (s *ctxStream) Context() context.Context { return s.ctx }

// Endpoints returns the client URLs of the server, for Config.Endpoints.
func (e *Server) Endpoints() []string { return append([]string(nil), e.endpoints...) }

// Close stops the server and waits for it to stop. Clients still connected
// are cut off. A cluster member that leads first hands raft leadership to
// a peer (which takes up to etcd's request timeout, over 5 s, when no peer
// takes it). Close and CloseNow are idempotent and return nil; only the
// first call of either has an effect.
func (e *Server) Close() error {
	e.closeOnce.Do(func() { e.stop(false) })
	return nil
}

// CloseNow stops the server at once, without handing over raft
// leadership: to its peers it is a crash, but its data on disk is intact
// and a restart on the same Dir resumes it. Use it to stop a whole
// cluster quickly or to inject a member failure in tests.
func (e *Server) CloseNow() error {
	e.closeOnce.Do(func() { e.stop(true) })
	return nil
}

func (e *Server) stop(now bool) {
	e.quiet.Store(true)
	e.closing()
	<-e.watchEnd
	if now {
		e.etcd.Server.HardStop()
	}
	e.etcd.Close()
}

// freeLoopbackAddr returns a 127.0.0.1 address whose port was free a
// moment ago. Another process may take it before etcd binds it;
// Start retries then.
func freeLoopbackAddr() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", fmt.Errorf("picking a free port: %w", err)
	}
	addr := l.Addr().String()
	l.Close()
	return addr, nil
}

func isAddrInUse(err error) bool {
	return errors.Is(err, syscall.EADDRINUSE) || strings.Contains(err.Error(), "address already in use")
}
