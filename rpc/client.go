package rpc

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"reflect"
	"slices"
	"strings"
	"sync"
	"time"
)

// Client is an rpcplus client over one connection. It is safe for
// concurrent use; many calls and streams may be in flight at once.
//
// It owns two goroutines, started by NewClient or Dial and stopped by
// Close or by the loss of the connection: a writer, which writes the
// requests in the order they were made, and a reader. The reader delivers
// stream replies on the callers' channels and blocks while a channel is
// full, so every stream's channel must be drained (or the stream closed)
// for the other calls on the connection to progress.
type Client struct {
	codecKind Codec
	codec     clientCodec
	rwc       io.ReadWriteCloser

	mu       sync.Mutex
	seq      uint64
	pending  map[uint64]*Call
	streams  map[uint64]*StreamCall
	outq     []*outRequest // requests waiting for the writer
	shutdown bool          // no new calls: closing or connection lost
	closing  bool          // Close was called

	wake       chan struct{} // capacity 1: the writer has work or must stop
	closingCh  chan struct{} // closed by Close: the reader stops delivering
	writerDone chan struct{} // closed when the writer has returned
	done       chan struct{} // closed when the reader has ended every call
}

// outRequest is a request waiting for the client's writer.
type outRequest struct {
	method  string
	seq     uint64
	body    any
	call    *Call         // the unary call it starts; nil for streams and CloseStream
	encoded chan struct{} // closed once the writer is done with body
	written chan error    // capacity 1: the result of writing it, or ErrShutdown
}

func newOutRequest(method string, seq uint64, body any, call *Call) *outRequest {
	return &outRequest{method: method, seq: seq, body: body, call: call,
		encoded: make(chan struct{}), written: make(chan error, 1)}
}

// Call is an asynchronous unary call started by Go.
type Call struct {
	ServiceMethod string
	Args          any
	Reply         any
	// Error is set when Done delivers the call: nil, a ServerError (the
	// method's error text), ErrShutdown, or a local encoding/decoding error.
	Error error
	// Done receives the call when it completes.
	Done chan *Call

	seq uint64
	// Guarded by Client.mu: Call gave up on its ctx (the reader must not
	// touch Reply), or the reader stored the reply into Reply.
	abandoned, delivered bool
}

func (call *Call) done() {
	select {
	case call.Done <- call:
	default:
		// The caller's channel is full; net/rpc drops the completion too.
	}
}

// Dial connects to addr over TCP, performs the CONNECT upgrade at
// DefaultPath asking for codec, and returns a client on the connection.
// ctx bounds the dial and the upgrade only. It is (&Dialer{}).Dial.
func Dial(ctx context.Context, addr string, codec Codec) (*Client, error) {
	return (&Dialer{}).Dial(ctx, addr, codec)
}

// Dialer dials rpc servers with options. The zero value dials plain TCP
// and sends no extra header, as Dial does. A Dialer is safe for
// concurrent use once configured.
type Dialer struct {
	// TLS, if set, makes the connection TLS with this configuration
	// (ServerName defaults to addr's host, as tls.Dial does); the
	// handshake completes before the CONNECT request is sent.
	TLS *tls.Config
	// Header is sent with the CONNECT request (for example
	// Authorization). Accept is set by the codec and cannot be
	// overridden.
	Header http.Header
}

// Dial connects to addr, performs the CONNECT upgrade at DefaultPath
// asking for codec, and returns a client on the connection. ctx bounds
// the dial, the TLS handshake and the upgrade only. A refused upgrade is
// an error that quotes the server's status line.
func (d *Dialer) Dial(ctx context.Context, addr string, codec Codec) (*Client, error) {
	var nd net.Dialer
	var conn net.Conn
	var err error
	if d.TLS != nil {
		td := tls.Dialer{NetDialer: &nd, Config: d.TLS}
		conn, err = td.DialContext(ctx, "tcp", addr)
	} else {
		conn, err = nd.DialContext(ctx, "tcp", addr)
	}
	if err != nil {
		return nil, fmt.Errorf("rpc: dial %s: %w", addr, err)
	}
	stop := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Unix(1, 0)) })
	br, err := upgrade(conn, codec, d.Header)
	if !stop() {
		err = ctx.Err()
	}
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("rpc: upgrade %s: %w", addr, err)
	}
	var rwc io.ReadWriteCloser = conn
	if br.Buffered() > 0 {
		rwc = &bufferedConn{Conn: conn, r: br}
	}
	return NewClient(rwc, codec), nil
}

func upgrade(conn net.Conn, codec Codec, header http.Header) (*bufio.Reader, error) {
	accept := gobAccept
	if codec == JSON {
		accept = jsonAccept
	}
	var req strings.Builder
	req.WriteString("CONNECT " + DefaultPath + " HTTP/1.0\r\nAccept: " + accept + "\r\n")
	if len(header) > 0 {
		h := header.Clone()
		h.Del("Accept")
		if err := h.Write(&req); err != nil {
			return nil, err
		}
	}
	req.WriteString("\r\n")
	if _, err := io.WriteString(conn, req.String()); err != nil {
		return nil, err
	}
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodConnect})
	if err != nil {
		return nil, err
	}
	if resp.Status != connectedStatus {
		return nil, fmt.Errorf("unexpected HTTP response %q", resp.Status)
	}
	return br, nil
}

// NewClient returns a client speaking codec on conn, which must already be
// upgraded (or be a raw rpcplus stream). The client owns conn and closes it.
func NewClient(conn io.ReadWriteCloser, codec Codec) *Client {
	c := &Client{
		codecKind:  codec,
		codec:      newClientCodec(codec, conn),
		rwc:        conn,
		pending:    make(map[uint64]*Call),
		streams:    make(map[uint64]*StreamCall),
		wake:       make(chan struct{}, 1),
		closingCh:  make(chan struct{}),
		writerDone: make(chan struct{}),
		done:       make(chan struct{}),
	}
	go c.writeLoop()
	go c.readLoop()
	return c
}

// enqueueLocked hands r to the writer. c.mu must be held.
func (c *Client) enqueueLocked(r *outRequest) {
	c.outq = append(c.outq, r)
	c.signalWriter()
}

func (c *Client) signalWriter() {
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

// unqueueLocked removes r from the writer's queue, reporting false when
// the writer has already taken it. c.mu must be held.
func (c *Client) unqueueLocked(r *outRequest) bool {
	i := slices.Index(c.outq, r)
	if i < 0 {
		return false
	}
	c.outq = slices.Delete(c.outq, i, i+1)
	return true
}

// writeLoop writes the queued requests in order until the client shuts
// down. It takes every request queued, encodes them (after which it no
// longer reads their bodies), then writes them at once. A failed encoding
// or write closes the connection (the encoder's state is unknown after
// it, as in net/rpc), which makes the reader end every call.
func (c *Client) writeLoop() {
	defer close(c.writerDone)
	var batch []*outRequest
	for {
		c.mu.Lock()
		for len(c.outq) == 0 && !c.shutdown {
			c.mu.Unlock()
			<-c.wake
			c.mu.Lock()
		}
		if c.shutdown {
			left := c.outq
			c.outq = nil
			c.mu.Unlock()
			for _, r := range left {
				close(r.encoded)
				r.written <- ErrShutdown
			}
			return
		}
		batch, c.outq = c.outq, batch[:0]
		c.mu.Unlock()

		var err error
		for _, r := range batch {
			if err == nil {
				if err = c.codec.encodeRequest(r.method, r.seq, r.body); err != nil {
					err = fmt.Errorf("rpc: encoding %s: %w", r.method, err)
				}
			}
			close(r.encoded)
		}
		if err == nil {
			if err = c.codec.flush(); err != nil {
				err = fmt.Errorf("rpc: sending: %w", err)
			}
		}
		if err != nil {
			c.rwc.Close()
			c.failCalls(batch, err)
		}
		for i, r := range batch {
			r.written <- err
			batch[i] = nil
		}
	}
}

// failCalls ends with err the unary calls of batch that are still pending.
func (c *Client) failCalls(batch []*outRequest, err error) {
	for _, r := range batch {
		call := r.call
		if call == nil {
			continue
		}
		c.mu.Lock()
		mine := c.pending[call.seq] == call
		delete(c.pending, call.seq)
		c.mu.Unlock()
		if mine {
			call.Error = err
			call.done()
		}
	}
}

// Done is closed when the connection is lost or the client is closed, after
// every pending call and stream has ended with ErrShutdown.
func (c *Client) Done() <-chan struct{} { return c.done }

// Close closes the connection, ends every pending call and stream with
// ErrShutdown, and waits for the client's goroutines to exit. A second
// Close returns ErrShutdown.
func (c *Client) Close() error {
	c.mu.Lock()
	if c.closing {
		c.mu.Unlock()
		<-c.done
		return ErrShutdown
	}
	c.closing, c.shutdown = true, true
	c.mu.Unlock()
	close(c.closingCh)
	err := c.rwc.Close()
	<-c.done
	if errors.Is(err, net.ErrClosed) {
		err = nil // the connection was already lost
	}
	return err
}

// Call calls method with args and waits for its reply, decoded into reply
// (a pointer). It returns nil, a ServerError carrying the method's error
// text, ErrShutdown, or ctx.Err() if ctx ends first, even while the
// request waits to be written (the server is then not told: a request not
// yet taken by the client's writer is never sent, one taken is sent, and
// a reply that comes later is discarded). After it returns ctx.Err(),
// nothing writes into reply: a late reply is decoded into a value of its
// own and dropped. It does not use args after it returns.
func (c *Client) Call(ctx context.Context, method string, args, reply any) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	call, r := c.start(method, args, reply, make(chan *Call, 1))
	select {
	case <-call.Done:
		return call.Error
	case <-ctx.Done():
		c.mu.Lock()
		if call.delivered {
			// The reply is in reply already: the call is complete but for
			// its signal, which follows without I/O.
			c.mu.Unlock()
			<-call.Done
			return call.Error
		}
		call.abandoned = true
		if c.pending[call.seq] == call {
			delete(c.pending, call.seq)
		}
		taken := r != nil && !c.unqueueLocked(r)
		c.mu.Unlock()
		if taken {
			<-r.encoded // does no I/O: the writer reads args until then
		}
		return ctx.Err()
	}
}

// Go starts a call and returns once its request is written (it blocks
// while the connection cannot be written); the call is sent on done when
// it completes. done must be buffered (Go panics otherwise); nil allocates
// a channel.
func (c *Client) Go(method string, args, reply any, done chan *Call) *Call {
	if done == nil {
		done = make(chan *Call, 1)
	} else if cap(done) == 0 {
		panic("rpc: Go: done channel is unbuffered")
	}
	call, r := c.start(method, args, reply, done)
	if r != nil {
		<-r.written
	}
	return call
}

// start registers a call and queues its request. The request is nil when
// the client is shut down; the call has then completed with ErrShutdown.
func (c *Client) start(method string, args, reply any, done chan *Call) (*Call, *outRequest) {
	call := &Call{ServiceMethod: method, Args: args, Reply: reply, Done: done}
	c.mu.Lock()
	if c.shutdown {
		c.mu.Unlock()
		call.Error = ErrShutdown
		call.done()
		return call, nil
	}
	c.seq++
	call.seq = c.seq
	c.pending[call.seq] = call
	r := newOutRequest(method, call.seq, args, call)
	c.enqueueLocked(r)
	c.mu.Unlock()
	return call, r
}

// StreamCall is a streaming call started by Client.Stream.
type StreamCall struct {
	c      *Client
	seq    uint64
	method string
	ch     reflect.Value
	elem   reflect.Type // the type a reply is decoded into
	ptr    bool         // ch carries *elem

	closeOnce sync.Once
	closeErr  error
	closed    chan struct{} // Close was called: stop delivering
	stopCtx   func() bool

	err  error         // set before done is closed
	done chan struct{} // closed just before ch is closed
}

// Stream calls a streaming method. ch must be a chan T or chan *T (T the
// method's reply type); each reply is sent on it, and ch is closed when the
// stream ends, after which Err tells why. Sending on ch blocks the client's
// reader, so the caller must keep draining ch until it is closed (buffer
// it, or add buffering on top).
//
// Cancelling ctx closes the stream as Close does. Stream blocks while its
// request is written. It returns an error only when ch is not a suitable
// channel, ctx is already done or the client is shut down; once a
// StreamCall is returned, every failure is reported by Err after ch is
// closed.
func (c *Client) Stream(ctx context.Context, method string, args any, ch any) (*StreamCall, error) {
	chv := reflect.ValueOf(ch)
	if chv.Kind() != reflect.Chan || chv.Type().ChanDir()&reflect.SendDir == 0 || chv.IsNil() {
		return nil, fmt.Errorf("rpc: Stream %s: ch must be a non-nil sendable channel, not %T", method, ch)
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	sc := &StreamCall{
		c:      c,
		method: method,
		ch:     chv,
		elem:   chv.Type().Elem(),
		closed: make(chan struct{}),
		done:   make(chan struct{}),
	}
	if sc.elem.Kind() == reflect.Pointer {
		sc.elem, sc.ptr = sc.elem.Elem(), true
	}
	c.mu.Lock()
	if c.shutdown {
		c.mu.Unlock()
		return nil, ErrShutdown
	}
	c.seq++
	sc.seq = c.seq
	c.streams[sc.seq] = sc
	// A cancel queues its CloseStream under c.mu, so after the request.
	sc.stopCtx = context.AfterFunc(ctx, func() { sc.Close() })
	r := newOutRequest(method, sc.seq, args, nil)
	c.enqueueLocked(r)
	c.mu.Unlock()
	// A failed write ends the connection; the reader then ends the stream
	// with ErrShutdown (it alone may close ch).
	<-r.written
	return sc, nil
}

// Close cancels the stream: it sends CloseStream, stops delivering replies,
// and the stream then ends (normally with EOS, so Err returns nil); the
// caller should still drain ch until it is closed. It is idempotent and
// safe to call concurrently with everything else. It returns the error of
// writing the cancel, if any.
func (sc *StreamCall) Close() error {
	sc.closeOnce.Do(func() {
		close(sc.closed)
		c := sc.c
		c.mu.Lock()
		if c.shutdown || c.streams[sc.seq] != sc {
			c.mu.Unlock()
			return
		}
		r := newOutRequest(closeStream, sc.seq, nil, nil)
		c.enqueueLocked(r)
		c.mu.Unlock()
		if err := <-r.written; err != nil && !errors.Is(err, ErrShutdown) {
			sc.closeErr = err
		}
	})
	return sc.closeErr
}

// Done is closed when the stream has ended (just before ch is closed).
func (sc *StreamCall) Done() <-chan struct{} { return sc.done }

// Err reports why the stream ended: nil after EOS (a clean end or a
// cancel), a ServerError with the method's error text, ErrShutdown when the
// connection was lost or the client closed, or a decoding error. It returns
// nil while the stream is still running.
func (sc *StreamCall) Err() error {
	select {
	case <-sc.done:
		return sc.err
	default:
		return nil
	}
}

// finish ends the stream once it has been removed from the client's map;
// only the goroutine that removed it calls finish.
func (sc *StreamCall) finish(err error) {
	sc.stopCtx()
	sc.err = err
	close(sc.done) // before ch, so that Err is set once ch is seen closed
	sc.ch.Close()
}

// deliver sends one reply on the caller's channel unless the stream or the
// client is being closed.
func (sc *StreamCall) deliver(v reflect.Value) {
	if sc.ch.TrySend(v) {
		return
	}
	reflect.Select([]reflect.SelectCase{
		{Dir: reflect.SelectSend, Chan: sc.ch, Send: v},
		{Dir: reflect.SelectRecv, Chan: reflect.ValueOf(sc.closed)},
		{Dir: reflect.SelectRecv, Chan: reflect.ValueOf(sc.c.closingCh)},
	})
}

// readLoop reads replies until the connection fails, then ends every
// pending call and stream.
func (c *Client) readLoop() {
	var err error
	for err == nil {
		var resp response
		if err = c.codec.readResponseHeader(&resp); err != nil {
			break
		}
		err = c.handleReply(&resp)
	}
	c.terminate()
}

// handleReply reads the body of one reply and routes it. It returns an
// error only when the connection can no longer be read.
func (c *Client) handleReply(resp *response) error {
	c.mu.Lock()
	call := c.pending[resp.seq]
	delete(c.pending, resp.seq)
	sc := c.streams[resp.seq]
	if sc != nil && resp.errText != "" {
		delete(c.streams, resp.seq)
	}
	c.mu.Unlock()

	switch {
	case call != nil:
		if resp.errText != "" {
			call.Error = ServerError(resp.errText)
			err := c.codec.readResponseBody(nil)
			call.done()
			return err
		}
		if call.Reply == nil {
			err := c.codec.readResponseBody(nil)
			call.done()
			return err
		}
		rv := reflect.ValueOf(call.Reply)
		if rv.Kind() != reflect.Pointer || rv.IsNil() {
			call.Error = fmt.Errorf("rpc: reply of %s must be a non-nil pointer, not %T", call.ServiceMethod, call.Reply)
			err := c.codec.readResponseBody(nil)
			call.done()
			return err
		}
		// Decoded into a value of its own, and stored into Reply only if
		// Call has not given up meanwhile: an abandoned call's reply is
		// never written.
		v := reflect.New(rv.Elem().Type())
		if err := decodeInto(c.codecKind, v, c.codec.readResponseBody); err != nil {
			// Like net/rpc: the call fails; the connection goes on (the
			// message was consumed). A corrupt stream fails the next read.
			call.Error = fmt.Errorf("rpc: decoding reply of %s: %w", call.ServiceMethod, err)
			call.done()
			return nil
		}
		c.mu.Lock()
		if !call.abandoned {
			rv.Elem().Set(v.Elem())
			call.delivered = true
		}
		c.mu.Unlock()
		call.done()
		return nil
	case sc != nil && resp.errText == "":
		v := reflect.New(sc.elem)
		if err := decodeInto(c.codecKind, v, c.codec.readResponseBody); err != nil {
			return fmt.Errorf("rpc: decoding reply of stream %s: %w", sc.method, err)
		}
		if !sc.ptr {
			v = v.Elem()
		}
		sc.deliver(v)
		return nil
	case sc != nil:
		err := c.codec.readResponseBody(nil)
		if resp.errText == eos {
			sc.finish(nil)
		} else {
			sc.finish(ServerError(resp.errText))
		}
		return err
	default:
		// A reply to a call abandoned by its ctx, or to a stream already
		// ended: discard it.
		return c.codec.readResponseBody(nil)
	}
}

// terminate ends every pending call and stream with ErrShutdown and marks
// the client done.
func (c *Client) terminate() {
	c.rwc.Close()
	c.mu.Lock()
	c.shutdown = true
	pending, streams := c.pending, c.streams
	c.pending, c.streams = make(map[uint64]*Call), make(map[uint64]*StreamCall)
	c.mu.Unlock()
	c.signalWriter()
	<-c.writerDone
	for _, call := range pending {
		call.Error = ErrShutdown
		call.done()
	}
	for _, sc := range streams {
		sc.finish(ErrShutdown)
	}
	close(c.done)
}
