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
	"github.com/flynn/discoverd/api/retry"
	"github.com/flynn/discoverd/backend"
	"github.com/flynn/discoverd/internal/keylock"
	"github.com/jonboulle/clockwork"
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

// backendTimeout bounds each backend call the agent makes on its own
// behalf (expiry, Session.Close, orphan retries, a removal whose caller
// gave up), each wait for a key lock on its own behalf, and how long a
// lookup of a name not watched yet waits for the store's first snapshot.
const backendTimeout = 5 * time.Second

// removeParallelism bounds the store removals of one batch (a janitor
// sweep, a Session.Close) that run at once.
const removeParallelism = 16

// maxOrphanBackoff bounds the delay between two retries of orphaned keys
// while the store keeps failing.
const maxOrphanBackoff = time.Minute

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

	// backendTimeout is the constant backendTimeout, shortened by tests.
	backendTimeout time.Duration
	// localWait is maxLocalWait (how long lookups wait for the watch to
	// show a local write), lengthened by tests.
	localWait time.Duration
	// clock is the time of expiry: heartbeats, the janitor's period, the
	// orphans' backoff and the watches' linger. The real clock, or a fake
	// one in tests (export_test.go). Timeouts of store calls and the
	// watch's retries stay on real time: they bound I/O with a real store.
	clock clockwork.Clock

	ctx    context.Context // cancelled by Close: stops every goroutine
	cancel context.CancelFunc
	wg     sync.WaitGroup // the janitor and every watch goroutine
	wake   chan struct{}  // capacity 1: asks the janitor to sweep now

	// locks serialises the store operations on one registration key, so
	// that a Register, an Unregister and an expiry of the same name/addr
	// reach the store in the order they were decided.
	locks keylock.Set[regKey]

	mu       sync.Mutex
	closed   bool
	regs     map[regKey]*registration
	expiry   expiry              // the registrations of regs that can expire, by last heartbeat
	orphans  map[regKey]struct{} // keys that may still be in the store without being held here
	watches  map[string]*watch
	sessions int
	// Retries of orphans back off while the store fails: orphanFails
	// consecutive failed batches, next retry not before orphanNext.
	orphanFails int
	orphanNext  time.Time

	stats counters
}

// New validates cfg, applies its defaults and starts the agent's expiry
// loop. The caller must call Close.
func New(cfg Config) (*Agent, error) {
	return newAgent(cfg, backendTimeout, clockwork.NewRealClock())
}

func newAgent(cfg Config, timeout time.Duration, clock clockwork.Clock) (*Agent, error) {
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
		cfg:            cfg,
		backend:        cfg.Backend,
		log:            cfg.Logger,
		backendTimeout: timeout,
		localWait:      maxLocalWait,
		clock:          clock,
		ctx:            ctx,
		cancel:         cancel,
		wake:           make(chan struct{}, 1),
		regs:           make(map[regKey]*registration),
		orphans:        make(map[regKey]struct{}),
		watches:        make(map[string]*watch),
	}
	if n, ok := cfg.Backend.(backend.LossNotifier); ok {
		n.OnLost(a.lostToAnother)
	}
	a.wg.Add(1)
	go a.janitor()
	return a, nil
}

// lostToAnother forgets a registration that the backend stopped holding
// because another session (through another agent) took it over in the
// store: its former owner's Heartbeat then gets CodeNotFound, and its
// Close removes nothing. The backend calls it while it holds its own lock
// of the key, so a Register of the key on this agent writes only after it
// (and Register re-reads what the agent holds after its write).
func (a *Agent) lostToAnother(name, addr string) {
	k := regKey{name, addr}
	a.mu.Lock()
	defer a.mu.Unlock()
	if r := a.regs[k]; r != nil && !a.closed {
		a.forgetLocked(k, r)
		a.log.Info("registration taken over through another agent; no longer held here", "name", name, "addr", addr)
	}
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
	a.expiry = expiry{}
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
// watches. It also sweeps at once when woken (a new orphan to retry). It
// runs until Close.
func (a *Agent) janitor() {
	defer a.wg.Done()
	t := a.clock.NewTicker(a.sweepPeriod())
	defer t.Stop()
	for {
		select {
		case <-a.ctx.Done():
			return
		case <-t.Chan():
			a.sweep(a.clock.Now())
		case <-a.wake:
			a.sweep(a.clock.Now())
		}
	}
}

func (a *Agent) sweepPeriod() time.Duration { return max(a.cfg.TTL/4, 10*time.Millisecond) }

// wakeJanitor asks the janitor to sweep now, without blocking.
func (a *Agent) wakeJanitor() {
	select {
	case a.wake <- struct{}{}:
	default:
	}
}

func (a *Agent) sweep(now time.Time) {
	a.mu.Lock()
	if a.closed {
		a.mu.Unlock()
		return
	}
	keys := a.expiry.expired(now, a.cfg.TTL)
	// While orphan retries back off, the store is believed down: expiries
	// are done in memory and their keys join the orphans.
	storeOK := !now.Before(a.orphanNext)
	if storeOK {
		for k := range a.orphans {
			keys = append(keys, k)
		}
	}
	for name, w := range a.watches {
		if w.refs == 0 && now.Sub(w.idleSince) >= a.cfg.WatchLinger {
			delete(a.watches, name)
			w.cancel()
		}
	}
	a.mu.Unlock()
	if len(keys) > 0 {
		a.removeBatch("janitor sweep", keys, a.prepareSweep, storeOK)
	}
}

// prepareSweep decides, under k's key lock, what the janitor does with k:
// a registration still without a heartbeat within the TTL is dropped from
// memory (expired), an orphan not registered again is kept; both are then
// removed from the store (true).
func (a *Agent) prepareSweep(k regKey) bool {
	a.mu.Lock()
	if a.closed {
		a.mu.Unlock()
		return false
	}
	if r := a.regs[k]; r != nil {
		delete(a.orphans, k)
		if r.owner.kept || a.clock.Since(r.beat) <= a.cfg.TTL {
			a.mu.Unlock()
			return false
		}
		a.forgetLocked(k, r)
		a.mu.Unlock()
		a.stats.expired.Add(1)
		a.log.Info("agent: registration expired: no heartbeat within the TTL", "name", k.name, "addr", k.addr, "ttl", a.cfg.TTL)
		return true
	}
	_, orphan := a.orphans[k]
	a.mu.Unlock()
	return orphan
}

// errBatchStopped cancels the store calls of a batch after a store failure.
var errBatchStopped = errors.New("agent: batch stopped after a store failure")

// removeBatch removes keys from the store on the agent's behalf, at most
// removeParallelism at a time, and blocks until every key is done. For
// each key, prepare runs under the key's lock and reports whether the key
// must be removed (it drops the registration from memory first, if any).
//
// Without useStore, or once a store call of the batch failed, the keys
// are not sent to the store: they become orphans, retried by the janitor
// with backoff. A failure is counted and logged once per batch, with how
// many removals it deferred; calls cut short by the batch's stop or by the
// agent's Close are not failures.
func (a *Agent) removeBatch(op string, keys []regKey, prepare func(regKey) bool, useStore bool) {
	b := &removal{a: a, prepare: prepare}
	b.ctx, b.stop = context.WithCancelCause(a.ctx)
	defer b.stop(nil)
	if !useStore {
		b.stop(errBatchStopped)
	}
	b.run(keys)
	b.report(op)
}

// removal is one removeBatch: the context its store calls run under,
// cancelled with errBatchStopped at the first store failure, and its
// tallies.
type removal struct {
	a       *Agent
	prepare func(regKey) bool
	ctx     context.Context
	stop    context.CancelCauseFunc

	mu                                      sync.Mutex
	firstErr                                error
	removed, failed, deferred, lockTimeouts int
}

// run removes each key in a goroutine of its own, removeParallelism at a
// time, and returns when all are done.
func (b *removal) run(keys []regKey) {
	sem := make(chan struct{}, removeParallelism)
	var wg sync.WaitGroup
	for _, k := range keys {
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer func() { <-sem; wg.Done() }()
			b.one(k)
		}()
	}
	wg.Wait()
}

// one removes k: under its key lock, if prepare says so, from the store,
// or, once the batch stopped, by handing it to the janitor.
func (b *removal) one(k regKey) {
	unlock, ok := b.lock(k)
	if !ok {
		return
	}
	defer unlock()
	if !b.prepare(k) {
		return
	}
	if b.ctx.Err() != nil {
		b.toJanitor(k)
		return
	}
	ctx, cancel := context.WithTimeout(b.ctx, b.a.backendTimeout)
	err := b.a.removeFromStore(ctx, k)
	cancel()
	b.tally(err)
}

// lock takes k's lock within the backend timeout; a key still busy then
// is counted and left alone.
func (b *removal) lock(k regKey) (unlock func(), ok bool) {
	ctx, cancel := context.WithTimeout(b.a.ctx, b.a.backendTimeout)
	defer cancel()
	unlock, err := b.a.locks.Lock(ctx, k)
	if err != nil {
		if b.a.ctx.Err() == nil {
			b.mu.Lock()
			b.lockTimeouts++
			b.mu.Unlock()
		}
		return nil, false
	}
	return unlock, true
}

// toJanitor leaves k to the janitor: the store is believed down, and the
// backend must not write k again when it restores its session.
func (b *removal) toJanitor(k regKey) {
	if f, ok := b.a.backend.(backend.Forgetter); ok {
		f.Forget(k.name, k.addr)
	}
	b.a.addOrphan(k, false)
	b.mu.Lock()
	b.deferred++
	b.mu.Unlock()
}

// tally counts the outcome of one store removal; the first failure stops
// the batch.
func (b *removal) tally(err error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	switch {
	case err == nil, errors.Is(err, backend.ErrNotOwner):
		b.removed++
	case b.a.ctx.Err() != nil || errors.Is(err, backend.ErrClosed) || errors.Is(err, errShutdown):
	case errors.Is(context.Cause(b.ctx), errBatchStopped):
		b.deferred++
	default:
		b.failed++
		if b.firstErr == nil {
			b.firstErr = err
		}
		b.stop(errBatchStopped)
	}
}

// report logs what the batch left behind and sets when the janitor
// retries the orphans: the backoff grows after a failure and is reset by
// a batch that reached the store.
func (b *removal) report(op string) {
	a := b.a
	if b.lockTimeouts > 0 {
		a.log.Warn("agent: "+op+": registrations busy past the timeout; left to expire or to the next sweep",
			"count", b.lockTimeouts, "timeout", a.backendTimeout)
	}
	a.mu.Lock()
	switch {
	case b.failed > 0:
		a.orphanFails++
		delay := retry.Delay(a.sweepPeriod(), max(maxOrphanBackoff, a.sweepPeriod()), a.orphanFails-1)
		a.orphanNext = a.clock.Now().Add(delay)
		a.mu.Unlock()
		a.stats.backendErrors.Add(1)
		a.log.Warn("agent: backend unregister failed; removals left to retry",
			"op", op, "failed", b.failed, "deferred", b.deferred, "removed", b.removed, "retry_in", delay, "err", b.firstErr)
	case b.removed > 0:
		a.orphanFails, a.orphanNext = 0, time.Time{}
		a.mu.Unlock()
	default:
		a.mu.Unlock()
	}
}

// addOrphan records that k may be in the store without being held. A
// retry soon (the caller gave up, the store is fine) wakes the janitor
// unless retries are backing off.
func (a *Agent) addOrphan(k regKey, soon bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.closed {
		return
	}
	a.orphans[k] = struct{}{}
	if soon && a.orphanFails == 0 {
		a.wakeJanitor()
	}
}

// removeFromStore unregisters k from the store; on failure k becomes an
// orphan that the janitor retries. It returns the backend's error as is
// and neither counts nor logs it. The caller holds k's key lock.
func (a *Agent) removeFromStore(ctx context.Context, k regKey) error {
	err := a.backend.Unregister(ctx, k.name, k.addr)
	a.mu.Lock()
	defer a.mu.Unlock()
	if errors.Is(err, backend.ErrNotOwner) {
		delete(a.orphans, k) // another session's now: nothing of ours to remove
		return err
	}
	if err != nil {
		if a.closed {
			return errShutdown
		}
		a.orphans[k] = struct{}{}
		return err
	}
	delete(a.orphans, k)
	return nil
}

// removeNow removes k from the store for a caller that has already dropped
// it from memory: the call is bounded by backendTimeout and by Close, not
// by ctx, so that a caller giving up does not leave the key behind. A
// failure is counted and logged, and the janitor retries it. The caller
// holds k's key lock.
func (a *Agent) removeNow(ctx context.Context, k regKey) error {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), a.backendTimeout)
	defer cancel()
	stop := context.AfterFunc(a.ctx, cancel)
	defer stop()
	err := a.removeFromStore(ctx, k)
	switch {
	case err == nil:
		return nil
	case errors.Is(err, backend.ErrNotOwner):
		return api.Errorf(api.CodePermissionDenied, "%s/%s was taken over through another agent; it was left in place", k.name, k.addr)
	case a.ctx.Err() != nil || errors.Is(err, backend.ErrClosed) || errors.Is(err, errShutdown):
		return errShutdown
	}
	a.stats.backendErrors.Add(1)
	a.log.Warn("agent: backend unregister failed; will retry", "name", k.name, "addr", k.addr, "err", err)
	return api.Errorf(api.CodeUnavailable, "store unavailable: unregister failed (details in the agent's log); the agent retries it")
}

// lockKey acquires k's key lock, waiting at most until ctx is done (its
// error is returned) or the agent closes (errShutdown). A ctx already done
// never gets the lock.
func (a *Agent) lockKey(ctx context.Context, k regKey) (unlock func(), err error) {
	if a.ctx.Err() != nil {
		return nil, errShutdown
	}
	lctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	stop := context.AfterFunc(a.ctx, func() { cancel(errShutdown) })
	defer stop()
	unlock, err = a.locks.Lock(lctx, k)
	if err != nil {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		return nil, errShutdown
	}
	return unlock, nil
}

func (k regKey) String() string { return fmt.Sprintf("%s/%s", k.name, k.addr) }
