package discoverd

import (
	"context"
	"errors"
	"sync"

	"github.com/flynn/discoverd/api"
)

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
// ErrDisconnected while the client is reconnecting.
func (c *Client) Subscribe(ctx context.Context, name string) (*Stream, error) {
	conn := c.current()
	if conn == nil {
		return nil, wireError("subscribe "+name, ErrDisconnected)
	}
	ctx, cancel := context.WithCancel(ctx)
	stop := context.AfterFunc(c.ctx, cancel) // the client's Close ends the stream
	in := make(chan *ServiceUpdate, 64)
	call, err := conn.Stream(ctx, api.MethodSubscribe, &api.Args{Name: name}, in)
	if err != nil {
		stop()
		cancel()
		return nil, wireError("subscribe "+name, err)
	}
	s := &Stream{updates: make(chan *ServiceUpdate, c.cfg.WatchBuffer), cancel: cancel, done: make(chan struct{})}
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		stop()
		cancel()
		call.Close()
		for range in {
		}
		return nil, wireError("subscribe "+name, ErrClosed)
	}
	c.wg.Add(1)
	c.mu.Unlock()
	go func() {
		defer c.wg.Done()
		defer close(s.done)
		defer stop()
		defer close(s.updates)
		var err error
	loop:
		for {
			select {
			case u, ok := <-in:
				if !ok {
					err = call.Err()
					break loop
				}
				select {
				case s.updates <- u:
				default:
					err = ErrSlowReader
					break loop
				}
			case <-ctx.Done():
				err = ctx.Err()
				break loop
			}
		}
		call.Close()
		for range in { // until the stream's end or the connection's
		}
		if err == nil {
			err = errors.New("the agent ended the stream")
		}
		s.mu.Lock()
		s.err = wireError("subscribe "+name, err)
		s.mu.Unlock()
	}()
	return s, nil
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
