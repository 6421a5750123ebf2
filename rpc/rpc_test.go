package rpc_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"reflect"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/flynn/discoverd/rpc"
)

func TestUnaryCalls(t *testing.T) {
	forCodecs(t, func(t *testing.T, codec rpc.Codec) {
		ts := startServer(t, nil)
		c := mustDial(t, ts.addr, codec)
		ctx := testCtx(t)

		var r Reply
		attrs := map[string]string{"k": "v"}
		if err := c.Call(ctx, "Arith.Add", &Args{A: 2, B: 3, Attrs: attrs}, &r); err != nil {
			t.Fatal(err)
		}
		if r.C != 5 || r.Attrs["k"] != "v" {
			t.Errorf("Add = %+v, want C=5 and the attrs echoed", r)
		}
		r = Reply{}
		if err := c.Call(ctx, "Arith.Mul", Args{A: 4, B: 5}, &r); err != nil || r.C != 20 {
			t.Errorf("Mul = %+v, %v; want C=20", r, err)
		}

		err := c.Call(ctx, "Arith.Fail", &Args{}, &r)
		var se rpc.ServerError
		if !errors.As(err, &se) || err.Error() != "not_found: no such thing" {
			t.Errorf("Fail: err = %#v, want ServerError with the method's text", err)
		}

		// Absent maps stay nil rather than being invented by the server.
		r = Reply{}
		if err := c.Call(ctx, "Arith.Add", &Args{A: 1}, &r); err != nil || r.Attrs != nil {
			t.Errorf("Add without attrs = %+v, %v; want nil Attrs", r, err)
		}
	})
}

func TestUnknownMethodKeepsConnection(t *testing.T) {
	forCodecs(t, func(t *testing.T, codec rpc.Codec) {
		ts := startServer(t, nil)
		c := mustDial(t, ts.addr, codec)
		ctx := testCtx(t)
		for _, m := range []string{"Arith.Nope", "Nope.Add", "NoDot", "CloseStreamX.Y"} {
			var r Reply
			err := c.Call(ctx, m, &Args{A: 1}, &r)
			var se rpc.ServerError
			if !errors.As(err, &se) {
				t.Errorf("Call(%q): err = %v, want a ServerError", m, err)
			}
		}
		var r Reply
		if err := c.Call(ctx, "Arith.Add", &Args{A: 1, B: 1}, &r); err != nil || r.C != 2 {
			t.Fatalf("Add after unknown methods = %+v, %v", r, err)
		}
	})
}

// Many calls are in flight on one connection; a blocked call does not hold
// back the others, and replies arrive out of order.
func TestConcurrentInterleavedCalls(t *testing.T) {
	forCodecs(t, func(t *testing.T, codec rpc.Codec) {
		ts := startServer(t, nil)
		c := mustDial(t, ts.addr, codec)
		ctx := testCtx(t)

		blocked := c.Go("Arith.Block", &Args{}, &Reply{}, nil)
		recv(t, ts.arith.blocked, "Block to start")

		// A stream is in flight too.
		items := make(chan Reply, 1)
		sc, err := c.Stream(ctx, "Arith.Forever", &Args{A: 1}, items)
		if err != nil {
			t.Fatal(err)
		}
		recv(t, items, "first stream reply")

		const n = 50
		var wg sync.WaitGroup
		errs := make(chan error, n)
		for i := range n {
			wg.Add(1)
			go func() {
				defer wg.Done()
				var r Reply
				if err := c.Call(ctx, "Arith.Add", &Args{A: i, B: 1}, &r); err != nil {
					errs <- err
				} else if r.C != i+1 {
					errs <- fmt.Errorf("Add(%d, 1) = %d", i, r.C)
				}
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Error(err)
		}
		select {
		case <-blocked.Done:
			t.Fatal("Block completed before it was released")
		default:
		}
		close(ts.arith.release)
		call := recv(t, blocked.Done, "Block reply")
		if call.Error != nil || call.Reply.(*Reply).S != "released" {
			t.Errorf("Block = %+v, %v", call.Reply, call.Error)
		}
		sc.Close()
		drain(t, items)
		if err := sc.Err(); err != nil {
			t.Errorf("stream Err after Close = %v, want nil", err)
		}
	})
}

func TestConnIdentity(t *testing.T) {
	ts := startServer(t, nil)
	ctx := testCtx(t)
	ids := map[uint64]bool{}
	for range 2 {
		c := mustDial(t, ts.addr, rpc.Gob)
		var a, b uint64
		if err := c.Call(ctx, "Arith.ConnID", &Args{}, &a); err != nil {
			t.Fatal(err)
		}
		if err := c.Call(ctx, "Arith.ConnID", &Args{}, &b); err != nil {
			t.Fatal(err)
		}
		if a != b {
			t.Errorf("two calls on one connection saw IDs %d and %d", a, b)
		}
		ids[a] = true
	}
	if len(ids) != 2 {
		t.Errorf("two connections share an ID: %v", ids)
	}
	if rpc.ConnFromContext(context.Background()) != nil {
		t.Error("ConnFromContext outside a call is not nil")
	}
}

func TestStream(t *testing.T) {
	forCodecs(t, func(t *testing.T, codec rpc.Codec) {
		ts := startServer(t, nil)
		c := mustDial(t, ts.addr, codec)
		ctx := testCtx(t)

		t.Run("chan T", func(t *testing.T) {
			ch := make(chan Reply)
			sc, err := c.Stream(ctx, "Arith.Count", &Args{A: 5, S: "x"}, ch)
			if err != nil {
				t.Fatal(err)
			}
			got := drain(t, ch)
			if len(got) != 5 {
				t.Fatalf("got %d replies, want 5", len(got))
			}
			for i, r := range got {
				if r.C != i || r.S != "x" {
					t.Errorf("reply %d = %+v", i, r)
				}
			}
			if err := sc.Err(); err != nil {
				t.Errorf("Err = %v, want nil after EOS", err)
			}
			recv(t, sc.Done(), "Done")
		})
		t.Run("chan *T", func(t *testing.T) {
			ch := make(chan *Reply, 2)
			sc, err := c.Stream(ctx, "Arith.Count", &Args{A: 3}, ch)
			if err != nil {
				t.Fatal(err)
			}
			if got := drain(t, ch); len(got) != 3 || got[2].C != 2 {
				t.Errorf("got %v", got)
			}
			if err := sc.Err(); err != nil {
				t.Errorf("Err = %v", err)
			}
		})
		t.Run("error end", func(t *testing.T) {
			ch := make(chan Reply, 2)
			sc, err := c.Stream(ctx, "Arith.FailStream", &Args{}, ch)
			if err != nil {
				t.Fatal(err)
			}
			if got := drain(t, ch); len(got) != 1 {
				t.Errorf("got %d replies, want 1", len(got))
			}
			if err := sc.Err(); err == nil || err.Error() != "stream broke" {
				t.Errorf("Err = %v, want ServerError(stream broke)", err)
			}
		})
		t.Run("unknown method", func(t *testing.T) {
			ch := make(chan Reply, 1)
			sc, err := c.Stream(ctx, "Arith.Nope", &Args{}, ch)
			if err != nil {
				t.Fatal(err)
			}
			drain(t, ch)
			var se rpc.ServerError
			if !errors.As(sc.Err(), &se) {
				t.Errorf("Err = %v, want ServerError", sc.Err())
			}
		})
		t.Run("bad channel", func(t *testing.T) {
			if _, err := c.Stream(ctx, "Arith.Count", &Args{}, make(<-chan Reply)); err == nil {
				t.Error("receive-only channel accepted")
			}
			if _, err := c.Stream(ctx, "Arith.Count", &Args{}, 42); err == nil {
				t.Error("non-channel accepted")
			}
		})
	})
}

func TestStreamCancel(t *testing.T) {
	forCodecs(t, func(t *testing.T, codec rpc.Codec) {
		for _, how := range []string{"Close", "ctx"} {
			t.Run(how, func(t *testing.T) {
				ts := startServer(t, nil)
				c := mustDial(t, ts.addr, codec)
				sctx, cancel := context.WithCancel(testCtx(t))
				defer cancel()
				ch := make(chan Reply)
				sc, err := c.Stream(sctx, "Arith.Forever", &Args{A: 3}, ch)
				if err != nil {
					t.Fatal(err)
				}
				for i := range 3 {
					if r := recv(t, ch, "reply"); r.C != i {
						t.Fatalf("reply %d = %+v", i, r)
					}
				}
				if how == "Close" {
					if err := sc.Close(); err != nil {
						t.Fatal(err)
					}
					sc.Close() // idempotent
				} else {
					cancel()
				}
				if err := recv(t, ts.arith.streamEnd, "handler to see the cancel"); !errors.Is(err, context.Canceled) {
					t.Errorf("handler's ctx ended with %v, want Canceled", err)
				}
				drain(t, ch)
				if err := sc.Err(); err != nil {
					t.Errorf("Err = %v, want nil (EOS)", err)
				}
				// The connection goes on.
				var r Reply
				if err := c.Call(testCtx(t), "Arith.Add", &Args{A: 1, B: 2}, &r); err != nil || r.C != 3 {
					t.Errorf("Add after cancel = %+v, %v", r, err)
				}
				select {
				case err := <-ts.arith.streamEnd:
					t.Errorf("handler reported %v", err)
				default:
				}
			})
		}
	})
}

// The client goes away in the middle of a stream: the handler's context is
// cancelled and the connection's Done fires.
func TestClientDisconnectMidStream(t *testing.T) {
	forCodecs(t, func(t *testing.T, codec rpc.Codec) {
		ts := startServer(t, nil)
		c := mustDial(t, ts.addr, codec)
		ch := make(chan Reply, 1)
		sc, err := c.Stream(testCtx(t), "Arith.Forever", &Args{A: 1}, ch)
		if err != nil {
			t.Fatal(err)
		}
		recv(t, ch, "first reply")
		recv(t, ts.arith.connIDs, "conn id")
		if err := c.Close(); err != nil {
			t.Fatal(err)
		}
		if err := recv(t, ts.arith.streamEnd, "handler to end"); !errors.Is(err, context.Canceled) {
			t.Errorf("handler ctx ended with %v", err)
		}
		drain(t, ch)
		if !errors.Is(sc.Err(), rpc.ErrShutdown) {
			t.Errorf("stream Err = %v, want ErrShutdown", sc.Err())
		}
		if err := c.Call(testCtx(t), "Arith.Add", &Args{}, &Reply{}); !errors.Is(err, rpc.ErrShutdown) {
			t.Errorf("Call after Close = %v, want ErrShutdown", err)
		}
		if err := c.Close(); !errors.Is(err, rpc.ErrShutdown) {
			t.Errorf("second Close = %v, want ErrShutdown", err)
		}
	})
}

func TestServerCloseShutsClientsDown(t *testing.T) {
	forCodecs(t, func(t *testing.T, codec rpc.Codec) {
		ts := startServer(t, nil)
		c := mustDial(t, ts.addr, codec)
		ctx := testCtx(t)
		blocked := c.Go("Arith.Block", &Args{}, &Reply{}, nil)
		recv(t, ts.arith.blocked, "Block to start")
		ch := make(chan Reply, 1)
		sc, err := c.Stream(ctx, "Arith.Forever", &Args{}, ch)
		if err != nil {
			t.Fatal(err)
		}
		recv(t, ts.arith.connIDs, "stream to start")

		if err := ts.srv.Close(context.Background()); err != nil {
			t.Fatal(err)
		}
		// Close waited for the handlers.
		select {
		case err := <-ts.arith.streamEnd:
			if !errors.Is(err, context.Canceled) {
				t.Errorf("stream handler ended with %v", err)
			}
		default:
			t.Error("Close returned before the stream handler ended")
		}
		if call := recv(t, blocked.Done, "Block to fail"); !errors.Is(call.Error, rpc.ErrShutdown) {
			t.Errorf("pending call: %v, want ErrShutdown", call.Error)
		}
		drain(t, ch)
		if !errors.Is(sc.Err(), rpc.ErrShutdown) {
			t.Errorf("stream: %v, want ErrShutdown", sc.Err())
		}
		recv(t, c.Done(), "client Done")
		if _, err := rpc.Dial(ctx, ts.addr, codec); err == nil {
			t.Error("Dial after server Close succeeded")
		}
	})
}

// A stream far longer than the stream buffer, sent in a tight loop,
// reaches a reader that keeps up whole: Send waits for the connection's
// writer instead of cutting the stream.
func TestLongStreamToFastReader(t *testing.T) {
	forCodecs(t, func(t *testing.T, codec rpc.Codec) {
		const n = 1000 // rpc.DefaultStreamBuffer is 256
		ts := startServer(t, nil)
		c := mustDial(t, ts.addr, codec)
		ch := make(chan Reply)
		sc, err := c.Stream(testCtx(t), "Arith.Count", &Args{A: n}, ch)
		if err != nil {
			t.Fatal(err)
		}
		got := drain(t, ch)
		if err := sc.Err(); err != nil {
			t.Fatalf("stream ended with %v after %d replies, want EOS after %d", err, len(got), n)
		}
		if len(got) != n {
			t.Fatalf("%d replies, want %d", len(got), n)
		}
		for i, r := range got {
			if r.C != i {
				t.Fatalf("reply %d = %+v", i, r)
			}
		}
	})
}

// A Send that waits for room returns ErrStreamClosed as soon as the stream
// ends, here by the client's cancel while it reads nothing; the stream
// ends with EOS and the connection goes on.
func TestWaitingSendEndsWithStream(t *testing.T) {
	forCodecs(t, func(t *testing.T, codec rpc.Codec) {
		ts := startServer(t, func(s *rpc.Server) { s.StreamBuffer = 4 })
		c := mustDial(t, ts.addr, codec)
		ctx := testCtx(t)
		ch := make(chan Reply) // not read until the stream is cancelled
		sc, err := c.Stream(ctx, "Arith.Flood", &Args{S: "0123456789abcdef", B: 1024}, ch)
		if err != nil {
			t.Fatal(err)
		}
		for i := -1; i < 5; i = recv(t, ts.arith.sending, "Flood to send") {
		}
		sc.Close()
		if err := recv(t, ts.arith.streamEnd, "Flood to end"); !errors.Is(err, rpc.ErrStreamClosed) {
			t.Errorf("Send returned %v, want ErrStreamClosed", err)
		}
		drain(t, ch)
		if err := sc.Err(); err != nil {
			t.Errorf("stream Err = %v, want nil (EOS)", err)
		}
		var r Reply
		if err := c.Call(ctx, "Arith.Add", &Args{A: 1, B: 1}, &r); err != nil || r.C != 2 {
			t.Errorf("Add after the stream: %+v, %v", r, err)
		}
	})
}

// Streams beyond MaxStreamsPerConn are refused with TooManyStreams's text
// without their method being called; a stream's slot is free again once
// its end is written.
func TestStreamCapPerConnection(t *testing.T) {
	forCodecs(t, func(t *testing.T, codec rpc.Codec) {
		ts := startServer(t, func(s *rpc.Server) {
			s.MaxStreamsPerConn = 2
			s.TooManyStreams = func(limit int) error { return fmt.Errorf("resource_exhausted: %d streams", limit) }
		})
		c := mustDial(t, ts.addr, codec)
		ctx := testCtx(t)
		open := func() (*rpc.StreamCall, chan Reply) {
			ch := make(chan Reply, 1)
			sc, err := c.Stream(ctx, "Arith.Forever", &Args{}, ch)
			if err != nil {
				t.Fatal(err)
			}
			return sc, ch
		}
		first, ch1 := open()
		recv(t, ts.arith.connIDs, "first stream to start")
		_, ch2 := open()
		recv(t, ts.arith.connIDs, "second stream to start")
		for range 3 {
			sc, ch := open()
			drain(t, ch)
			if err := sc.Err(); err == nil || err.Error() != "resource_exhausted: 2 streams" {
				t.Errorf("stream over the cap ended with %v", err)
			}
		}
		select {
		case <-ts.arith.connIDs:
			t.Error("the method of a refused stream was called")
		default:
		}
		first.Close()
		drain(t, ch1)
		recv(t, ts.arith.streamEnd, "first stream to end")
		_, ch3 := open()
		recv(t, ts.arith.connIDs, "a stream in the freed slot to start")
		c.Close()
		drain(t, ch2)
		drain(t, ch3)
		for range 2 {
			recv(t, ts.arith.streamEnd, "streams to end")
		}
	})
}

// A peer that asks for streams without end and never reads makes the
// server start no more than MaxStreamsPerConn methods; the others are
// refused, and their refusals are written once the peer reads.
func TestStreamFloodStartsNoMoreThanTheCap(t *testing.T) {
	srv := rpc.NewServer()
	srv.MaxStreamsPerConn = 2
	srv.MaxCallsPerConn = 4
	var started atomic.Int32
	err := rpc.RegisterStream(srv, "Flood.Wait", func(ctx context.Context, args *Args, st rpc.Stream) error {
		started.Add(1)
		<-ctx.Done()
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close(context.Background())
	serverSide, clientSide := net.Pipe() // synchronous: the server reads only what we write
	defer clientSide.Close()
	served := make(chan struct{})
	go func() {
		defer close(served)
		srv.ServeConn(serverSide, rpc.Gob)
	}()
	clientSide.SetDeadline(time.Now().Add(waitTimeout))
	p := newGobPeer(t, clientSide)
	const n = 200
	sent := make(chan struct{})
	go func() {
		defer close(sent)
		for i := range n {
			p.send("Flood.Wait", uint64(i+1), wireArgs{})
		}
	}()
	refused := 0
	for refused < n-2 {
		h, _ := p.recv()
		if h.Error == "" || h.Error == "EOS" {
			t.Fatalf("unexpected reply %+v", h)
		}
		refused++
	}
	recv(t, sent, "every request to be read")
	if got := started.Load(); got != 2 {
		t.Errorf("%d stream methods started, want 2 (the cap)", got)
	}
	clientSide.Close()
	recv(t, served, "ServeConn to return")
}

// Express methods have call slots of their own: while the connection's
// other calls hold every shared slot, an express call still runs.
func TestExpressCallsBypassStuckCalls(t *testing.T) {
	forCodecs(t, func(t *testing.T, codec rpc.Codec) {
		ts := startServer(t, func(s *rpc.Server) { s.MaxCallsPerConn = 2 })
		if err := rpc.RegisterUnary(ts.srv, "Fn.Add", ts.arith.Add, rpc.Express()); err != nil {
			t.Fatal(err)
		}
		c := mustDial(t, ts.addr, codec)
		ctx := testCtx(t)
		b1 := c.Go("Arith.Block", &Args{}, &Reply{}, nil)
		b2 := c.Go("Arith.Block", &Args{}, &Reply{}, nil)
		recv(t, ts.arith.blocked, "first Block to start")
		recv(t, ts.arith.blocked, "second Block to start")
		var r Reply
		if err := c.Call(ctx, "Fn.Add", &Args{A: 1, B: 2}, &r); err != nil || r.C != 3 {
			t.Errorf("express Add while the shared slots are taken = %+v, %v", r, err)
		}
		select {
		case <-b1.Done:
			t.Error("Block returned before it was released")
		case <-b2.Done:
			t.Error("Block returned before it was released")
		default:
		}
		close(ts.arith.release)
		recv(t, b1.Done, "first Block")
		recv(t, b2.Done, "second Block")
	})
}

func TestCallContext(t *testing.T) {
	ts := startServer(t, nil)
	c := mustDial(t, ts.addr, rpc.Gob)
	ctx, cancel := context.WithCancel(testCtx(t))
	done := make(chan error, 1)
	go func() { done <- c.Call(ctx, "Arith.Block", &Args{}, &Reply{}) }()
	recv(t, ts.arith.blocked, "Block to start")
	cancel()
	if err := recv(t, done, "Call to return"); !errors.Is(err, context.Canceled) {
		t.Errorf("Call = %v, want Canceled", err)
	}
	close(ts.arith.release)
	// The late reply is discarded and the connection goes on.
	var r Reply
	if err := c.Call(testCtx(t), "Arith.Add", &Args{A: 2, B: 2}, &r); err != nil || r.C != 4 {
		t.Errorf("Add = %+v, %v", r, err)
	}
}

// A call abandoned by its ctx never has its reply written, even when the
// reply arrives as the ctx ends: the deadlines below straddle the round
// trip, and a later call proves that every earlier reply has been read.
func TestCallAbandonedReplyUntouched(t *testing.T) {
	forCodecs(t, func(t *testing.T, codec rpc.Codec) {
		ts := startServer(t, nil)
		c := mustDial(t, ts.addr, codec)
		type attempt struct {
			r   *Reply
			err error
		}
		var attempts []attempt
		for i := range 400 {
			ctx, cancel := context.WithTimeout(testCtx(t), time.Duration(i%40)*5*time.Microsecond)
			r := new(Reply)
			err := c.Call(ctx, "Arith.Add", &Args{A: 2, B: 2}, r)
			cancel()
			attempts = append(attempts, attempt{r, err})
		}
		var last Reply
		if err := c.Call(testCtx(t), "Arith.Add", &Args{A: 1, B: 1}, &last); err != nil || last.C != 2 {
			t.Fatalf("Add after the abandoned calls = %+v, %v", last, err)
		}
		abandoned := 0
		for i, a := range attempts {
			switch {
			case a.err == nil && a.r.C != 4:
				t.Errorf("call %d succeeded with reply %+v", i, *a.r)
			case a.err != nil && !reflect.DeepEqual(*a.r, Reply{}):
				t.Errorf("call %d returned %v, yet its reply was written later: %+v", i, a.err, *a.r)
			case a.err != nil:
				abandoned++
			}
		}
		t.Logf("%d of %d calls abandoned", abandoned, len(attempts))
	})
}

func TestHTTPUpgrade(t *testing.T) {
	ts := startServer(t, nil)
	for _, method := range []string{"GET", "POST"} {
		req, _ := http.NewRequest(method, "http://"+ts.addr+rpc.DefaultPath, nil)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusMethodNotAllowed {
			t.Errorf("%s %s = %d, want 405", method, rpc.DefaultPath, resp.StatusCode)
		}
	}
	resp, err := http.Get("http://" + ts.addr + "/hello")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(body) != "hello" {
		t.Errorf("plain HTTP on the same port = %q", body)
	}
	http.DefaultClient.CloseIdleConnections()
}

func TestRegister(t *testing.T) {
	s := rpc.NewServer()
	defer s.Close(context.Background())
	if err := s.Register(newArith()); err != nil {
		t.Fatal(err)
	}
	if err := s.Register(newArith()); err == nil {
		t.Error("second Register of the same name succeeded")
	}
	if err := s.RegisterName("Other", newArith()); err != nil {
		t.Error(err)
	}
	if err := s.Register(&struct{}{}); err == nil {
		t.Error("receiver without methods accepted")
	}
	if err := s.RegisterName("", newArith()); err == nil {
		t.Error("empty name accepted")
	}
	if err := s.Register(&Unsafe{}); err == nil {
		t.Error("argument with a map inside a slice accepted")
	}

	if err := s.Register(&OddShapes{}); err == nil {
		t.Error("receiver with only unsuitable methods accepted")
	}
}

// OddShapes has exported methods of no accepted shape.
type OddShapes struct{}

func (*OddShapes) Ping(ctx context.Context, reply *Reply) error     { return nil }
func (*OddShapes) NoError(args *Args, reply *Reply)                 {}
func (*OddShapes) ValueReply(args *Args, reply Reply) error         { return nil }
func (*OddShapes) TooMany(ctx context.Context, a, b, c *Args) error { return nil }
func (*OddShapes) Stream(ctx context.Context, s rpc.Stream) error   { return nil }

// Unsafe's argument holds maps where gob would size them from the peer.
type Unsafe struct{}

type UnsafeArgs struct{ List []map[string]string }

func (*Unsafe) M(args *UnsafeArgs, reply *Reply) error { return nil }

// writeSignalConn reports on writing each time a Write starts.
type writeSignalConn struct {
	net.Conn
	writing chan struct{}
}

func (c *writeSignalConn) Write(p []byte) (int, error) {
	select {
	case c.writing <- struct{}{}:
	default:
	}
	return c.Conn.Write(p)
}

// Call returns when its ctx ends even while its request cannot be written
// (here the peer never reads), and so does a call queued behind it; Close
// then ends the client.
func TestCallContextWhileWriting(t *testing.T) {
	serverSide, clientSide := net.Pipe() // writes block until read; nothing reads
	defer serverSide.Close()
	conn := &writeSignalConn{Conn: clientSide, writing: make(chan struct{}, 1)}
	c := rpc.NewClient(conn, rpc.Gob)
	defer c.Close()

	call := func(ctx context.Context) <-chan error {
		done := make(chan error, 1)
		go func() { done <- c.Call(ctx, "Arith.Add", &Args{A: 1, B: 2}, &Reply{}) }()
		return done
	}
	ctx1, cancel1 := context.WithCancel(testCtx(t))
	first := call(ctx1)
	recv(t, conn.writing, "the first request to be written")
	ctx2, cancel2 := context.WithCancel(testCtx(t))
	second := call(ctx2)

	cancel2()
	if err := recv(t, second, "the queued Call to return"); !errors.Is(err, context.Canceled) {
		t.Errorf("queued Call = %v, want Canceled", err)
	}
	cancel1()
	if err := recv(t, first, "the Call being written to return"); !errors.Is(err, context.Canceled) {
		t.Errorf("Call being written = %v, want Canceled", err)
	}
	if err := c.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
	recv(t, c.Done(), "the client to be done")
}

// Close waits for the methods only until its context is done; a later
// Close waits for the rest.
func TestServerCloseIsBounded(t *testing.T) {
	srv := rpc.NewServer()
	started, release := make(chan struct{}), make(chan struct{})
	err := rpc.RegisterUnary(srv, "Stuck.Wait", func(ctx context.Context, args *Args, reply *Reply) error {
		close(started)
		<-release // deaf to ctx, as a method stuck in I/O
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	serverSide, clientSide := net.Pipe()
	defer clientSide.Close()
	served := make(chan struct{})
	go func() {
		defer close(served)
		srv.ServeConn(serverSide, rpc.Gob)
	}()
	newGobPeer(t, clientSide).send("Stuck.Wait", 1, wireArgs{})
	recv(t, started, "the method to start")

	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if err := srv.Close(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Close with a stuck method = %v, want DeadlineExceeded", err)
	}
	close(release)
	if err := srv.Close(context.Background()); err != nil {
		t.Fatalf("second Close = %v", err)
	}
	recv(t, served, "ServeConn to return")
}
