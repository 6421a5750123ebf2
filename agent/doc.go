// Package agent is the transport-free core of discoverd: sessions and
// their registrations, the heartbeat/expiry loop, the per-name fan-out
// cache and the leader computation. The RPC and HTTP front ends translate
// their calls into the methods of Agent, Session and Subscription; the
// store is any backend.Backend.
//
//	b, err := etcd.Open(ctx, etcd.Config{Endpoints: eps, TTL: 10 * time.Second})
//	if err != nil {
//		return err
//	}
//	defer b.Close() // after the agent: removes its registrations at once
//	a, err := agent.New(agent.Config{Backend: b, ExternalIP: "10.0.0.1"})
//	if err != nil {
//		return err
//	}
//	defer a.Close()
//
//	sess := a.NewSession(0) // one per client connection
//	defer sess.Close()      // unregisters what the session owns
//	addr, err := sess.Register(ctx, agent.Args{Name: "web", Addr: ":8080"})
//	if err != nil {
//		return err // an *api.Error: its Code says why
//	}
//	_ = sess.Heartbeat(ctx, agent.Args{Name: "web", Addr: addr}) // in memory only
//
//	sub, err := a.Subscribe(ctx, "web")
//	if err != nil {
//		return err
//	}
//	defer sub.Close()
//	for {
//		u, err := sub.Next(ctx) // snapshot, zero-value sentinel, then changes
//		if err != nil {
//			return err
//		}
//		fmt.Println(u.Addr, u.Online)
//	}
//
// Liveness. A registration lives until the first of: Unregister; the
// Close of the session that owns it; no Register or Heartbeat for
// Config.TTL (the agent's janitor expires it); the agent's backend session
// ending (the store removes it after its own TTL, or at once when the
// backend is closed). Heartbeats, and re-registrations with unchanged
// attributes, are answered from memory: they never write to the store.
//
// Fan-out. Each watched service name has one backend subscription and one
// goroutine, shared by all local subscribers, that keeps an in-memory cache
// (answering snapshots, Instances and LeaderOf) and queues every change to
// each subscriber. Subscribers hold no goroutine: each has a queue bounded
// by Config.SubscriberBuffer and is cut off with CodeResourceExhausted when
// it falls behind, so it never blocks the watch or other subscribers. When
// the backend stream breaks, the watch keeps serving its last known state
// and resubscribes with backoff, emitting only the differences. A lookup
// of a name not watched yet does not wait for an unreachable store: it
// fails with CodeUnavailable. Instances read from the store that break the
// api limits are dropped.
//
// Errors returned to callers are *api.Error values (or a ctx error) whose
// messages are safe to show a client; store failures are logged and
// returned as CodeUnavailable.
package agent
