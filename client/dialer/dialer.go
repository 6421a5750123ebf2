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
//
// # The cache of names
//
// A Dialer resolves a name through a ServiceSet, which holds one of the
// limited streams of the client's connection to the agent (the agent
// allows api.DefaultMaxStreamsPerConn per connection). So the Dialer keeps
// the sets of at most MaxCachedNames names, closing the least recently
// dialled one to make room, and does not keep the set of a name that has
// no online instance when it is dialled (a later Dial of it asks the
// agent again). A Dialer therefore never holds more than MaxCachedNames
// streams, however many names it is asked for.
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

// MaxCachedNames is how many names a Dialer keeps a ServiceSet for.
const MaxCachedNames = 64

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
// dial, or with a net.Dialer when dial is nil. It keeps the ServiceSets of
// the names it dials as the package doc says, until Close (or c's Close).
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
	sets   map[string]*entry // at most MaxCachedNames
	tick   uint64            // a logical clock for entry.used
	closed bool
}

// entry is one name's ServiceSet, opened by the first Dial of the name.
type entry struct {
	ready chan struct{} // closed when set or err is set
	set   discoverd.ServiceSet
	err   error

	// Guarded by dialer.mu:
	used    uint64 // the dialer's tick at the last Dial of the name
	opened  bool   // set and err are set (ready is being closed)
	dropped bool   // no longer in the cache: whoever dropped it or its opener closes set
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
	e, err := d.entry(ctx, name)
	if err != nil {
		return nil, fmt.Errorf("dialer: %s: %w", addr, err)
	}
	addrs := e.set.Addrs()
	if len(addrs) == 0 {
		d.drop(name, e)
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

var errClosed = errors.New("dialer is closed")

// entry returns the cache entry of name, opening its ServiceSet on first
// use and evicting the least recently used entry when the cache is full.
// A failed open is not cached. The set of the returned entry may have been
// closed since (evicted): its last view is still valid to dial.
func (d *dialer) entry(ctx context.Context, name string) (*entry, error) {
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		return nil, errClosed
	}
	e, ok := d.sets[name]
	var evicted discoverd.ServiceSet
	if !ok {
		if len(d.sets) >= MaxCachedNames {
			evicted = d.evictLocked()
		}
		e = &entry{ready: make(chan struct{})}
		d.sets[name] = e
	}
	d.tick++
	e.used = d.tick
	d.mu.Unlock()
	if evicted != nil {
		evicted.Close()
	}
	if !ok {
		d.open(name, e)
	}
	select {
	case <-e.ready:
		if e.err != nil {
			return nil, e.err
		}
		return e, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// open opens the ServiceSet of e, which this goroutine created.
func (d *dialer) open(name string, e *entry) {
	set, err := d.c.NewServiceSet(name)
	d.mu.Lock()
	switch {
	case err != nil:
		if d.sets[name] == e {
			delete(d.sets, name)
		}
	case d.closed:
		set.Close()
		set, err = nil, errClosed
	case e.dropped: // evicted while opening: serve this Dial, keep nothing
		set.Close()
	}
	e.set, e.err, e.opened = set, err, true
	d.mu.Unlock()
	close(e.ready)
}

// evictLocked drops the least recently dialled entry and returns its set
// for the caller to close (nil if it is still opening: its opener closes
// it).
func (d *dialer) evictLocked() discoverd.ServiceSet {
	var oldest string
	var oe *entry
	for name, e := range d.sets {
		if oe == nil || e.used < oe.used {
			oldest, oe = name, e
		}
	}
	return d.dropLocked(oldest, oe)
}

// dropLocked removes e, the entry of name, from the cache and returns its
// set for the caller to close (nil if e is still opening).
func (d *dialer) dropLocked(name string, e *entry) discoverd.ServiceSet {
	if d.sets[name] == e {
		delete(d.sets, name)
	}
	if e.dropped {
		return nil
	}
	e.dropped = true
	if !e.opened {
		return nil
	}
	return e.set
}

// drop removes e, the entry of name, from the cache and closes its set.
func (d *dialer) drop(name string, e *entry) {
	d.mu.Lock()
	set := d.dropLocked(name, e)
	d.mu.Unlock()
	if set != nil {
		set.Close()
	}
}

func (d *dialer) Close() error {
	d.mu.Lock()
	d.closed = true
	var sets []discoverd.ServiceSet
	for name, e := range d.sets {
		if set := d.dropLocked(name, e); set != nil {
			sets = append(sets, set)
		}
	}
	d.mu.Unlock()
	for _, set := range sets {
		set.Close()
	}
	return nil
}
