package balancer_test

import (
	"fmt"
	"log"

	discoverd "github.com/flynn/discoverd/client"
	"github.com/flynn/discoverd/client/balancer"
)

// Spread requests over the instances of "example-api", oldest first.
func ExampleRoundRobin() {
	client, err := discoverd.NewClient() // $DISCOVERD, else 127.0.0.1:1111
	if err != nil {
		log.Fatal(err)
	}
	defer client.Close()
	// Two instances (normally other processes), the first one older.
	for _, addr := range []string{"127.0.0.1:7001", "127.0.0.1:7002"} {
		if err := client.Register("example-api", addr); err != nil {
			log.Fatal(err)
		}
	}

	set, err := client.NewServiceSet("example-api")
	if err != nil {
		log.Fatal(err)
	}
	defer set.Close()
	lb := balancer.RoundRobin(set)
	for range 3 {
		svc, err := lb.Next()
		if err == balancer.ErrNoServices {
			log.Fatal("no instance of example-api is online")
		}
		fmt.Println("sending to", svc.Addr)
	}
	// Output:
	// sending to 127.0.0.1:7001
	// sending to 127.0.0.1:7002
	// sending to 127.0.0.1:7001
}
