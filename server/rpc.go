package server

import (
	"context"
	"errors"
	"io"
	"sync/atomic"
	"time"

	"github.com/flynn/discoverd/agent"
	"github.com/flynn/discoverd/api"
	"github.com/flynn/discoverd/rpc"
)

// connState is what the server keeps per RPC connection: the agent session
// that owns the connection's registrations. It lives from the connection's
// first call until the connection ends; a watcher goroutine then closes
// the session. (The connection's streams are capped by the rpc server:
// rpc.Server.MaxStreamsPerConn.)
type connState struct {
	session  *agent.Session
	lastBeat atomic.Int64 // unix nanos of the last successful Register or Heartbeat
}

// beat records a successful Register or Heartbeat on the connection.
func (st *connState) beat() { st.lastBeat.Store(time.Now().UnixNano()) }

// keepIdle is the RPC server's KeepIdle: a connection whose last Register
// or Heartbeat is less than a TTL old may still hold registrations, which
// closing it would end, so it is kept however quiet it is.
func (s *Server) keepIdle(c rpc.Conn) bool {
	s.mu.Lock()
	st := s.conns[c.ID()]
	s.mu.Unlock()
	return st != nil && time.Since(time.Unix(0, st.lastBeat.Load())) <= s.opts.TTL
}

// conn returns the state of the connection the call in ctx arrived on,
// creating it (and its watcher) on the first call.
func (s *Server) conn(ctx context.Context) (*connState, error) {
	c := rpc.ConnFromContext(ctx)
	if c == nil {
		return nil, api.Errorf(api.CodeInternal, "call without an rpc connection")
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, api.Errorf(api.CodeUnavailable, "agent is shutting down")
	}
	if st, ok := s.conns[c.ID()]; ok {
		return st, nil
	}
	st := &connState{session: s.agent.NewSession(s.opts.MaxRegistrationsPerConn)}
	s.conns[c.ID()] = st
	s.wg.Add(1)
	go s.watchConn(c, st)
	return st, nil
}

// watchConn closes the session of c once c ends (the rpc server closes
// every connection on Close, so this always returns).
func (s *Server) watchConn(c rpc.Conn, st *connState) {
	defer s.wg.Done()
	<-c.Done()
	s.mu.Lock()
	delete(s.conns, c.ID())
	s.mu.Unlock()
	st.session.Close()
}

// registerRPC publishes the methods of the RPC service "Agent" (DESIGN §5)
// on rs, as typed functions rather than a reflection-called receiver.
// Subscribe and Leader are pulled streams (rpc.RegisterSource): the
// connection's writer takes each update from the agent's subscription
// when it can write it, so an open stream holds no goroutine, and a
// change fanned out to a connection's streams wakes only its writer,
// which encodes the change once for all of them (the agent hands every
// subscriber the same *ServiceUpdate; rpc.SharedValues).
//
// Heartbeat is an express method (rpc.Express): it never touches the store,
// and it must get through while a connection's Register and Unregister
// calls are stuck on a store that does not answer, or the connection's
// registrations would expire. Those calls end within CallTimeout, which
// frees their slots.
func (s *Server) registerRPC(rs *rpc.Server) error {
	r := &rpcAgent{s: s}
	return errors.Join(
		rpc.RegisterUnary(rs, api.MethodRegister, r.register),
		rpc.RegisterUnary(rs, api.MethodHeartbeat, r.heartbeat, rpc.Express()),
		rpc.RegisterUnary(rs, api.MethodUnregister, r.unregister),
		rpc.RegisterSource(rs, api.MethodSubscribe, r.subscribe, rpc.SharedValues()),
		rpc.RegisterSource(rs, api.MethodLeader, r.leader, rpc.SharedValues()),
	)
}

// rpcAgent implements the methods of the RPC service "Agent". Every error
// they return is an *api.Error, so its text starts with the code. Each
// unary call runs under CallTimeout.
type rpcAgent struct{ s *Server }

// register registers args on the connection's session (or heartbeats and
// updates the attributes of an existing registration) and replies with the
// expanded address.
func (r *rpcAgent) register(ctx context.Context, args *api.Args, reply *string) (err error) {
	defer r.s.metrics.observeRPC(api.MethodRegister, time.Now(), &err)
	if args.Check != nil { // kept by the agent, not by this connection (checks.go)
		return r.registerChecked(ctx, args, reply)
	}
	if r.s.isChecked(args.Name, args.Addr) {
		return api.Errorf(api.CodeConflict, "%s/%s is a checked registration, kept by the agent: register it with its check to update it, or unregister it first", args.Name, args.Addr)
	}
	return r.call(ctx, "register", r.s.allowRPC(ctx, rightRegister, args.Name, args.ValidateRegister), func(ctx context.Context, st *connState) (err error) {
		*reply, err = st.session.Register(ctx, *args)
		return err
	}, true)
}

// heartbeat marks the registration args.Name/args.Addr alive; not_found
// when this connection does not hold it.
func (r *rpcAgent) heartbeat(ctx context.Context, args *api.Args, _ *struct{}) (err error) {
	defer r.s.metrics.observeRPC(api.MethodHeartbeat, time.Now(), &err)
	return r.call(ctx, "heartbeat", r.s.allowRPC(ctx, rightRegister, args.Name, args.ValidateKey), func(ctx context.Context, st *connState) error {
		return st.session.Heartbeat(ctx, *args)
	}, true)
}

// unregister removes the registration args.Name/args.Addr now. The ACL
// is not asked: a connection can only remove what it owns (anything else
// is permission_denied), so a token whose rights were withdrawn can still
// clean up after itself.
func (r *rpcAgent) unregister(ctx context.Context, args *api.Args, _ *struct{}) (err error) {
	defer r.s.metrics.observeRPC(api.MethodUnregister, time.Now(), &err)
	if r.s.isChecked(args.Name, args.Addr) {
		return r.unregisterChecked(ctx, args)
	}
	return r.call(ctx, "unregister", args.ValidateKey, func(ctx context.Context, st *connState) error {
		return st.session.Unregister(ctx, *args)
	}, false)
}

// call runs one unary method: it checks the arguments (the edge: the
// agent trusts them after), then runs do on the connection's session
// under CallTimeout. beats says whether a success counts as the
// connection's heartbeat (connState.beat).
func (r *rpcAgent) call(ctx context.Context, op string, validate func() error,
	do func(context.Context, *connState) error, beats bool) error {
	if err := validate(); err != nil {
		return r.s.wireError(op, err)
	}
	ctx, cancel := context.WithTimeout(ctx, r.s.opts.CallTimeout)
	defer cancel()
	st, err := r.s.conn(ctx)
	if err != nil {
		return err
	}
	if err := do(ctx, st); err != nil {
		return r.s.wireError(op, err)
	}
	if beats {
		st.beat()
	}
	return nil
}

// subscribe streams the instances of args.Name: the snapshot, the empty
// sentinel, then every change. It ends with EOS when the client closes the
// stream or the connection, and with the error otherwise.
func (r *rpcAgent) subscribe(ctx context.Context, args *api.Args, ready func()) (rpc.Source, error) {
	return r.s.openSource(ctx, api.MethodSubscribe, "subscribe", args.Name, r.s.agent.Subscribe, ready)
}

// leader streams the leader of args.Name: the current one (the empty update
// when there is none), then each change.
func (r *rpcAgent) leader(ctx context.Context, args *api.Args, ready func()) (rpc.Source, error) {
	return r.s.openSource(ctx, api.MethodLeader, "leader", args.Name, r.s.agent.Leader, ready)
}

// openSource opens the agent subscription of one Subscribe or Leader
// stream and returns it as the stream's source. An error ends the stream
// with it; a client that went away while it opened ends it with EOS.
func (s *Server) openSource(ctx context.Context, method, op, name string,
	open func(context.Context, string) (*agent.Subscription, error), ready func()) (_ rpc.Source, err error) {
	start := time.Now()
	if err := api.ValidateName(name); err != nil {
		s.metrics.observeRPC(method, start, &err)
		return nil, err
	}
	if _, err := s.conn(ctx); err != nil {
		s.metrics.observeRPC(method, start, &err)
		return nil, err
	}
	if err := s.checkRPC(ctx, rightRead, name); err != nil {
		s.metrics.observeRPC(method, start, &err)
		return nil, err
	}
	sub, err := open(ctx, name)
	if err != nil {
		if ctx.Err() != nil {
			err = nil // the client went away while it opened
			s.metrics.observeRPC(method, start, &err)
			return nil, io.EOF
		}
		err = s.wireError(op, err)
		s.metrics.observeRPC(method, start, &err)
		return nil, err
	}
	s.metrics.rpcStreams.Inc()
	src := &subSource{s: s, ctx: ctx, method: method, op: op, name: name, sub: sub, start: start}
	sub.Notify(ready)
	return src, nil
}

// subSource is a Subscribe or Leader stream's source: the updates of its
// agent subscription, taken by the connection's writer. A reader that
// falls SubscriberBuffer updates behind is cut off by the agent, and the
// stream ends with that error once the updates queued before the cut are
// sent.
type subSource struct {
	s                *Server
	ctx              context.Context // the stream's
	method, op, name string
	sub              *agent.Subscription
	start            time.Time
	end              error // what the stream ended with, for the metrics
}

func (src *subSource) Next() (any, bool, error) {
	u, err := src.sub.TryNext()
	if err != nil {
		src.end = src.s.streamEnd(src.ctx, src.op, src.name, err)
		if src.end == nil {
			return nil, false, io.EOF
		}
		return nil, false, src.end
	}
	if u == nil {
		return nil, false, nil
	}
	return u, true, nil // shared with the name's other subscribers
}

func (src *subSource) Close() {
	src.sub.Close()
	src.s.metrics.rpcStreams.Dec()
	src.s.metrics.observeRPC(src.method, src.start, &src.end)
}

// streamEnd returns what a stream ends with after err from its
// subscription or its Send.
func (s *Server) streamEnd(ctx context.Context, op, name string, err error) error {
	if ctx.Err() != nil {
		return nil // the client closed the stream or the connection
	}
	e := s.wireError(op, err)
	if e.Code == api.CodeResourceExhausted {
		s.log.Warn("rpc stream cut off: the client reads too slowly",
			"op", op, "name", name, "remote", rpc.ConnFromContext(ctx).RemoteAddr(), "err", e.Message)
	}
	return e
}
