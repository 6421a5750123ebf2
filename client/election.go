package discoverd

import (
	"time"
)

// selfWait bounds how long RegisterWithSet waits for the agent to show the
// new registration in the set.
const selfWait = 10 * time.Second

// RegisterWithSet registers addr as an instance of name (as
// RegisterWithAttributes does) and returns a ServiceSet of name in which
// this instance is left out of Services, Addrs and Select, but may be
// returned by Leader and Leaders: compare with SelfAddr to know whether
// this instance leads. This is the building block of leader election
// among the instances of a service.
//
// It blocks until the set holds the agent's current view including this
// instance (or, at most 10 s after the registration, without it). Closing
// the set does not unregister the instance.
func (c *Client) RegisterWithSet(name, addr string, attributes map[string]string) (ServiceSet, error) {
	s, err := c.registerWithSet(name, addr, attributes)
	if err != nil {
		return nil, err
	}
	return s, nil
}

func (c *Client) registerWithSet(name, addr string, attributes map[string]string) (*serviceSet, error) {
	expanded, err := c.register(name, addr, attributes)
	if err != nil {
		return nil, err
	}
	s, err := c.newServiceSet(name, expanded)
	if err != nil {
		_ = c.Unregister(name, addr)
		return nil, err
	}
	t := time.NewTimer(selfWait)
	defer t.Stop()
	select {
	case <-s.selfSeen:
	case <-s.ctx.Done():
	case <-t.C:
	}
	return s, nil
}

// RegisterAndStandby registers addr as an instance of name and returns a
// channel that receives this instance's Service once, when it is (or
// becomes) the leader — the oldest instance of name — and is then closed.
// Use it for a standby mode: wait on the channel, then start serving. The
// channel is closed without a value if the client is closed first. Only
// the client sends on it (the type is go-discoverd's, bidirectional).
//
// The Service's Created is the leader's fencing token. Leadership is not
// reported as lost: if the connection to the agent drops, the instance is
// registered again with a new (larger) Created and is no longer the oldest,
// so a leader should treat ConnStatusDisconnected (WatchReconnects) as the
// end of its term. Use RegisterWithSet and Leaders to follow the leader
// continuously.
func (c *Client) RegisterAndStandby(name, addr string, attributes map[string]string) (chan *Service, error) {
	s, err := c.registerWithSet(name, addr, attributes)
	if err != nil {
		return nil, err
	}
	ch := make(chan *Service, 1)
	s.mu.Lock()
	if s.closed {
		close(ch)
	} else {
		s.standby = ch
		s.leader = nil // re-evaluate: fires at once if self leads
		s.leaderChangedLocked()
	}
	s.mu.Unlock()
	return ch, nil
}

// Services returns the instances of name, oldest first. It waits until at
// least one is online, up to timeout, and then fails with ErrTimeout. It
// opens and closes a ServiceSet; keep a ServiceSet to follow a service.
func (c *Client) Services(name string, timeout time.Duration) ([]*Service, error) {
	s, err := c.NewServiceSet(name)
	if err != nil {
		return nil, err
	}
	defer s.Close()
	updates := s.Watch(true)
	t := time.NewTimer(timeout)
	defer t.Stop()
	for {
		if services := s.Services(); len(services) > 0 {
			return services, nil
		}
		select {
		case _, ok := <-updates:
			if !ok {
				return nil, ErrClosed
			}
		case <-t.C:
			return nil, ErrTimeout
		}
	}
}
