package rpc_test

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/flynn/discoverd/rpc"
)

// registerFuncs publishes, under service "Fn", typed functions that behave
// as the Arith receiver's methods of the same names (most are its method
// values), plus Panic.
func registerFuncs(t *testing.T, srv *rpc.Server, a *Arith) {
	t.Helper()
	err := errors.Join(
		rpc.RegisterUnary(srv, "Fn.Add", a.Add),
		rpc.RegisterUnary(srv, "Fn.Fail", a.Fail),
		rpc.RegisterUnary(srv, "Fn.ConnID", a.ConnID),
		rpc.RegisterUnary(srv, "Fn.Panic", func(ctx context.Context, args *Args, reply *Reply) error {
			panic("boom")
		}),
		rpc.RegisterStream(srv, "Fn.Count", a.Count),
		rpc.RegisterStream(srv, "Fn.FailStream", func(ctx context.Context, args *Args, st rpc.Stream) error {
			return a.FailStream(args, st)
		}),
		rpc.RegisterStream(srv, "Fn.Forever", a.Forever),
		rpc.RegisterStream(srv, "Fn.Flood", a.Flood),
		rpc.RegisterStream(srv, "Fn.PanicStream", func(ctx context.Context, args *Args, st rpc.Stream) error {
			if err := st.Send(&Reply{C: 1}); err != nil {
				return err
			}
			panic("boom")
		}),
	)
	if err != nil {
		t.Fatal(err)
	}
}

// startFuncServer is startServer with the typed functions of registerFuncs
// registered as well.
func startFuncServer(t *testing.T, configure func(*rpc.Server)) *testServer {
	t.Helper()
	ts := startServer(t, configure)
	registerFuncs(t, ts.srv, ts.arith)
	return ts
}

// Typed functions answer exactly as the receiver's methods they mirror:
// replies, errors, streams and their ends, panics, bad arguments.
func TestTypedFunctions(t *testing.T) {
	forCodecs(t, func(t *testing.T, codec rpc.Codec) {
		ts := startFuncServer(t, nil)
		c := mustDial(t, ts.addr, codec)
		ctx := testCtx(t)

		t.Run("unary", func(t *testing.T) {
			var r Reply
			if err := c.Call(ctx, "Fn.Add", &Args{A: 2, B: 3, Attrs: map[string]string{"k": "v"}}, &r); err != nil {
				t.Fatal(err)
			}
			if r.C != 5 || r.Attrs["k"] != "v" {
				t.Errorf("Add = %+v, want C=5 and the attrs echoed", r)
			}
			r = Reply{}
			if err := c.Call(ctx, "Fn.Add", &Args{A: 1}, &r); err != nil || r.Attrs != nil {
				t.Errorf("Add without attrs = %+v, %v; want nil Attrs", r, err)
			}
			err := c.Call(ctx, "Fn.Fail", &Args{}, &r)
			var se rpc.ServerError
			if !errors.As(err, &se) || err.Error() != "not_found: no such thing" {
				t.Errorf("Fail: err = %#v, want ServerError with the method's text", err)
			}
			var id, idArith uint64
			if err := c.Call(ctx, "Fn.ConnID", &Args{}, &id); err != nil {
				t.Fatal(err)
			}
			if err := c.Call(ctx, "Arith.ConnID", &Args{}, &idArith); err != nil || id != idArith {
				t.Errorf("ConnID: typed %d, receiver %d (%v); want the same connection", id, idArith, err)
			}
		})
		t.Run("stream", func(t *testing.T) {
			ch := make(chan Reply)
			sc, err := c.Stream(ctx, "Fn.Count", &Args{A: 5, S: "x"}, ch)
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
		})
		t.Run("stream error end", func(t *testing.T) {
			ch := make(chan Reply, 2)
			sc, err := c.Stream(ctx, "Fn.FailStream", &Args{}, ch)
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
		t.Run("panics", func(t *testing.T) {
			const want = "rpc: method Fn.Panic failed (internal error)"
			if err := c.Call(ctx, "Fn.Panic", &Args{}, &Reply{}); err == nil || err.Error() != want {
				t.Errorf("Panic = %v, want %q", err, want)
			}
			ch := make(chan Reply, 2)
			sc, err := c.Stream(ctx, "Fn.PanicStream", &Args{}, ch)
			if err != nil {
				t.Fatal(err)
			}
			if got := drain(t, ch); len(got) != 1 {
				t.Errorf("PanicStream: got %d replies, want 1", len(got))
			}
			if err := sc.Err(); err == nil || err.Error() != "rpc: method Fn.PanicStream failed (internal error)" {
				t.Errorf("PanicStream Err = %v", err)
			}
			var r Reply
			if err := c.Call(ctx, "Fn.Add", &Args{A: 1, B: 1}, &r); err != nil || r.C != 2 {
				t.Errorf("Add after panics = %+v, %v", r, err)
			}
		})
	})
}

// Arguments that do not fit the function's type are handled as for a
// receiver's method: JSON gets an error reply on a live connection, gob (a
// corrupt stream) loses the connection.
func TestTypedFunctionWrongArgs(t *testing.T) {
	for _, svc := range []string{"Arith", "Fn"} {
		t.Run(svc, func(t *testing.T) {
			ts := startFuncServer(t, nil)
			ctx := testCtx(t)

			c := mustDial(t, ts.addr, rpc.JSON)
			err := c.Call(ctx, svc+".Add", map[string]string{"A": "two"}, &Reply{})
			var se rpc.ServerError
			if !errors.As(err, &se) || !strings.HasPrefix(err.Error(), "rpc: cannot decode params") {
				t.Errorf("JSON: Add with a string for A = %v, want a ServerError about the params", err)
			}
			var r Reply
			if err := c.Call(ctx, svc+".Add", &Args{A: 1, B: 1}, &r); err != nil || r.C != 2 {
				t.Errorf("JSON: Add after bad params = %+v, %v", r, err)
			}

			g := mustDial(t, ts.addr, rpc.Gob)
			if err := g.Call(ctx, svc+".Add", "not Args", &Reply{}); !errors.Is(err, rpc.ErrShutdown) {
				t.Errorf("gob: Add with a string = %v, want ErrShutdown (connection closed)", err)
			}
		})
	}
}

// Cancelling a typed stream cancels its context with ErrStreamClosed as the
// cause, and later Sends fail.
func TestTypedStreamCancel(t *testing.T) {
	forCodecs(t, func(t *testing.T, codec rpc.Codec) {
		ts := startServer(t, nil)
		causes := make(chan error, 1)
		err := rpc.RegisterStream(ts.srv, "Fn.Wait", func(ctx context.Context, args *Args, st rpc.Stream) error {
			if err := st.Send(&Reply{C: args.A}); err != nil {
				return err
			}
			<-ctx.Done()
			if err := st.Send(&Reply{}); !errors.Is(err, rpc.ErrStreamClosed) {
				causes <- errors.New("Send after cancel: " + errString(err))
				return nil
			}
			causes <- context.Cause(ctx)
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		c := mustDial(t, ts.addr, codec)
		ch := make(chan Reply)
		sc, err := c.Stream(testCtx(t), "Fn.Wait", &Args{A: 7}, ch)
		if err != nil {
			t.Fatal(err)
		}
		if r := recv(t, ch, "reply"); r.C != 7 {
			t.Fatalf("reply = %+v", r)
		}
		if err := sc.Close(); err != nil {
			t.Fatal(err)
		}
		if err := recv(t, causes, "handler to see the cancel"); !errors.Is(err, rpc.ErrStreamClosed) {
			t.Errorf("handler's ctx cause = %v, want ErrStreamClosed", err)
		}
		drain(t, ch)
		if err := sc.Err(); err != nil {
			t.Errorf("Err = %v, want nil (EOS)", err)
		}
	})
}

// A typed stream goes at its reader's pace as a receiver's does: a long
// one sent in a tight loop arrives whole.
func TestTypedLongStream(t *testing.T) {
	forCodecs(t, func(t *testing.T, codec rpc.Codec) {
		const n = 1000
		ts := startFuncServer(t, func(s *rpc.Server) { s.StreamBuffer = 4 })
		c := mustDial(t, ts.addr, codec)
		ch := make(chan Reply)
		sc, err := c.Stream(testCtx(t), "Fn.Count", &Args{A: n}, ch)
		if err != nil {
			t.Fatal(err)
		}
		if got := drain(t, ch); len(got) != n || sc.Err() != nil {
			t.Errorf("%d replies and %v, want %d and EOS", len(got), sc.Err(), n)
		}
	})
}

// Typed functions and a receiver may share a service name, in either
// order; a name is published once.
func TestRegisterFuncs(t *testing.T) {
	add := func(ctx context.Context, args *Args, reply *Reply) error { reply.C = args.A + args.B; return nil }
	count := func(ctx context.Context, args *Args, st rpc.Stream) error { return st.Send(&Reply{C: args.A}) }

	t.Run("errors", func(t *testing.T) {
		s := rpc.NewServer()
		if err := s.Register(newArith()); err != nil {
			t.Fatal(err)
		}
		if err := rpc.RegisterUnary(s, "Fn.Add", add); err != nil {
			t.Fatal(err)
		}
		for _, tc := range []struct {
			name string
			err  error
		}{
			{"no dot", rpc.RegisterUnary(s, "Add", add)},
			{"empty service", rpc.RegisterUnary(s, ".Add", add)},
			{"empty method", rpc.RegisterStream(s, "Fn.", count)},
			{"nil unary", rpc.RegisterUnary[Args, Reply](s, "Fn.Nil", nil)},
			{"nil stream", rpc.RegisterStream[Args](s, "Fn.Nil", nil)},
			{"interface argument", rpc.RegisterUnary(s, "Fn.Any", func(ctx context.Context, args *any, reply *Reply) error { return nil })},
			{"argument with an unsafe map", rpc.RegisterStream(s, "Fn.Unsafe", func(ctx context.Context, args *UnsafeArgs, st rpc.Stream) error { return nil })},
			{"same typed name", rpc.RegisterStream(s, "Fn.Add", count)},
			{"a receiver's method", rpc.RegisterUnary(s, "Arith.Add", add)},
			{"a receiver's stream", rpc.RegisterStream(s, "Arith.Count", count)},
			{"receiver on a typed name", s.RegisterName("Fn", newArith())},
		} {
			if tc.err == nil {
				t.Errorf("%s: accepted", tc.name)
			}
		}
		// A refused RegisterName publishes none of its methods.
		if err := rpc.RegisterUnary(s, "Fn.Mul", add); err != nil {
			t.Errorf("Fn.Mul after the refused receiver: %v", err)
		}
	})

	t.Run("shared service", func(t *testing.T) {
		ts := startServer(t, nil) // Arith by reflection
		if err := rpc.RegisterUnary(ts.srv, "Arith.Sum", add); err != nil {
			t.Fatal(err)
		}
		if err := rpc.RegisterStream(ts.srv, "Mixed.One", count); err != nil {
			t.Fatal(err)
		}
		if err := ts.srv.RegisterName("Mixed", newArith()); err != nil {
			t.Fatal(err)
		}
		if err := ts.srv.RegisterName("Mixed", newArith()); err == nil {
			t.Error("second receiver under one name accepted")
		}
		c := mustDial(t, ts.addr, rpc.Gob)
		ctx := testCtx(t)
		for _, m := range []string{"Arith.Sum", "Arith.Add", "Mixed.Add"} {
			var r Reply
			if err := c.Call(ctx, m, &Args{A: 2, B: 2}, &r); err != nil || r.C != 4 {
				t.Errorf("%s = %+v, %v", m, r, err)
			}
		}
		ch := make(chan Reply, 1)
		sc, err := c.Stream(ctx, "Mixed.One", &Args{A: 9}, ch)
		if err != nil {
			t.Fatal(err)
		}
		if got := drain(t, ch); len(got) != 1 || got[0].C != 9 || sc.Err() != nil {
			t.Errorf("Mixed.One = %+v, %v", got, sc.Err())
		}
	})
}
