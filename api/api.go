// Package api is discoverd's vocabulary: the wire types, the limits, the
// validation rules and the error codes. It imports nothing of ours, so every
// other package (agent, rpc front end, client, backends) speaks in its terms.
//
//	args := api.Args{Name: "web", Addr: "10.0.0.1:8080"}
//	if err := args.Validate(); err != nil {
//		log.Fatal(err) // e.g. "invalid_argument: name ..."
//	}
//
// The gob field names of Args and ServiceUpdate are part of the wire contract
// with go-discoverd clients: fields may be added, never renamed.
package api

import (
	"cmp"
	"strings"
	"time"
)

// Args is the argument of every Agent RPC method. Subscribe and Leader use
// only Name; Heartbeat and Unregister use Name and Addr.
type Args struct {
	Name  string
	Addr  string
	Attrs map[string]string
	// Check, in a Register call, hands the registration to the agent,
	// which keeps it online while the check passes (no heartbeats). nil
	// for an ordinary registration. Older clients never send it, and
	// older agents ignore it (gob and JSON skip unknown fields).
	Check *Check
}

// ServiceUpdate describes one instance of a service, or one change to it.
//
// In a Subscribe stream the zero ServiceUpdate (empty Name) is the sentinel
// meaning "the snapshot is complete, you are current". In a Leader stream it
// means "there is no leader".
type ServiceUpdate struct {
	Name   string
	Addr   string
	Online bool
	Attrs  map[string]string
	// Created is the registration's fencing token: unique among the
	// registrations of Name, stable across heartbeats, attribute updates,
	// takeovers and the agent's restores after a lost store session, and
	// strictly larger for a registration acknowledged after this one was.
	// The leader is the online instance with the smallest Created (see
	// Older), so successive leaders carry strictly increasing tokens. Its
	// encoding is the backend's (docs/API.md, "Fencing tokens").
	Created uint
}

// Age places an instance in its service's age order: by Created, then by
// Addr. The oldest online instance leads. Created is unique per name; the
// address only keeps the order total for stores that cannot guarantee
// that. It is the one definition of instance age used by the agent, the
// client and every backend.
type Age struct {
	Created uint64
	Addr    string
}

// Compare returns a negative number when a is older than b, positive when
// younger, 0 when equal.
func (a Age) Compare(b Age) int {
	return cmp.Or(cmp.Compare(a.Created, b.Created), strings.Compare(a.Addr, b.Addr))
}

// Age returns u's place in the age order.
func (u *ServiceUpdate) Age() Age { return Age{uint64(u.Created), u.Addr} }

// IsSentinel reports whether u is the empty marker update.
func (u *ServiceUpdate) IsSentinel() bool { return u.Name == "" && u.Addr == "" }

// Limits. Each violation is reported to the caller as an *Error with
// CodeInvalidArgument or CodeResourceExhausted; nothing else is harmed.
const (
	MaxNameLen      = 128     // bytes in a service name
	MaxAddrLen      = 261     // bytes in "host:port" (255-byte DNS name, brackets, port)
	MaxAttrs        = 64      // attributes per registration
	MaxAttrKeyLen   = 128     // bytes in an attribute key
	MaxAttrValueLen = 1 << 10 // bytes in an attribute value
	MaxMessageSize  = 1 << 20 // bytes in one RPC message (decoded size bounded before allocation)

	// DefaultMaxRegistrationsPerConn caps the registrations one connection
	// (one session) may hold at once.
	DefaultMaxRegistrationsPerConn = 1024
	// DefaultMaxStreamsPerConn caps the concurrent streams (Subscribe,
	// Leader) on one connection.
	DefaultMaxStreamsPerConn = 256
)

// Defaults shared by the agent, the client and the CLI.
const (
	// DefaultAgentAddr is where the agent listens and where clients look for
	// it when DISCOVERD is unset.
	DefaultAgentAddr = "127.0.0.1:1111"
	// DefaultTTL is how long a registration lives without a heartbeat, and
	// how long the store keeps an agent's registrations after the agent dies.
	DefaultTTL = 10 * time.Second
	// HeartbeatInterval is how often go-discoverd clients re-register.
	HeartbeatInterval = 5 * time.Second
)

// RPC method names of the agent, as rpcplus clients spell them.
const (
	MethodRegister   = "Agent.Register"
	MethodHeartbeat  = "Agent.Heartbeat"
	MethodUnregister = "Agent.Unregister"
	MethodSubscribe  = "Agent.Subscribe"
	MethodLeader     = "Agent.Leader"
)
