// Command checkerclient is a client process of the fault suite's membership
// checker (faults/checker_test.go): it holds one registration on one
// connection to an agent, so that the checker can SIGKILL the process that
// owns a registration.
//
//	checkerclient -agent 127.0.0.1:1111 -name web -addr 10.0.0.1:80 -op 42 -hb 500ms
//
// It registers name/addr with the attribute op=OP, prints "registered" (or
// "error TEXT" and exits 1), then heartbeats with Agent.Heartbeat every hb.
// It never registers again: a heartbeat that fails is printed as
// "heartbeat TEXT" and the process goes on. It exits when its standard input
// closes (so it never outlives the test) or when the agent closes the
// connection.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/flynn/discoverd/api"
	"github.com/flynn/discoverd/rpc"
)

func main() {
	agent := flag.String("agent", api.DefaultAgentAddr, "agent address")
	name := flag.String("name", "", "service name")
	addr := flag.String("addr", "", "instance address")
	op := flag.String("op", "", "value of the op attribute")
	hb := flag.Duration("hb", time.Second, "heartbeat interval")
	flag.Parse()
	if err := run(*agent, api.Args{Name: *name, Addr: *addr, Attrs: map[string]string{"op": *op}}, *hb); err != nil {
		fmt.Printf("error %v\n", err)
		os.Exit(1)
	}
}

func run(agent string, args api.Args, hb time.Duration) error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := rpc.Dial(ctx, agent, rpc.Gob)
	if err != nil {
		return err
	}
	defer c.Close()
	var got string
	if err := c.Call(ctx, api.MethodRegister, &args, &got); err != nil {
		return err
	}
	fmt.Println("registered")

	stdin := make(chan struct{})
	go func() { io.Copy(io.Discard, os.Stdin); close(stdin) }() // ends with stdin
	t := time.NewTicker(hb)
	defer t.Stop()
	for {
		select {
		case <-stdin:
			return nil
		case <-c.Done():
			return fmt.Errorf("the agent closed the connection")
		case <-t.C:
			hctx, hcancel := context.WithTimeout(context.Background(), 4*hb)
			err := c.Call(hctx, api.MethodHeartbeat, &api.Args{Name: args.Name, Addr: args.Addr}, &struct{}{})
			hcancel()
			if err != nil {
				fmt.Printf("heartbeat %v\n", err)
			}
		}
	}
}
