package discoverd

import (
	"context"
	"errors"
	"maps"
	"net"
	"slices"
	"sync"
	"time"

	"github.com/flynn/discoverd/api"
	"github.com/flynn/discoverd/api/retry"
	"github.com/flynn/discoverd/rpc"
)

// ServiceUpdate is one change to a service: an instance online (new, or
// with new attributes) or offline. It is the agent's wire type
// (agent.ServiceUpdate in go-discoverd programs is the same type).
type ServiceUpdate = api.ServiceUpdate

// Service is one online instance of a service.
type Service struct {
	// Created is the agent store's creation index of the registration:
	// stable while the registration lives, strictly larger for a later one.
	// The leader is the instance with the smallest Created, so a leader can
	// hand its Created to the resources it writes as a fencing token: a
	// write carrying a smaller token than one already seen comes from a
	// deposed leader and can be refused.
	Created uint
	Name    string
	Host    string
	Port    string
	Addr    string
	Attrs   map[string]string
}

// A ServiceSet is a live view of the online instances of one service,
// kept current by a subscription to the agent (and restored after a
// reconnection). Every process that watches the same service with the same
// filter agrees on its Leader: the oldest instance.
//
// All methods are safe for concurrent use and never block on the agent.
// Channels returned by Watch and Leaders never stall the set: each has a
// bounded buffer, and a watcher that falls behind is dealt with as the
// methods describe. Every such channel is closed when the set is closed.
type ServiceSet interface {
	// SelfAddr returns the (expanded) address this set's client registered
	// through RegisterWithSet, or "" for a plain NewServiceSet.
	SelfAddr() string

	// Leader returns the oldest instance in the set (which may be this
	// client's own registration), or nil if the set is empty.
	Leader() *Service

	// Leaders returns a channel that first receives the current leader,
	// then the new leader each time it changes (a nil *Service when the set
	// becomes empty). A new Created for the same address is a new leader.
	// The channel keeps the 16 most recent leaders: if the reader falls
	// that far behind, the oldest are dropped, so the last value received
	// is always the current leader.
	Leaders() chan *Service

	// Services returns the instances in the set, oldest first, leaving out
	// this client's own registration (RegisterWithSet). The result is a
	// copy the caller may keep and modify.
	Services() []*Service

	// Addrs returns the addresses of Services, in the same order.
	Addrs() []string

	// Select returns the instances of Services whose attributes include
	// every key and value of attrs, oldest first.
	Select(attrs map[string]string) []*Service

	// Filter restricts the set to the instances whose attributes include
	// every key and value of attrs (nil or empty: no restriction). The set
	// keeps the unfiltered view, so widening a filter brings instances
	// back. Watchers receive an offline update for each instance that
	// leaves the set and an online update for each one that joins it.
	Filter(attrs map[string]string)

	// Watch returns a channel of the changes to the set: an online update
	// when an instance joins it or changes its attributes, an offline update
	// when one leaves. With bringCurrent, the channel first holds an online
	// update for every instance already in the set, oldest first. The
	// updates include this client's own registration and are shared with
	// other watchers: do not modify them.
	//
	// The channel buffers Config.WatchBuffer updates beyond the current
	// ones. A watcher that falls further behind is cut off: its channel is
	// closed (after the updates already queued) and a warning is logged; it
	// may Watch again with bringCurrent to resynchronise. The set and the
	// other watchers are never slowed by it.
	Watch(bringCurrent bool) chan *ServiceUpdate

	// Unwatch stops and closes a channel returned by Watch. Channels that
	// are unknown, already cut off or already closed are ignored.
	Unwatch(chan *ServiceUpdate)

	// Close stops the set: its subscription ends and every channel returned
	// by Watch and Leaders is closed. It does not block and is idempotent;
	// it returns nil.
	Close() error
}

// leaderBuffer is the capacity of a Leaders channel.
const leaderBuffer = 16

type serviceSet struct {
	c        *Client
	name     string
	selfAddr string
	ctx      context.Context // cancelled by Close
	cancel   context.CancelFunc
	ready    chan error    // the first snapshot's outcome
	selfSeen chan struct{} // closed when selfAddr is first seen online

	mu       sync.Mutex
	all      map[string]*ServiceUpdate // every online instance, by addr (unfiltered)
	filter   map[string]string
	watchers map[chan *ServiceUpdate]struct{}
	leaders  map[chan *Service]struct{}
	leader   *Service      // the last leader announced to Leaders
	standby  chan *Service // RegisterAndStandby: fired once when self leads
	seenSelf bool
	closed   bool
}

var _ ServiceSet = (*serviceSet)(nil)

// NewServiceSet subscribes to the instances of name and returns a set that
// holds them all. It blocks until the agent has sent the current instances
// (at most Config.CallTimeout). It fails with ErrDisconnected while the
// client is reconnecting, ErrClosed after Close, or the agent's error
// (e.g. CodeInvalidArgument for a bad name).
func (c *Client) NewServiceSet(name string) (ServiceSet, error) {
	return c.newServiceSet(name, "")
}

func (c *Client) newServiceSet(name, selfAddr string) (*serviceSet, error) {
	conn := c.current()
	ctx, cancel := context.WithCancel(c.ctx)
	s := &serviceSet{
		c:        c,
		name:     name,
		selfAddr: selfAddr,
		ctx:      ctx,
		cancel:   cancel,
		ready:    make(chan error, 1),
		selfSeen: make(chan struct{}),
		all:      make(map[string]*ServiceUpdate),
		watchers: make(map[chan *ServiceUpdate]struct{}),
		leaders:  make(map[chan *Service]struct{}),
	}
	sub, err := c.subscribe(ctx, conn, name)
	if err != nil {
		cancel()
		return nil, err
	}
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		cancel()
		sub.stop()
		return nil, ErrClosed
	}
	c.sets[s] = struct{}{}
	c.wg.Add(1)
	c.mu.Unlock()
	go s.run(conn, sub)

	t := time.NewTimer(c.cfg.CallTimeout)
	defer t.Stop()
	select {
	case err = <-s.ready:
	case <-ctx.Done():
		select {
		case err = <-s.ready: // run reported, then closed the set
		default:
			err = ErrClosed
		}
	case <-t.C:
		err = timeoutError("subscribe " + name)
	}
	if err != nil {
		s.Close()
		return nil, err
	}
	return s, nil
}

func (c *Client) isClosed() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.closed
}

var errStopped = errors.New("stopped")

// run owns the set's subscription: it applies updates, and when the
// stream ends it resubscribes (on a new connection if the old one died),
// until the set or the client is closed.
func (s *serviceSet) run(conn *rpc.Client, sub *subscription) {
	defer s.c.wg.Done()
	defer s.Close()
	first := true
	b := retry.Backoff{Min: s.c.cfg.MinBackoff, Max: s.c.cfg.MaxBackoff}
	for {
		current, err := s.consume(sub, first)
		if err == errStopped {
			return
		}
		if first && !current {
			s.ready <- err
			return
		}
		if current {
			b.Reset()
		}
		first = false
		s.c.log.Warn("discoverd: subscription ended; resubscribing", "name", s.name, "err", err)
		for {
			select {
			case <-conn.Done():
				if conn = s.c.waitConn(s.ctx.Done(), conn); conn == nil {
					return
				}
			default:
				// The stream ended on a live connection (the agent cut us
				// off, or is shutting down): retry after a pause.
				if !sleep(s.ctx.Done(), retry.Jitter(b.Next())) {
					return
				}
			}
			if sub, err = s.c.subscribe(s.ctx, conn, s.name); err == nil {
				break
			}
			s.c.log.Warn("discoverd: resubscribe failed", "name", s.name, "err", err)
		}
	}
}

// consume reads one subscription until it ends. The snapshot part is
// collected and then reconciled with the set's view, so a resubscription
// reports only what changed. It reports whether the snapshot completed.
func (s *serviceSet) consume(sub *subscription, first bool) (current bool, err error) {
	snapshot := make(map[string]*ServiceUpdate)
	for {
		select {
		case u, ok := <-sub.ch:
			if !ok {
				if s.ctx.Err() != nil {
					return current, errStopped
				}
				return current, sub.err()
			}
			switch {
			case u == nil:
			case !current && u.IsSentinel():
				current = true
				s.reconcile(snapshot)
				snapshot = nil
				if first {
					s.ready <- nil
				}
			case !current && u.Online:
				snapshot[u.Addr] = u
			case !current:
				delete(snapshot, u.Addr)
			case u.IsSentinel():
			default:
				s.apply(u)
			}
		case <-s.ctx.Done():
			sub.stop()
			return current, errStopped
		}
	}
}

// reconcile replaces the view with snapshot and notifies the differences.
func (s *serviceSet) reconcile(snapshot map[string]*ServiceUpdate) {
	s.mu.Lock()
	defer s.mu.Unlock()
	gone, put := api.Diff(s.all, snapshot)
	for _, addr := range gone {
		s.changeLocked(s.all[addr], nil)
	}
	for _, addr := range put {
		s.putLocked(snapshot[addr])
	}
	s.leaderChangedLocked()
}

// apply applies one live update.
func (s *serviceSet) apply(u *ServiceUpdate) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if u.Online {
		s.putLocked(u)
	} else {
		s.changeLocked(s.all[u.Addr], nil)
	}
	s.leaderChangedLocked()
}

// putLocked applies u, an online instance, by the rule of api.Classify:
// nothing when unchanged, the old registration's removal first when
// replaced.
func (s *serviceSet) putLocked(u *ServiceUpdate) {
	switch old, c := api.Classify(s.all, u.Addr, u); c {
	case api.Unchanged:
	case api.Replaced:
		s.changeLocked(old, nil)
		s.changeLocked(nil, u)
	default:
		s.changeLocked(old, u)
	}
}

// changeLocked moves one instance from old to new (either may be nil)
// and tells the watchers what that means for the filtered set.
func (s *serviceSet) changeLocked(old, new *ServiceUpdate) {
	switch {
	case new != nil:
		s.all[new.Addr] = new
		if new.Addr == s.selfAddr && !s.seenSelf {
			s.seenSelf = true
			close(s.selfSeen)
		}
	case old != nil:
		delete(s.all, old.Addr)
	default:
		return
	}
	wasIn := old != nil && s.matchLocked(old)
	isIn := new != nil && s.matchLocked(new)
	switch {
	case isIn:
		s.notifyLocked(clone(new, true))
	case wasIn:
		s.notifyLocked(clone(old, false))
	}
}

func clone(u *ServiceUpdate, online bool) *ServiceUpdate {
	c := *u
	c.Online = online
	c.Attrs = maps.Clone(u.Attrs)
	return &c
}

func (s *serviceSet) matchLocked(u *ServiceUpdate) bool { return matches(u.Attrs, s.filter) }

func matches(attrs, want map[string]string) bool {
	for k, v := range want {
		if got, ok := attrs[k]; !ok || got != v {
			return false
		}
	}
	return true
}

// notifyLocked queues u for every watcher, cutting off those that are full.
func (s *serviceSet) notifyLocked(u *ServiceUpdate) {
	for ch := range s.watchers {
		select {
		case ch <- u:
		default:
			delete(s.watchers, ch)
			close(ch)
			s.c.log.Warn("discoverd: a ServiceSet watcher fell behind; its channel is closed", "name", s.name, "buffer", cap(ch))
		}
	}
}

// viewLocked returns the filtered set, oldest first, self included.
func (s *serviceSet) viewLocked() []*ServiceUpdate {
	view := make([]*ServiceUpdate, 0, len(s.all))
	for _, u := range s.all {
		if s.matchLocked(u) {
			view = append(view, u)
		}
	}
	sortByAge(view)
	return view
}

// leaderChangedLocked announces a new leader to Leaders channels and fires
// the standby channel when this client's registration leads.
func (s *serviceSet) leaderChangedLocked() {
	l := s.leaderLocked()
	same := (l == nil && s.leader == nil) ||
		(l != nil && s.leader != nil && l.Addr == s.leader.Addr && l.Created == s.leader.Created)
	if same {
		return
	}
	s.leader = l
	for ch := range s.leaders {
		sendLatest(ch, copyService(l))
	}
	if s.standby != nil && l != nil && l.Addr == s.selfAddr {
		s.standby <- copyService(l) // buffered, sent once
		close(s.standby)
		s.standby = nil
		s.closeLocked()
	}
}

// sendLatest sends v on ch, dropping the oldest queued value if ch is full.
// Callers are ch's only sender and hold a lock, so the second try succeeds.
func sendLatest[T any](ch chan T, v T) {
	for range 2 {
		select {
		case ch <- v:
			return
		default:
		}
		select {
		case <-ch:
		default:
		}
	}
}

func (s *serviceSet) leaderLocked() *Service {
	var oldest *ServiceUpdate
	for _, u := range s.all {
		if s.matchLocked(u) && (oldest == nil || older(u, oldest)) {
			oldest = u
		}
	}
	if oldest == nil {
		return nil
	}
	return toService(oldest)
}

func older(a, b *ServiceUpdate) bool { return a.Age().Compare(b.Age()) < 0 }

func sortByAge(us []*ServiceUpdate) {
	slices.SortFunc(us, func(a, b *ServiceUpdate) int { return a.Age().Compare(b.Age()) })
}

func byAge(m map[string]*ServiceUpdate) []*ServiceUpdate {
	us := slices.Collect(maps.Values(m))
	sortByAge(us)
	return us
}

func toService(u *ServiceUpdate) *Service {
	host, port, _ := net.SplitHostPort(u.Addr)
	return &Service{Created: u.Created, Name: u.Name, Host: host, Port: port, Addr: u.Addr, Attrs: maps.Clone(u.Attrs)}
}

func copyService(s *Service) *Service {
	if s == nil {
		return nil
	}
	c := *s
	c.Attrs = maps.Clone(s.Attrs)
	return &c
}

func (s *serviceSet) SelfAddr() string { return s.selfAddr }

func (s *serviceSet) Leader() *Service {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.leaderLocked()
}

func (s *serviceSet) Leaders() chan *Service {
	ch := make(chan *Service, leaderBuffer)
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		close(ch)
		return ch
	}
	ch <- s.leaderLocked()
	s.leaders[ch] = struct{}{}
	return ch
}

func (s *serviceSet) Services() []*Service {
	return s.Select(nil)
}

func (s *serviceSet) Addrs() []string {
	services := s.Services()
	addrs := make([]string, len(services))
	for i, svc := range services {
		addrs[i] = svc.Addr
	}
	return addrs
}

func (s *serviceSet) Select(attrs map[string]string) []*Service {
	s.mu.Lock()
	defer s.mu.Unlock()
	var list []*Service
	for _, u := range s.viewLocked() {
		if u.Addr != s.selfAddr && matches(u.Attrs, attrs) {
			list = append(list, toService(u))
		}
	}
	return list
}

func (s *serviceSet) Filter(attrs map[string]string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	old := s.filter
	s.filter = maps.Clone(attrs)
	for _, u := range byAge(s.all) {
		wasIn, isIn := matches(u.Attrs, old), s.matchLocked(u)
		switch {
		case isIn && !wasIn:
			s.notifyLocked(clone(u, true))
		case wasIn && !isIn:
			s.notifyLocked(clone(u, false))
		}
	}
	s.leaderChangedLocked()
}

func (s *serviceSet) Watch(bringCurrent bool) chan *ServiceUpdate {
	s.mu.Lock()
	defer s.mu.Unlock()
	var view []*ServiceUpdate
	if bringCurrent {
		view = s.viewLocked()
	}
	ch := make(chan *ServiceUpdate, len(view)+s.c.cfg.WatchBuffer)
	if s.closed {
		close(ch)
		return ch
	}
	for _, u := range view {
		ch <- clone(u, true)
	}
	s.watchers[ch] = struct{}{}
	return ch
}

func (s *serviceSet) Unwatch(ch chan *ServiceUpdate) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.watchers[ch]; ok {
		delete(s.watchers, ch)
		close(ch)
	}
}

func (s *serviceSet) Close() error {
	s.mu.Lock()
	s.closeLocked()
	s.mu.Unlock()
	s.c.mu.Lock()
	delete(s.c.sets, s)
	s.c.mu.Unlock()
	return nil
}

func (s *serviceSet) closeLocked() {
	if s.closed {
		return
	}
	s.closed = true
	s.cancel()
	for ch := range s.watchers {
		close(ch)
	}
	clear(s.watchers)
	for ch := range s.leaders {
		close(ch)
	}
	clear(s.leaders)
	if s.standby != nil {
		close(s.standby)
		s.standby = nil
	}
}
