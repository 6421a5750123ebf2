package rpc_test

import (
	"context"
	"errors"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/flynn/discoverd/rpc"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// waitTimeout bounds every wait in these tests.
const waitTimeout = 10 * time.Second

var codecs = []rpc.Codec{rpc.Gob, rpc.JSON}

// Args and Reply are the test service's wire types.
type Args struct {
	A, B  int
	S     string
	Attrs map[string]string
}

type Reply struct {
	C     int
	S     string
	Attrs map[string]string
}

// Arith is the test receiver. Its hook channels let tests observe and steer
// handlers; nil channels are never used.
type Arith struct {
	release   chan struct{} // Block returns when it is closed
	blocked   chan struct{} // Block signals here when it starts
	streamEnd chan error    // streaming methods report how they ended
	connIDs   chan uint64   // Forever reports its connection's ID
	sending   chan int      // Flood announces each reply it is about to send
}

func newArith() *Arith {
	return &Arith{
		release:   make(chan struct{}),
		blocked:   make(chan struct{}, 16),
		streamEnd: make(chan error, 16),
		connIDs:   make(chan uint64, 16),
		sending:   make(chan int, 64),
	}
}

func (t *Arith) Add(ctx context.Context, args *Args, reply *Reply) error {
	reply.C = args.A + args.B
	reply.Attrs = args.Attrs
	return nil
}

// Mul has no context, as plain net/rpc methods.
func (t *Arith) Mul(args Args, reply *Reply) error {
	reply.C = args.A * args.B
	return nil
}

func (t *Arith) Fail(ctx context.Context, args *Args, reply *Reply) error {
	return errors.New("not_found: no such thing")
}

func (t *Arith) ConnID(ctx context.Context, args *Args, reply *uint64) error {
	c := rpc.ConnFromContext(ctx)
	if c == nil {
		return errors.New("no conn in ctx")
	}
	*reply = c.ID()
	return nil
}

// Block waits until release is closed or its call is cancelled.
func (t *Arith) Block(ctx context.Context, args *Args, reply *Reply) error {
	t.blocked <- struct{}{}
	select {
	case <-t.release:
		reply.S = "released"
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Count streams 0..A-1 and ends.
func (t *Arith) Count(ctx context.Context, args *Args, s rpc.Stream) error {
	for i := range args.A {
		if err := s.Send(&Reply{C: i, S: args.S}); err != nil {
			return err
		}
	}
	return nil
}

// FailStream sends one reply and ends with an error.
func (t *Arith) FailStream(args *Args, s rpc.Stream) error {
	if err := s.Send(Reply{C: 1}); err != nil {
		return err
	}
	return errors.New("stream broke")
}

// Forever sends A replies, then waits for its context and reports why.
func (t *Arith) Forever(ctx context.Context, args *Args, s rpc.Stream) error {
	t.connIDs <- rpc.ConnFromContext(ctx).ID()
	for i := range args.A {
		if err := s.Send(&Reply{C: i}); err != nil {
			t.streamEnd <- err
			return err
		}
	}
	<-s.Context().Done()
	t.streamEnd <- s.Context().Err()
	// Sending after the end fails cleanly.
	if err := s.Send(&Reply{}); !errors.Is(err, rpc.ErrStreamClosed) {
		t.streamEnd <- errors.New("Send after end: " + errString(err))
	}
	return nil
}

// Flood sends A replies of len(S)*B bytes (replies without end when A is
// 0), announcing each on sending just before its Send, and reports how it
// ended on streamEnd: nil, or the error of the Send that failed.
func (t *Arith) Flood(ctx context.Context, args *Args, s rpc.Stream) error {
	payload := strings.Repeat(args.S, args.B)
	for i := 0; args.A == 0 || i < args.A; i++ {
		select {
		case t.sending <- i:
		default: // nobody is counting this far
		}
		if err := s.Send(&Reply{C: i, S: payload}); err != nil {
			t.streamEnd <- err
			return err
		}
	}
	t.streamEnd <- nil
	return nil
}

func errString(err error) string {
	if err == nil {
		return "<nil>"
	}
	return err.Error()
}

// testServer is an rpc.Server mounted at rpc.DefaultPath on a real HTTP
// server on 127.0.0.1, next to a plain HTTP handler at /hello.
type testServer struct {
	srv   *rpc.Server
	arith *Arith
	addr  string
}

func startServer(t testing.TB, configure func(*rpc.Server)) *testServer {
	t.Helper()
	srv := rpc.NewServer()
	if configure != nil {
		configure(srv)
	}
	arith := newArith()
	if err := srv.Register(arith); err != nil {
		t.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.Handle(rpc.DefaultPath, srv)
	mux.HandleFunc("/hello", func(w http.ResponseWriter, r *http.Request) { w.Write([]byte("hello")) })
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	hs := &http.Server{Handler: mux}
	served := make(chan struct{})
	go func() {
		defer close(served)
		hs.Serve(ln)
	}()
	t.Cleanup(func() {
		hs.Close()
		srv.Close(context.Background())
		<-served
	})
	return &testServer{srv: srv, arith: arith, addr: ln.Addr().String()}
}

func mustDial(t testing.TB, addr string, codec rpc.Codec) *rpc.Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	c, err := rpc.Dial(ctx, addr, codec)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	t.Cleanup(cancel)
	return ctx
}

// recv waits for one value on ch.
func recv[T any](t *testing.T, ch <-chan T, what string) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(waitTimeout):
		t.Fatalf("timed out waiting for %s", what)
		panic("unreachable")
	}
}

// drain reads ch until it is closed and returns what it read.
func drain[T any](t *testing.T, ch <-chan T) []T {
	t.Helper()
	var got []T
	timeout := time.After(waitTimeout)
	for {
		select {
		case v, ok := <-ch:
			if !ok {
				return got
			}
			got = append(got, v)
		case <-timeout:
			t.Fatalf("timed out draining a stream after %d replies", len(got))
		}
	}
}

func forCodecs(t *testing.T, f func(t *testing.T, codec rpc.Codec)) {
	for _, codec := range codecs {
		t.Run(codec.String(), func(t *testing.T) { f(t, codec) })
	}
}
