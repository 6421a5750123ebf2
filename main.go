// Command discoverd is the service-discovery agent, and its command-line
// client.
//
//	discoverd                                  # agent, embedded etcd, on 127.0.0.1:1111
//	discoverd -etcd http://h1:2379,http://h2:2379
//	discoverd -zookeeper h1:2181,h2:2181
//	discoverd register|services|watch|leader ...   # CLI subcommands (see cli.go)
//	discoverd help | version
//
// Every agent flag can also be set by the environment variable
// DISCOVERD_<FLAG> (help.go). Flags and operation are described in
// docs/OPERATIONS.md.
package main

import (
	"cmp"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/flynn/discoverd/agent"
	"github.com/flynn/discoverd/api"
	"github.com/flynn/discoverd/api/retry"
	"github.com/flynn/discoverd/backend"
	"github.com/flynn/discoverd/backend/etcd"
	"github.com/flynn/discoverd/backend/etcd/embedded"
	"github.com/flynn/discoverd/backend/zookeeper"
	"github.com/flynn/discoverd/internal/buildinfo"
	"github.com/flynn/discoverd/server"
)

func main() {
	// The first SIGINT/SIGTERM starts a graceful stop; later ones are
	// ignored (foreman sends SIGINT then SIGTERM), as the stop is bounded
	// in time. SIGKILL still ends the process at once.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Getenv, os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

// run is main without the process: it dispatches CLI subcommands, or runs
// the agent until ctx is done, and returns the exit code: 0 after a clean
// stop, 1 when the agent cannot start or fails, 2 for bad flags.
func run(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) int {
	switch {
	case len(args) == 1 && isHelp(args[0]):
		printHelp(stdout, getenv)
		return 0
	case len(args) == 1 && isVersion(args[0]):
		fmt.Fprintln(stdout, buildinfo.Read())
		return 0
	case len(args) > 0 && isCommand(args[0]):
		return runCommand(ctx, args, getenv, stdout, stderr)
	}
	m := NewMain()
	if err := m.ParseFlags(args, getenv, stdout); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		fmt.Fprintf(stderr, "discoverd: %v\n", err)
		return 2
	}
	logger, err := newLogger(stderr, m.LogFormat, m.LogLevel)
	if err != nil {
		fmt.Fprintf(stderr, "discoverd: %v\n", err)
		return 2
	}
	m.Logger = logger
	m.OnStoreFatal = fatalExit(m.Logger, stderr, os.Exit)
	if err := m.Run(ctx); err != nil {
		fmt.Fprintf(stderr, "discoverd: %v\n", oneLine(err))
		return 1
	}
	return 0
}

// oneLine joins the lines of a (possibly joined) error.
func oneLine(err error) string { return strings.ReplaceAll(err.Error(), "\n", "; ") }

// Defaults of the agent's flags.
const (
	DefaultEtcdClientAddr = "127.0.0.1:2379"
	DefaultEtcdPeerAddr   = "127.0.0.1:2380"
	// DefaultStoreTimeout bounds how long the agent retries a store it
	// cannot reach when it starts, before it gives up and exits 1.
	DefaultStoreTimeout = 30 * time.Second
	// shutdownTimeout bounds the wait for in-flight HTTP requests on stop.
	shutdownTimeout = 5 * time.Second
)

// Main is the discoverd agent process: its configuration (set by
// ParseFlags, or directly by tests) and the pieces it wires together. Start
// builds them in order; Close stops them in reverse order.
type Main struct {
	// Bind is the host:port of the RPC and HTTP listener ("-bind").
	Bind string
	// Etcd lists the client URLs of an external etcd cluster ("-etcd").
	// Empty, with ZooKeeper empty too, means: run an embedded etcd.
	Etcd []string
	// ZooKeeper lists host:port of ZooKeeper servers ("-zookeeper").
	ZooKeeper []string
	// DataDir is the embedded etcd's data directory ("-data-dir").
	DataDir string
	// EtcdClientAddr and EtcdPeerAddr are where the embedded etcd listens
	// ("-etcd-client-addr", "-etcd-peer-addr"); "" picks a free loopback
	// port.
	EtcdClientAddr, EtcdPeerAddr string
	// TTL is how long a registration lives without a heartbeat, and how
	// long the store keeps a dead agent's registrations ("-ttl").
	TTL time.Duration
	// ExternalIP expands addresses written as ":port" ("-external-ip",
	// env EXTERNAL_IP).
	ExternalIP string
	// LogLevel is the minimum level logged ("-log-level").
	LogLevel slog.Level
	// LogFormat is LogText or LogJSON ("-log-format"); run builds Logger
	// from it.
	LogFormat string
	// StoreTimeout bounds the retries of an unreachable store at start
	// ("-store-timeout").
	StoreTimeout time.Duration
	// Logger receives every log line. Default slog.Default().
	Logger *slog.Logger
	// The DNS front end's settings (DNS, DNSDomain, DNSTTL): see dns.go.
	dnsMain
	// TLS, ACL and store credentials: see security.go.
	securityMain
	// The health checks' settings (MaxCheckProbes, MaxChecks): see checks_main.go.
	checksMain

	// MaxConns caps the client connections served at once ("-max-conns");
	// 0 derives it from the descriptor limit (see connBudget).
	MaxConns int
	// RPCIdleTimeout closes RPC connections without calls, streams or
	// registrations after that long ("-rpc-idle-timeout"); 0 never.
	RPCIdleTimeout time.Duration
	// BodyTimeout bounds the arrival of an HTTP request body
	// ("-http-body-timeout").
	BodyTimeout time.Duration
	// MaxHTTPRegistrationsPerAddr caps the HTTP registrations of one
	// client address ("-http-registrations-per-addr").
	MaxHTTPRegistrationsPerAddr int
	// OnStoreFatal is called when the embedded etcd meets a fatal error;
	// it must not return (see embedded.Config.OnFatal). run sets it to
	// print "discoverd: <reason>" and exit 1.
	OnStoreFatal func(error)

	ln        net.Listener
	conns     *server.ConnLimiter
	front     swapHandler // the start-up handler, then server
	starting  *server.Starting
	embedded  *embedded.Server
	backend   backend.Backend
	agent     *agent.Agent
	server    *server.Server
	http      *http.Server
	serveDone chan error // Serve's result; buffered

	closeOnce sync.Once
	closeErr  error
}

// NewMain returns a Main with every field at its default.
func NewMain() *Main {
	return &Main{
		Bind:           api.DefaultAgentAddr,
		DataDir:        defaultDataDir(os.Getenv),
		EtcdClientAddr: DefaultEtcdClientAddr,
		EtcdPeerAddr:   DefaultEtcdPeerAddr,
		TTL:            api.DefaultTTL,
		LogLevel:       slog.LevelInfo,
		LogFormat:      LogText,
		StoreTimeout:   DefaultStoreTimeout,

		RPCIdleTimeout:              server.DefaultRPCIdleTimeout,
		BodyTimeout:                 server.DefaultBodyTimeout,
		MaxHTTPRegistrationsPerAddr: server.DefaultMaxHTTPRegistrationsPerAddr,
		dnsMain:                     defaultDNS(),
		checksMain:                  defaultChecks(),
	}
}

// defaultDataDir is $XDG_STATE_HOME/discoverd/etcd, else
// $HOME/.local/state/discoverd/etcd, else ./discoverd.etcd.
func defaultDataDir(getenv func(string) string) string {
	if d := getenv("XDG_STATE_HOME"); filepath.IsAbs(d) {
		return filepath.Join(d, "discoverd", "etcd")
	}
	if h := getenv("HOME"); filepath.IsAbs(h) {
		return filepath.Join(h, ".local", "state", "discoverd", "etcd")
	}
	return "discoverd.etcd"
}

// ParseFlags sets m from the command-line arguments and the environment
// (read through getenv): each flag's DISCOVERD_<FLAG> variable, then the
// flag itself, which wins. Of -etcd and -zookeeper, one on the command
// line overrides the other's variable. Help goes to usage. It returns
// flag.ErrHelp for -h, and an error that names the flag or variable for
// anything it cannot accept.
func (m *Main) ParseFlags(args []string, getenv func(string) string, usage io.Writer) error {
	fs := m.flagSet(getenv)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			printHelp(usage, getenv)
		}
		return err
	}
	onCmdline := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { onCmdline[f.Name] = true })
	// One store chosen on the command line overrides the environment's.
	onCmdline["zookeeper"] = onCmdline["zookeeper"] || onCmdline["etcd"]
	onCmdline["etcd"] = onCmdline["zookeeper"]
	if err := setFromEnv(fs, getenv, onCmdline); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unknown command %q (the agent takes flags only; see discoverd help)", fs.Arg(0))
	}
	return m.validate()
}

// flagSet defines the agent's flags on m, with m's values as defaults
// (the data dir and external IP from getenv's XDG_STATE_HOME, HOME and
// EXTERNAL_IP).
func (m *Main) flagSet(getenv func(string) string) *flag.FlagSet {
	fs := flag.NewFlagSet("discoverd", flag.ContinueOnError)
	fs.SetOutput(io.Discard) // errors are returned, printed once by the caller
	m.DataDir = defaultDataDir(getenv)
	m.ExternalIP = getenv("EXTERNAL_IP")
	fs.StringVar(&m.Bind, "bind", m.Bind, "`host:port` to serve RPC and HTTP on")
	fs.Func("etcd", "comma-separated client `URLs` of an etcd cluster (default: run an embedded etcd)", func(s string) error {
		m.Etcd = splitList(s)
		return nil
	})
	fs.Func("zookeeper", "comma-separated `host:port` list of ZooKeeper servers", func(s string) error {
		m.ZooKeeper = splitList(s)
		return nil
	})
	fs.StringVar(&m.DataDir, "data-dir", m.DataDir, "embedded etcd data `dir`; also holds checks.journal (checked registrations) in every store mode")
	fs.StringVar(&m.EtcdClientAddr, "etcd-client-addr", m.EtcdClientAddr, "embedded etcd client `host:port` (empty: a free port)")
	fs.StringVar(&m.EtcdPeerAddr, "etcd-peer-addr", m.EtcdPeerAddr, "embedded etcd peer `host:port` (empty: a free port)")
	fs.DurationVar(&m.TTL, "ttl", m.TTL, "registration lifetime without a heartbeat; also how long a dead agent's registrations remain")
	fs.StringVar(&m.ExternalIP, "external-ip", m.ExternalIP, "`IP` that expands \":port\" addresses (default $EXTERNAL_IP)")
	fs.TextVar(&m.LogLevel, "log-level", m.LogLevel, "minimum log `level`: debug, info, warn or error")
	fs.Var((*logFormat)(&m.LogFormat), "log-format", "log `format`: text or json")
	fs.DurationVar(&m.StoreTimeout, "store-timeout", m.StoreTimeout, "how long to retry an unreachable store at start")
	// Limits that keep one client from exhausting the agent (docs/OPERATIONS.md).
	fs.IntVar(&m.MaxConns, "max-conns", m.MaxConns, "cap on client connections (HTTP and RPC) served at once; 0 derives it from the descriptor limit")
	fs.DurationVar(&m.RPCIdleTimeout, "rpc-idle-timeout", m.RPCIdleTimeout, "close RPC connections without calls, streams or registrations after this long; 0 never")
	fs.DurationVar(&m.BodyTimeout, "http-body-timeout", m.BodyTimeout, "how long an HTTP request body may take to arrive")
	fs.IntVar(&m.MaxHTTPRegistrationsPerAddr, "http-registrations-per-addr", m.MaxHTTPRegistrationsPerAddr, "cap on the HTTP registrations of one client address")
	m.dnsFlags(fs)
	m.securityFlags(fs, getenv)
	m.checkFlags(fs)
	return fs
}

// validate checks the combination of settings.
func (m *Main) validate() error {
	switch {
	case len(m.Etcd) > 0 && len(m.ZooKeeper) > 0:
		return errors.New("-etcd and -zookeeper are mutually exclusive")
	case m.TTL < time.Second:
		return fmt.Errorf("-ttl %v: must be at least 1s", m.TTL)
	case m.StoreTimeout <= 0:
		return fmt.Errorf("-store-timeout %v: must be positive", m.StoreTimeout)
	case len(m.Etcd) == 0 && len(m.ZooKeeper) == 0 && m.DataDir == "":
		return errors.New("-data-dir is empty")
	case m.MaxConns < 0:
		return fmt.Errorf("-max-conns %d: must not be negative", m.MaxConns)
	case m.RPCIdleTimeout < 0:
		return fmt.Errorf("-rpc-idle-timeout %v: must not be negative", m.RPCIdleTimeout)
	case m.BodyTimeout <= 0:
		return fmt.Errorf("-http-body-timeout %v: must be positive", m.BodyTimeout)
	case m.MaxHTTPRegistrationsPerAddr <= 0:
		return fmt.Errorf("-http-registrations-per-addr %d: must be positive", m.MaxHTTPRegistrationsPerAddr)
	}
	if m.ExternalIP != "" {
		if err := api.ValidateAddr(net.JoinHostPort(m.ExternalIP, "1")); err != nil {
			return fmt.Errorf("external IP %q is not an IP address or host name", m.ExternalIP)
		}
	}
	if err := m.validateSecurity(len(m.Etcd) > 0, len(m.ZooKeeper) > 0); err != nil {
		return err
	}
	if err := m.validateChecks(); err != nil {
		return err
	}
	return m.validateDNS()
}

func splitList(s string) []string {
	var out []string
	for part := range strings.SplitSeq(s, ",") {
		if part = strings.TrimSpace(part); part != "" {
			out = append(out, part)
		}
	}
	return out
}

// Start raises the descriptor limit, binds the listener (so "address in
// use" is an error here) and serves it at once with the start-up handler
// (/health answers 503 "starting", RPC calls fail with unavailable), starts
// the embedded etcd if no store is configured, opens the backend
// (retrying an unreachable store for up to StoreTimeout), and starts the
// agent and its front ends, which then take over the listener. It blocks
// until the agent serves, or fails and leaves nothing running; cancelling
// ctx (a signal) ends it at any step. Call Close after a successful Start.
func (m *Main) Start(ctx context.Context) (err error) {
	if err := m.validate(); err != nil {
		return err
	}
	if m.Logger == nil {
		m.Logger = slog.Default()
	}
	defer func() {
		if err != nil {
			m.Close()
		}
	}()
	if err := m.loadSecurity(); err != nil {
		return err
	}
	m.ln, err = net.Listen("tcp", m.Bind)
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	m.conns = &server.ConnLimiter{Max: m.connLimit(), Logger: m.Logger.With("component", "server")}
	m.starting = server.NewStarting(m.Logger.With("component", "server"))
	m.front.set(m.starting)
	m.http = &http.Server{
		Handler:           &m.front,
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       2 * time.Minute,
		ErrorLog:          slog.NewLogLogger(m.Logger.Handler(), slog.LevelWarn),
	}
	m.serveDone = make(chan error, 1)
	go func() { m.serveDone <- m.http.Serve(m.conns.Listen(m.wrapListener(m.ln))) }() // stopped by Close
	if m.backend, err = m.openBackend(ctx); err != nil {
		return err
	}
	m.agent, err = agent.New(agent.Config{
		Backend:    m.backend,
		TTL:        m.TTL,
		ExternalIP: m.ExternalIP,
		Logger:     m.Logger.With("component", "agent"),
	})
	if err != nil {
		return err
	}
	if err := m.startChecks(); err != nil {
		return err
	}
	opts := server.Options{
		Checks:                      m.checks,
		Logger:                      m.Logger.With("component", "server"),
		TTL:                         m.TTL,
		Conns:                       m.conns,
		BodyTimeout:                 m.BodyTimeout,
		RPCIdleTimeout:              cmp.Or(m.RPCIdleTimeout, -1), // 0: never
		MaxHTTPRegistrationsPerAddr: m.MaxHTTPRegistrationsPerAddr,
		Store:                       m.storeName(),
		ACL:                         m.aclPointer(),
	}
	if l, ok := m.backend.(backend.Lister); ok {
		opts.Services = l
	}
	m.server, err = server.New(m.agent, opts)
	if err != nil {
		return err
	}
	if err := m.startDNS(); err != nil {
		return err
	}
	m.front.set(m.server)
	m.starting.Close(ctx) // its RPC clients reconnect, to the agent proper
	build := buildinfo.Read()
	m.Logger.Info("discoverd serving", "addr", m.ln.Addr().String(), "store", m.storeName(), "ttl", m.TTL.String(),
		"max_conns", m.conns.Max, "version", build.Version, "revision", build.ShortRevision(),
		"tls", m.tls != nil, "acl_file", m.ACLFile)
	m.warnOpen(m.Logger, m.ln.Addr())
	m.startReloader(m.Logger.With("component", "security"))
	return nil
}

// Addr is the address the agent listens on; valid after Start.
func (m *Main) Addr() net.Addr { return m.ln.Addr() }

// Run starts the agent, serves until ctx is done (SIGINT/SIGTERM) or the
// listener fails, then closes everything. It returns the start or serve
// error; a stop that was not clean (say, the lease could not be revoked
// because the store was gone, so registrations linger for the TTL) is
// logged as a warning, not returned: the agent did stop.
func (m *Main) Run(ctx context.Context) error {
	if err := m.Start(ctx); err != nil {
		if ctx.Err() != nil {
			m.Logger.Info("discoverd stopped during start-up", "reason", context.Cause(ctx), "step", err)
			return nil
		}
		return err
	}
	var serveErr error
	var storeDone <-chan struct{}
	if m.embedded != nil {
		storeDone = m.embedded.Done()
	}
	select {
	case <-ctx.Done():
		m.Logger.Info("discoverd stopping", "reason", context.Cause(ctx))
	case serveErr = <-m.serveDone:
		m.serveDone <- serveErr // for Close
		serveErr = fmt.Errorf("serve: %w", serveErr)
		m.Logger.Error("discoverd stopping", "reason", serveErr)
	case <-storeDone:
		serveErr = m.embedded.Err()
		m.Logger.Error("discoverd stopping", "reason", serveErr)
	}
	if err := m.Close(); err != nil {
		m.Logger.Warn("discoverd stopped with errors", "err", err)
	} else {
		m.Logger.Info("discoverd stopped")
	}
	return serveErr
}

// Close stops the agent in reverse order of Start: the DNS server (and its
// view of the agent), the agent (its subscriptions end with
// "unavailable"), the front ends (RPC connections and SSE streams close),
// the HTTP server (RPC methods and in-flight requests get up to
// shutdownTimeout in all), the backend (which revokes the agent's lease or
// session, so its registrations vanish from the store at once), and the
// embedded etcd. It is idempotent.
func (m *Main) Close() error {
	m.closeOnce.Do(func() {
		m.closeReloader()
		errs := []error{m.closeDNS(), m.closeChecks()}
		if m.agent != nil {
			errs = append(errs, m.agent.Close())
		}
		ctx, cancel := context.WithTimeout(context.Background(), shutdownTimeout)
		defer cancel()
		if m.server != nil {
			errs = append(errs, m.server.Shutdown(ctx))
		}
		if m.starting != nil {
			errs = append(errs, m.starting.Close(ctx))
		}
		if m.http != nil {
			if err := m.http.Shutdown(ctx); err != nil {
				errs = append(errs, fmt.Errorf("http shutdown: %w", err), m.http.Close())
			}
			if err := <-m.serveDone; !errors.Is(err, http.ErrServerClosed) {
				errs = append(errs, err)
			}
		} else if m.ln != nil {
			errs = append(errs, m.ln.Close())
		}
		if m.backend != nil {
			errs = append(errs, m.backend.Close())
		}
		if m.embedded != nil {
			errs = append(errs, m.embedded.Close())
		}
		m.closeErr = errors.Join(errs...)
	})
	return m.closeErr
}

func (m *Main) storeName() string {
	switch {
	case len(m.ZooKeeper) > 0:
		return "zookeeper " + strings.Join(m.ZooKeeper, ",")
	case len(m.Etcd) > 0:
		return "etcd " + strings.Join(m.Etcd, ",")
	}
	return "embedded etcd in " + m.DataDir
}

// openBackend starts the embedded etcd when no store is configured, then
// opens the backend, retrying with backoff until StoreTimeout.
func (m *Main) openBackend(ctx context.Context) (backend.Backend, error) {
	if len(m.ZooKeeper) > 0 {
		log := m.Logger.With("component", "zookeeper")
		return m.retry(ctx, "zookeeper", func(ctx context.Context) (backend.Backend, error) {
			b, err := zookeeper.Open(ctx, zookeeper.Config{Servers: m.ZooKeeper, TTL: m.TTL, Logger: log, Auth: m.ZooKeeperAuth})
			if err != nil {
				return nil, err
			}
			return b, nil
		})
	}
	endpoints := m.Etcd
	if len(endpoints) == 0 {
		if err := os.MkdirAll(filepath.Dir(m.DataDir), 0o700); err != nil {
			return nil, fmt.Errorf("embedded etcd: %w", err)
		}
		sctx, cancel := context.WithTimeout(ctx, m.StoreTimeout)
		e, err := embedded.Start(sctx, embedded.Config{
			Dir:        m.DataDir,
			ClientAddr: m.EtcdClientAddr,
			PeerAddr:   m.EtcdPeerAddr,
			Name:       "discoverd",
			Logger:     m.Logger.With("component", "etcd-server"),
			OnFatal:    m.OnStoreFatal,
		})
		cancel()
		if err != nil {
			return nil, err
		}
		m.embedded = e
		endpoints = e.Endpoints()
	}
	log := m.Logger.With("component", "etcd")
	tlsConf, err := m.etcdTLS()
	if err != nil {
		return nil, err
	}
	cfg := etcd.Config{Endpoints: endpoints, TTL: m.TTL, Logger: log, Prefix: m.EtcdPrefix,
		TLS: tlsConf, Username: m.EtcdUser, Password: m.EtcdPassword}
	if m.embedded != nil {
		// The embedded etcd is this agent's alone: registrations left on
		// a previous run's lease (its clients died with it) go once their
		// clients had one heartbeat interval to claim them back.
		cfg.ReclaimAfter = m.TTL / 2
	}
	return m.retry(ctx, "etcd", func(ctx context.Context) (backend.Backend, error) {
		b, err := etcd.Open(ctx, cfg)
		if err != nil {
			return nil, err
		}
		return b, nil
	})
}

// retry calls open until it succeeds, ctx is done, or StoreTimeout has
// passed; each attempt is bounded by attemptTimeout. Between attempts it
// backs off from 100 ms to 2 s (retry.Backoff, without jitter).
func (m *Main) retry(ctx context.Context, store string, open func(context.Context) (backend.Backend, error)) (backend.Backend, error) {
	const attemptTimeout = 5 * time.Second
	ctx, cancel := context.WithTimeout(ctx, m.StoreTimeout)
	defer cancel()
	bo := retry.Backoff{Min: 100 * time.Millisecond, Max: 2 * time.Second}
	for attempt := 1; ; attempt++ {
		actx, acancel := context.WithTimeout(ctx, attemptTimeout)
		b, err := open(actx)
		acancel()
		if err == nil {
			return b, nil
		}
		m.Logger.Warn("store unreachable; retrying", "store", store, "attempt", attempt, "err", err)
		t := time.NewTimer(bo.Next())
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, fmt.Errorf("%s unreachable after %d attempts in %v: %w", store, attempt, m.StoreTimeout, err)
		case <-t.C:
		}
	}
}
