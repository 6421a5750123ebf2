package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/flynn/discoverd/api"
	"github.com/flynn/discoverd/backend"
)

// Args is the argument of the agent's methods (go-discoverd applications
// refer to agent.Args).
type Args = api.Args

// ServiceUpdate is one instance of a service or one change to it
// (go-discoverd applications refer to agent.ServiceUpdate).
type ServiceUpdate = api.ServiceUpdate

// Defaults of Config.
const (
	DefaultSubscriberBuffer = 1024
	DefaultWatchLinger      = 5 * time.Second
)

// backendTimeout bounds the backend calls the agent makes on its own
// behalf (expiry, Session.Close, cleanup retries): one deadline per batch.
const backendTimeout = 5 * time.Second

// Config configures an Agent. Only Backend is required; the zero value of
// every other field selects its documented default.
type Config struct {
	// Backend is the store. Required. The Agent does not close it.
	Backend backend.Backend
	// TTL is how long a registration lives without a heartbeat. Default
	// api.DefaultTTL.
	TTL time.Duration
	// ExternalIP replaces the missing host of an address written as
	// ":port". Empty means such addresses are refused with
	// CodeInvalidArgument.
	ExternalIP string
	// SubscriberBuffer is how many live updates may be queued for one
	// subscriber before it is cut off as too slow. The snapshot delivered
	// when it subscribes does not count. Default DefaultSubscriberBuffer.
	SubscriberBuffer int
	// MaxRegistrationsPerSession is the cap used by NewSession(0). Default
	// api.DefaultMaxRegistrationsPerConn.
	MaxRegistrationsPerSession int
	// WatchLinger is how long the backend watch of a service name is kept
	// after its last local subscriber leaves, so that repeated one-shot
	// lookups (Instances, LeaderOf) do not resubscribe each time. Default
	// DefaultWatchLinger; negative stops the watch at once.
	WatchLinger time.Duration
	// Logger receives the agent's logs. Default slog.Default().
	Logger *slog.Logger
}

// Agent is the transport-free core of discoverd: it holds the registrations
// made through its sessions, keeps them alive in memory (heartbeats never
// reach the store), expires those whose heartbeats stop, and fans the
// store's changes out to local subscribers through one backend watch per
// service name.
//
// All methods are safe for concurrent use.
type Agent struct {
	cfg     Config
	backend backend.Backend
	log     *slog.Logger

	ctx    context.Context // cancelled by Close: stops every goroutine
	cancel context.CancelFunc
	wg     sync.WaitGroup // the janitor and every watch goroutine

	mu       sync.Mutex
	closed   bool
	regs     map[regKey]*registration
	orphans  map[regKey]struct{} // keys that may still be in the store without being held here
	keyLocks map[regKey]*keyLock
	watches  map[string]*watch
	sessions int

	stats counters
}

// New validates cfg, applies its defaults and starts the agent's expiry
// loop. The caller must call Close.
func New(cfg Config) (*Agent, error) {
	if cfg.Backend == nil {
		return nil, errors.New("agent: Config.Backend is required")
	}
	if cfg.TTL < 0 || cfg.SubscriberBuffer < 0 || cfg.MaxRegistrationsPerSession < 0 {
		return nil, errors.New("agent: Config.TTL, SubscriberBuffer and MaxRegistrationsPerSession must not be negative")
	}
	if cfg.TTL == 0 {
		cfg.TTL = api.DefaultTTL
	}
	if cfg.SubscriberBuffer == 0 {
		cfg.SubscriberBuffer = DefaultSubscriberBuffer
	}
	if cfg.MaxRegistrationsPerSession == 0 {
		cfg.MaxRegistrationsPerSession = api.DefaultMaxRegistrationsPerConn
	}
	if cfg.WatchLinger == 0 {
		cfg.WatchLinger = DefaultWatchLinger
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	ctx, cancel := context.WithCancel(context.Background())
	a := &Agent{
		cfg:      cfg,
		backend:  cfg.Backend,
		log:      cfg.Logger,
		ctx:      ctx,
		cancel:   cancel,
		regs:     make(map[regKey]*registration),
		orphans:  make(map[regKey]struct{}),
		keyLocks: make(map[regKey]*keyLock),
		watches:  make(map[string]*watch),
	}
	a.wg.Add(1)
	go a.janitor()
	return a, nil
}

// Close stops the expiry loop and every watch, ends every subscription
// with an *api.Error of CodeUnavailable, forgets every session, and waits
// for the agent's goroutines to stop. It does not unregister anything nor
// close the Backend: closing the Backend afterwards removes the agent's
// registrations from the store at once. Sessions and subscriptions remain
// safe to use and to close; their calls fail with CodeUnavailable. Close is
// idempotent and always returns nil.
func (a *Agent) Close() error {
	a.mu.Lock()
	if a.closed {
		a.mu.Unlock()
		a.wg.Wait()
		return nil
	}
	a.closed = true
	a.regs = make(map[regKey]*registration)
	a.orphans = make(map[regKey]struct{})
	a.sessions = 0
	a.mu.Unlock()
	a.cancel()
	a.wg.Wait()
	return nil
}

// Ping reports whether the store is reachable: nil, or an *api.Error with
// CodeUnavailable (the cause is logged). It blocks at most until ctx is
// done.
func (a *Agent) Ping(ctx context.Context) error {
	if err := a.backend.Ping(ctx); err != nil {
		return a.backendError(ctx, "ping", err)
	}
	return nil
}

// Stats is a snapshot of the agent's gauges and counters, for metrics.
type Stats struct {
	Registrations int // registrations held by this agent's sessions now
	Sessions      int // open sessions
	Subscribers   int // open subscriptions (Subscribe and Leader)
	Watches       int // backend watches (one per watched service name)

	Events             uint64 // backend events applied to the watch caches
	Fanout             uint64 // updates queued to subscribers
	SlowSubscribersCut uint64 // subscriptions cut off for falling behind
	Expired            uint64 // registrations expired for lack of heartbeats
	BackendErrors      uint64 // failed backend calls and broken backend streams

	// Store is the backend's liveness session, when the backend reports it
	// (backend.SessionReporter); nil otherwise.
	Store *backend.SessionState
}

type counters struct {
	subscribers   atomic.Int64
	events        atomic.Uint64
	fanout        atomic.Uint64
	slowCut       atomic.Uint64
	expired       atomic.Uint64
	backendErrors atomic.Uint64
}

// Stats returns the current gauges and counters. It is cheap and safe for
// concurrent use.
func (a *Agent) Stats() Stats {
	a.mu.Lock()
	s := Stats{Registrations: len(a.regs), Sessions: a.sessions, Watches: len(a.watches)}
	a.mu.Unlock()
	s.Subscribers = int(a.stats.subscribers.Load())
	s.Events = a.stats.events.Load()
	s.Fanout = a.stats.fanout.Load()
	s.SlowSubscribersCut = a.stats.slowCut.Load()
	s.Expired = a.stats.expired.Load()
	s.BackendErrors = a.stats.backendErrors.Load()
	if r, ok := a.backend.(backend.SessionReporter); ok {
		st := r.SessionState()
		s.Store = &st
	}
	return s
}

var errShutdown = api.Errorf(api.CodeUnavailable, "agent shutting down")

// backendError logs a failed backend call and turns it into the error the
// caller sees: ctx's error when the caller gave up, CodeUnavailable
// otherwise. The cause stays in the log.
func (a *Agent) backendError(ctx context.Context, op string, err error, attrs ...any) error {
	if ctx.Err() != nil {
		return ctx.Err()
	}
	if errors.Is(err, backend.ErrClosed) {
		return errShutdown
	}
	a.stats.backendErrors.Add(1)
	a.log.Warn("agent: backend "+op+" failed", append(attrs, "err", err)...)
	return api.Errorf(api.CodeUnavailable, "store unavailable: %s failed (details in the agent's log)", op)
}

// janitor is the agent's one periodic loop: it expires registrations whose
// heartbeats stopped, retries the removal of orphaned keys, and stops idle
// watches. It runs until Close.
func (a *Agent) janitor() {
	defer a.wg.Done()
	tick := max(a.cfg.TTL/4, 10*time.Millisecond)
	t := time.NewTicker(tick)
	defer t.Stop()
	for {
		select {
		case <-a.ctx.Done():
			return
		case now := <-t.C:
			a.sweep(now)
		}
	}
}

func (a *Agent) sweep(now time.Time) {
	a.mu.Lock()
	if a.closed {
		a.mu.Unlock()
		return
	}
	var stale, orphans []regKey
	for k, r := range a.regs {
		if now.Sub(r.beat) > a.cfg.TTL {
			stale = append(stale, k)
		}
	}
	for k := range a.orphans {
		orphans = append(orphans, k)
	}
	for name, w := range a.watches {
		if w.refs == 0 && now.Sub(w.idleSince) >= a.cfg.WatchLinger {
			delete(a.watches, name)
			w.cancel()
		}
	}
	a.mu.Unlock()

	if len(stale) == 0 && len(orphans) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(a.ctx, backendTimeout)
	defer cancel()
	for _, k := range stale {
		a.expire(ctx, k)
	}
	for _, k := range orphans {
		a.retryOrphan(ctx, k)
	}
}

// expire removes k if its last heartbeat is still older than the TTL.
func (a *Agent) expire(ctx context.Context, k regKey) {
	unlock, err := a.lockKey(ctx, k)
	if err != nil {
		return // shutting down or out of time; the next sweep retries
	}
	defer unlock()
	a.mu.Lock()
	r := a.regs[k]
	if a.closed || r == nil || time.Since(r.beat) <= a.cfg.TTL {
		a.mu.Unlock()
		return
	}
	a.forgetLocked(k, r)
	a.mu.Unlock()
	a.stats.expired.Add(1)
	a.log.Info("agent: registration expired: no heartbeat within the TTL", "name", k.name, "addr", k.addr, "ttl", a.cfg.TTL)
	a.removeFromStore(ctx, k)
}

// retryOrphan removes from the store a key that a failed call may have
// left there, unless it has been registered again since.
func (a *Agent) retryOrphan(ctx context.Context, k regKey) {
	unlock, err := a.lockKey(ctx, k)
	if err != nil {
		return
	}
	defer unlock()
	a.mu.Lock()
	_, orphan := a.orphans[k]
	_, held := a.regs[k]
	if held {
		delete(a.orphans, k)
	}
	a.mu.Unlock()
	if orphan && !held {
		a.removeFromStore(ctx, k)
	}
}

// removeFromStore unregisters k from the store; on failure k becomes an
// orphan that the janitor retries. The caller holds k's key lock.
func (a *Agent) removeFromStore(ctx context.Context, k regKey) error {
	err := a.backend.Unregister(ctx, k.name, k.addr)
	a.mu.Lock()
	defer a.mu.Unlock()
	if err != nil {
		if a.closed || errors.Is(err, backend.ErrClosed) {
			return errShutdown
		}
		a.orphans[k] = struct{}{}
		a.stats.backendErrors.Add(1)
		a.log.Warn("agent: backend unregister failed; will retry", "name", k.name, "addr", k.addr, "err", err)
		if ctx.Err() != nil {
			return ctx.Err()
		}
		return api.Errorf(api.CodeUnavailable, "store unavailable: unregister failed (details in the agent's log); the agent retries it")
	}
	delete(a.orphans, k)
	return nil
}

// keyLock serialises the store operations on one registration key, so that
// a Register, an Unregister and an expiry of the same name/addr reach the
// store in the order they were decided. It is a channel so that waiting
// for it honours a context.
type keyLock struct {
	ch   chan struct{}
	refs int // guarded by Agent.mu
}

// lockKey acquires k's key lock, waiting at most until ctx is done.
func (a *Agent) lockKey(ctx context.Context, k regKey) (unlock func(), err error) {
	a.mu.Lock()
	l := a.keyLocks[k]
	if l == nil {
		l = &keyLock{ch: make(chan struct{}, 1)}
		a.keyLocks[k] = l
	}
	l.refs++
	a.mu.Unlock()
	release := func() {
		a.mu.Lock()
		if l.refs--; l.refs == 0 {
			delete(a.keyLocks, k)
		}
		a.mu.Unlock()
	}
	select {
	case l.ch <- struct{}{}:
		return func() { <-l.ch; release() }, nil
	case <-ctx.Done():
		release()
		return nil, ctx.Err()
	case <-a.ctx.Done():
		release()
		return nil, errShutdown
	}
}

func (k regKey) String() string { return fmt.Sprintf("%s/%s", k.name, k.addr) }
