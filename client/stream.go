package discoverd

import (
	"context"
	"sync"

	"github.com/flynn/discoverd/api"
	"github.com/flynn/discoverd/rpc"
)

// subscription is one Agent.Subscribe stream on one connection, read by
// one goroutine (a ServiceSet's or a Stream's).
type subscription struct {
	name string
	call *rpc.StreamCall
	ch   chan *ServiceUpdate // closed by rpc when the stream ends
}

// subscriptionBuffer is the capacity of a subscription's channel. Its
// reader empties it at once into bounded buffers of its own (a set's view,
// a Stream's Updates), so this only smooths bursts.
const subscriptionBuffer = 64

// subscribe opens Agent.Subscribe for name on conn (nil: while
// disconnected). Cancelling ctx closes the stream. It fails with
// ErrDisconnected, ErrClosed or the rpc layer's error.
func (c *Client) subscribe(ctx context.Context, conn *rpc.Client, name string) (*subscription, error) {
	if conn == nil {
		if c.isClosed() {
			return nil, ErrClosed
		}
		return nil, ErrDisconnected
	}
	ch := make(chan *ServiceUpdate, subscriptionBuffer)
	call, err := conn.Stream(ctx, api.MethodSubscribe, &api.Args{Name: name}, ch)
	if err != nil {
		if c.ctx.Err() != nil {
			return nil, ErrClosed
		}
		return nil, wireError("subscribe "+name, err)
	}
	return &subscription{name: name, call: call, ch: ch}, nil
}

// stop closes the stream and drains its channel until rpc closes it (at
// the end of the stream or of the connection): rpc's reader blocks on a
// full channel, which would stall every call on the connection.
func (s *subscription) stop() {
	s.call.Close()
	for range s.ch {
	}
}

// err returns why the stream ended, once its channel is closed.
func (s *subscription) err() error {
	err := s.call.Err()
	if err == nil {
		err = errStreamEnded
	}
	return wireError("subscribe "+s.name, err)
}

// ErrSlowReader ends a Stream whose reader fell more than Config.WatchBuffer
// updates behind.
var ErrSlowReader error = &api.Error{Code: api.CodeResourceExhausted, Message: "discoverd: stream reader fell behind"}

// A Stream is a raw subscription to the agent: what Agent.Subscribe sends,
// unprocessed. Unlike a ServiceSet it does not survive a reconnection and
// it shows the sentinel. Updates are buffered (Config.WatchBuffer); a
// reader that falls further behind ends the stream with ErrSlowReader.
type Stream struct {
	updates chan *ServiceUpdate
	cancel  context.CancelFunc
	done    chan struct{}

	mu  sync.Mutex
	err error
}

// Subscribe opens a raw stream of the instances of name: an online update
// for each current instance, then the sentinel (an update for which
// IsSentinel is true) meaning "you are current", then every change. The
// stream ends when ctx is done, Close is called, the connection is lost
// (ErrDisconnected) or the agent ends it. It fails at once with
// ErrDisconnected while the client is reconnecting, and with ErrClosed
// after Close.
func (c *Client) Subscribe(ctx context.Context, name string) (*Stream, error) {
	ctx, cancel := context.WithCancel(ctx)
	stop := context.AfterFunc(c.ctx, cancel) // the client's Close ends the stream
	sub, err := c.subscribe(ctx, c.current(), name)
	if err != nil {
		stop()
		cancel()
		return nil, err
	}
	s := &Stream{updates: make(chan *ServiceUpdate, c.cfg.WatchBuffer), cancel: cancel, done: make(chan struct{})}
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		stop()
		cancel()
		sub.stop()
		return nil, ErrClosed
	}
	c.wg.Add(1)
	c.mu.Unlock()
	go func() {
		defer c.wg.Done()
		defer close(s.done)
		defer stop()
		defer close(s.updates)
		err := s.forward(ctx, sub)
		s.mu.Lock()
		s.err = err
		s.mu.Unlock()
	}()
	return s, nil
}

// forward copies the updates of sub to s.updates until the stream ends,
// ctx is done or the reader falls behind, and returns why it stopped.
func (s *Stream) forward(ctx context.Context, sub *subscription) error {
	for {
		select {
		case u, ok := <-sub.ch:
			if !ok {
				if ctx.Err() != nil { // rpc closed the stream for ctx
					return wireError("subscribe "+sub.name, ctx.Err())
				}
				return sub.err()
			}
			select {
			case s.updates <- u:
			default:
				sub.stop()
				return ErrSlowReader
			}
		case <-ctx.Done():
			sub.stop()
			return wireError("subscribe "+sub.name, ctx.Err())
		}
	}
}

// Updates returns the stream's channel. It is closed when the stream ends
// (after the values already queued); Err then says why.
func (s *Stream) Updates() <-chan *ServiceUpdate { return s.updates }

// Err returns why the stream ended (nil while it runs). A stream ended by
// its context or by Close reports context.Canceled.
func (s *Stream) Err() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.err
}

// Done is closed when the stream has ended and Err is set. Updates may
// still hold queued values.
func (s *Stream) Done() <-chan struct{} { return s.done }

// Close ends the stream and waits for it to stop. It is idempotent.
func (s *Stream) Close() error {
	s.cancel()
	<-s.done
	return nil
}
