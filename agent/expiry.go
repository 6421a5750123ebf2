package agent

import "time"

// expiry lists the registrations that can expire (those of sessions that
// are not kept) in the order of their last heartbeat, oldest first. A
// heartbeat moves its registration to the back, so the list stays in that
// order as long as the clock does not go back (the agent's clock is read
// under a.mu for every heartbeat). The janitor's sweep then walks only
// the registrations that expired, from the front, instead of every one
// it holds: at 100,000 registrations a sweep that found none expired
// walked them all under the agent's lock every TTL/4. Its links live in
// the registrations themselves, so a heartbeat allocates nothing.
type expiry struct {
	front, back *registration
}

// beatLocked records a heartbeat of r (a Register or a Heartbeat) at the
// agent's time now. The caller holds a.mu.
func (a *Agent) beatLocked(r *registration) {
	r.beat = a.clock.Now()
	a.expiry.remove(r)
	if !r.owner.kept {
		a.expiry.pushBack(r)
	}
}

// expired returns the keys of the registrations whose last heartbeat is
// more than ttl before now, oldest first.
func (l *expiry) expired(now time.Time, ttl time.Duration) []regKey {
	var keys []regKey
	for r := l.front; r != nil && now.Sub(r.beat) > ttl; r = r.next {
		keys = append(keys, r.key)
	}
	return keys
}

func (l *expiry) pushBack(r *registration) {
	r.prev, r.next, r.listed = l.back, nil, true
	if l.back != nil {
		l.back.next = r
	} else {
		l.front = r
	}
	l.back = r
}

// remove takes r off the list; r need not be on it.
func (l *expiry) remove(r *registration) {
	if !r.listed {
		return
	}
	if r.prev != nil {
		r.prev.next = r.next
	} else {
		l.front = r.next
	}
	if r.next != nil {
		r.next.prev = r.prev
	} else {
		l.back = r.prev
	}
	r.prev, r.next, r.listed = nil, nil, false
}
