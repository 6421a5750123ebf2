// Package faults holds discoverd's fault suite: tests that break the
// system's surroundings under load and check that nothing is lost and
// nothing crashes. It has no code of its own; run it with `make faults`
// (it also runs in `make test`).
//
// Every scenario runs real servers on 127.0.0.1: a 3-member embedded etcd
// cluster (backend/etcd/etcdtest), in-process agents serving RPC and HTTP
// on real TCP listeners, and the discoverd binary itself (built by
// TestMain) where a process must be killed. Each scenario asserts exact
// registration sets, read from the store and from subscribers, before and
// after the fault:
//
//   - TestEtcdMemberLoss: a follower, then the raft leader, stops while
//     two agents serve registering clients and subscribers.
//   - TestEtcdUnavailable: every etcd member stops for 3×TTL.
//   - TestAgentKilled: the agent process is SIGKILLed and restarted on the
//     same port.
//   - TestSlowSubscriber: a subscriber that never reads.
//   - TestConnectionChurn: 10,000 connections opened and dropped,
//     half-open connections, half frames.
//   - TestBadInput*: malformed and out-of-limit requests over raw RPC.
//   - TestMembershipChecker: issue 11's randomized, seeded checker. Agent
//     processes on a 3-member cluster of etcd server processes (frozen
//     with SIGSTOP for store pauses), random client operations (register,
//     re-register, unregister, close-at-once, takeover, SIGKILL of client
//     processes run from faults/checkerclient), agent kills; every
//     operation and every stream update is recorded, and the invariants of
//     history_test.go are checked on the history at quiescence (each check
//     is shown failing on hand-made histories in history_check_test.go).
//     make soak runs it for 10 minutes; -checker.seed replays a seed, and
//     -checker.history=FILE writes a failed run's whole history to FILE.
//
// FuzzHTTPPutBody and FuzzRPCClientReplies fuzz the decoders that have no
// fuzz target in their own package; `make fuzz` runs every fuzz target of
// the module. docs/OPERATIONS.md ("Failure modes") describes what an
// operator sees in each scenario, as these tests show it.
package faults
