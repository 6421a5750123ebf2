package discoverd

import (
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

func (c *Client) expandedAddr(r *registration) string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return r.expanded
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

// register registers and returns the expanded address.
func (c *Client) register(name, addr string, attrs map[string]string) (string, error) {
	key := regKey{name, addr}
	attrs = maps.Clone(attrs)
	c.mu.Lock()
	conn, closed, r := c.conn, c.closed, c.regs[key]
	c.mu.Unlock()
	if closed {
		return "", wireError("register", ErrClosed)
	}
	if conn == nil {
		return "", wireError("register", ErrDisconnected)
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
		return "", wireError("register", ErrClosed)
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

func (c *Client) registerCall(conn *rpc.Client, name, addr string, attrs map[string]string) (string, error) {
	var expanded string
	err := c.call(conn, "register "+name+" "+addr, api.MethodRegister, &api.Args{Name: name, Addr: addr, Attrs: attrs}, &expanded)
	if err == nil && expanded == "" {
		expanded = addr // an agent that does not report the expanded address
	}
	return expanded, err
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

// restoreRegistrations registers everything again on a new connection.
func (c *Client) restoreRegistrations(conn *rpc.Client) {
	for _, r := range c.registrations() {
		r.mu.Lock()
		if !r.gone {
			if e, err := c.registerCall(conn, r.name, r.addr, r.attrs); err != nil {
				c.log.Warn("discoverd: restoring a registration failed; the heartbeat loop will retry", "name", r.name, "addr", r.addr, "err", err)
			} else {
				c.setExpanded(r, e)
			}
		}
		r.mu.Unlock()
	}
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
		conn := c.current()
		if conn == nil {
			continue // the supervisor restores everything on reconnection
		}
		for _, r := range c.registrations() {
			c.heartbeat(conn, r)
		}
	}
}

// heartbeat keeps r alive with Agent.Heartbeat, registering it again when
// the agent has forgotten it (CodeNotFound), and falling back to
// Agent.Register, which counts as a heartbeat, with an agent that predates
// Agent.Heartbeat.
func (c *Client) heartbeat(conn *rpc.Client, r *registration) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.gone {
		return
	}
	c.mu.Lock()
	legacy := c.legacy && c.conn == conn
	c.mu.Unlock()
	if !legacy {
		err := c.call(conn, "heartbeat "+r.name+" "+r.addr, api.MethodHeartbeat, &api.Args{Name: r.name, Addr: c.expandedAddr(r)}, &struct{}{})
		switch {
		case err == nil:
			return
		case api.ErrorCode(err) == api.CodeNotFound && !isUnknownMethod(err):
			c.log.Info("discoverd: the agent forgot a registration; registering it again", "name", r.name, "addr", r.addr)
		case isUnknownMethod(err):
			c.mu.Lock()
			if c.conn == conn {
				c.legacy = true
			}
			c.mu.Unlock()
		default:
			c.log.Warn("discoverd: heartbeat failed", "name", r.name, "addr", r.addr, "err", err)
			return
		}
	}
	if e, err := c.registerCall(conn, r.name, r.addr, r.attrs); err != nil {
		c.log.Warn("discoverd: heartbeat (register) failed", "name", r.name, "addr", r.addr, "err", err)
	} else {
		c.setExpanded(r, e)
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
