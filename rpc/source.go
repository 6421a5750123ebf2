package rpc

import (
	"context"
	"errors"
	"fmt"
	"io"
	"reflect"
)

// Source is the producing side of a pulled stream (RegisterSource). The
// connection's writer takes the source's values when it is ready to write
// them, one at a time and in turn with the connection's other calls and
// streams, so an open pulled stream holds no goroutine: thousands of
// streams of one connection cost its one writer.
type Source interface {
	// Next returns the next value to send, without blocking. ok is false
	// when no value is ready now: the source then calls the ready
	// function it was opened with once one is (or once it has ended). A
	// non-nil err ends the stream after the values already sent: io.EOF
	// with EOS, anything else with its text. The value is encoded before
	// Next is called again, so the source may reuse it. Next is called
	// from one goroutine at a time.
	Next() (v any, ok bool, err error)
	// Close releases the source. The server calls it exactly once, when
	// the stream has ended for any reason (Next's error, the client's
	// CloseStream, the connection's end), never concurrently with Next,
	// and without holding locks of its own.
	Close()
}

// RegisterSource publishes open as the streaming method serviceMethod
// ("Service.Method"), whose replies are pulled from a Source by the
// connection's writer instead of pushed by a goroutine per stream. For
// each call the server runs open in a goroutine of its own with the
// stream's context (done when the client cancels the stream or the
// connection ends; it carries the connection, ConnFromContext), a new *A
// decoded from the request, and ready, which the source calls whenever
// it may have a value after Next reported none; ready never blocks and is
// safe to call from any goroutine, at any time, also during open and
// after the stream ended. open may block (to take a snapshot); once it
// returns a Source the goroutine ends. An error from open ends the stream
// with the error's text.
//
// On the wire a pulled stream is an ordinary stream. Errors and
// concurrency are as for RegisterUnary.
func RegisterSource[A any](s *Server, serviceMethod string, open func(ctx context.Context, args *A, ready func()) (Source, error), opts ...SourceOption) error {
	if open == nil {
		return fmt.Errorf("rpc: RegisterSource %s: nil function", serviceMethod)
	}
	m := &method{
		argType: reflect.TypeFor[A](),
		source: func(ctx context.Context, args any, ready func()) (Source, error) {
			return open(ctx, args.(*A), ready)
		},
	}
	for _, o := range opts {
		o(m)
	}
	return s.registerFunc("RegisterSource", serviceMethod, m)
}

// A SourceOption changes how RegisterSource serves a method.
type SourceOption func(*method)

// SharedValues declares that the sources' values are pointers to values
// that are never modified once a source returned them, and that one
// value may be returned by many sources (a change fanned out to many
// streams). A connection's writer then encodes such a value once and
// writes the same bytes for each reply that carries it in a row, as when
// a change reaches the many streams of one connection. A source that
// reuses its value (see Source.Next) must not be registered with it.
func SharedValues() SourceOption { return func(m *method) { m.shared = true } }

// runSource is the goroutine that opens the source of st, then hands it
// to the writer.
func (c *serverConn) runSource(st *serverStream, m *method, args any) {
	defer c.handlers.Done()
	src, err := c.openSource(st, m, args)
	if err != nil {
		c.endStream(st, err)
		return
	}
	c.mu.Lock()
	if st.final || c.dead {
		// Ended while it opened: the writer will never pull it.
		c.mu.Unlock()
		src.Close()
		return
	}
	st.src = src
	st.signalled = true
	c.readyLocked(st)
	c.mu.Unlock()
}

func (c *serverConn) openSource(st *serverStream, m *method, args any) (src Source, err error) {
	defer c.recoverMethod(st.method, &err)
	src, err = m.source(st.ctx, args, st.ready)
	if err == nil && src == nil {
		err = errors.New("rpc: method returned no source")
	}
	return src, err
}

// ready is the function a Source calls when it may have a value.
func (st *serverStream) ready() {
	c := st.c
	c.mu.Lock()
	st.signalled = true
	if st.src != nil && !st.final {
		c.readyLocked(st)
	}
	c.mu.Unlock()
}

// readyLocked puts the queue of st in the writer's round. c.mu must be
// held.
func (c *serverConn) readyLocked(st *serverStream) {
	if c.dead || st.q.queued {
		return
	}
	st.q.queued = true
	c.ready.push(&st.q)
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

// pullLocked takes the next reply of a pulled stream, whose queue the
// writer has just taken from the round: ok false when the source has none
// now (the queue then stays out of the round until the source calls
// ready) or the stream ended. It is called by the writer with c.mu held,
// and releases it while it asks the source.
func (c *serverConn) pullLocked(st *serverStream) (msg response, ok bool) {
	st.q.queued = false // out of the round; ready puts it back
	st.signalled = false
	src := st.src
	c.mu.Unlock()
	v, ok, err := c.next(st, src)
	c.mu.Lock()
	switch {
	case st.final || c.dead:
		return response{}, false // ended meanwhile: its final reply is queued
	case err != nil:
		text := eos
		if !errors.Is(err, io.EOF) {
			text = errorText(err)
		}
		st.endLocked(text, false)
		return response{}, false
	case !ok:
		if st.signalled {
			c.readyLocked(st) // a value came while it was asked
		}
		return response{}, false
	}
	c.readyLocked(st) // it may have more: ask again in its turn
	// Only a pointer can be shared (and compared by the codec).
	shared := st.shared && reflect.ValueOf(v).Kind() == reflect.Pointer
	return response{method: st.method, seq: st.seq, body: v, shared: shared}, true
}

// next asks src for its next value, turning a panic into an error that
// ends the stream (logged with its stack), as for a method's panic.
func (c *serverConn) next(st *serverStream, src Source) (v any, ok bool, err error) {
	defer c.recoverMethod(st.method, &err)
	return src.Next()
}

// closeEnded closes the sources of ended streams. It is called by the
// writer with c.mu held, and releases it while it closes them.
func (c *serverConn) closeEnded() {
	srcs := c.closing
	c.closing = nil
	c.mu.Unlock()
	for _, src := range srcs {
		src.Close()
	}
	c.mu.Lock()
}

// closeSources closes the sources of the streams still open when the
// connection ended; serve calls it after the writer and the handlers have
// returned.
func (c *serverConn) closeSources() {
	c.mu.Lock()
	srcs := c.closing
	c.closing = nil
	for _, st := range c.active {
		if st.src != nil {
			srcs = append(srcs, st.src)
			st.src = nil
		}
	}
	c.mu.Unlock()
	for _, src := range srcs {
		src.Close()
	}
}
