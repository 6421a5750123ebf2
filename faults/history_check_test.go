package faults_test

import (
	"strings"
	"testing"
	"time"
)

// The checks of history_test.go on hand-made histories: each passes on a
// correct history and reports the violation planted in a bad one.

var hbase = time.Date(2026, 1, 1, 12, 0, 0, 0, time.UTC)

func at(ms int) time.Time { return hbase.Add(time.Duration(ms) * time.Millisecond) }

var (
	kA = regKey{"web", "10.0.0.1:80"}
	kB = regKey{"web", "10.0.0.2:80"}
)

func reg(id int, session string, k regKey, start, end int, err string) op {
	return op{ID: id, Kind: opRegister, Session: session, Agent: "a1", Key: k, Start: at(start), End: at(end), Err: err}
}

func sub(name string, us ...update) *streamLog {
	return &streamLog{ID: "subscribe " + name + " @a1", Kind: streamSubscribe, Agent: "a1", Name: name, Updates: us}
}

func leader(name string, us ...update) *streamLog {
	return &streamLog{ID: "leader " + name + " @a1", Kind: streamLeader, Agent: "a1", Name: name, Updates: us}
}

func on(ms int, addr string, created uint, opID string) update {
	return update{At: at(ms), Addr: addr, Online: true, Created: created, Op: opID}
}

func off(ms int, addr string, created uint, opID string) update {
	return update{At: at(ms), Addr: addr, Created: created, Op: opID}
}

// wantViolations fails t unless vs has n entries, each containing every
// string of contains.
func wantViolations(t *testing.T, vs []string, n int, contains ...string) {
	t.Helper()
	if len(vs) != n {
		t.Fatalf("%d violations, want %d: %q", len(vs), n, vs)
	}
	for _, v := range vs {
		for _, c := range contains {
			if !strings.Contains(v, c) {
				t.Errorf("violation %q does not mention %q", v, c)
			}
		}
	}
}

func TestCheckStore(t *testing.T) {
	for _, tc := range []struct {
		name     string
		ops      []op
		store    map[regKey]storedReg
		want     int
		contains []string
		open     int
	}{
		{"held and stored", []op{reg(1, "s1", kA, 0, 5, "")}, map[regKey]storedReg{kA: {7, "1"}}, 0, nil, 0},
		{"unregistered and gone", []op{reg(1, "s1", kA, 0, 5, ""), {ID: 2, Kind: opUnregister, Session: "s1", Key: kA, Start: at(10), End: at(12)}}, nil, 0, nil, 0},
		{"orphan of a close-at-once", []op{{ID: 1, Kind: opCloseAtOnce, Session: "x1", Key: kA, Start: at(0), End: at(2), Err: "unknown"}},
			map[regKey]storedReg{kA: {7, "1"}}, 1, []string{"orphan", "web/10.0.0.1:80", "x1 ended at 12:00:00.000"}, 0},
		{"orphan of a closed session", []op{reg(1, "s1", kA, 0, 5, ""), {ID: 2, Kind: opClose, Session: "s1", Start: at(10)}},
			map[regKey]storedReg{kA: {7, "1"}}, 1, []string{"orphan", "op 1 register"}, 0},
		{"orphan of a killed agent", []op{reg(1, "s1", kA, 0, 5, ""), {ID: 2, Kind: opKillAgent, Agent: "a1", Sessions: []string{"s1"}, Start: at(10)}},
			map[regKey]storedReg{kA: {7, "1"}}, 1, []string{"orphan"}, 0},
		{"lost", []op{reg(1, "s1", kA, 0, 5, "")}, nil, 1, []string{"lost", "s1 is alive"}, 0},
		{"takeover: the new owner's write", []op{reg(1, "s1", kA, 0, 5, ""), reg(2, "s2", kA, 10, 15, ""), {ID: 3, Kind: opClose, Session: "s1", Start: at(20)}},
			map[regKey]storedReg{kA: {7, "2"}}, 0, nil, 0},
		{"takeover: lost by the old owner's close", []op{reg(1, "s1", kA, 0, 5, ""), reg(2, "s2", kA, 10, 15, ""), {ID: 3, Kind: opClose, Session: "s1", Start: at(20)}},
			nil, 1, []string{"lost", "op 2"}, 0},
		{"stale version", []op{reg(1, "s1", kA, 0, 5, ""), reg(2, "s1", kA, 10, 15, "")}, map[regKey]storedReg{kA: {7, "1"}}, 1, []string{"op 1", "last write is op 2"}, 0},
		{"failed register leaves it open", []op{reg(1, "s1", kA, 0, 5, "unavailable: store")}, map[regKey]storedReg{kA: {7, "1"}}, 0, nil, 1},
		{"failed register by the owner: either version", []op{reg(1, "s1", kA, 0, 5, ""), reg(2, "s1", kA, 10, 15, "timeout")}, map[regKey]storedReg{kA: {7, "1"}}, 0, nil, 0},
		{"denied probe changes nothing", []op{reg(1, "s1", kA, 0, 5, ""), {ID: 2, Kind: opProbeUnregister, Session: "s2", Key: kA, Start: at(10), Err: "permission_denied: not yours"}},
			map[regKey]storedReg{kA: {7, "1"}}, 0, nil, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			vs, open := checkStore(&history{TTL: time.Second, Ops: tc.ops, Store: tc.store})
			wantViolations(t, vs, tc.want, tc.contains...)
			if open != tc.open {
				t.Errorf("%d open keys, want %d", open, tc.open)
			}
		})
	}
}

func TestCheckConverged(t *testing.T) {
	store := map[regKey]storedReg{kA: {7, "1"}}
	good := sub("web", on(1, kA.Addr, 7, "1"), on(2, kB.Addr, 8, "2"), off(3, kB.Addr, 8, "2"))
	wantViolations(t, checkConverged(&history{Store: store, Streams: []*streamLog{good}}), 0)

	extra := sub("web", on(1, kA.Addr, 7, "1"), on(2, kB.Addr, 8, "2"))
	wantViolations(t, checkConverged(&history{Store: store, Streams: []*streamLog{extra}}), 1, "extra 10.0.0.2:80")
	missing := sub("web")
	wantViolations(t, checkConverged(&history{Store: store, Streams: []*streamLog{missing}}), 1, "missing 10.0.0.1:80")
	stale := sub("web", on(1, kA.Addr, 7, "0"))
	wantViolations(t, checkConverged(&history{Store: store, Streams: []*streamLog{stale}}), 1, "op 0, stored as Created 7 op 1")
	cut := sub("web", on(1, kA.Addr, 7, "1"))
	cut.Ended = "resource_exhausted: too slow"
	wantViolations(t, checkConverged(&history{Store: store, Streams: []*streamLog{cut}}), 1, "ended while its agent lived")
	killed := sub("web")
	killed.Ended = "agent killed"
	wantViolations(t, checkConverged(&history{Store: store, Streams: []*streamLog{killed}}), 0)
}

func TestCheckUniqueCreated(t *testing.T) {
	good := sub("web", on(1, kA.Addr, 7, "1"), on(2, kA.Addr, 7, "3"), on(3, kB.Addr, 8, "2"))
	other := sub("api", on(1, kB.Addr, 7, "4")) // another name may share it
	wantViolations(t, checkUniqueCreated(&history{Streams: []*streamLog{good, other}}), 0)

	bad := sub("web", on(1, kA.Addr, 7, "1"), on(2, kB.Addr, 7, "2"))
	wantViolations(t, checkUniqueCreated(&history{Streams: []*streamLog{bad}}), 1, "web: 2 registrations share Created 7", "10.0.0.1:80", "10.0.0.2:80")
	inStore := &history{Streams: []*streamLog{sub("web", on(1, kA.Addr, 7, "1"))}, Store: map[regKey]storedReg{kB: {7, "2"}}}
	wantViolations(t, checkUniqueCreated(inStore), 1, "the store at quiescence")
}

func TestCheckLeaderTokens(t *testing.T) {
	none := update{At: at(3)}
	good := leader("web", on(1, kA.Addr, 5, "1"), none, on(4, kA.Addr, 5, "1"), on(5, kA.Addr, 5, "9"), on(6, kB.Addr, 8, "2"))
	wantViolations(t, checkLeaderTokens(&history{Streams: []*streamLog{good}}), 0)

	shared := leader("web", on(1, kA.Addr, 5, "1"), on(2, kB.Addr, 5, "2"))
	wantViolations(t, checkLeaderTokens(&history{Streams: []*streamLog{shared}}), 1, "leader 10.0.0.1:80 (Created 5", "then leader 10.0.0.2:80 (Created 5", "did not increase")
	back := leader("web", on(1, kA.Addr, 5, "1"), none, on(4, kB.Addr, 8, "2"), on(5, kA.Addr, 5, "1"))
	wantViolations(t, checkLeaderTokens(&history{Streams: []*streamLog{back}}), 1, "Created 8", "Created 5")
}

func TestCheckNoFalseOffline(t *testing.T) {
	for _, tc := range []struct {
		name     string
		ops      []op
		updates  []update
		want     int
		contains []string
	}{
		{"offline after unregister",
			[]op{reg(1, "s1", kA, 0, 5, ""), {ID: 2, Kind: opUnregister, Session: "s1", Key: kA, Start: at(100), End: at(105)}},
			[]update{on(3, kA.Addr, 7, "1"), off(104, kA.Addr, 7, "1")}, 0, nil},
		{"offline after the owner's kill",
			[]op{reg(1, "c1", kA, 0, 5, ""), {ID: 2, Kind: opKillClient, Session: "c1", Start: at(100)}},
			[]update{on(3, kA.Addr, 7, "1"), off(130, kA.Addr, 7, "1")}, 0, nil},
		{"offline of a taken-over version",
			[]op{reg(1, "s1", kA, 0, 5, ""), reg(2, "s2", kA, 100, 105, "")},
			[]update{on(3, kA.Addr, 7, "1"), off(103, kA.Addr, 7, "1"), on(104, kA.Addr, 9, "2")}, 0, nil},
		{"offline of a failed register",
			[]op{reg(1, "s1", kA, 0, 5, "unavailable")},
			[]update{on(3, kA.Addr, 7, "1"), off(50, kA.Addr, 7, "1")}, 0, nil},
		{"storm during a store pause",
			[]op{reg(1, "s1", kA, 0, 5, ""), {ID: 2, Kind: opPauseStore, Start: at(100), End: at(4100)}},
			[]update{on(3, kA.Addr, 7, "1"), off(4200, kA.Addr, 7, "1"), on(4300, kA.Addr, 7, "1")}, 1,
			[]string{"web/10.0.0.1:80 went offline although s1 held it", "still held at the end of the run", "at 12:00:04.200", "op 2 pause-store"}},
		{"offline while the owner re-registers",
			[]op{reg(1, "s1", kA, 0, 5, ""), reg(2, "s1", kA, 100, 105, "")},
			[]update{on(3, kA.Addr, 7, "1"), off(103, kA.Addr, 7, "1")}, 1, []string{"ops [1 2]"}},
		{"removed by the previous owner's close",
			[]op{reg(1, "s1", kA, 0, 5, ""), reg(2, "s2", kA, 100, 105, ""), {ID: 3, Kind: opClose, Session: "s1", Start: at(200)}},
			[]update{on(3, kA.Addr, 7, "1"), on(104, kA.Addr, 7, "2"), off(210, kA.Addr, 7, "2")}, 1,
			[]string{"although s2 held it", "op 1 register web/10.0.0.1:80 by s1", "s1 ended at 12:00:00.200"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := &history{TTL: time.Second, Ops: tc.ops, Streams: []*streamLog{sub("web", tc.updates...)}}
			wantViolations(t, checkNoFalseOffline(h), tc.want, tc.contains...)
		})
	}
}

func TestCheckOwnership(t *testing.T) {
	owner := reg(1, "s1", kA, 0, 5, "")
	probe := func(kind opKind, err string) op {
		return op{ID: 2, Kind: kind, Session: "s2", Agent: owner.Agent, Key: kA, Start: at(10), End: at(11), Err: err}
	}
	ok := &history{Ops: []op{owner, probe(opProbeHeartbeat, "permission_denied: owned by another session")}}
	wantViolations(t, checkOwnership(ok), 0)
	// Through an agent that does not hold the key, not_found is right.
	elsewhere := probe(opProbeUnregister, "not_found: unknown")
	elsewhere.Agent = owner.Agent + "-other"
	wantViolations(t, checkOwnership(&history{Ops: []op{owner, elsewhere}}), 0)
	// After a close-at-once of unknown outcome on the key, no agent may
	// hold it: not_found is right.
	closeAtOnce := op{ID: 3, Kind: opCloseAtOnce, Session: "x3", Agent: "a2", Key: kA, Start: at(6), End: at(7), Err: "unknown"}
	wantViolations(t, checkOwnership(&history{Ops: []op{owner, closeAtOnce, probe(opProbeUnregister, "not_found: unknown")}}), 0)
	// A close-at-once that started before the register but whose write
	// landed after it (a stream saw it) may have taken the key over too;
	// one whose write was not seen after the register may not.
	early := op{ID: 5, Kind: opCloseAtOnce, Session: "x5", Agent: "a2", Key: kA, Start: at(0), End: at(1), Err: "unknown"}
	landed := &streamLog{ID: "subscribe web @a1", Kind: streamSubscribe, Name: kA.Name, Updates: []update{{At: at(8), Addr: kA.Addr, Online: true, Op: "5"}}}
	wantViolations(t, checkOwnership(&history{Ops: []op{early, owner, probe(opProbeUnregister, "not_found: unknown")}, Streams: []*streamLog{landed}}), 0)
	landed.Updates[0].At = at(-1)
	wantViolations(t, checkOwnership(&history{Ops: []op{early, owner, probe(opProbeUnregister, "not_found: unknown")}, Streams: []*streamLog{landed}}), 1, "want permission_denied")
	// The owner's session ended while the probe ran: its registration
	// went with it, and not_found is right; not before the owner ended.
	kill := op{ID: 4, Kind: opKillClient, Session: "s1", Agent: owner.Agent, Start: at(10), End: at(12)}
	wantViolations(t, checkOwnership(&history{Ops: []op{owner, kill, probe(opProbeUnregister, "not_found: unknown")}}), 0)
	kill.Start = at(11)
	wantViolations(t, checkOwnership(&history{Ops: []op{owner, kill, probe(opProbeUnregister, "not_found: unknown")}}), 1, "want permission_denied")
	// A probe whose connection died with its agent got no answer.
	wantViolations(t, checkOwnership(&history{Ops: []op{owner, probe(opProbeUnregister, "rpc: connection is shut down")}}), 0)
	for _, bad := range []op{probe(opProbeHeartbeat, ""), probe(opProbeUnregister, ""), probe(opProbeHeartbeat, "not_found: unknown")} {
		h := &history{Ops: []op{reg(1, "s1", kA, 0, 5, ""), bad}}
		wantViolations(t, checkOwnership(h), 1, "does not own web/10.0.0.1:80", "want permission_denied")
	}
	takeover := &history{
		TTL:     time.Second,
		Ops:     []op{reg(1, "s1", kA, 0, 5, ""), reg(2, "s2", kA, 100, 105, ""), {ID: 3, Kind: opClose, Session: "s1", Start: at(200)}},
		Streams: []*streamLog{sub("web", on(3, kA.Addr, 7, "1"), on(104, kA.Addr, 7, "2"), off(210, kA.Addr, 7, "2"))},
	}
	wantViolations(t, checkOwnership(takeover), 1, "s2 took it over at 12:00:00.100 from s1, which ended at 12:00:00.200")
}
