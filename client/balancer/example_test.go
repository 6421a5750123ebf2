package balancer_test

import (
	"log"

	discoverd "github.com/flynn/discoverd/client"
	"github.com/flynn/discoverd/client/balancer"
)

// Spread requests over the instances of "api", oldest first.
func ExampleRoundRobin() {
	set, err := discoverd.NewServiceSet("api")
	if err != nil {
		log.Fatal(err)
	}
	defer set.Close()
	lb := balancer.RoundRobin(set)
	svc, err := lb.Next()
	if err == balancer.ErrNoServices {
		log.Fatal("no instance of api is online")
	}
	log.Println("sending to", svc.Addr)
}
