// Package rpc is a streaming RPC wire-compatible with github.com/flynn/rpcplus
// (a streaming variant of Go's net/rpc), so that existing rpcplus clients,
// go-discoverd among them, work unchanged. It knows nothing about service
// discovery.
//
//	srv := rpc.NewServer()
//	srv.Register(Greeter{})              // methods become "Greeter.Hello", ...
//	mux.Handle(rpc.DefaultPath, srv)     // CONNECT upgrade; other paths stay plain HTTP
//
//	c, _ := rpc.Dial(ctx, addr, rpc.Gob) // or rpc.JSON
//	var reply string
//	err := c.Call(ctx, "Greeter.Hello", &GreetArgs{Name: "world"}, &reply)
//	ch := make(chan int)
//	sc, _ := c.Stream(ctx, "Greeter.Count", &GreetArgs{}, ch)
//	for n := range ch { ... }            // drain until closed
//	err = sc.Err()                       // nil after a clean end (EOS)
//
// See the package example for a complete program, and docs/API.md
// ("Protocol") for the bytes on the wire.
//
// # Server
//
// A receiver's methods are unary, func(ctx, *A, *R) error, or streaming,
// func(ctx, *A, rpc.Stream) error (ctx is optional in both). The context of
// a call is cancelled when its connection or the server closes, and for a
// stream also when the client cancels it; ConnFromContext tells which
// connection a call came on, and Conn.Done when it ends, so state can be
// tied to the connection that created it.
//
// Functions can be published too, typed and without reflection:
// RegisterUnary(srv, "Greeter.Hello", hello) and RegisterStream(srv,
// "Greeter.Count", count), with the shapes above (ctx required). On the
// wire they are indistinguishable from a receiver's methods. A stream is a
// goroutine parked in its method for the stream's life, and calling it
// directly keeps that goroutine's stack small. For streams that are many
// and long-lived, RegisterSource publishes a pulled stream instead: the
// method opens a Source and returns, and the connection's writer takes
// the source's values when it can write them, so an open stream holds no
// goroutine (with SharedValues, a value that many streams of a connection
// send is also encoded once).
//
// Each connection has one reader (the ServeConn goroutine), one writer
// goroutine that serialises every reply, and one goroutine per executing
// call. Many calls run at once and their replies interleave: the writer
// takes one reply from each call in turn, so a stream with a backlog holds
// back the other calls on its connection by at most one message. A stream
// goes at its reader's pace: Stream.Send queues up to
// Server.StreamBuffer replies and then blocks until the writer takes one
// (a producer that must not wait keeps its own bounded backlog and cuts a
// slow reader off itself). Everything the server holds for a peer is
// bounded per connection, however little the peer reads: unary calls
// (Server.MaxCallsPerConn; the reader stops reading while they are all
// taken), calls of Express methods (as many again, so that short calls
// such as heartbeats still start while the others are stuck), and streams
// (Server.MaxStreamsPerConn; one more is refused with an error reply).
//
// Bad input harms only its own connection: an unknown method gets an error
// reply and the connection goes on; a message over Server.MaxMessageSize is
// refused before it is read into memory (gob: from the message's length
// prefix; JSON: by bounding the bytes read per message), and it, like any
// malformed header or gob body, closes the connection with a logged reason.
// encoding/gob would size maps from the peer's element count, so the server
// pre-creates the maps of an argument and Register refuses argument types
// with maps where gob would create them itself.
//
// # Client
//
// A Client multiplexes calls and streams over one connection. Its reader
// goroutine delivers stream replies on the caller's channel and blocks while
// that channel is full: the caller must drain it (or Close the stream).
// When the connection is lost, every pending call and stream ends with
// ErrShutdown and Done is closed. Errors returned by remote methods are
// ServerError values carrying the method's error text unchanged.
package rpc
