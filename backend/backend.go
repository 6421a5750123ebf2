// Package backend defines the store contract behind the agent: the one
// interface a new store implements to plug into discoverd. The agent
// depends on this package only, never on a concrete store.
//
// A backend holds one liveness session in its store for the whole agent (an
// etcd lease, a ZooKeeper session) and attaches every registration to it, so
// that a dead agent's registrations vanish by themselves after the TTL and
// the agent's per-registration heartbeats never reach the store.
//
//	b, _ := etcd.Open(ctx, etcd.Config{Endpoints: eps, TTL: 10 * time.Second})
//	defer b.Close()
//	_ = b.Register(ctx, "web", "10.0.0.1:80", map[string]string{"v": "1"})
//	s, _ := b.Subscribe(ctx, "web")
//	defer s.Close()
//	for ev := range s.Events() {
//		// Put events for the snapshot, one Current event, then live changes.
//	}
//
// The conformance suite in package backendtest defines what "implements
// the contract" means; a new backend is done when it passes it against a
// real server.
package backend

import (
	"context"
	"errors"

	"github.com/flynn/discoverd/api"
)

// Backend is a consistent store of service registrations. All methods are
// safe for concurrent use. Names, addresses and attributes given to it are
// valid (api.ValidateName, api.ValidateAddr, api.ValidateAttrs): the
// agent's front ends check what callers send, once, and everything after
// them trusts it; a backend need not check again. What a backend reads
// from its store is another matter: anything may have written it.
type Backend interface {
	// Register stores (or replaces the attributes of) the registration
	// name/addr on this backend's session. Re-registering the same
	// name/addr keeps its Created; an event is emitted to subscribers only
	// if the attributes changed. The backend remembers the registration and
	// stores it again if its session is lost and renewed. It blocks until
	// the store acknowledges the write or ctx is done.
	Register(ctx context.Context, name, addr string, attrs map[string]string) error

	// Unregister removes the registration name/addr at once and forgets it.
	// Removing a registration that does not exist is not an error. A
	// registration that another session now owns in the store (it was
	// taken over, through another agent) is left in place: Unregister
	// forgets it and returns ErrNotOwner.
	Unregister(ctx context.Context, name, addr string) error

	// Subscribe starts a stream of the registrations of name. The stream
	// first delivers one Put event per registration that exists, then one
	// Current event, then every change in store order, with nothing lost or
	// reordered between the snapshot and the live part. When the store's
	// history is compacted or the watch breaks, the stream recovers by
	// itself and delivers the difference as ordinary Put and Delete events.
	// It blocks until the stream is set up or ctx is done; ctx does not
	// bound the life of the stream (Close does).
	Subscribe(ctx context.Context, name string) (Stream, error)

	// Ping reports whether the store is reachable now (nil) or why not. It
	// blocks at most until ctx is done.
	Ping(ctx context.Context) error

	// Close ends the backend's session, which removes every registration
	// made through it at once (best effort, bounded in time), ends all its
	// open streams with ErrClosed, and stops its goroutines. It is
	// idempotent.
	Close() error
}

// EventType says what an Event means.
type EventType uint8

const (
	// Put: the instance was registered, or its attributes changed.
	Put EventType = iota + 1
	// Delete: the instance is gone (unregistered, or its session expired).
	// Only Name and Addr of the Instance are guaranteed to be set.
	Delete
	// Current: the snapshot is complete; the events that follow are live.
	// Sent exactly once per stream. The Instance is zero.
	Current
)

func (t EventType) String() string {
	switch t {
	case Put:
		return "put"
	case Delete:
		return "delete"
	case Current:
		return "current"
	}
	return "unknown"
}

// Instance is one registration as the store holds it.
type Instance struct {
	Name  string
	Addr  string
	Attrs map[string]string
	// Created is the registration's fencing token: unique among the
	// registrations of Name, strictly larger for a registration whose
	// Register was acknowledged after this one's, and stable across
	// attribute updates, takeovers (a Register of a name/addr that another
	// session holds) and the backend's restores after a lost session. How
	// it is derived from the store is the backend's business (docs/API.md).
	Created uint64
}

// Age returns in's place in the age order (api.Age).
func (in Instance) Age() api.Age { return api.Age{Created: in.Created, Addr: in.Addr} }

// Version returns in's registration and attributes (api.Versioned), by
// which views of a service tell a change from none.
func (in Instance) Version() api.Version { return api.Version{Created: in.Created, Attrs: in.Attrs} }

// Event is one item of a Stream.
type Event struct {
	Type     EventType
	Instance Instance
}

// Stream is a subscription to one service name.
type Stream interface {
	// Events delivers the stream's events. The channel is closed by the
	// stream when it ends: after Close, or after an error it cannot
	// recover from (see Err). The consumer must keep reading; the backend
	// may buffer but is allowed to block on a reader that stops.
	Events() <-chan Event
	// Err returns why the stream ended: nil after the stream's own Close,
	// ErrClosed after the backend's Close, the cause otherwise. Valid once
	// Events is closed.
	Err() error
	// Close ends the stream and waits for its goroutines to stop. It is
	// idempotent.
	Close() error
}

// ErrClosed is returned by a Backend's methods after Close.
var ErrClosed = errors.New("backend: closed")

// ErrNotOwner is returned by Unregister for a registration that another
// session owns in the store: nothing was deleted.
var ErrNotOwner = errors.New("backend: registration owned by another session")

// Claimer is implemented by a backend that can make sure a registration
// is its own in the store now, taking it over if another session wrote it
// meanwhile, even when Register would write nothing (same attributes as
// it last stored). It is optional; the agent calls it when one of its
// sessions takes over a registration another of its sessions held, since
// that registration may have been taken over through another agent in
// the meantime. It blocks and fails as Register does.
type Claimer interface {
	Claim(ctx context.Context, name, addr string, attrs map[string]string) error
}

// Forgetter is implemented by a backend that can stop holding a
// registration without a store call, so that it does not write it again
// when it restores its session. It is optional; the agent uses it when it
// gives up a registration (expiry, a closed session) while the store is
// unreachable, and removes the key with Unregister once the store is
// back.
type Forgetter interface {
	// Forget drops name/addr from what the backend holds. It does not
	// block on the store.
	Forget(name, addr string)
}

// LossNotifier is implemented by a backend that can tell when it stops
// holding a registration because another session took it over in the
// store (found by its anti-entropy or a restore). It is optional; the
// agent uses it to drop such registrations from memory, so that their
// former owner is no longer answered as if it still held them.
type LossNotifier interface {
	// OnLost sets f, called with each registration the backend dropped,
	// from a backend goroutine, with no lock of the backend held. It is
	// set once, before the backend is used.
	OnLost(f func(name, addr string))
}

// SessionReporter is implemented by a backend that can tell the state of
// its liveness session (an etcd lease, a ZooKeeper session). It is
// optional; the agent exports it as metrics when present.
type SessionReporter interface {
	// SessionState returns the state now. It does not block.
	SessionState() SessionState
}

// SessionState describes a backend's liveness session.
type SessionState struct {
	// Live reports whether the backend holds a session it believes valid.
	// It is false while a lost session is being replaced, and after Close.
	Live bool
	// Established counts the sessions the backend has obtained since Open:
	// 1 at start, one more each time a lost session was replaced (and the
	// backend's registrations written again).
	Established uint64
	// Repairs counts the drift the backend's anti-entropy found and fixed
	// since Open: keys on its session that it no longer held (deleted) and
	// held registrations missing from the store (written again).
	Repairs uint64
	// Lost counts the registrations the backend stopped holding because
	// another session took them over in the store.
	Lost uint64
}
