package agent

import (
	"context"
	"maps"
	"time"

	"github.com/flynn/discoverd/api"
	"github.com/flynn/discoverd/backend"
)

// regKey identifies a registration: a service name and an expanded address.
type regKey struct{ name, addr string }

// registration is one name/addr held by this agent. Guarded by Agent.mu.
type registration struct {
	key   regKey
	owner *Session
	attrs map[string]string // as last written to the store
	beat  time.Time         // last Register or Heartbeat (beatLocked)
	dirty bool              // a write of attrs failed: the store may hold others

	// Links in the agent's expiry list (expiry.go); listed while on it.
	prev, next *registration
	listed     bool
}

// Session groups the registrations of one client connection. A
// registration (name, addr) belongs to the session that last registered
// it: a Register of the same name/addr from another session takes it over
// (a new process on the same address). Only the owner heartbeats,
// unregisters or, by closing, ends it: Heartbeat and Unregister from
// another session fail with CodePermissionDenied, and a session that lost
// a registration to a takeover leaves it alone when it closes.
//
// A shared session (NewSharedSession) is the owner class of clients
// without a connection, such as HTTP: it never takes over a registration
// of another session, and is refused (CodeConflict) where it would.
//
// Its methods are safe for concurrent use. A Session is cheap; it holds no
// goroutine.
type Session struct {
	a      *Agent
	max    int  // <0: unlimited
	shared bool // an owner class without a connection (HTTP): never takes over
	kept   bool // the agent's own class (health checks): shared, and never expires (kept.go)

	// guarded by a.mu
	regs    map[regKey]struct{}
	pending int // new registrations being written, counted against max
	closed  bool
}

// NewSession starts a session that may hold at most maxRegistrations
// registrations at once: 0 selects Config.MaxRegistrationsPerSession, a
// negative number means unlimited (for transports without connections,
// such as HTTP). The caller must call Close when the client goes away.
func (a *Agent) NewSession(maxRegistrations int) *Session {
	return a.newSession(maxRegistrations, false)
}

// NewSharedSession starts the session of an owner class whose clients have
// no connection (HTTP): its registrations live by their heartbeats only
// (the TTL), and it never takes over a registration that a connection's
// session holds (CodeConflict). maxRegistrations is as for NewSession.
func (a *Agent) NewSharedSession(maxRegistrations int) *Session {
	return a.newSession(maxRegistrations, true)
}

func (a *Agent) newSession(maxRegistrations int, shared bool) *Session {
	if maxRegistrations == 0 {
		maxRegistrations = a.cfg.MaxRegistrationsPerSession
	}
	s := &Session{a: a, max: maxRegistrations, shared: shared, regs: make(map[regKey]struct{})}
	a.mu.Lock()
	if a.closed {
		s.closed = true
	} else {
		a.sessions++
	}
	a.mu.Unlock()
	return s
}

var errSessionClosed = api.Errorf(api.CodeUnavailable, "session closed")

// key expands the addr of args (":port" to Config.ExternalIP). Name and
// addr are trusted: the front ends checked them (api.Args.ValidateKey).
func (s *Session) key(args api.Args) (regKey, error) {
	addr, err := api.ExpandAddr(args.Addr, s.a.cfg.ExternalIP)
	if err != nil {
		return regKey{}, err
	}
	return regKey{args.Name, addr}, nil
}

// usableLocked reports why s cannot be used now, if it cannot.
func (s *Session) usableLocked() error {
	switch {
	case s.a.closed:
		return errShutdown
	case s.closed:
		return errSessionClosed
	}
	return nil
}

// Register registers args as online and returns its address, with a
// ":port" address expanded to Config.ExternalIP. Registering a name/addr
// the agent already holds is a heartbeat plus an attribute update: the
// registration keeps its Created and the store is written only when the
// attributes changed. A Register from another session than the owner is
// a takeover: the registration moves to this session, and the store is
// written to make sure it is this agent's there (backend.Claimer), since
// it may have been taken over through another agent meanwhile.
//
// It blocks until the store acknowledged the write, or until ctx is done.
// A lookup or a new subscription on this agent that follows sees the
// write: it waits, if needed, until the agent's watch shows it (at most a
// second; see noteLocal). Errors:
// *api.Error with CodeInvalidArgument (":port" without ExternalIP; args
// must pass api.Args.ValidateRegister: the agent does not check them
// again), CodeConflict (a shared session cannot take the
// registration over from a connection's session), CodeResourceExhausted
// (the session's cap is reached), CodeUnavailable (store unreachable,
// session or agent closed);
// or ctx.Err(). After a failed store write of a new registration, it may
// or may not have been stored: the agent removes it from the store in the
// background (at once when ctx ended, after the next janitor sweep when
// the store failed) unless it is registered again. The session stays
// usable after any error.
func (s *Session) Register(ctx context.Context, args api.Args) (string, error) {
	k, err := s.key(args)
	if err != nil {
		return "", err
	}
	// Fast path: a known registration with unchanged attributes is a
	// heartbeat, answered from memory. A store operation in flight on this
	// key is ordered after this one: a removal takes the registration out
	// of a.regs before it calls the store.
	if done, err := s.refresh(k, args.Attrs); done {
		return k.addr, err
	}

	unlock, err := s.a.lockKey(ctx, k)
	if err != nil {
		return "", err
	}
	defer unlock()
	w, done, err := s.beginWrite(k, args.Attrs)
	switch {
	case done:
		return k.addr, err
	case err != nil:
		return "", err
	}
	w.attrs = maps.Clone(args.Attrs)
	err = s.write(ctx, w)
	if err := s.finishWrite(ctx, w, err); err != nil {
		return "", err
	}
	s.a.noteLocal(k, w.attrs, true)
	return k.addr, nil
}

// regWrite is one Register's store write, from beginWrite to finishWrite,
// made under the key's lock.
type regWrite struct {
	k        regKey
	r        *registration     // held when the write began (stays in a.regs under the key lock), or nil: a new one
	reserved bool              // counted in s.pending against the session's cap
	attrs    map[string]string // written: the caller's, copied
}

// refresh is refreshLocked under the agent's lock.
func (s *Session) refresh(k regKey, attrs map[string]string) (done bool, err error) {
	s.a.mu.Lock()
	defer s.a.mu.Unlock()
	return s.refreshLocked(k, attrs)
}

// beginWrite runs under k's key lock, before the store write. It answers
// from memory if s now holds k with the same attributes (a concurrent
// Register of s wrote them: done, as refreshLocked); otherwise it reserves a place under the
// session's cap for a registration s does not hold yet, and returns the
// write to make (its attrs still to be set).
func (s *Session) beginWrite(k regKey, attrs map[string]string) (w *regWrite, done bool, err error) {
	a := s.a
	a.mu.Lock()
	defer a.mu.Unlock()
	if done, err := s.refreshLocked(k, attrs); done {
		return nil, true, err
	}
	r := a.regs[k]
	w = &regWrite{k: k, r: r, reserved: r == nil || r.owner != s}
	if w.reserved {
		if err := s.reserveLocked(); err != nil {
			return nil, false, err
		}
	}
	return w, false, nil
}

// write sends w to the store. A takeover (s does not own the registration
// the agent holds) claims it when the backend can (backend.Claimer): it
// may have been taken over through another agent since its former owner
// registered it. Anything else is a Register.
func (s *Session) write(ctx context.Context, w *regWrite) error {
	b := s.a.backend
	if c, ok := b.(backend.Claimer); ok && w.r != nil && w.reserved {
		return c.Claim(ctx, w.k.name, w.k.addr, w.attrs)
	}
	return b.Register(ctx, w.k.name, w.k.addr, w.attrs)
}

// finishWrite records the outcome of w's store write, err. After a failure
// the registration held is marked dirty (its next Register writes), and a
// new one, which the store may or may not hold, is left to the janitor as
// an orphan. After a success s holds the registration (keepWrite).
func (s *Session) finishWrite(ctx context.Context, w *regWrite, err error) error {
	a := s.a
	a.mu.Lock()
	if w.reserved {
		s.pending--
	}
	if err == nil {
		return s.keepWrite(ctx, w) // unlocks a.mu
	}
	if w.r != nil {
		w.r.dirty = true
	}
	a.mu.Unlock()
	if w.r == nil {
		// The write may have happened. When the caller gave up, the
		// store is probably fine: retry the removal at once.
		a.addOrphan(w.k, ctx.Err() != nil)
	}
	return a.backendError(ctx, "register", err, "name", w.k.name, "addr", w.k.addr)
}

// keepWrite makes s the holder of w's registration after a successful
// store write, with the attributes written and a fresh heartbeat; it
// withdraws the write instead if s was closed meanwhile and never held
// it. It is called with a.mu held and unlocks it.
func (s *Session) keepWrite(ctx context.Context, w *regWrite) error {
	a, k, r := s.a, w.k, w.r
	delete(a.orphans, k)
	if a.closed {
		a.mu.Unlock()
		return errShutdown
	}
	if r != nil && a.regs[k] != r {
		// Forgotten during the write (lostToAnother): this write took it
		// back, as a new registration of s.
		r = nil
	}
	if r == nil && s.closed {
		// Close ran while we were writing (the connection died): it
		// cannot have seen this registration, so withdraw it here, even
		// though ctx has most likely ended with the connection.
		a.mu.Unlock()
		_ = a.removeNow(ctx, k)
		return errSessionClosed
	}
	if r == nil {
		r = &registration{key: k, owner: s}
		a.regs[k] = r
		s.regs[k] = struct{}{}
	} else if r.owner != s && !s.closed {
		delete(r.owner.regs, k)
		r.owner = s
		s.regs[k] = struct{}{}
	}
	// A registration that stays with its owner because s was closed
	// meanwhile keeps the attributes just written.
	r.attrs = w.attrs
	r.dirty = false
	a.beatLocked(r)
	closed := s.closed
	a.mu.Unlock()
	if closed {
		return errSessionClosed
	}
	return nil
}

// refreshLocked handles a Register that needs no store write: s holds k
// with the same attributes. It refreshes the heartbeat. It refuses (done,
// with an error) a Register the ownership rules refuse. done reports
// whether the Register is complete (successfully or with err).
func (s *Session) refreshLocked(k regKey, attrs map[string]string) (done bool, err error) {
	if err := s.usableLocked(); err != nil {
		return true, err
	}
	r := s.a.regs[k]
	if r != nil {
		if err := s.ownerErrLocked(k, r, true); err != nil {
			return true, err
		}
	}
	// A takeover goes to the store even with the same attributes: the
	// registration may have been taken over through another agent since
	// the former owner registered it (backend.Claimer).
	if r == nil || r.dirty || r.owner != s || !maps.Equal(r.attrs, attrs) {
		return false, nil
	}
	s.a.beatLocked(r)
	return true, nil
}

// ownerErrLocked returns why s may not act on r, which another session
// owns (nil when s owns it, or may take it over by registering).
func (s *Session) ownerErrLocked(k regKey, r *registration, takeover bool) error {
	switch {
	case r.owner == s:
		return nil
	case s.kept:
		return api.Errorf(api.CodeConflict, "%s/%s is held by another session (a connection or an HTTP registration); a checked registration does not take it over", k.name, k.addr)
	case s.shared && !r.owner.shared:
		return api.Errorf(api.CodeConflict, "%s/%s is registered by a connection (RPC); an HTTP request cannot take it over or remove it", k.name, k.addr)
	case s.shared && r.owner.kept:
		return api.Errorf(api.CodeConflict, "%s/%s is a checked registration, kept by the agent; an HTTP request without its check cannot take it over or remove it", k.name, k.addr)
	case takeover:
		return nil
	}
	return api.Errorf(api.CodePermissionDenied, "%s/%s belongs to another session (the one that registered it last)", k.name, k.addr)
}

// reserveLocked counts one more registration against the session's cap.
func (s *Session) reserveLocked() error {
	if s.max >= 0 && len(s.regs)+s.pending >= s.max {
		return api.Errorf(api.CodeResourceExhausted, "too many registrations on this connection: the limit is %d", s.max)
	}
	s.pending++
	return nil
}

// Heartbeat marks the registration args.Name/args.Addr alive (a ":port"
// address is expanded as in Register). It never writes to the store and
// does not block. Errors: *api.Error with CodeNotFound when the agent does
// not hold the registration (it expired or was never made: register it
// again), CodePermissionDenied when another session owns it
// (CodeConflict for a shared session), CodeInvalidArgument for ":port"
// without ExternalIP (args must pass api.Args.ValidateKey),
// CodeUnavailable when the session or agent is closed.
func (s *Session) Heartbeat(ctx context.Context, args api.Args) error {
	k, err := s.key(args)
	if err != nil {
		return err
	}
	a := s.a
	a.mu.Lock()
	defer a.mu.Unlock()
	if err := s.usableLocked(); err != nil {
		return err
	}
	r := a.regs[k]
	if r == nil {
		return notFound(k)
	}
	if err := s.ownerErrLocked(k, r, false); err != nil {
		return err
	}
	a.beatLocked(r)
	return nil
}

func notFound(k regKey) error {
	return api.Errorf(api.CodeNotFound, "unknown registration %s/%s; register it again", k.name, k.addr)
}

// Unregister removes the registration args.Name/args.Addr (a ":port"
// address is expanded as in Register) from the store at once. Only its
// owner may: another session gets CodePermissionDenied (a shared session
// CodeConflict), and nothing changes. A key the agent no longer holds but
// still has to remove from the store (an orphan) may be removed by any
// session.
//
// It may wait for another store operation on the same registration; ctx
// bounds that wait. Once the registration is dropped from memory, the
// store removal is no longer bound by ctx but by an internal timeout (a
// few seconds), so that a caller giving up leaves nothing behind. It
// returns nil once the store acknowledged the removal; as for Register, a
// lookup on this agent that follows does not show it. Errors, and what
// the agent holds after each:
//   - CodeInvalidArgument (":port" without ExternalIP; args must pass
//     api.Args.ValidateKey): nothing changed.
//   - CodeNotFound: the agent did not hold it (nor a removal to retry).
//   - ctx.Err(): ctx ended while waiting; nothing changed, the agent holds
//     the registration if it did.
//   - CodeUnavailable "session closed" or "agent shutting down": nothing
//     changed (a registration owned by another session stays with it).
//   - CodeUnavailable "store unavailable": the agent no longer holds the
//     registration and keeps retrying its removal in the background.
func (s *Session) Unregister(ctx context.Context, args api.Args) error {
	k, err := s.key(args)
	if err != nil {
		return err
	}
	a := s.a
	unlock, err := a.lockKey(ctx, k)
	if err != nil {
		return err
	}
	defer unlock()
	a.mu.Lock()
	if err := s.usableLocked(); err != nil {
		a.mu.Unlock()
		return err
	}
	r := a.regs[k]
	_, orphan := a.orphans[k]
	if r == nil && !orphan {
		a.mu.Unlock()
		return notFound(k)
	}
	if r != nil {
		if err := s.ownerErrLocked(k, r, false); err != nil {
			a.mu.Unlock()
			return err
		}
		a.forgetLocked(k, r)
	}
	a.mu.Unlock()
	if err := a.removeNow(ctx, k); err != nil {
		return err
	}
	a.noteLocal(k, nil, false)
	return nil
}

// forgetLocked drops the registration k from the agent and its owner.
func (a *Agent) forgetLocked(k regKey, r *registration) {
	delete(a.regs, k)
	delete(r.owner.regs, k)
	a.expiry.remove(r)
}

// Close unregisters every registration the session owns and ends the
// session; later calls fail with CodeUnavailable. It drops the
// registrations from memory and blocks until the store acknowledged their
// removals, made several at once; each is bounded by an internal timeout.
// If the store fails, the remaining removals are not attempted: they are
// logged once and retried by the agent in the background. After
// Agent.Close it only marks the session closed. It is idempotent.
func (s *Session) Close() {
	a := s.a
	a.mu.Lock()
	if s.closed {
		a.mu.Unlock()
		return
	}
	s.closed = true
	if a.closed {
		a.mu.Unlock()
		return
	}
	a.sessions--
	keys := make([]regKey, 0, len(s.regs))
	for k := range s.regs {
		keys = append(keys, k)
	}
	a.mu.Unlock()
	if len(keys) > 0 {
		a.removeBatch("session close", keys, s.prepareRelease, true)
	}
}

// prepareRelease drops k from memory if s still owns it, and reports
// whether it must be removed from the store. The caller holds k's key
// lock.
func (s *Session) prepareRelease(k regKey) bool {
	a := s.a
	a.mu.Lock()
	defer a.mu.Unlock()
	r := a.regs[k]
	if a.closed || r == nil || r.owner != s {
		return false
	}
	a.forgetLocked(k, r)
	return true
}
