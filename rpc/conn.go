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
	"sync/atomic"
	"syscall"
	"time"
)

// Stream is the sending side of a streaming call, handed to a streaming
// method. It is safe for concurrent use.
type Stream interface {
	// Send queues v to be written as the next reply of the stream. While
	// StreamBuffer replies of the stream wait to be written, it blocks
	// until the connection's writer takes one (so a stream goes at the
	// pace its reader reads, and the replies queued for it stay bounded),
	// or until the stream ends. It returns ErrStreamClosed once the stream
	// has ended: the client cancelled it, the connection closed, the server
	// closed or the method returned. A producer that must not be held up by
	// a slow reader keeps its own bounded backlog and decides itself when
	// to give up on the reader.
	// v is encoded later by the connection's writer and must not be
	// modified after Send.
	Send(v any) error
	// Context is the stream's context: done when the client cancels the
	// stream, the connection closes or the server closes; context.Cause
	// is ErrStreamClosed for a cancel. It carries the connection
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
//
// Three pools of slots bound what a peer can make the server hold, however
// little it reads. A slot is taken by the reader before a call starts and
// given back by the writer once the call's final reply is written, so what
// waits to be written for one connection is at most MaxCallsPerConn unary
// replies (calls and error replies), MaxCallsPerConn replies of express
// calls, and MaxStreamsPerConn × (StreamBuffer + 1) stream replies. The
// reader waits for a unary or express slot (it stops reading the
// connection, which pushes back on the peer); a stream request that finds
// no stream slot is refused at once, since streams end only when asked to
// and waiting for one would stop the reader from ever reading that
// request.
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

	calls      chan struct{} // slots of unary calls and error replies
	express    chan struct{} // slots of calls of Express methods
	streams    chan struct{} // slots of streams
	handlers   sync.WaitGroup
	writerDone chan struct{}
	wake       chan struct{} // capacity 1: the writer has work
	closeOnce  sync.Once
	lastRead   atomic.Int64 // time.Now().UnixNano() when the reader last read a request

	idleTimer *time.Timer // owned by the writer; nil without IdleTimeout

	mu      sync.Mutex
	dead    bool
	ready   round // queues with replies to write (or sources to pull), in round-robin order
	active  map[uint64]*serverStream
	closing []Source // sources of ended streams, for the writer to close
}

// round is the writer's FIFO of ready queues. It reuses its array: a
// fan-out readies one queue per stream of a connection, and a slice taken
// from the front would be reallocated as it grows at the back.
type round struct {
	qs   []*outQueue // qs[head:] are waiting
	head int
}

func (r *round) empty() bool { return r.head == len(r.qs) }

// push adds q at the back. When the array is full and at least half of it
// is already taken, the waiting queues move to its front instead of
// growing it; moving them for less would cost as much as the pushes it
// saves, and a writer that keeps just behind the pushes would move nearly
// the whole array on every push.
func (r *round) push(q *outQueue) {
	if len(r.qs) == cap(r.qs) && r.head >= len(r.qs)/2 {
		n := copy(r.qs, r.qs[r.head:])
		clear(r.qs[n:])
		r.qs, r.head = r.qs[:n], 0
	}
	r.qs = append(r.qs, q)
}

// pop takes the oldest queue; the round must not be empty.
func (r *round) pop() *outQueue {
	q := r.qs[r.head]
	r.qs[r.head] = nil
	r.head++
	if r.head == len(r.qs) {
		r.qs, r.head = r.qs[:0], 0
	}
	return q
}

// outQueue holds the replies of one call waiting for the writer. The writer
// takes one reply from each ready queue in turn, so a stream with a long
// backlog delays other calls by at most one message.
type outQueue struct {
	msgs   []response
	queued bool          // in serverConn.ready
	st     *serverStream // the stream these replies belong to; nil for a unary call
}

func newServerConn(base context.Context, s *Server, id uint64, rwc io.ReadWriteCloser, codec Codec) *serverConn {
	c := &serverConn{
		srv:        s,
		id:         id,
		rwc:        rwc,
		codecKind:  codec,
		codec:      newServerCodec(codec, rwc, s.maxMessageSize()),
		calls:      make(chan struct{}, s.maxCalls()),
		express:    make(chan struct{}, s.maxCalls()),
		streams:    make(chan struct{}, s.maxStreams()),
		writerDone: make(chan struct{}),
		wake:       make(chan struct{}, 1),
		active:     make(map[uint64]*serverStream),
	}
	if a, ok := rwc.(interface{ RemoteAddr() net.Addr }); ok && a.RemoteAddr() != nil {
		c.remote = a.RemoteAddr().String()
	}
	c.log = s.logger().With("conn", id, "remote", c.remote, "codec", codec.String())
	c.ctx, c.cancel = context.WithCancelCause(base)
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
	c.closeSources()
}

// shutdown ends the connection once: no more replies are written, every
// call's context is cancelled and the transport is closed, which unblocks
// the reader and the writer.
func (c *serverConn) shutdown(reason error) {
	c.closeOnce.Do(func() {
		c.mu.Lock()
		c.dead = true
		c.ready = round{}
		c.mu.Unlock()
		if isDisconnect(reason) {
			c.log.Debug("rpc: connection ended", "reason", reason)
		} else {
			c.log.Warn("rpc: closing connection", "reason", reason)
		}
		c.cancel(reason)
		c.rwc.Close()
	})
}

// isDisconnect reports whether reason is an ordinary end of a connection:
// the peer closed or reset it, went away mid-message, or the server closed.
// Those are logged at debug level; anything else is worth a warning.
func isDisconnect(reason error) bool {
	if reason == nil {
		return true
	}
	for _, target := range []error{io.EOF, io.ErrUnexpectedEOF, net.ErrClosed, errServerClosed, ErrIdle, syscall.ECONNRESET, syscall.EPIPE} {
		if errors.Is(reason, target) {
			return true
		}
	}
	return false
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
		if c.srv.IdleTimeout > 0 {
			c.lastRead.Store(time.Now().UnixNano())
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
		if m.stream != nil || m.source != nil {
			if !c.startStream(req, m, argv.Interface()) {
				return nil
			}
		} else if !c.startCall(req, m, argv.Interface()) {
			return nil
		}
	}
}

// acquire takes a slot of pool, blocking while the pool is full. It
// returns false when the connection has ended.
func (c *serverConn) acquire(pool chan struct{}) bool {
	select {
	case pool <- struct{}{}:
		return true
	case <-c.ctx.Done():
		return false
	}
}

// replyError queues an error reply to req, which holds a unary slot until
// it is written. It returns false when the connection has ended.
func (c *serverConn) replyError(req request, text string) bool {
	if !c.acquire(c.calls) {
		return false
	}
	c.mu.Lock()
	c.enqueueLocked(&outQueue{}, response{method: req.method, seq: req.seq, errText: text, final: true, slot: c.calls})
	c.mu.Unlock()
	return true
}

// startCall runs a unary method in a goroutine of its own; args is a
// pointer to its decoded argument. It returns false when the connection has
// ended.
func (c *serverConn) startCall(req request, m *method, args any) bool {
	slot := c.calls
	if m.express {
		slot = c.express
	}
	if !c.acquire(slot) {
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
		resp := response{method: req.method, seq: req.seq, final: true, slot: slot}
		if err != nil {
			resp.errText = errorText(err)
		} else {
			resp.body = reply
		}
		c.mu.Lock()
		c.enqueueLocked(&outQueue{}, resp)
		c.mu.Unlock()
	}()
	return true
}

// startStream runs a streaming method in a goroutine of its own; args is a
// pointer to its decoded argument. When the connection's stream slots are
// all taken the stream is refused with an error reply instead. It returns
// false when the connection has ended.
func (c *serverConn) startStream(req request, m *method, args any) bool {
	select {
	case c.streams <- struct{}{}:
	default:
		return c.replyError(req, errorText(c.srv.tooManyStreams()))
	}
	st := &serverStream{c: c, seq: req.seq, method: req.method, shared: m.shared}
	st.q.st = st
	st.ctx, st.cancel = context.WithCancelCause(c.callCtx)
	c.mu.Lock()
	if c.active[req.seq] != nil {
		c.mu.Unlock()
		st.cancel(nil)
		<-c.streams
		return c.replyError(req, fmt.Sprintf("rpc: sequence number %d is in use by a stream", req.seq))
	}
	c.active[req.seq] = st
	c.mu.Unlock()
	c.handlers.Add(1)
	if m.source != nil {
		go c.runSource(st, m, args)
	} else {
		go c.runStream(st, m, args)
	}
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

// endStream ends st after its method returned err: with EOS for nil, else
// with err's text. A stream the client cancelled has already ended.
func (c *serverConn) endStream(st *serverStream, err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if st.final {
		return // cancelled (CloseStream): the method's result is moot
	}
	text := eos
	if err != nil {
		text = errorText(err)
	}
	st.endLocked(text, false)
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
		c.ready.push(q)
	}
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

// writeLoop is the connection's only writer. It writes the ready replies
// one from each call in turn, flushes when none is left, and ends the
// connection on a write error. Taking a stream's reply makes room for one
// more, which wakes a Send waiting for it; writing a call's final reply
// gives its slot back.
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
	yielded := false    // since the last flush
	var pulled response // a pulled stream's reply being written: one allocation for the connection, not one per reply
	var idle <-chan time.Time
	if d := c.srv.IdleTimeout; d > 0 {
		c.lastRead.Store(time.Now().UnixNano())
		t := time.NewTimer(d)
		defer t.Stop()
		idle = t.C
		c.idleTimer = t
	}
	for {
		c.mu.Lock()
		if len(c.closing) > 0 {
			c.closeEnded() // unlocks and locks c.mu
		}
		for c.ready.empty() && !c.dead {
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
				case <-idle:
					if c.idleExpired() {
						c.shutdown(ErrIdle)
						return
					}
				}
			}
			c.mu.Lock()
		}
		if c.dead {
			c.mu.Unlock()
			return
		}
		q := c.ready.pop()
		if len(q.msgs) == 0 && q.st != nil && q.st.src != nil {
			var ok bool
			pulled, ok = c.pullLocked(q.st)
			c.mu.Unlock()
			if ok {
				err := c.codec.writeResponse(&pulled)
				pulled = response{}
				if err != nil {
					c.shutdown(err)
					return
				}
			}
			continue
		}
		msg := q.msgs[0]
		q.msgs[0] = response{}
		q.msgs = q.msgs[1:]
		if len(q.msgs) > 0 {
			c.ready.push(q)
		} else {
			q.queued = false
		}
		if st := q.st; st != nil && st.waiters > 0 {
			select {
			case st.room <- struct{}{}:
			default: // a wake-up is already pending
			}
		}
		c.mu.Unlock()

		err := c.codec.writeResponse(&msg)
		if msg.slot != nil {
			<-msg.slot
		}
		if err != nil {
			c.shutdown(err)
			return
		}
	}
}

// idleExpired is called by the writer when the idle timer fires. It
// reports whether the connection has been idle for IdleTimeout, and if not
// re-arms the timer for when it could be: IdleTimeout after the last
// request, or a whole IdleTimeout while a call or stream holds a slot or
// KeepIdle claims the connection.
func (c *serverConn) idleExpired() bool {
	d := c.srv.IdleTimeout
	if len(c.calls)+len(c.express)+len(c.streams) > 0 {
		c.idleTimer.Reset(d)
		return false
	}
	if since := time.Since(time.Unix(0, c.lastRead.Load())); since < d {
		c.idleTimer.Reset(d - since)
		return false
	}
	if keep := c.srv.KeepIdle; keep != nil && keep(c) {
		c.idleTimer.Reset(d)
		return false
	}
	return true
}

// closeStream handles a client's CloseStream: the stream's pending replies
// are dropped, it ends with EOS and its context is cancelled. An unknown
// seq (a stream that already ended) is ignored.
func (c *serverConn) closeStream(seq uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if st := c.active[seq]; st != nil {
		st.endLocked(eos, true)
	}
}

type serverStream struct {
	c      *serverConn
	seq    uint64
	method string
	shared bool // its values are shared (SharedValues)
	ctx    context.Context
	cancel context.CancelCauseFunc

	// Guarded by c.mu.
	q   outQueue
	src Source // a pulled stream's source, once opened; nil once ended
	// signalled: the source called ready since the writer last asked it
	signalled bool
	final     bool          // the final header is queued; Send is refused
	waiters   int           // Sends waiting for room in q
	room      chan struct{} // capacity 1, made by the first Send that waits; signalled when the writer takes a reply while waiters > 0
}

func (st *serverStream) Context() context.Context { return st.ctx }

func (st *serverStream) Send(v any) error {
	c := st.c
	limit := c.srv.streamBuffer()
	c.mu.Lock()
	for {
		switch {
		case st.final, c.dead:
			c.mu.Unlock()
			return ErrStreamClosed
		case len(st.q.msgs) < limit:
			c.enqueueLocked(&st.q, response{method: st.method, seq: st.seq, body: v})
			c.mu.Unlock()
			return nil
		}
		if st.room == nil {
			st.room = make(chan struct{}, 1)
		}
		st.waiters++
		c.mu.Unlock()
		var done bool
		select {
		case <-st.room:
		case <-st.ctx.Done():
			done = true
		}
		c.mu.Lock()
		st.waiters--
		if done {
			// The stream ended (final or dead is set before its context is
			// cancelled); say so even if room appeared meanwhile.
			c.mu.Unlock()
			return ErrStreamClosed
		}
	}
}

// endLocked ends the stream: later Sends return ErrStreamClosed, the final
// header with text is queued (after the pending replies, or instead of
// them when dropPending) holding the stream's slot until it is written,
// and the stream's context is cancelled. c.mu must be held.
func (st *serverStream) endLocked(text string, dropPending bool) {
	c := st.c
	st.final = true
	if st.src != nil {
		c.closing = append(c.closing, st.src)
		st.src = nil
	}
	if dropPending {
		clear(st.q.msgs)
		st.q.msgs = st.q.msgs[:0]
	}
	c.enqueueLocked(&st.q, response{method: st.method, seq: st.seq, errText: text, final: true, slot: c.streams})
	if c.active[st.seq] == st {
		delete(c.active, st.seq)
	}
	st.cancel(ErrStreamClosed)
}
