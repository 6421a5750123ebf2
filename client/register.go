package discoverd

import (
	"context"
	"maps"
	"strings"
	"sync"
	"time"

	"github.com/flynn/discoverd/api"
	"github.com/flynn/discoverd/rpc"
)

type regKey struct{ name, addr string }

// registration is one instance this client keeps online.
type registration struct {
	name, addr string // as the application gave them

	mu       sync.Mutex // serialises this registration's calls to the agent
	attrs    map[string]string
	gone     bool   // unregistered; heartbeats and restores skip it
	expanded string // guarded by Client.mu: the address the agent stored (":port" expanded)
}

func (c *Client) setExpanded(r *registration, addr string) {
	c.mu.Lock()
	r.expanded = addr
	c.mu.Unlock()
}

// Register announces the instance addr of service name, with no
// attributes. See RegisterWithAttributes.
func (c *Client) Register(name, addr string) error {
	return c.RegisterWithAttributes(name, addr, nil)
}

// RegisterWithAttributes announces the instance addr of service name with
// the given attributes (nil is fine) and keeps it online: the client
// heartbeats it every HeartbeatInterval and registers it again after a
// reconnection, until Unregister, UnregisterAll or Close. An addr written as
// ":port" is expanded by the agent to EXTERNAL_IP:port. Registering the same
// name and addr again updates the attributes.
//
// It blocks until the agent answers. It fails with ErrDisconnected while the
// client is reconnecting, and with an *api.Error (CodeInvalidArgument,
// CodeResourceExhausted, ...) when the agent refuses the registration.
func (c *Client) RegisterWithAttributes(name, addr string, attributes map[string]string) error {
	_, err := c.register(name, addr, attributes)
	return err
}

// RegisterInstance is RegisterWithAttributes that also returns the
// address the agent stored: addr itself, or EXTERNAL_IP:port for an addr
// written as ":port". It makes no subscription (RegisterWithSet returns
// the same address as SelfAddr, but subscribes to the whole service).
// The registration is kept online, and withdrawn by Unregister with either
// address, exactly as with RegisterWithAttributes. Errors are those of
// RegisterWithAttributes.
func (c *Client) RegisterInstance(name, addr string, attributes map[string]string) (expandedAddr string, err error) {
	return c.register(name, addr, attributes)
}

// register registers and returns the expanded address.
func (c *Client) register(name, addr string, attrs map[string]string) (string, error) {
	key := regKey{name, addr}
	attrs = maps.Clone(attrs)
	c.mu.Lock()
	conn, closed, r := c.conn, c.closed, c.regs[key]
	c.mu.Unlock()
	if closed {
		return "", ErrClosed
	}
	if conn == nil {
		return "", ErrDisconnected
	}
	if r == nil {
		r = &registration{name: name, addr: addr}
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.gone { // unregistered while we waited for r.mu: start afresh
		r = &registration{name: name, addr: addr}
		r.mu.Lock()
		defer r.mu.Unlock()
	}
	expanded, err := c.registerCall(conn, name, addr, attrs)
	if err != nil {
		return "", err
	}
	r.attrs = attrs
	c.mu.Lock()
	r.expanded = expanded
	if c.closed {
		c.mu.Unlock()
		return "", ErrClosed
	}
	c.regs[key] = r
	now := c.conn
	c.mu.Unlock()
	// The connection may have been replaced while the call was in flight,
	// after the supervisor restored the registrations it knew of.
	if now != nil && now != conn {
		if e, err := c.registerCall(now, name, addr, attrs); err == nil {
			c.setExpanded(r, e)
		}
	}
	return expanded, nil
}

// registerCall calls Agent.Register on conn, bounded by CallTimeout, and
// returns the expanded address.
func (c *Client) registerCall(conn *rpc.Client, name, addr string, attrs map[string]string) (string, error) {
	ctx, cancel := context.WithTimeout(c.ctx, c.cfg.CallTimeout)
	defer cancel()
	return c.registerCtx(ctx, conn, name, addr, attrs)
}

// registerCtx is registerCall bounded by ctx.
func (c *Client) registerCtx(ctx context.Context, conn *rpc.Client, name, addr string, attrs map[string]string) (string, error) {
	var expanded string
	err := c.callCtx(ctx, conn, "register "+name+" "+addr, api.MethodRegister, &api.Args{Name: name, Addr: addr, Attrs: attrs}, &expanded)
	if err != nil {
		return "", err
	}
	if expanded == "" {
		expanded = addr // an agent that does not report the expanded address
	}
	return expanded, nil
}

// Unregister withdraws the registration name/addr (addr as given to
// Register, or as expanded by the agent) and stops its heartbeats. It
// returns ErrUnknownRegistration if this client did not register it.
// While the client is disconnected it only forgets the registration (the
// agent withdraws it by itself when it sees the connection close, or after
// its TTL) and returns nil. It blocks until the agent answers.
func (c *Client) Unregister(name, addr string) error {
	c.mu.Lock()
	r := c.regs[regKey{name, addr}]
	if r == nil {
		for _, x := range c.regs {
			if x.name == name && x.expanded == addr {
				r = x
				break
			}
		}
	}
	if r != nil {
		delete(c.regs, regKey{r.name, r.addr})
	}
	c.mu.Unlock()
	if r == nil {
		return ErrUnknownRegistration
	}
	return c.withdraw(r)
}

func (c *Client) withdraw(r *registration) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.gone = true
	conn := c.current()
	if conn == nil {
		return nil
	}
	err := c.call(conn, "unregister "+r.name+" "+r.addr, api.MethodUnregister, &api.Args{Name: r.name, Addr: r.addr}, &struct{}{})
	if api.ErrorCode(err) == api.CodeNotFound || (err != nil && c.current() == nil) {
		return nil // already gone from the agent
	}
	return err
}

// UnregisterAll withdraws every registration of this client. It tries
// them all and returns the first error.
func (c *Client) UnregisterAll() error {
	c.mu.Lock()
	regs := make([]*registration, 0, len(c.regs))
	for k, r := range c.regs {
		regs = append(regs, r)
		delete(c.regs, k)
	}
	c.mu.Unlock()
	var first error
	for _, r := range regs {
		if err := c.withdraw(r); err != nil && first == nil {
			first = err
		}
	}
	return first
}

func (c *Client) registrations() []*registration {
	c.mu.Lock()
	defer c.mu.Unlock()
	regs := make([]*registration, 0, len(c.regs))
	for _, r := range c.regs {
		regs = append(regs, r)
	}
	return regs
}

// maxInFlight bounds the calls a heartbeat round or a restoration has in
// flight at once. The agent runs up to rpc.DefaultMaxCallsPerConn unary
// calls per connection; this leaves room for the application's own.
const maxInFlight = 32

// parallel runs f(0), ..., f(n-1) on at most maxInFlight goroutines and
// returns when they have all returned.
func parallel(n int, f func(i int)) {
	next := make(chan int)
	var wg sync.WaitGroup
	for range min(n, maxInFlight) {
		wg.Go(func() {
			for i := range next {
				f(i)
			}
		})
	}
	for i := range n {
		next <- i
	}
	close(next)
	wg.Wait()
}

// restoreRegistrations registers everything again on a new connection,
// concurrently, each call bounded by CallTimeout.
func (c *Client) restoreRegistrations(conn *rpc.Client) {
	regs := c.registrations()
	parallel(len(regs), func(i int) {
		r := regs[i]
		r.mu.Lock()
		defer r.mu.Unlock()
		if r.gone {
			return
		}
		if e, err := c.registerCall(conn, r.name, r.addr, r.attrs); err != nil {
			c.log.Warn("discoverd: restoring a registration failed; the heartbeat loop will retry", "name", r.name, "addr", r.addr, "err", err)
		} else {
			c.setExpanded(r, e)
		}
	})
}

func (c *Client) heartbeatLoop() {
	defer c.wg.Done()
	t := time.NewTicker(c.cfg.HeartbeatInterval)
	defer t.Stop()
	for {
		select {
		case <-c.ctx.Done():
			return
		case <-t.C:
		}
		if conn := c.current(); conn != nil {
			c.heartbeatRound(conn)
		} // else the supervisor restores everything on reconnection
	}
}

// heartbeatRound heartbeats every registration on conn at once, then
// registers again, at once, those the agent has forgotten (CodeNotFound),
// or all of them with an agent that predates Agent.Heartbeat (for which
// Agent.Register counts as a heartbeat). Each of the two phases is bounded
// by half a HeartbeatInterval (and by CallTimeout), so a round ends within
// an interval whatever the agent does, and a call that is slow or never
// answered delays no other registration.
func (c *Client) heartbeatRound(conn *rpc.Client) {
	timeout := min(c.cfg.HeartbeatInterval/2, c.cfg.CallTimeout)
	regs := c.registrations()
	forgotten := make([]bool, len(regs))
	ctx, cancel := context.WithTimeout(c.ctx, timeout)
	parallel(len(regs), func(i int) { forgotten[i] = c.heartbeat(ctx, conn, regs[i]) })
	cancel()

	var again []*registration
	for i, r := range regs {
		if forgotten[i] {
			again = append(again, r)
		}
	}
	ctx, cancel = context.WithTimeout(c.ctx, timeout)
	defer cancel()
	parallel(len(again), func(i int) { c.reregister(ctx, conn, again[i]) })
}

// heartbeat sends one Agent.Heartbeat for r and reports whether r must be
// registered again: the agent forgot it, or lacks Agent.Heartbeat.
func (c *Client) heartbeat(ctx context.Context, conn *rpc.Client, r *registration) (again bool) {
	c.mu.Lock()
	legacy := c.legacy && c.conn == conn
	addr := r.expanded
	c.mu.Unlock()
	if legacy {
		return true
	}
	err := c.callCtx(ctx, conn, "heartbeat "+r.name+" "+r.addr, api.MethodHeartbeat, &api.Args{Name: r.name, Addr: addr}, &struct{}{})
	switch {
	case err == nil:
		return false
	case isUnknownMethod(err):
		c.mu.Lock()
		if c.conn == conn {
			c.legacy = true
		}
		c.mu.Unlock()
		return true
	case api.ErrorCode(err) == api.CodeNotFound:
		c.log.Info("discoverd: the agent forgot a registration; registering it again", "name", r.name, "addr", r.addr)
		return true
	case err == ErrClosed, err == ErrDisconnected:
		return false // the supervisor restores the registrations on the next connection
	}
	c.log.Warn("discoverd: heartbeat failed", "name", r.name, "addr", r.addr, "err", err)
	return false
}

// reregister registers r again on conn, unless a call for r is under way
// (a Register, an Unregister or a restoration, which decides r's fate) or
// r was unregistered meanwhile.
func (c *Client) reregister(ctx context.Context, conn *rpc.Client, r *registration) {
	if !r.mu.TryLock() {
		return
	}
	defer r.mu.Unlock()
	if r.gone {
		return
	}
	expanded, err := c.registerCtx(ctx, conn, r.name, r.addr, r.attrs)
	switch {
	case err == nil:
		c.setExpanded(r, expanded)
	case err != ErrClosed && err != ErrDisconnected:
		c.log.Warn("discoverd: heartbeat (register) failed", "name", r.name, "addr", r.addr, "err", err)
	}
}

// isUnknownMethod reports whether err says the agent has no such method
// (an agent older than Agent.Heartbeat). rpcplus-style servers answer
// "rpc: can't find method Agent.Heartbeat".
func isUnknownMethod(err error) bool {
	if err == nil {
		return false
	}
	s := err.Error()
	return strings.Contains(s, "can't find method") || strings.Contains(s, "unknown method") ||
		strings.Contains(s, "can't find service")
}
