package agent_test

import (
	"context"
	"fmt"
	"log"
	"os"
	"time"

	"github.com/flynn/discoverd/agent"
	"github.com/flynn/discoverd/backend/etcd"
	"github.com/flynn/discoverd/backend/etcd/embedded"
)

// An agent on an embedded etcd: register through a session, watch the
// service, and see the registration go when the session closes.
func Example() {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	dir, err := os.MkdirTemp("", "agent-example")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)
	srv, err := embedded.Start(ctx, embedded.Config{Dir: dir, Logger: quiet()})
	if err != nil {
		log.Fatal(err)
	}
	defer srv.Close()
	b, err := etcd.Open(ctx, etcd.Config{Endpoints: srv.Endpoints(), TTL: 10 * time.Second, Logger: quiet()})
	if err != nil {
		log.Fatal(err)
	}
	defer b.Close() // after the agent: removes its registrations at once
	a, err := agent.New(agent.Config{Backend: b, ExternalIP: "10.0.0.1", Logger: quiet()})
	if err != nil {
		log.Fatal(err)
	}
	defer a.Close()

	sub, err := a.Subscribe(ctx, "web")
	if err != nil {
		log.Fatal(err)
	}
	defer sub.Close()

	sess := a.NewSession(0)
	addr, err := sess.Register(ctx, agent.Args{Name: "web", Addr: ":8080", Attrs: map[string]string{"v": "1"}})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("registered", addr)
	sess.Close() // the client went away

	for range 3 {
		u, err := sub.Next(ctx)
		if err != nil {
			log.Fatal(err)
		}
		switch {
		case u.IsSentinel():
			fmt.Println("current")
		case u.Online:
			fmt.Println("online", u.Addr, u.Attrs["v"])
		default:
			fmt.Println("offline", u.Addr)
		}
	}
	// Output:
	// registered 10.0.0.1:8080
	// current
	// online 10.0.0.1:8080 1
	// offline 10.0.0.1:8080
}
