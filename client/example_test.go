package discoverd_test

import (
	"fmt"
	"log"

	discoverd "github.com/flynn/discoverd/client"
)

// An application registers itself, finds a peer and follows the leader.
func Example() {
	client, err := discoverd.NewClient() // $DISCOVERD, else 127.0.0.1:1111
	if err != nil {
		log.Fatal(err)
	}
	defer client.Close()

	// Register this instance and watch its service.
	set, err := client.RegisterWithSet("example-db", "127.0.0.1:5432", map[string]string{"role": "primary"})
	if err != nil {
		log.Fatal(err)
	}
	// A peer joins (normally another process, with its own client).
	if err := client.RegisterWithAttributes("example-db", "127.0.0.1:5433", map[string]string{"role": "replica"}); err != nil {
		log.Fatal(err)
	}

	// Find the peer: wait until it shows up.
	for u := range set.Watch(true) {
		if u.Online && u.Addr != set.SelfAddr() {
			break
		}
	}
	peer := set.Services()[0] // self is left out
	fmt.Println("peer:", peer.Addr, peer.Attrs["role"])

	// Follow the leader: the oldest instance.
	leader := <-set.Leaders()
	fmt.Println("leader:", leader.Addr, "is me:", leader.Addr == set.SelfAddr())
	// Output:
	// peer: 127.0.0.1:5433 replica
	// leader: 127.0.0.1:5432 is me: true
}

// Standby instances wait for their turn to lead; the leader's Created is a
// fencing token that grows with each new leader.
func ExampleClient_RegisterAndStandby() {
	first, err := discoverd.NewClient()
	if err != nil {
		log.Fatal(err)
	}
	second, err := discoverd.NewClient()
	if err != nil {
		log.Fatal(err)
	}
	defer second.Close()

	standby1, err := first.RegisterAndStandby("example-scheduler", "127.0.0.1:6001", nil)
	if err != nil {
		log.Fatal(err)
	}
	standby2, err := second.RegisterAndStandby("example-scheduler", "127.0.0.1:6002", nil)
	if err != nil {
		log.Fatal(err)
	}

	leader := <-standby1
	fmt.Println("leading:", leader.Addr)

	first.Close() // the leader's process dies
	next := <-standby2
	fmt.Println("took over:", next.Addr, "token grew:", next.Created > leader.Created)
	// Output:
	// leading: 127.0.0.1:6001
	// took over: 127.0.0.1:6002 token grew: true
}

// Services waits for at least one instance and returns them, oldest first.
func ExampleClient_Services() {
	client, err := discoverd.NewClient()
	if err != nil {
		log.Fatal(err)
	}
	defer client.Close()
	if err := client.Register("example-api", "127.0.0.1:8080"); err != nil {
		log.Fatal(err)
	}
	services, err := client.Services("example-api", discoverd.DefaultTimeout)
	if err != nil {
		log.Fatal(err)
	}
	for _, s := range services {
		fmt.Println(s.Host, s.Port)
	}
	// Output:
	// 127.0.0.1 8080
}
