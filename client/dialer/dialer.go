// Package dialer connects to services by their discoverd name: Dial("tcp",
// "api:80") connects to an online instance of the service "api", and
// NewHTTPClient returns an *http.Client whose requests to http://api/...
// go to the instances of "api".
//
//	d := dialer.New(client, nil)
//	defer d.Close()
//	conn, err := d.Dial("tcp", "api") // or "api:8080": the port is ignored
//
// # Naming rule
//
// The address given to Dial is "NAME" or "NAME:PORT". If NAME is an IP
// address literal, the address is dialled as is. Otherwise NAME is a
// discoverd service name, PORT is ignored, and the connection goes to the
// registered address (host and port) of one of the service's online
// instances, chosen at random; if it refuses, the others are tried in
// random order until one accepts. There is no DNS fallback: "localhost" is
// a service name like any other.
package dialer

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"sync"

	discoverd "github.com/flynn/discoverd/client"
)

// ErrNoInstances is returned (wrapped) by Dial when the service has no
// online instance.
var ErrNoInstances = errors.New("dialer: no online instance")

// DialFunc dials a resolved address, as net.Dial does.
type DialFunc func(network, addr string) (net.Conn, error)

// Dialer dials discoverd service names. Its methods are safe for
// concurrent use.
type Dialer interface {
	// Dial connects to an instance of the service named by addr (see the
	// package doc for the naming rule). It blocks until connected; the
	// first Dial of a name also waits for the agent's view of it.
	Dial(network, addr string) (net.Conn, error)
	// DialContext is Dial bounded by ctx.
	DialContext(ctx context.Context, network, addr string) (net.Conn, error)
	// Close closes the ServiceSets the dialer opened.
	Close() error
}

// New returns a Dialer that resolves names through c and connects with
// dial, or with a net.Dialer when dial is nil. It keeps one ServiceSet per
// name it has dialled, until Close (or c's Close).
func New(c *discoverd.Client, dial DialFunc) Dialer {
	d := &dialer{c: c, sets: make(map[string]*entry)}
	if dial != nil {
		d.dial = func(_ context.Context, network, addr string) (net.Conn, error) { return dial(network, addr) }
	} else {
		var nd net.Dialer
		d.dial = nd.DialContext
	}
	return d
}

// NewHTTPClient returns an *http.Client whose transport dials through a
// Dialer of c, so that http://NAME/ and http://NAME:PORT/ reach the
// instances of the service NAME. The Dialer's ServiceSets live until c is
// closed. The transport uses no proxy.
func NewHTTPClient(c *discoverd.Client) *http.Client {
	t := http.DefaultTransport.(*http.Transport).Clone()
	t.Proxy = nil
	t.DialContext = New(c, nil).DialContext
	return &http.Client{Transport: t}
}

type dialer struct {
	c    *discoverd.Client
	dial func(ctx context.Context, network, addr string) (net.Conn, error)

	mu     sync.Mutex
	sets   map[string]*entry
	closed bool
}

// entry is one name's ServiceSet, created once by the first Dial of it.
type entry struct {
	ready chan struct{} // closed when set or err is set
	set   discoverd.ServiceSet
	err   error
}

func (d *dialer) Dial(network, addr string) (net.Conn, error) {
	return d.DialContext(context.Background(), network, addr)
}

func (d *dialer) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	name := addr
	if host, _, err := net.SplitHostPort(addr); err == nil {
		name = host
	}
	if _, err := netip.ParseAddr(name); err == nil {
		return d.dial(ctx, network, addr)
	}
	set, err := d.set(ctx, name)
	if err != nil {
		return nil, fmt.Errorf("dialer: %s: %w", addr, err)
	}
	addrs := set.Addrs()
	if len(addrs) == 0 {
		return nil, fmt.Errorf("dialer: service %q: %w", name, ErrNoInstances)
	}
	rand.Shuffle(len(addrs), func(i, j int) { addrs[i], addrs[j] = addrs[j], addrs[i] })
	var errs []error
	for _, a := range addrs {
		conn, err := d.dial(ctx, network, a)
		if err == nil {
			return conn, nil
		}
		errs = append(errs, err)
		if ctx.Err() != nil {
			break
		}
	}
	return nil, fmt.Errorf("dialer: service %q: %w", name, errors.Join(errs...))
}

// set returns the ServiceSet of name, opening it on first use. A failed
// open is not cached.
func (d *dialer) set(ctx context.Context, name string) (discoverd.ServiceSet, error) {
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		return nil, errors.New("dialer is closed")
	}
	e, ok := d.sets[name]
	if !ok {
		e = &entry{ready: make(chan struct{})}
		d.sets[name] = e
	}
	d.mu.Unlock()
	if !ok {
		e.set, e.err = d.c.NewServiceSet(name)
		d.mu.Lock()
		if e.err != nil {
			delete(d.sets, name)
		} else if d.closed {
			e.set.Close()
			e.set, e.err = nil, errors.New("dialer is closed")
		}
		d.mu.Unlock()
		close(e.ready)
	}
	select {
	case <-e.ready:
		return e.set, e.err
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

func (d *dialer) Close() error {
	d.mu.Lock()
	d.closed = true
	sets := d.sets
	d.sets = make(map[string]*entry)
	d.mu.Unlock()
	for _, e := range sets {
		select {
		case <-e.ready:
			if e.set != nil {
				e.set.Close()
			}
		default: // still opening: set() closes it when it sees d.closed
		}
	}
	return nil
}
