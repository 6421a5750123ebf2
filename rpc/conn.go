package rpc

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"reflect"
	"runtime"
	"runtime/debug"
	"sync"
)

// Stream is the sending side of a streaming call, handed to a streaming
// method. It is safe for concurrent use.
type Stream interface {
	// Send queues v to be written as the next reply of the stream. It never
	// blocks. It returns ErrStreamClosed once the stream has ended (the
	// client cancelled it, the connection closed, or the method returned),
	// and ErrSlowReader when StreamBuffer replies are already waiting: the
	// stream is then cut (its context is cancelled, later Sends return
	// ErrSlowReader) and, once the method returns, it ends with the
	// method's error text, or with ErrSlowReader's text if the method
	// returns nil, ErrSlowReader or its context's error.
	// v is encoded later by the connection's writer and must not be
	// modified after Send.
	Send(v any) error
	// Context is the stream's context: done when the client cancels the
	// stream, the stream is cut as slow, the connection closes or the
	// server closes. context.Cause tells which: ErrStreamClosed for a
	// cancel, ErrSlowReader for a cut. It carries the connection
	// (ConnFromContext).
	Context() context.Context
}

// Conn identifies the connection a call arrived on.
type Conn interface {
	// ID is unique among the connections of one Server.
	ID() uint64
	// RemoteAddr is the peer's address, "" when the transport has none.
	RemoteAddr() string
	// Done is closed when the connection has ended.
	Done() <-chan struct{}
}

type connKey struct{}

// ConnFromContext returns the connection a call arrived on, given the
// call's context (or one derived from it), and nil outside a call.
func ConnFromContext(ctx context.Context) Conn {
	if c, ok := ctx.Value(connKey{}).(*serverConn); ok && c != nil {
		return c
	}
	return nil
}

// serverConn is one connection being served. Its reader runs on the
// ServeConn goroutine; it owns one writer goroutine and one goroutine per
// executing call, and waits for all of them before ServeConn returns.
type serverConn struct {
	srv       *Server
	id        uint64
	rwc       io.ReadWriteCloser
	codecKind Codec
	codec     serverCodec
	remote    string
	log       *slog.Logger

	ctx     context.Context // done when the connection ends
	cancel  context.CancelCauseFunc
	callCtx context.Context // ctx carrying the connection

	sem        chan struct{} // one token per unary reply not yet written
	handlers   sync.WaitGroup
	writerDone chan struct{}
	wake       chan struct{} // capacity 1: the writer has work
	closeOnce  sync.Once

	mu      sync.Mutex
	dead    bool
	ready   []*outQueue // queues with replies to write, in round-robin order
	streams map[uint64]*serverStream
}

// outQueue holds the replies of one call waiting for the writer. The writer
// takes one reply from each ready queue in turn, so a stream with a long
// backlog delays other calls by at most one message.
type outQueue struct {
	msgs   []response
	queued bool // in serverConn.ready
	unary  bool // its (single) reply holds a token of sem
}

func newServerConn(s *Server, id uint64, rwc io.ReadWriteCloser, codec Codec) *serverConn {
	c := &serverConn{
		srv:        s,
		id:         id,
		rwc:        rwc,
		codecKind:  codec,
		codec:      newServerCodec(codec, rwc, s.maxMessageSize()),
		sem:        make(chan struct{}, s.maxCalls()),
		writerDone: make(chan struct{}),
		wake:       make(chan struct{}, 1),
		streams:    make(map[uint64]*serverStream),
	}
	if a, ok := rwc.(interface{ RemoteAddr() net.Addr }); ok && a.RemoteAddr() != nil {
		c.remote = a.RemoteAddr().String()
	}
	c.log = s.logger().With("conn", id, "remote", c.remote, "codec", codec.String())
	c.ctx, c.cancel = context.WithCancelCause(context.Background())
	c.callCtx = context.WithValue(c.ctx, connKey{}, c)
	return c
}

func (c *serverConn) ID() uint64            { return c.id }
func (c *serverConn) RemoteAddr() string    { return c.remote }
func (c *serverConn) Done() <-chan struct{} { return c.ctx.Done() }

// serve runs the reader until the connection ends, then tears down.
func (c *serverConn) serve() {
	go c.writeLoop()
	err := c.readLoop()
	c.shutdown(err)
	c.handlers.Wait()
	<-c.writerDone
}

// shutdown ends the connection once: no more replies are written, every
// call's context is cancelled and the transport is closed, which unblocks
// the reader and the writer.
func (c *serverConn) shutdown(reason error) {
	c.closeOnce.Do(func() {
		c.mu.Lock()
		c.dead = true
		c.ready = nil
		c.mu.Unlock()
		switch {
		case reason == nil, errors.Is(reason, io.EOF), errors.Is(reason, errServerClosed), errors.Is(reason, net.ErrClosed):
			c.log.Debug("rpc: connection ended", "reason", reason)
		default:
			c.log.Warn("rpc: closing connection", "reason", reason)
		}
		c.cancel(reason)
		c.rwc.Close()
	})
}

func (c *serverConn) readLoop() error {
	for {
		var req request
		if err := c.codec.readRequestHeader(&req); err != nil {
			if err == io.EOF {
				return io.EOF
			}
			return fmt.Errorf("reading request header: %w", err)
		}
		if req.method == closeStream {
			if err := c.codec.readRequestBody(nil); err != nil {
				return fmt.Errorf("reading body of CloseStream: %w", err)
			}
			c.closeStream(req.seq)
			continue
		}
		m, lookupErr := c.srv.lookup(req.method)
		if lookupErr != nil {
			if err := c.codec.readRequestBody(nil); err != nil {
				return fmt.Errorf("reading body of %q: %w", req.method, err)
			}
			if !c.replyError(req, lookupErr.Error()) {
				return nil
			}
			continue
		}
		argv := reflect.New(m.argType)
		if err := decodeInto(c.codecKind, argv, c.codec.readRequestBody); err != nil {
			var pe *paramsError
			if !errors.As(err, &pe) {
				return fmt.Errorf("reading body of %s: %w", req.method, err)
			}
			if !c.replyError(req, pe.Error()) {
				return nil
			}
			continue
		}
		if m.stream != nil {
			if !c.startStream(req, m, argv.Interface()) {
				return nil
			}
		} else if !c.startCall(req, m, argv.Interface()) {
			return nil
		}
	}
}

// acquire takes a unary-reply token, blocking while MaxCallsPerConn replies
// are pending. It returns false when the connection has ended.
func (c *serverConn) acquire() bool {
	select {
	case c.sem <- struct{}{}:
		return true
	case <-c.ctx.Done():
		return false
	}
}

// replyError queues an error reply to req. It returns false when the
// connection has ended.
func (c *serverConn) replyError(req request, text string) bool {
	if !c.acquire() {
		return false
	}
	c.mu.Lock()
	c.enqueueLocked(&outQueue{unary: true}, response{method: req.method, seq: req.seq, errText: text, final: true})
	c.mu.Unlock()
	return true
}

// startCall runs a unary method in a goroutine of its own; args is a
// pointer to its decoded argument. It returns false when the connection has
// ended.
func (c *serverConn) startCall(req request, m *method, args any) bool {
	if !c.acquire() {
		return false
	}
	c.handlers.Add(1)
	go func() {
		defer c.handlers.Done()
		replyv := reflect.New(m.replyType)
		switch m.replyType.Kind() {
		case reflect.Map:
			replyv.Elem().Set(reflect.MakeMap(m.replyType))
		case reflect.Slice:
			replyv.Elem().Set(reflect.MakeSlice(m.replyType, 0, 0))
		}
		reply := replyv.Interface()
		err := c.callUnary(req.method, m, args, reply)
		resp := response{method: req.method, seq: req.seq, final: true}
		if err != nil {
			resp.errText = errorText(err)
		} else {
			resp.body = reply
		}
		c.mu.Lock()
		c.enqueueLocked(&outQueue{unary: true}, resp)
		c.mu.Unlock()
	}()
	return true
}

// startStream runs a streaming method in a goroutine of its own; args is a
// pointer to its decoded argument. It returns false when the connection has
// ended.
func (c *serverConn) startStream(req request, m *method, args any) bool {
	st := &serverStream{c: c, seq: req.seq, method: req.method}
	st.ctx, st.cancel = context.WithCancelCause(c.callCtx)
	c.mu.Lock()
	if c.streams[req.seq] != nil {
		c.mu.Unlock()
		st.cancel(nil)
		return c.replyError(req, fmt.Sprintf("rpc: sequence number %d is in use by a stream", req.seq))
	}
	c.streams[req.seq] = st
	c.mu.Unlock()
	c.handlers.Add(1)
	go c.runStream(st, m, args)
	return true
}

// runStream is the goroutine of one stream. A stream's handler may stay
// parked for the life of the connection, so the frames below it are kept
// few and small: one goroutine stack per subscriber is most of a
// subscriber's memory.
func (c *serverConn) runStream(st *serverStream, m *method, args any) {
	defer c.handlers.Done()
	c.endStream(st, c.callStream(st, m, args))
}

// endStream ends st after its method returned err.
func (c *serverConn) endStream(st *serverStream, err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	switch {
	case st.final:
		// Already ended (CloseStream); the method's result is moot.
	case st.ended:
		// Cut as slow: the method may say why in its own words.
		text := ErrSlowReader.Error()
		if err != nil && !errors.Is(err, ErrSlowReader) && !errors.Is(err, context.Canceled) {
			text = errorText(err)
		}
		st.endLocked(ErrSlowReader, text, false)
	default:
		text := eos
		if err != nil {
			text = errorText(err)
		}
		st.endLocked(ErrStreamClosed, text, false)
	}
}

// callUnary and callStream call a method, turning a panic into an error
// (logged with its stack) so that one faulty method does not take the
// process down.
func (c *serverConn) callUnary(name string, m *method, args, reply any) (err error) {
	defer c.recoverMethod(name, &err)
	return m.call(c.callCtx, args, reply)
}

func (c *serverConn) callStream(st *serverStream, m *method, args any) (err error) {
	defer c.recoverMethod(st.method, &err)
	return m.stream(st.ctx, args, st)
}

// recoverMethod, deferred by a method's caller, turns the method's panic
// into *err.
func (c *serverConn) recoverMethod(name string, err *error) {
	if p := recover(); p != nil {
		c.log.Error("rpc: method panicked", "method", name, "panic", p, "stack", string(debug.Stack()))
		*err = fmt.Errorf("rpc: method %s failed (internal error)", name)
	}
}

func errorText(err error) string {
	if t := err.Error(); t != "" {
		return t
	}
	return "rpc: method returned an error with empty text"
}

// enqueueLocked appends r to q and makes q ready. Replies to a dead
// connection are dropped. c.mu must be held.
func (c *serverConn) enqueueLocked(q *outQueue, r response) {
	if c.dead {
		return
	}
	q.msgs = append(q.msgs, r)
	if !q.queued {
		q.queued = true
		c.ready = append(c.ready, q)
	}
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

// writeLoop is the connection's only writer. It writes the ready replies
// one from each call in turn, flushes when none is left, and ends the
// connection on a write error.
//
// Before a flush it yields the processor once (runtime.Gosched) and looks
// again. One event often wakes many handlers of a connection at once (a
// change fanned out to its streams); each queues its reply a moment later,
// and without the yield each reply would cost a write syscall of its own
// (and a wake-up of the peer's reader). With it, the replies of handlers
// that were already runnable share the flush. At most one yield precedes a
// flush, so a lone reply waits only for that yield, which returns at once
// when nothing else is runnable.
func (c *serverConn) writeLoop() {
	defer close(c.writerDone)
	yielded := false // since the last flush
	for {
		c.mu.Lock()
		for len(c.ready) == 0 && !c.dead {
			c.mu.Unlock()
			if !yielded {
				runtime.Gosched()
				yielded = true
			} else {
				if err := c.codec.flush(); err != nil {
					c.shutdown(fmt.Errorf("writing: %w", err))
					return
				}
				yielded = false
				select {
				case <-c.wake:
				case <-c.ctx.Done():
				}
			}
			c.mu.Lock()
		}
		if c.dead {
			c.mu.Unlock()
			return
		}
		q := c.ready[0]
		c.ready[0] = nil
		c.ready = c.ready[1:]
		msg := q.msgs[0]
		q.msgs[0] = response{}
		q.msgs = q.msgs[1:]
		if len(q.msgs) > 0 {
			c.ready = append(c.ready, q)
		} else {
			q.queued = false
		}
		c.mu.Unlock()

		err := c.codec.writeResponse(&msg)
		if q.unary {
			<-c.sem
		}
		if err != nil {
			c.shutdown(err)
			return
		}
	}
}

// closeStream handles a client's CloseStream: the stream's pending replies
// are dropped, it ends with EOS and its context is cancelled. An unknown
// seq (a stream that already ended) is ignored.
func (c *serverConn) closeStream(seq uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if st := c.streams[seq]; st != nil && !st.ended { // a stream cut as slow ends with its error
		st.endLocked(ErrStreamClosed, eos, true)
	}
}

type serverStream struct {
	c      *serverConn
	seq    uint64
	method string
	ctx    context.Context
	cancel context.CancelCauseFunc

	// Guarded by c.mu.
	q       outQueue
	ended   bool // Send is refused with sendErr
	final   bool // the final header is queued
	sendErr error
}

func (st *serverStream) Context() context.Context { return st.ctx }

func (st *serverStream) Send(v any) error {
	c := st.c
	c.mu.Lock()
	defer c.mu.Unlock()
	switch {
	case st.ended:
		return st.sendErr
	case c.dead:
		return ErrStreamClosed
	case len(st.q.msgs) >= c.srv.streamBuffer():
		st.cutLocked()
		return ErrSlowReader
	}
	c.enqueueLocked(&st.q, response{method: st.method, seq: st.seq, body: v})
	return nil
}

// cutLocked ends a stream whose queue is full: later Sends return
// ErrSlowReader and its context is cancelled. The replies already queued
// are still written; the final header follows when the method returns, with
// the method's error text or, if it returns nil, ErrSlowReader or its
// context's error, ErrSlowReader's text. c.mu must be held.
func (st *serverStream) cutLocked() {
	st.ended, st.sendErr = true, ErrSlowReader
	if st.c.streams[st.seq] == st {
		delete(st.c.streams, st.seq)
	}
	st.cancel(ErrSlowReader)
}

// endLocked ends the stream: later Sends return sendErr, the final header
// with text is queued (after the pending replies, or instead of them when
// dropPending), and the stream's context is cancelled. c.mu must be held.
func (st *serverStream) endLocked(sendErr error, text string, dropPending bool) {
	c := st.c
	st.ended, st.final, st.sendErr = true, true, sendErr
	if dropPending {
		clear(st.q.msgs)
		st.q.msgs = st.q.msgs[:0]
	}
	c.enqueueLocked(&st.q, response{method: st.method, seq: st.seq, errText: text, final: true})
	if c.streams[st.seq] == st {
		delete(c.streams, st.seq)
	}
	st.cancel(sendErr)
}
