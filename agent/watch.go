package agent

import (
	"context"
	"errors"
	"maps"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/flynn/discoverd/api"
	"github.com/flynn/discoverd/api/retry"
	"github.com/flynn/discoverd/backend"
)

// Backoff of a watch whose backend stream broke (retry.Backoff, jittered).
const (
	minRetry = 100 * time.Millisecond
	maxRetry = 5 * time.Second
)

// watch is the one backend subscription of a service name, shared by all
// local subscribers. Its goroutine (run) reads the backend's events into an
// in-memory cache and fans each change out to the subscribers' queues. It
// never blocks on a subscriber.
type watch struct {
	a      *Agent
	name   string
	ctx    context.Context // cancelled to stop the watch
	cancel context.CancelFunc

	readyOnce  sync.Once
	ready      chan struct{} // closed once the cache holds a complete snapshot
	failedOnce sync.Once
	failed     chan struct{} // closed once an attempt to get a snapshot failed
	done       chan struct{} // closed when run has returned

	// guarded by Agent.mu
	refs      int       // subscriptions and one-shot lookups using the watch
	idleSince time.Time // when refs last dropped to 0

	// mu orders the fan-out: a subscriber takes its snapshot and joins
	// subs under mu, and every change is applied to the cache and queued
	// to every subscriber under mu, so nothing is lost or reordered.
	mu      sync.Mutex
	stopped bool
	cache   map[string]api.ServiceUpdate // addr → online instance
	leader  api.ServiceUpdate            // oldest online instance (compareAge); zero if none
	subs    map[*Subscription]struct{}   // Subscribe streams
	// changed, when not nil, is closed at the next change of the cache
	// (then set to nil); settle and View wait on it.
	changed chan struct{}
	leaders map[*Subscription]struct{} // Leader streams
	// pending holds this agent's acknowledged writes that the cache does
	// not show yet, by addr (noteLocal); npending counts them, read
	// without mu by settle's fast path.
	pending    map[string]*pendingWrite
	pendingSeq uint64
	npending   atomic.Int32

	// Instances refused for breaking the api limits (foreign data):
	// logged at most once per badLogEvery, with how many since. Owned by
	// run's goroutine.
	badLogged time.Time
	badCount  int
}

// badLogEvery rate-limits the log of refused instances, per watch.
const badLogEvery = time.Minute

// acquireWatch returns the watch of name, starting it if needed, and
// counts one more user. The caller must call releaseWatch.
func (a *Agent) acquireWatch(name string) (*watch, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.closed {
		return nil, errShutdown
	}
	w := a.watches[name]
	if w == nil {
		ctx, cancel := context.WithCancel(a.ctx)
		w = &watch{
			a:       a,
			name:    name,
			ctx:     ctx,
			cancel:  cancel,
			ready:   make(chan struct{}),
			failed:  make(chan struct{}),
			done:    make(chan struct{}),
			cache:   make(map[string]api.ServiceUpdate),
			subs:    make(map[*Subscription]struct{}),
			leaders: make(map[*Subscription]struct{}),
			pending: make(map[string]*pendingWrite),
		}
		a.watches[name] = w
		a.wg.Add(1)
		go w.run()
	}
	w.refs++
	return w, nil
}

// releaseWatch counts one user less. A watch without users is stopped
// after Config.WatchLinger by the janitor (at once if it is negative).
func (a *Agent) releaseWatch(w *watch) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if w.refs--; w.refs > 0 {
		return
	}
	w.idleSince = a.clock.Now()
	if a.cfg.WatchLinger < 0 && a.watches[w.name] == w {
		delete(a.watches, w.name)
		w.cancel()
	}
}

// waitReady blocks until w's cache holds a complete snapshot. It does not
// wait for a store that cannot be reached: once an attempt to subscribe
// has failed, or after the agent's backend timeout, it returns
// CodeUnavailable while the watch keeps trying for later callers. It
// returns ctx.Err() if ctx ends first, and errShutdown if w stopped.
func (w *watch) waitReady(ctx context.Context) error {
	select {
	case <-w.ready:
		return nil
	default:
	}
	t := time.NewTimer(w.a.backendTimeout)
	defer t.Stop()
	select {
	case <-w.ready:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	case <-w.done:
		return errShutdown
	case <-w.failed:
	case <-t.C:
	}
	select {
	case <-w.ready: // the retry that just succeeded
		return nil
	default:
	}
	return api.Errorf(api.CodeUnavailable, "store unreachable: no snapshot of %s yet", w.name)
}

// run owns the backend stream of w: it subscribes, applies events, and
// resubscribes with backoff when the stream breaks, until w.ctx is done or
// the backend is closed. While the store is unreachable the cache keeps
// its last known state.
func (w *watch) run() {
	defer w.a.wg.Done()
	defer close(w.done)
	defer w.shutdown()
	defer w.unlist()
	bo := retry.Backoff{Min: minRetry, Max: maxRetry}
	for {
		stream, err := w.a.backend.Subscribe(w.ctx, w.name)
		current := false
		if err == nil {
			current, err = w.consume(stream)
			_ = stream.Close()
			if current {
				bo.Reset()
			}
		}
		if w.ctx.Err() != nil {
			return
		}
		if !current {
			w.failedOnce.Do(func() { close(w.failed) })
		}
		if errors.Is(err, backend.ErrClosed) {
			// Closed for good (main closes it after the agent; here it
			// went first): no point in resubscribing.
			w.a.log.Warn("agent: backend closed; watch stopped", "name", w.name)
			return
		}
		w.a.stats.backendErrors.Add(1)
		delay := bo.Next()
		w.a.log.Warn("agent: backend watch broken; serving the last known state and resubscribing",
			"name", w.name, "err", err, "retry_in", delay)
		t := time.NewTimer(retry.Jitter(delay))
		select {
		case <-w.ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
	}
}

// unlist removes w from the agent's watches if it is still listed, so that
// a watch that stopped by itself is not served to later callers.
func (w *watch) unlist() {
	w.a.mu.Lock()
	defer w.a.mu.Unlock()
	if w.a.watches[w.name] == w {
		delete(w.a.watches, w.name)
	}
}

// consume applies the events of one backend stream until it ends or w is
// stopped. The stream's snapshot is collected apart and diffed into the
// cache at its Current event, so a resubscription emits only what changed
// while the stream was down. current reports whether that point was
// reached.
func (w *watch) consume(stream backend.Stream) (current bool, err error) {
	fresh := make(map[string]api.ServiceUpdate)
	for {
		select {
		case <-w.ctx.Done():
			return current, nil
		case ev, ok := <-stream.Events():
			if !ok {
				if err := stream.Err(); err != nil {
					return current, err
				}
				return current, errors.New("backend stream ended without an error")
			}
			w.a.stats.events.Add(1)
			u, typ := w.update(ev.Instance), ev.Type
			if typ == backend.Put && !w.valid(u) {
				typ = backend.Delete // what the store holds is unusable
			}
			if current {
				w.mu.Lock()
				w.applyLocked(typ, u, true)
				w.mu.Unlock()
				continue
			}
			switch typ {
			case backend.Put:
				fresh[ev.Instance.Addr] = u
			case backend.Delete:
				delete(fresh, ev.Instance.Addr)
			case backend.Current:
				w.resync(fresh)
				current, fresh = true, nil
				w.readyOnce.Do(func() { close(w.ready) })
			}
		}
	}
}

func (w *watch) update(in backend.Instance) api.ServiceUpdate {
	return api.ServiceUpdate{Name: w.name, Addr: in.Addr, Online: true, Attrs: in.Attrs, Created: uint(in.Created)}
}

// valid reports whether u is within the api limits. The backends do not
// enforce them on what they read, and data written by something other
// than a discoverd agent must not reach subscribers; refusals are logged
// at most once per badLogEvery. Only run calls it.
func (w *watch) valid(u api.ServiceUpdate) bool {
	err := api.ValidateAddr(u.Addr)
	if err == nil {
		err = api.ValidateAttrs(u.Attrs)
	}
	if err == nil {
		return true
	}
	w.badCount++
	if now := time.Now(); now.Sub(w.badLogged) >= badLogEvery {
		w.a.log.Warn("agent: ignoring instances in the store that break the limits",
			"name", w.name, "addr", truncate(u.Addr, 64), "err", err, "count", w.badCount)
		w.badLogged, w.badCount = now, 0
	}
	return false
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}

// resync makes the cache equal to a complete snapshot, emitting the
// differences as ordinary changes to Subscribe streams: removals first,
// then additions and updates, each oldest first. Leader streams get one
// update at the end, if the leader's identity changed: the intermediate
// states are not ones the store went through.
func (w *watch) resync(fresh map[string]api.ServiceUpdate) {
	w.mu.Lock()
	defer w.mu.Unlock()
	gone, put := api.Diff(w.cache, fresh)
	for _, addr := range gone {
		w.applyLocked(backend.Delete, w.cache[addr], false)
	}
	for _, addr := range put {
		w.applyLocked(backend.Put, fresh[addr], false)
	}
	old := w.leader
	w.leader = w.oldestLocked()
	if w.leader.Addr != old.Addr || w.leader.Created != old.Created {
		w.fanOutLocked(w.leaders, w.leader)
	}
}

func sortOldestFirst(us []api.ServiceUpdate) []api.ServiceUpdate {
	slices.SortFunc(us, compareAge)
	return us
}

// compareAge orders instances oldest first (api.Age).
func compareAge(a, b api.ServiceUpdate) int { return a.Age().Compare(b.Age()) }

func older(a, b api.ServiceUpdate) bool { return compareAge(a, b) < 0 }

// oldestLocked returns the oldest instance in the cache (the leader), or
// the zero ServiceUpdate if it is empty.
func (w *watch) oldestLocked() api.ServiceUpdate {
	var o api.ServiceUpdate
	for _, c := range w.cache {
		if o.Addr == "" || older(c, o) {
			o = c
		}
	}
	return o
}

// applyLocked applies one change to the cache and fans it out to Subscribe
// streams, and, if leaders is set, moves the leader and tells Leader
// streams. A Put that changes nothing (same Created and attributes) and a
// Delete of an unknown instance emit nothing. A Delete carries the last
// known attributes and Created. A Put of a known addr with another Created
// (the instance was removed and registered again, unseen) emits the
// removal of the old one first.
func (w *watch) applyLocked(typ backend.EventType, u api.ServiceUpdate, leaders bool) {
	switch typ {
	case backend.Put:
		switch old, c := api.Classify(w.cache, u.Addr, u); c {
		case api.Unchanged:
			return
		case api.Replaced:
			w.applyLocked(backend.Delete, old, leaders)
		}
		w.cache[u.Addr] = u
	case backend.Delete:
		old, ok := w.cache[u.Addr]
		if !ok {
			return
		}
		delete(w.cache, u.Addr)
		u = old
		u.Online = false
	default:
		return
	}
	if len(w.pending) > 0 {
		w.confirmLocked(u.Addr)
	}
	if w.changed != nil {
		close(w.changed)
		w.changed = nil
	}
	w.fanOutLocked(w.subs, u)
	if leaders && w.moveLeaderLocked(u) {
		w.fanOutLocked(w.leaders, w.leader)
	}
}

// fanOutLocked queues u to every subscription of set, cutting off those
// whose queue is full.
func (w *watch) fanOutLocked(set map[*Subscription]struct{}, u api.ServiceUpdate) {
	if len(set) == 0 {
		return
	}
	limit := w.a.cfg.SubscriberBuffer
	var queued uint64
	p := &u // one copy, shared by every queue
	for s := range set {
		if s.push(p, limit) {
			queued++
			continue
		}
		delete(set, s)
		w.a.stats.slowCut.Add(1)
		w.a.log.Info("agent: subscriber cut off: too slow", "name", w.name, "queued", limit)
	}
	w.a.stats.fanout.Add(queued)
}

// moveLeaderLocked updates w.leader after the change u was applied to the
// cache and reports whether the leader's identity (addr, Created) changed.
// An attribute update of the leader updates w.leader but is not a change.
func (w *watch) moveLeaderLocked(u api.ServiceUpdate) bool {
	old := w.leader
	switch {
	case u.Online && (old.Addr == "" || older(u, old)):
		w.leader = u
	case u.Addr == old.Addr && u.Online && u.Created == old.Created:
		w.leader = u
		return false
	case u.Addr == old.Addr:
		// The leader left (or was re-created later): the oldest remaining.
		w.leader = w.oldestLocked()
	default:
		return false
	}
	return w.leader.Addr != old.Addr || w.leader.Created != old.Created
}

// shutdown ends every subscription of w; run calls it when it returns.
func (w *watch) shutdown() {
	w.mu.Lock()
	w.stopped = true
	clear(w.pending)
	w.npending.Store(0)
	subs := slices.Collect(maps.Keys(w.subs))
	subs = slices.AppendSeq(subs, maps.Keys(w.leaders))
	clear(w.subs)
	clear(w.leaders)
	w.mu.Unlock()
	for _, s := range subs {
		s.end(errShutdown)
	}
}

// Subscribe starts a subscription to the instances of name. Next then
// returns every online instance (Online true, oldest first), then the zero
// ServiceUpdate meaning "you are current", then every change in order:
// Online true with the new attributes for a registration or an attribute
// update, Online false (with the last known Attrs and Created) for a
// removal. Nothing is lost or reordered between the snapshot and the live
// part.
//
// If the name is not watched yet, Subscribe blocks until the store
// answered with a snapshot, but not for an unreachable store: it fails
// once the agent's first attempt to subscribe failed, or after the
// agent's backend timeout (a few seconds), while the agent keeps trying
// for later calls. A name already watched is served from the agent's
// cache, even while the store is unreachable. ctx does not bound the
// subscription; Close does, and the caller must call it. name must be
// valid (api.ValidateName): the front ends check it, the agent trusts it.
// Errors: CodeUnavailable when the store is unreachable ("store
// unreachable: no snapshot of <name> yet") or the agent is closed;
// ctx.Err().
func (a *Agent) Subscribe(ctx context.Context, name string) (*Subscription, error) {
	return a.join(ctx, name, false)
}

// Leader starts a subscription to the leader of name: the online instance
// with the smallest Created (the smallest Addr among equals: registrations
// stored in one transaction share a Created). Next first returns the
// current leader (the zero ServiceUpdate when there is none), then each new
// leader whenever the leader's identity (addr, Created) changes, and the
// zero ServiceUpdate when the last instance leaves. An attribute update of the current leader is
// not a change of leader and is not sent (LeaderOf returns it).
// Blocking, lifetime and errors are as for Subscribe.
func (a *Agent) Leader(ctx context.Context, name string) (*Subscription, error) {
	return a.join(ctx, name, true)
}

func (a *Agent) join(ctx context.Context, name string, leader bool) (*Subscription, error) {
	w, err := a.acquireWatch(name)
	if err != nil {
		return nil, err
	}
	if err := w.waitReady(ctx); err != nil {
		a.releaseWatch(w)
		return nil, err
	}
	w.settle(ctx)
	s := &Subscription{w: w, wake: make(chan struct{}, 1)}
	w.mu.Lock()
	if w.stopped {
		w.mu.Unlock()
		a.releaseWatch(w)
		return nil, errShutdown
	}
	if leader {
		leader := w.leader
		s.q = []*api.ServiceUpdate{&leader}
		w.leaders[s] = struct{}{}
	} else {
		snap := append(w.snapshotLocked(1), api.ServiceUpdate{})
		s.q = make([]*api.ServiceUpdate, len(snap))
		for i := range snap {
			s.q[i] = &snap[i]
		}
		w.subs[s] = struct{}{}
	}
	s.snapLeft = len(s.q)
	w.mu.Unlock()
	a.stats.subscribers.Add(1)
	return s, nil
}

// snapshotLocked returns the online instances, oldest first, in a slice
// with room for extra more.
func (w *watch) snapshotLocked(extra int) []api.ServiceUpdate {
	us := make([]api.ServiceUpdate, 0, len(w.cache)+extra)
	for _, u := range w.cache {
		us = append(us, u)
	}
	return sortOldestFirst(us)
}

// Instances returns the online instances of name, oldest first, from the
// agent's cache. It blocks only when the name is not watched yet, as
// Subscribe does. Errors as for Subscribe.
func (a *Agent) Instances(ctx context.Context, name string) ([]api.ServiceUpdate, error) {
	var us []api.ServiceUpdate
	err := a.lookup(ctx, name, func(w *watch) { us = w.snapshotLocked(0) })
	return us, err
}

// LeaderOf returns the current leader of name (the online instance with
// the smallest Created, then Addr) and true, or false when name has no
// online instance. Blocking and errors as for Instances.
func (a *Agent) LeaderOf(ctx context.Context, name string) (api.ServiceUpdate, bool, error) {
	var u api.ServiceUpdate
	err := a.lookup(ctx, name, func(w *watch) { u = w.leader })
	return u, u.Addr != "", err
}

func (a *Agent) lookup(ctx context.Context, name string, read func(*watch)) error {
	w, err := a.acquireWatch(name)
	if err != nil {
		return err
	}
	defer a.releaseWatch(w)
	if err := w.waitReady(ctx); err != nil {
		return err
	}
	w.settle(ctx)
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.stopped {
		return errShutdown
	}
	read(w)
	return nil
}

// ErrSubscriptionClosed is returned by Next after Close.
var ErrSubscriptionClosed = api.Errorf(api.CodeUnavailable, "subscription closed")

// smallQueue is the capacity a drained queue may keep; a larger one is
// released so that an idle subscriber costs little memory.
const smallQueue = 16

// Subscription is a stream of updates from Subscribe or Leader. It holds
// no goroutine: the agent queues updates (never blocking on it) and Next
// pulls them. A subscription whose live queue exceeds
// Config.SubscriberBuffer is cut off.
//
// Next must be called from one goroutine at a time; Close may be called
// concurrently with Next. The Attrs maps of the updates are shared between
// subscribers and must not be modified.
type Subscription struct {
	w      *watch
	wake   chan struct{}          // capacity 1: signalled after a push or an end
	notify atomic.Pointer[func()] // Notify's function

	closeOnce sync.Once

	mu       sync.Mutex
	q        []*api.ServiceUpdate // q[head:] is pending; shared between subscribers
	head     int
	snapLeft int   // pending items of the initial snapshot (not bounded)
	err      error // why the stream ends, once q is drained
}

// push queues u unless the subscription ended. It reports false when the
// live part of the queue is full: the subscription is then cut off. It
// never blocks on the consumer.
func (s *Subscription) push(u *api.ServiceUpdate, limit int) bool {
	s.mu.Lock()
	if s.err != nil {
		s.mu.Unlock()
		return true
	}
	ok := true
	if live := len(s.q) - s.head - s.snapLeft; live >= limit {
		s.err = api.Errorf(api.CodeResourceExhausted, "subscriber too slow: %d updates queued", live)
		ok = false
	} else {
		// Full, and at least half of it consumed: move the pending part
		// to the front rather than grow. (For less, a consumer keeping
		// just behind would have it moved on every push.)
		if len(s.q) == cap(s.q) && s.head >= len(s.q)/2 {
			n := copy(s.q, s.q[s.head:])
			clear(s.q[n:])
			s.q, s.head = s.q[:n], 0
		}
		s.q = append(s.q, u)
	}
	s.mu.Unlock()
	s.signal()
	return ok
}

func (s *Subscription) signal() {
	if f := s.notify.Load(); f != nil {
		(*f)()
		return
	}
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// Notify makes the subscription call f, instead of waking Next, whenever
// an update is queued or the subscription ends; the consumer then takes
// the updates with TryNext. f is called at once too, for the updates
// already queued. It is called from the agent's fan-out, with the name's
// watch locked: it must not block, nor call into the agent; it may be
// called after Close. Notify is for consumers that serve many
// subscriptions from one goroutine (an RPC connection's writer); call it
// once, before the first TryNext, and do not mix it with Next.
func (s *Subscription) Notify(f func()) {
	s.notify.Store(&f)
	f()
}

// TryNext is Next without blocking: it returns nil, nil when no update is
// queued. When the stream has ended it first returns the updates still
// queued, then the reason, as Next does. The update returned is shared
// with the other subscribers of the change (the same pointer: a
// consumer may encode it once for all) and must not be modified.
func (s *Subscription) TryNext() (*api.ServiceUpdate, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.head < len(s.q) {
		return s.popLocked(), nil
	}
	return nil, s.err
}

// popLocked takes the oldest queued update. s.mu must be held and the
// queue must not be empty.
func (s *Subscription) popLocked() *api.ServiceUpdate {
	u := s.q[s.head]
	s.q[s.head] = nil
	s.head++
	if s.snapLeft > 0 {
		s.snapLeft--
	}
	if s.head == len(s.q) {
		if cap(s.q) > smallQueue {
			s.q = nil
		} else {
			s.q = s.q[:0]
		}
		s.head = 0
	}
	return u
}

// end makes the stream end with err once the queue is drained, unless it
// has already ended.
func (s *Subscription) end(err error) {
	s.mu.Lock()
	if s.err == nil {
		s.err = err
	}
	s.mu.Unlock()
	s.signal()
}

// Next returns the next update, blocking until there is one or ctx is
// done. When the stream has ended it first returns the updates still
// queued, then the reason: an *api.Error with CodeResourceExhausted when
// the subscriber was cut off as too slow, CodeUnavailable when the agent
// closed (or ErrSubscriptionClosed after Close). It returns ctx.Err() when
// ctx is done first; the subscription is then still usable.
func (s *Subscription) Next(ctx context.Context) (api.ServiceUpdate, error) {
	for {
		s.mu.Lock()
		if s.head < len(s.q) {
			u := s.popLocked()
			s.mu.Unlock()
			return *u, nil
		}
		err := s.err
		s.mu.Unlock()
		if err != nil {
			return api.ServiceUpdate{}, err
		}
		select {
		case <-s.wake:
		case <-ctx.Done():
			return api.ServiceUpdate{}, ctx.Err()
		}
	}
}

// Close ends the subscription, drops its queue and releases the name's
// watch. A blocked Next returns ErrSubscriptionClosed. It is idempotent
// and does not block for long.
func (s *Subscription) Close() {
	s.closeOnce.Do(func() {
		w := s.w
		w.mu.Lock()
		delete(w.subs, s)
		delete(w.leaders, s)
		w.mu.Unlock()
		s.mu.Lock()
		s.q, s.head, s.snapLeft = nil, 0, 0
		s.err = ErrSubscriptionClosed
		s.mu.Unlock()
		s.signal()
		w.a.stats.subscribers.Add(-1)
		w.a.releaseWatch(w)
	})
}

// maxLocalWait bounds how long a lookup waits for this agent's own watch
// to show a write the agent made (settle); the watch normally follows the
// store within a millisecond, and longer only when the store's watch is
// broken or holds deletions (a store stall).
const maxLocalWait = time.Second

// Read-your-writes. A Register or Unregister returns once the store has
// acknowledged it, without waiting for this agent's watch to show it;
// the lookups that follow on this agent wait instead. After the store
// acknowledged a write of an instance of a watched name, the write is
// noted as pending in the watch (noteLocal); the watch drops the note
// when its cache shows the written state, which it reaches by applying
// the store's events in order. A lookup, a new subscription or a View
// compile first waits until every write pending when it started is shown
// (settle), at most maxLocalWait after the write was acknowledged. So a
// lookup that follows a write sees it, and what subscribers are sent is
// unchanged: only the store's events, in store order, each once.
//
// The write is not applied to the cache ahead of its watch event: events
// of other instances of the name with smaller revisions may still be on
// their way, and a subscriber (or a leader lookup) would then see the
// store's changes out of order, a leader with a larger token before one
// with a smaller.

// pendingWrite is a local write the store acknowledged that the cache
// does not show yet.
type pendingWrite struct {
	seq      uint64            // order of the first unshown write of this addr
	present  bool              // written (attrs) or removed
	attrs    map[string]string // as written
	deadline time.Time         // when lookups stop waiting for it
}

// shows reports whether the cache shows p for addr.
func (w *watch) showsLocked(addr string, p *pendingWrite) bool {
	u, ok := w.cache[addr]
	return ok == p.present && (!ok || maps.Equal(u.Attrs, p.attrs))
}

// confirmLocked drops the pending write of addr once the cache shows it;
// applyLocked calls it after each change of addr.
func (w *watch) confirmLocked(addr string) {
	if p := w.pending[addr]; p != nil && w.showsLocked(addr, p) {
		delete(w.pending, addr)
		w.npending.Add(-1)
	}
}

// noteLocal records, after the store acknowledged a write of k, that the
// watch of k.name, if the agent runs one, must show it (present with
// attrs, or absent) before the next lookup is answered. A name without a
// watch needs nothing: a new watch reads the store afresh. The caller
// holds k's key lock, so the notes of one addr come in write order. It
// does not block.
func (a *Agent) noteLocal(k regKey, attrs map[string]string, present bool) {
	a.mu.Lock()
	w := a.watches[k.name]
	a.mu.Unlock()
	if w == nil {
		return
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.stopped {
		return
	}
	p := w.pending[k.addr]
	if p == nil {
		w.pendingSeq++
		p = &pendingWrite{seq: w.pendingSeq}
	}
	// An earlier write of addr that is not shown yet keeps its place: the
	// watch shows it on the way to this one, in store order.
	p.present, p.attrs, p.deadline = present, attrs, time.Now().Add(a.localWait)
	if w.showsLocked(k.addr, p) {
		if w.pending[k.addr] != nil {
			delete(w.pending, k.addr)
			w.npending.Add(-1)
		}
		return
	}
	if w.pending[k.addr] == nil {
		w.pending[k.addr] = p
		w.npending.Add(1)
	}
}

// settle blocks until the cache shows every local write that was pending
// when it was called, each for at most maxLocalWait after its
// acknowledgement, or until ctx ends or w stops. It returns at once when
// nothing is pending, without taking w.mu.
func (w *watch) settle(ctx context.Context) {
	if w.npending.Load() == 0 {
		return
	}
	w.mu.Lock()
	target := w.pendingSeq
	for {
		var until time.Time
		now := time.Now()
		for addr, p := range w.pending {
			switch {
			case !now.Before(p.deadline):
				delete(w.pending, addr) // the watch did not show it in time
				w.npending.Add(-1)
			case p.seq <= target && p.deadline.After(until):
				until = p.deadline
			}
		}
		if until.IsZero() || w.stopped {
			w.mu.Unlock()
			return
		}
		if w.changed == nil {
			w.changed = make(chan struct{})
		}
		changed := w.changed
		w.mu.Unlock()
		timer := time.NewTimer(until.Sub(now))
		select {
		case <-changed:
		case <-ctx.Done():
		case <-timer.C:
		case <-w.done:
		}
		timer.Stop()
		if ctx.Err() != nil {
			return
		}
		w.mu.Lock()
	}
}
