// Package discoverd is the Go client of the discoverd agent: register
// service instances, keep them online, find the instances of a service,
// follow their changes and elect a leader among them. Its API is that of
// github.com/flynn/go-discoverd, so a program written against it builds by
// changing the import path only. It talks to the local agent over the
// rpcplus protocol and links no store client (etcd, ZooKeeper).
//
//	client, err := discoverd.NewClient() // DISCOVERD or 127.0.0.1:1111
//	if err != nil {
//		log.Fatal(err)
//	}
//	defer client.Close()
//
//	// Announce this process; it stays online until Close or exit.
//	set, err := client.RegisterWithSet("db", ":5432", map[string]string{"role": "replica"})
//	if err != nil {
//		log.Fatal(err)
//	}
//	// Find the peers (this instance left out), oldest first.
//	for _, peer := range set.Services() {
//		fmt.Println("peer", peer.Addr)
//	}
//	// Follow the leader: the oldest instance, perhaps this one.
//	for leader := range set.Leaders() {
//		if leader != nil && leader.Addr == set.SelfAddr() {
//			fmt.Println("leading; fencing token", leader.Created)
//		}
//	}
//
// # Lifetimes
//
// A registration lives while its Client's connection does: the client
// heartbeats it every Config.HeartbeatInterval (Agent.Heartbeat, or
// Agent.Register with an older agent) and the agent withdraws it when the
// connection closes, when heartbeats stop for its TTL, or on Unregister.
// When the connection drops, the client reconnects with capped exponential
// backoff and jitter, registers everything again (with a new Created) and
// resubscribes every ServiceSet, which reports an offline update for each
// instance that vanished meanwhile and an online update for each new one.
// While disconnected, calls fail at once with ErrDisconnected.
//
// # Leaders and fencing
//
// The leader of a set is its oldest instance, the one with the smallest
// Created. Created is assigned by the agent's store, is stable while the
// registration lives and strictly larger for a later one, so a leader can
// attach its Created to what it writes as a fencing token: a resource that
// has seen token T refuses writes carrying a smaller one, which come from a
// deposed leader.
//
// # Slow readers
//
// Nothing a caller does (or fails to do) with a channel stalls a set or its
// other watchers: Watch channels are bounded and closed when their reader
// falls behind; Leaders and WatchReconnects channels keep the latest values,
// dropping the oldest.
//
// # Concurrency
//
// Client and ServiceSet methods are safe for concurrent use. Every
// goroutine of a Client stops on Close.
package discoverd
