package rpc_test

import (
	"context"
	"errors"
	"io"
	"sync"
	"testing"

	"github.com/flynn/discoverd/rpc"
)

// feed is a Source the test fills: push queues a reply (and calls ready),
// finish makes it end with err once drained. closed receives once when
// the server closes it.
type feed struct {
	mu     sync.Mutex
	q      []Reply
	err    error
	ready  func()
	cur    Reply
	nexts  int // Next calls made after Close: must stay 0
	shut   bool
	closed chan struct{}
}

func (f *feed) push(r Reply) {
	f.mu.Lock()
	f.q = append(f.q, r)
	ready := f.ready
	f.mu.Unlock()
	ready()
}

func (f *feed) finish(err error) {
	f.mu.Lock()
	f.err = err
	ready := f.ready
	f.mu.Unlock()
	ready()
}

func (f *feed) Next() (any, bool, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.shut {
		f.nexts++
	}
	if len(f.q) > 0 {
		f.cur, f.q = f.q[0], f.q[1:]
		return &f.cur, true, nil // reused: encoded before the next call
	}
	if f.err != nil {
		return nil, false, f.err
	}
	return nil, false, nil
}

func (f *feed) Close() {
	f.mu.Lock()
	f.shut = true
	f.mu.Unlock()
	close(f.closed) // a second Close would panic
}

// startFeedServer publishes "Feed.Open", a pulled stream whose sources
// (one per call, with args.A replies queued at the start) are sent on
// opened.
func startFeedServer(t *testing.T, opened chan *feed) *testServer {
	t.Helper()
	ts := startServer(t, nil)
	err := rpc.RegisterSource(ts.srv, "Feed.Open", func(ctx context.Context, args *Args, ready func()) (rpc.Source, error) {
		if args.S == "refuse" {
			return nil, errors.New("refused")
		}
		f := &feed{ready: ready, closed: make(chan struct{})}
		for i := range args.A {
			f.q = append(f.q, Reply{C: i, S: args.S})
		}
		opened <- f
		return f, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return ts
}

// A pulled stream is an ordinary stream on the wire: the queued replies
// in order, later ones as the source readies them, then EOS or the
// source's error; the source is closed exactly once, never asked again
// after, whether the stream ended by itself, by CloseStream or with the
// connection.
func TestSourceStream(t *testing.T) {
	forCodecs(t, func(t *testing.T, codec rpc.Codec) {
		opened := make(chan *feed, 1)
		ts := startFeedServer(t, opened)
		c := mustDial(t, ts.addr, codec)
		ctx := testCtx(t)

		t.Run("replies then EOS", func(t *testing.T) {
			ch := make(chan Reply, 16)
			sc, err := c.Stream(ctx, "Feed.Open", &Args{A: 3, S: "x"}, ch)
			if err != nil {
				t.Fatal(err)
			}
			f := recv(t, opened, "the source")
			for i := range 3 {
				if r := recv(t, ch, "a queued reply"); r.C != i || r.S != "x" {
					t.Fatalf("reply %d = %+v", i, r)
				}
			}
			f.push(Reply{C: 7})
			if r := recv(t, ch, "a later reply"); r.C != 7 {
				t.Fatalf("later reply = %+v", r)
			}
			f.finish(io.EOF)
			if got := drain(t, ch); len(got) != 0 {
				t.Fatalf("extra replies %+v", got)
			}
			if err := sc.Err(); err != nil {
				t.Fatalf("Err = %v, want nil after EOS", err)
			}
			recv(t, f.closed, "the source's Close")
		})
		t.Run("error end", func(t *testing.T) {
			ch := make(chan Reply, 16)
			sc, err := c.Stream(ctx, "Feed.Open", &Args{A: 1}, ch)
			if err != nil {
				t.Fatal(err)
			}
			f := recv(t, opened, "the source")
			f.finish(errors.New("resource_exhausted: too slow"))
			if got := drain(t, ch); len(got) != 1 {
				t.Fatalf("got %d replies, want the 1 queued before the end", len(got))
			}
			if err := sc.Err(); err == nil || err.Error() != "resource_exhausted: too slow" {
				t.Fatalf("Err = %v, want the source's error", err)
			}
			recv(t, f.closed, "the source's Close")
		})
		t.Run("open fails", func(t *testing.T) {
			ch := make(chan Reply, 1)
			sc, err := c.Stream(ctx, "Feed.Open", &Args{S: "refuse"}, ch)
			if err != nil {
				t.Fatal(err)
			}
			drain(t, ch)
			if err := sc.Err(); err == nil || err.Error() != "refused" {
				t.Fatalf("Err = %v, want refused", err)
			}
		})
		t.Run("client closes", func(t *testing.T) {
			ch := make(chan Reply, 16)
			sc, err := c.Stream(ctx, "Feed.Open", &Args{A: 1}, ch)
			if err != nil {
				t.Fatal(err)
			}
			f := recv(t, opened, "the source")
			recv(t, ch, "the queued reply")
			sc.Close()
			recv(t, f.closed, "the source's Close")
			f.push(Reply{C: 9}) // ready after the end is harmless
			var r Reply
			if err := c.Call(ctx, "Arith.Add", &Args{A: 1, B: 1}, &r); err != nil || r.C != 2 {
				t.Fatalf("Add after the close = %+v, %v", r, err)
			}
			f.mu.Lock()
			defer f.mu.Unlock()
			if f.nexts != 0 {
				t.Fatalf("Next called %d times after Close", f.nexts)
			}
		})
		t.Run("connection ends", func(t *testing.T) {
			c2 := mustDial(t, ts.addr, codec)
			ch := make(chan Reply, 16)
			if _, err := c2.Stream(ctx, "Feed.Open", &Args{}, ch); err != nil {
				t.Fatal(err)
			}
			f := recv(t, opened, "the source")
			c2.Close()
			recv(t, f.closed, "the source's Close")
		})
	})
}

// Many pulled streams of one connection all get every reply their sources
// ready at once, each in order.
func TestSourceManyStreams(t *testing.T) {
	const streams, replies = 50, 20
	opened := make(chan *feed, streams)
	ts := startFeedServer(t, opened)
	c := mustDial(t, ts.addr, rpc.Gob)
	ctx := testCtx(t)
	chans := make([]chan Reply, streams)
	for i := range chans {
		chans[i] = make(chan Reply, replies)
		if _, err := c.Stream(ctx, "Feed.Open", &Args{}, chans[i]); err != nil {
			t.Fatal(err)
		}
	}
	feeds := make([]*feed, streams)
	for i := range feeds {
		feeds[i] = recv(t, opened, "a source")
	}
	for n := range replies {
		for _, f := range feeds {
			f.push(Reply{C: n})
		}
	}
	for i, ch := range chans {
		for n := range replies {
			if r := recv(t, ch, "a reply"); r.C != n {
				t.Fatalf("stream %d: reply %d = %+v", i, n, r)
			}
		}
	}
}

// sharedFeed is a Source of shared values: every source of the test
// returns the same pointers, in order, then io.EOF.
type sharedFeed struct {
	vals []*Reply
	i    int
}

func (f *sharedFeed) Next() (any, bool, error) {
	if f.i == len(f.vals) {
		return nil, false, io.EOF
	}
	f.i++
	return f.vals[f.i-1], true, nil
}

func (f *sharedFeed) Close() {}

// Values shared between the streams of a connection (SharedValues) reach
// every stream intact, whether the connection encoded them afresh or
// wrote the bytes of the previous reply again, from its first reply on
// (where gob also sends the type) and after replies of other kinds.
func TestSourceSharedValues(t *testing.T) {
	forCodecs(t, func(t *testing.T, codec rpc.Codec) {
		ts := startServer(t, nil)
		vals := []*Reply{{C: 1, S: "a", Attrs: map[string]string{"k": "v"}}, {C: 2, S: "b"}, {C: 3}}
		err := rpc.RegisterSource(ts.srv, "Shared.Open", func(ctx context.Context, args *Args, ready func()) (rpc.Source, error) {
			return &sharedFeed{vals: vals}, nil
		}, rpc.SharedValues())
		if err != nil {
			t.Fatal(err)
		}
		ctx := testCtx(t)
		for _, warm := range []bool{false, true} {
			c := mustDial(t, ts.addr, codec)
			if warm {
				var r Reply
				if err := c.Call(ctx, "Arith.Add", &Args{A: 1}, &r); err != nil {
					t.Fatal(err)
				}
			}
			const streams = 20
			chans := make([]chan Reply, streams)
			calls := make([]*rpc.StreamCall, streams)
			for i := range chans {
				chans[i] = make(chan Reply, len(vals))
				if calls[i], err = c.Stream(ctx, "Shared.Open", &Args{}, chans[i]); err != nil {
					t.Fatal(err)
				}
			}
			for i, ch := range chans {
				got := drain(t, ch)
				if len(got) != len(vals) {
					t.Fatalf("warm %v, stream %d: %d replies, want %d", warm, i, len(got), len(vals))
				}
				for j, r := range got {
					if r.C != vals[j].C || r.S != vals[j].S || len(r.Attrs) != len(vals[j].Attrs) || r.Attrs["k"] != vals[j].Attrs["k"] {
						t.Fatalf("warm %v, stream %d, reply %d = %+v, want %+v", warm, i, j, r, *vals[j])
					}
				}
				if err := calls[i].Err(); err != nil {
					t.Fatalf("stream %d: Err = %v", i, err)
				}
			}
		}
	})
}

type panicSource struct{ closed chan struct{} }

func (p *panicSource) Next() (any, bool, error) { panic("boom") }
func (p *panicSource) Close()                   { close(p.closed) }

// A source whose Next panics ends its stream with an internal error; the
// connection and the server go on.
func TestSourcePanics(t *testing.T) {
	ts := startServer(t, nil)
	src := &panicSource{closed: make(chan struct{})}
	err := rpc.RegisterSource(ts.srv, "Panic.Open", func(ctx context.Context, args *Args, ready func()) (rpc.Source, error) {
		return src, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	c := mustDial(t, ts.addr, rpc.Gob)
	ctx := testCtx(t)
	ch := make(chan Reply, 1)
	sc, err := c.Stream(ctx, "Panic.Open", &Args{}, ch)
	if err != nil {
		t.Fatal(err)
	}
	drain(t, ch)
	if err := sc.Err(); err == nil || err.Error() != "rpc: method Panic.Open failed (internal error)" {
		t.Fatalf("Err = %v, want the internal error", err)
	}
	recv(t, src.closed, "the source's Close")
	var r Reply
	if err := c.Call(ctx, "Arith.Add", &Args{A: 1, B: 1}, &r); err != nil || r.C != 2 {
		t.Fatalf("Add after the panic = %+v, %v", r, err)
	}
}
