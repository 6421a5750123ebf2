package rpc_test

import (
	"context"
	"fmt"
	"log"
	"net"
	"net/http"

	"github.com/flynn/discoverd/rpc"
)

// Greeter is an example receiver with a unary and a streaming method.
type Greeter struct{}

type GreetArgs struct{ Name string }

func (Greeter) Hello(ctx context.Context, args *GreetArgs, reply *string) error {
	*reply = "hello, " + args.Name
	return nil
}

func (Greeter) Count(ctx context.Context, args *GreetArgs, s rpc.Stream) error {
	for i := 1; i <= 3; i++ {
		if err := s.Send(i); err != nil {
			return err // the client went away or cancelled
		}
	}
	return nil // the client sees EOS
}

func Example() {
	// Server: mount the upgrade handler on an ordinary HTTP mux.
	srv := rpc.NewServer()
	if err := srv.Register(Greeter{}); err != nil {
		log.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.Handle(rpc.DefaultPath, srv)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}
	hs := &http.Server{Handler: mux}
	served := make(chan struct{})
	go func() { defer close(served); hs.Serve(ln) }()
	defer func() { hs.Close(); srv.Close(context.Background()); <-served }()

	// Client.
	ctx := context.Background()
	c, err := rpc.Dial(ctx, ln.Addr().String(), rpc.Gob)
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()

	var reply string
	if err := c.Call(ctx, "Greeter.Hello", &GreetArgs{Name: "world"}, &reply); err != nil {
		log.Fatal(err)
	}
	fmt.Println(reply)

	ch := make(chan int) // drained below until the stream ends
	sc, err := c.Stream(ctx, "Greeter.Count", &GreetArgs{}, ch)
	if err != nil {
		log.Fatal(err)
	}
	for n := range ch {
		fmt.Println(n)
	}
	fmt.Println("end:", sc.Err())
	// Output:
	// hello, world
	// 1
	// 2
	// 3
	// end: <nil>
}

// Functions are published with their types, and their handlers are called
// without reflection.
func ExampleRegisterStream() {
	srv := rpc.NewServer()
	countdown := func(ctx context.Context, args *GreetArgs, s rpc.Stream) error {
		for i := 3; i > 0; i-- {
			if err := s.Send(fmt.Sprintf("%s %d", args.Name, i)); err != nil {
				return err
			}
		}
		return nil
	}
	greet := func(ctx context.Context, args *GreetArgs, reply *string) error {
		*reply = "hello, " + args.Name
		return nil
	}
	if err := rpc.RegisterStream(srv, "Launch.Countdown", countdown); err != nil {
		log.Fatal(err)
	}
	if err := rpc.RegisterUnary(srv, "Launch.Greet", greet); err != nil {
		log.Fatal(err)
	}
	server, client := net.Pipe()
	served := make(chan struct{})
	go func() { defer close(served); srv.ServeConn(server, rpc.JSON) }()
	defer func() { srv.Close(context.Background()); <-served }()

	c := rpc.NewClient(client, rpc.JSON)
	defer c.Close()
	ctx := context.Background()
	var reply string
	if err := c.Call(ctx, "Launch.Greet", &GreetArgs{Name: "crew"}, &reply); err != nil {
		log.Fatal(err)
	}
	fmt.Println(reply)
	ch := make(chan string)
	sc, err := c.Stream(ctx, "Launch.Countdown", &GreetArgs{Name: "T-minus"}, ch)
	if err != nil {
		log.Fatal(err)
	}
	for s := range ch {
		fmt.Println(s)
	}
	fmt.Println("end:", sc.Err())
	// Output:
	// hello, crew
	// T-minus 3
	// T-minus 2
	// T-minus 1
	// end: <nil>
}
