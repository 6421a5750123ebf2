package discoverd

import (
	"context"
	"crypto/tls"
	"errors"
	"log/slog"
	"os"
	"sync"
	"time"

	"github.com/flynn/discoverd/api"
	"github.com/flynn/discoverd/api/retry"
	"github.com/flynn/discoverd/rpc"
)

// DefaultTimeout is a reasonable timeout for the Services method.
const DefaultTimeout = time.Second

// ConnStatus is the state of a client's connection to its agent.
type ConnStatus int

// The connection states reported to WatchReconnects channels.
const (
	// ConnStatusConnected: a connection was (re)established; every
	// registration has been restored on it.
	ConnStatusConnected ConnStatus = iota
	// ConnStatusDisconnected: the connection was lost; the client is
	// reconnecting. Calls fail with ErrDisconnected until it is back.
	ConnStatusDisconnected
	// ConnStatusConnectFailed: one reconnection attempt failed; the client
	// keeps trying with capped exponential backoff.
	ConnStatusConnectFailed
)

func (s ConnStatus) String() string {
	switch s {
	case ConnStatusConnected:
		return "connected"
	case ConnStatusDisconnected:
		return "disconnected"
	case ConnStatusConnectFailed:
		return "connect_failed"
	}
	return "unknown"
}

// ConnEvent reports a change of the client's connection state.
type ConnEvent struct {
	Status ConnStatus
}

// Config configures a Client made by NewClientWithConfig. The zero value
// of every field means its documented default.
type Config struct {
	// Addr is the agent's host:port (a "tcp://" prefix is tolerated;
	// "https://host:port" connects over TLS, see TLS).
	// Default: the DISCOVERD environment variable, else api.DefaultAgentAddr.
	Addr string
	// TLS, if set, connects over TLS with this configuration. Default:
	// for an https:// Addr, TLSConfigFromEnv (DISCOVERD_CA_CERT,
	// DISCOVERD_CLIENT_CERT, DISCOVERD_CLIENT_KEY); else plain TCP.
	TLS *tls.Config
	// Token is sent to the agent as "Authorization: Bearer <token>" in
	// the connection's CONNECT request, for an agent with an ACL file.
	// Default: the DISCOVERD_TOKEN environment variable.
	Token string
	// HeartbeatInterval is how often the registrations are heartbeated,
	// all at once; a heartbeat (or the registration that follows a
	// not_found) is given at most half an interval. It must be well under
	// the agent's TTL. Default: api.DefaultTTL / 2.
	HeartbeatInterval time.Duration
	// DialTimeout bounds one connection attempt. Default: 5s.
	DialTimeout time.Duration
	// CallTimeout bounds one call to the agent (Register, Unregister, the
	// first snapshot of a ServiceSet, and heartbeats together with
	// HeartbeatInterval). A call that times out fails with CodeUnavailable.
	// Default: 10s.
	CallTimeout time.Duration
	// MinBackoff and MaxBackoff bound the delay between reconnection
	// attempts, which doubles from MinBackoff up to MaxBackoff, with jitter.
	// Defaults: 100ms and 5s.
	MinBackoff, MaxBackoff time.Duration
	// WatchBuffer is how many updates a ServiceSet queues for one watcher
	// (Watch) before it gives up on it and closes its channel. Default: 1024.
	WatchBuffer int
	// Logger receives warnings (failed heartbeats, lost connections,
	// watchers cut off). Default: slog.Default().
	Logger *slog.Logger
}

func (c *Config) setDefaults() {
	if c.Addr == "" {
		c.Addr = os.Getenv("DISCOVERD")
	}
	if c.Addr == "" {
		c.Addr = api.DefaultAgentAddr
	}
	if c.HeartbeatInterval <= 0 {
		c.HeartbeatInterval = api.DefaultTTL / 2
	}
	if c.DialTimeout <= 0 {
		c.DialTimeout = 5 * time.Second
	}
	if c.CallTimeout <= 0 {
		c.CallTimeout = 10 * time.Second
	}
	if c.MinBackoff <= 0 {
		c.MinBackoff = 100 * time.Millisecond
	}
	if c.MaxBackoff < c.MinBackoff {
		c.MaxBackoff = max(5*time.Second, c.MinBackoff)
	}
	if c.WatchBuffer <= 0 {
		c.WatchBuffer = 1024
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
}

// A Client holds one connection to a discoverd agent, keeps its
// registrations alive with heartbeats, and feeds its ServiceSets.
//
// When the connection drops, the client reconnects by itself (capped
// exponential backoff with jitter), registers every registration again and
// resubscribes every ServiceSet, which then reports what changed while it
// was away. While it is disconnected, calls fail at once with
// ErrDisconnected; WatchReconnects reports the transitions.
//
// A Client is safe for concurrent use. Close releases everything it owns:
// its goroutines, its ServiceSets and its connection (the agent then drops
// its registrations at once).
type Client struct {
	cfg Config
	log *slog.Logger

	ctx    context.Context // cancelled by Close
	cancel context.CancelFunc
	wg     sync.WaitGroup // the supervisor, the heartbeat loop, set and stream goroutines

	mu           sync.Mutex
	conn         *rpc.Client   // nil while disconnected or closed
	connUp       chan struct{} // closed, then replaced, whenever a new conn is published
	legacy       bool          // the agent of conn lacks Agent.Heartbeat
	closed       bool
	regs         map[regKey]*registration
	sets         map[*serviceSet]struct{}
	connWatchers map[chan ConnEvent]struct{}
}

// NewClient connects to the agent named by the DISCOVERD environment
// variable (a "tcp://" prefix is tolerated), or api.DefaultAgentAddr when
// it is unset. It blocks until connected and fails if the first attempt
// does; later losses are repaired in the background.
func NewClient() (*Client, error) {
	return NewClientWithConfig(Config{})
}

// NewClientWithAddr is NewClient with an explicit agent address.
func NewClientWithAddr(addr string) (*Client, error) {
	if addr == "" {
		addr = api.DefaultAgentAddr
	}
	return NewClientWithConfig(Config{Addr: addr})
}

// NewClientUsingAddress is the older name of NewClientWithAddr.
//
// Deprecated: use NewClientWithAddr.
func NewClientUsingAddress(addr string) (*Client, error) { return NewClientWithAddr(addr) }

// NewClientWithConfig connects to cfg.Addr. It blocks until connected
// (at most cfg.DialTimeout) and fails if that first attempt does.
func NewClientWithConfig(cfg Config) (*Client, error) {
	cfg.setDefaults()
	if err := cfg.setSecurity(); err != nil {
		return nil, api.Errorf(api.CodeInvalidArgument, "discoverd client: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	c := &Client{
		cfg:          cfg,
		log:          cfg.Logger.With("agent", cfg.Addr),
		ctx:          ctx,
		cancel:       cancel,
		connUp:       make(chan struct{}),
		regs:         make(map[regKey]*registration),
		sets:         make(map[*serviceSet]struct{}),
		connWatchers: make(map[chan ConnEvent]struct{}),
	}
	conn, err := c.dial()
	if err != nil {
		cancel()
		return nil, wireError("connect to "+cfg.Addr, err)
	}
	c.publish(conn)
	c.wg.Add(2)
	go c.supervise(conn)
	go c.heartbeatLoop()
	return c, nil
}

// Addr returns the agent address the client connects to.
func (c *Client) Addr() string { return c.cfg.Addr }

// Close stops the client: it closes every ServiceSet (their watcher
// channels are closed), closes the connection, which makes the agent drop
// this client's registrations at once, and waits for the client's
// goroutines to stop. It is idempotent and always returns nil.
func (c *Client) Close() error {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil
	}
	c.closed = true
	conn := c.conn
	c.conn = nil
	sets := make([]*serviceSet, 0, len(c.sets))
	for s := range c.sets {
		sets = append(sets, s)
	}
	for ch := range c.connWatchers {
		close(ch)
		delete(c.connWatchers, ch)
	}
	close(c.connUp) // wakes waitConn, which then sees closed
	c.mu.Unlock()

	c.cancel()
	for _, s := range sets {
		s.Close()
	}
	if conn != nil {
		conn.Close()
	}
	c.wg.Wait()
	return nil
}

// WatchReconnects returns a channel that receives a ConnEvent at each
// change of the connection state. Sends never block the client: the
// channel holds the 16 latest events, dropping the oldest when it is full,
// so the last event received is always the current state.
// The channel is closed by UnwatchReconnects or Close.
func (c *Client) WatchReconnects() chan ConnEvent {
	ch := make(chan ConnEvent, 16)
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		close(ch)
		return ch
	}
	c.connWatchers[ch] = struct{}{}
	return ch
}

// UnwatchReconnects stops and closes a channel returned by WatchReconnects.
// Unknown channels are ignored.
func (c *Client) UnwatchReconnects(ch chan ConnEvent) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.connWatchers[ch]; ok {
		delete(c.connWatchers, ch)
		close(ch)
	}
}

func (c *Client) notify(status ConnStatus) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for ch := range c.connWatchers {
		sendLatest(ch, ConnEvent{Status: status})
	}
}

func (c *Client) dial() (*rpc.Client, error) {
	ctx, cancel := context.WithTimeout(c.ctx, c.cfg.DialTimeout)
	defer cancel()
	return c.cfg.rpcDialer().Dial(ctx, c.cfg.Addr, rpc.Gob)
}

// current returns the live connection, or nil while disconnected.
func (c *Client) current() *rpc.Client {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.conn
}

// publish makes conn the client's connection and wakes waitConn callers.
// It reports false (and leaves conn alone) if the client is closed.
func (c *Client) publish(conn *rpc.Client) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return false
	}
	c.conn = conn
	c.legacy = false
	close(c.connUp)
	c.connUp = make(chan struct{})
	return true
}

// waitConn blocks until the client has a connection other than dead, or
// until stop is closed or the client is closed (then it returns nil).
func (c *Client) waitConn(stop <-chan struct{}, dead *rpc.Client) *rpc.Client {
	for {
		c.mu.Lock()
		conn, up, closed := c.conn, c.connUp, c.closed
		c.mu.Unlock()
		if closed {
			return nil
		}
		if conn != nil && conn != dead {
			return conn
		}
		select {
		case <-up:
		case <-stop:
			return nil
		}
	}
}

// supervise owns the connection: it notices its loss, reconnects, and
// restores the registrations. It returns when the client is closed.
func (c *Client) supervise(conn *rpc.Client) {
	defer c.wg.Done()
	for {
		select {
		case <-conn.Done():
		case <-c.ctx.Done():
			return
		}
		c.mu.Lock()
		if c.conn == conn {
			c.conn = nil
		}
		c.mu.Unlock()
		conn.Close()
		c.log.Warn("discoverd: lost the connection to the agent; reconnecting")
		c.notify(ConnStatusDisconnected)
		if conn = c.reconnect(); conn == nil {
			return
		}
	}
}

// reconnect dials until it succeeds or the client is closed (nil).
func (c *Client) reconnect() *rpc.Client {
	b := retry.Backoff{Min: c.cfg.MinBackoff, Max: c.cfg.MaxBackoff}
	for {
		conn, err := c.dial()
		if err == nil {
			if !c.publish(conn) {
				conn.Close()
				return nil
			}
			c.restoreRegistrations(conn)
			c.log.Info("discoverd: reconnected to the agent")
			c.notify(ConnStatusConnected)
			return conn
		}
		if c.ctx.Err() != nil {
			return nil
		}
		c.log.Warn("discoverd: reconnect failed", "err", err)
		c.notify(ConnStatusConnectFailed)
		if !sleep(c.ctx.Done(), retry.Jitter(b.Next())) {
			return nil
		}
	}
}

// sleep waits for d or until stop is closed; it reports whether d elapsed.
func sleep(stop <-chan struct{}, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-stop:
		return false
	}
}

// call makes one unary call on conn, or on the current connection when
// conn is nil (failing fast with ErrDisconnected when there is none),
// bounded by CallTimeout. The error is translated by callCtx.
func (c *Client) call(conn *rpc.Client, op, method string, args, reply any) error {
	ctx, cancel := context.WithTimeout(c.ctx, c.cfg.CallTimeout)
	defer cancel()
	return c.callCtx(ctx, conn, op, method, args, reply)
}

// callCtx is call bounded by ctx, which must derive from c.ctx. Errors:
// ErrClosed once the client is closed, ErrDisconnected without a
// connection, timeoutError when ctx's deadline passes, else wireError's.
func (c *Client) callCtx(ctx context.Context, conn *rpc.Client, op, method string, args, reply any) error {
	if conn == nil {
		c.mu.Lock()
		cur, closed := c.conn, c.closed
		c.mu.Unlock()
		switch {
		case closed:
			return ErrClosed
		case cur == nil:
			return ErrDisconnected
		}
		conn = cur
	}
	err := conn.Call(ctx, method, args, reply)
	switch {
	case err == nil:
		return nil
	case c.ctx.Err() != nil:
		return ErrClosed
	case errors.Is(err, context.DeadlineExceeded):
		return timeoutError(op)
	}
	return wireError(op, err)
}
