package faults_test

// The membership checker's history and its checks. A history is what the
// checker (checker_test.go) recorded: every operation with its outcome, and
// every update every stream saw, with timestamps, plus the store's content
// at quiescence. The checks are pure functions of a history, so that
// history_check_test.go can show each one failing on a hand-made history.

import (
	"cmp"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/flynn/discoverd/api"
	"github.com/flynn/discoverd/rpc"
)

// permissionDenied is the error code of a call by a session that does not
// own the registration.
const permissionDenied = string(api.CodePermissionDenied)
const notFound = string(api.CodeNotFound)

// regKey is a registration's identity: one instance of one service.
type regKey struct{ Name, Addr string }

func (k regKey) String() string { return k.Name + "/" + k.Addr }

type opKind string

// The operations of a history. Each register writes the attribute
// op=<its ID>, so that any update or stored value names the operation whose
// write it shows.
const (
	opRegister        opKind = "register"         // Register on the session's connection
	opUnregister      opKind = "unregister"       // Unregister by the session that owns the key
	opCloseAtOnce     opKind = "close-at-once"    // Register on a new raw connection, closed 0-2 ms after sending it
	opClose           opKind = "close"            // the session ends: its connection is closed (or its process exited)
	opKillClient      opKind = "kill-client"      // SIGKILL of the client process of the session
	opKillAgent       opKind = "kill-agent"       // SIGKILL of an agent process; Sessions died with it
	opPauseStore      opKind = "pause-store"      // SIGSTOP of every etcd member from Start, SIGCONT at End
	opProbeHeartbeat  opKind = "probe-heartbeat"  // Heartbeat from a session that does not own Key
	opProbeUnregister opKind = "probe-unregister" // Unregister from a session that does not own Key
)

// op is one operation and its outcome.
type op struct {
	ID       int
	Kind     opKind
	Session  string // "s3": an in-process connection; "c7": a client process; "x9": a close-at-once connection
	Agent    string // the agent it went through ("a1")
	Key      regKey // register, unregister, close-at-once, probes
	Start    time.Time
	End      time.Time
	Err      string   // "" when it succeeded (close-at-once: always "unknown")
	Sessions []string // kill-agent: the sessions that died with the agent
}

func (o op) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "op %d %s", o.ID, o.Kind)
	if o.Key != (regKey{}) {
		fmt.Fprintf(&b, " %s", o.Key)
	}
	if o.Session != "" {
		fmt.Fprintf(&b, " by %s", o.Session)
	}
	if o.Agent != "" {
		fmt.Fprintf(&b, " via %s", o.Agent)
	}
	fmt.Fprintf(&b, " [%s–%s]", ts(o.Start), ts(o.End))
	if o.Err != "" {
		fmt.Fprintf(&b, " failed: %s", o.Err)
	} else {
		b.WriteString(" ok")
	}
	return b.String()
}

func ts(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return t.Format("15:04:05.000")
}

// update is one ServiceUpdate a stream delivered. In a Leader stream an
// empty Addr means "no leader".
type update struct {
	At       time.Time
	Snapshot bool // Subscribe: part of the snapshot, before the sentinel
	Addr     string
	Online   bool
	Created  uint
	Op       string // the op attribute
}

type streamKind string

const (
	streamSubscribe streamKind = "subscribe"
	streamLeader    streamKind = "leader"
)

// streamLog is everything one Subscribe or Leader stream delivered.
type streamLog struct {
	ID      string // e.g. "subscribe svc0 @a1"
	Kind    streamKind
	Agent   string
	Name    string
	Updates []update
	Ended   string // "" while open at quiescence; else why it ended
}

// storedReg is one registration as the store held it at quiescence.
type storedReg struct {
	Created int64
	Op      string
}

// history is one run of the checker.
type history struct {
	TTL     time.Duration
	Ops     []op
	Streams []*streamLog
	Store   map[regKey]storedReg // read straight from etcd at quiescence
	// KnownGaps collects what the checks found and let pass because it is
	// a documented, open gap; the checker logs them.
	KnownGaps []string
}

// dump is h as text, one line per operation or update in time order, for
// reading a failed run (-checker.history).
func (h *history) dump() string {
	type line struct {
		at   time.Time
		text string
	}
	var lines []line
	for _, o := range h.Ops {
		lines = append(lines, line{o.Start, o.String()})
	}
	for _, s := range h.Streams {
		for _, u := range s.Updates {
			state := "offline"
			if u.Online {
				state = "online"
			}
			if s.Kind == streamLeader {
				state = "leader"
			}
			lines = append(lines, line{u.At, fmt.Sprintf("%s %s: %s %s Created %d op %s snapshot=%v", ts(u.At), s.ID, u.Addr, state, u.Created, u.Op, u.Snapshot)})
		}
		if s.Ended != "" {
			lines = append(lines, line{time.Time{}, fmt.Sprintf("%s ended: %s", s.ID, s.Ended)})
		}
	}
	slices.SortStableFunc(lines, func(a, b line) int { return a.at.Compare(b.at) })
	var b strings.Builder
	for _, l := range lines {
		b.WriteString(l.text)
		b.WriteByte('\n')
	}
	for _, k := range slices.SortedFunc(maps.Keys(h.Store), func(a, b regKey) int { return strings.Compare(a.String(), b.String()) }) {
		fmt.Fprintf(&b, "stored at quiescence: %s Created %d op %s\n", k, h.Store[k].Created, h.Store[k].Op)
	}
	return b.String()
}

// The model of who holds a key. A key's state is the set of states it may
// be in, given the outcomes seen so far: free, or held by a session through
// the version written by one register operation. A failed call leaves both
// possibilities open.

type holder struct {
	Session string // "" = free (nothing stored)
	Op      int    // the register operation whose write is stored
}

type keyState map[holder]bool

var free = holder{}

// model replays operations. Its zero value is not ready: use newModel.
type model struct {
	states map[regKey]keyState
	dead   map[string]time.Time // session -> when it ended
}

func newModel() *model {
	return &model{states: make(map[regKey]keyState), dead: make(map[string]time.Time)}
}

func (m *model) state(k regKey) keyState {
	st, ok := m.states[k]
	if !ok {
		st = keyState{free: true}
		m.states[k] = st
	}
	return st
}

func (m *model) die(session string, at time.Time) {
	if _, ok := m.dead[session]; !ok {
		m.dead[session] = at
	}
}

// apply records the outcome of o. Operations on one key must be applied in
// the order they ran (the checker never runs two at once on one key).
func (m *model) apply(o op) {
	switch o.Kind {
	case opClose, opKillClient:
		m.die(o.Session, o.Start)
	case opKillAgent:
		for _, s := range o.Sessions {
			m.die(s, o.Start)
		}
	case opRegister:
		if o.Err == "" {
			m.states[o.Key] = keyState{{o.Session, o.ID}: true}
		} else {
			m.state(o.Key)[holder{o.Session, o.ID}] = true
		}
	case opCloseAtOnce:
		m.state(o.Key)[holder{o.Session, o.ID}] = true
		m.die(o.Session, o.Start)
	case opUnregister, opProbeUnregister:
		switch {
		case o.Err == "":
			m.states[o.Key] = keyState{free: true}
		case strings.HasPrefix(o.Err, permissionDenied):
		default:
			m.state(o.Key)[free] = true
		}
	}
}

// final returns the possible states of k with dead sessions' holdings
// dropped: a session that ended holds nothing.
func (m *model) final(k regKey) keyState {
	out := keyState{}
	for h := range m.state(k) {
		if _, dead := m.dead[h.Session]; dead && h != free {
			h = free
		}
		out[h] = true
	}
	return out
}

// owner returns the live session that certainly holds k, "" if k is
// certainly free, and ok false if it is not known.
func (m *model) owner(k regKey) (session string, ok bool) {
	st := m.final(k)
	if len(st) == 1 {
		for h := range st {
			return h.Session, true
		}
	}
	sessions := make(map[string]bool)
	for h := range st {
		sessions[h.Session] = true
	}
	if len(sessions) == 1 && !sessions[""] {
		for s := range sessions {
			return s, true
		}
	}
	return "", false
}

func replay(h *history) *model {
	m := newModel()
	ops := slices.Clone(h.Ops)
	slices.SortStableFunc(ops, func(a, b op) int { return a.Start.Compare(b.Start) })
	for _, o := range ops {
		m.apply(o)
	}
	return m
}

func (h *history) opByID() map[int]op {
	out := make(map[int]op, len(h.Ops))
	for _, o := range h.Ops {
		out[o.ID] = o
	}
	return out
}

func (h *history) keys(m *model) []regKey {
	set := make(map[regKey]bool)
	for k := range m.states {
		set[k] = true
	}
	for k := range h.Store {
		set[k] = true
	}
	ks := slices.Collect(maps.Keys(set))
	slices.SortFunc(ks, func(a, b regKey) int { return cmp.Compare(a.String(), b.String()) })
	return ks
}

// describeOp says who wrote version opID and what became of its session.
func describeOp(ops map[int]op, m *model, opID string) string {
	var id int
	if _, err := fmt.Sscan(opID, &id); err != nil {
		return fmt.Sprintf("op %q (not one of the checker's)", opID)
	}
	o, ok := ops[id]
	if !ok {
		return fmt.Sprintf("op %d (unknown)", id)
	}
	s := o.String()
	if at, dead := m.dead[o.Session]; dead {
		s += fmt.Sprintf("; %s ended at %s", o.Session, ts(at))
	} else if o.Session != "" {
		s += fmt.Sprintf("; %s is alive", o.Session)
	}
	return s
}

// checkStore is invariant 1: at quiescence the store holds exactly the
// registrations held by live sessions, each as its owner last wrote it.
// Keys whose state the outcomes leave open are counted, not checked.
func checkStore(h *history) (violations []string, indeterminate int) {
	m := replay(h)
	ops := h.opByID()
	for _, k := range h.keys(m) {
		st := m.final(k)
		got, stored := h.Store[k]
		if len(st) > 1 && st[free] {
			indeterminate++
			continue
		}
		if st[free] {
			if stored {
				violations = append(violations, fmt.Sprintf("%s is stored (Created %d) but no live session holds it (orphan); it was written by %s",
					k, got.Created, describeOp(ops, m, got.Op)))
			}
			continue
		}
		var want []string
		for hd := range st {
			want = append(want, fmt.Sprint(hd.Op))
		}
		slices.Sort(want)
		switch {
		case !stored:
			violations = append(violations, fmt.Sprintf("%s is held by a live session but not stored (lost); its owner's last write: %s",
				k, describeOp(ops, m, want[len(want)-1])))
		case !slices.Contains(want, got.Op):
			violations = append(violations, fmt.Sprintf("%s is stored as written by %s, but its owner's last write is op %s: %s",
				k, describeOp(ops, m, got.Op), strings.Join(want, " or "), describeOp(ops, m, want[len(want)-1])))
		}
	}
	return violations, indeterminate
}

// streamState folds a Subscribe stream into the set it ends with.
func streamState(s *streamLog) map[string]update {
	set := make(map[string]update)
	for _, u := range s.Updates {
		if u.Online {
			set[u.Addr] = u
		} else {
			delete(set, u.Addr)
		}
	}
	return set
}

// checkConverged is invariant 1, second half: every Subscribe stream still
// open at quiescence ends with exactly the store's set of its name, each
// instance with the stored Created and version. A stream that ended while
// its agent lived is a violation too.
func checkConverged(h *history) []string {
	var out []string
	for _, s := range h.Streams {
		if s.Kind != streamSubscribe {
			continue
		}
		if s.Ended != "" {
			if !strings.HasPrefix(s.Ended, "agent killed") {
				out = append(out, fmt.Sprintf("%s ended while its agent lived: %s", s.ID, s.Ended))
			}
			continue
		}
		got := streamState(s)
		var diffs []string
		for k, st := range h.Store {
			if k.Name != s.Name {
				continue
			}
			u, ok := got[k.Addr]
			switch {
			case !ok:
				diffs = append(diffs, fmt.Sprintf("missing %s (stored, Created %d, op %s)", k.Addr, st.Created, st.Op))
			case int64(u.Created) != st.Created || u.Op != st.Op:
				diffs = append(diffs, fmt.Sprintf("%s as Created %d op %s, stored as Created %d op %s", k.Addr, u.Created, u.Op, st.Created, st.Op))
			}
		}
		for a, u := range got {
			if _, ok := h.Store[regKey{s.Name, a}]; !ok {
				diffs = append(diffs, fmt.Sprintf("extra %s (Created %d, op %s, last update at %s), not stored", a, u.Created, u.Op, ts(u.At)))
			}
		}
		if len(diffs) > 0 {
			slices.Sort(diffs)
			out = append(out, fmt.Sprintf("%s does not hold the stored set: %s", s.ID, strings.Join(diffs, "; ")))
		}
	}
	return out
}

// checkUniqueCreated is invariant 2: no two registrations of a name (two
// addresses) ever carried the same Created, in any update of any stream or
// in the store.
func checkUniqueCreated(h *history) []string {
	type seen struct {
		where string
		at    time.Time
	}
	byName := make(map[string]map[uint]map[string]seen) // name -> Created -> addr -> first sighting
	note := func(name string, created uint, addr, where string, at time.Time) {
		if addr == "" || created == 0 {
			return
		}
		if byName[name] == nil {
			byName[name] = make(map[uint]map[string]seen)
		}
		if byName[name][created] == nil {
			byName[name][created] = make(map[string]seen)
		}
		if _, ok := byName[name][created][addr]; !ok {
			byName[name][created][addr] = seen{where, at}
		}
	}
	for _, s := range h.Streams {
		for _, u := range s.Updates {
			note(s.Name, u.Created, u.Addr, s.ID, u.At)
		}
	}
	for k, st := range h.Store {
		note(k.Name, uint(st.Created), k.Addr, "the store at quiescence", time.Time{})
	}
	var out []string
	for _, name := range slices.Sorted(maps.Keys(byName)) {
		for _, c := range slices.Sorted(maps.Keys(byName[name])) {
			addrs := byName[name][c]
			if len(addrs) < 2 {
				continue
			}
			var ds []string
			for _, a := range slices.Sorted(maps.Keys(addrs)) {
				ds = append(ds, fmt.Sprintf("%s (first in %s at %s)", a, addrs[a].where, ts(addrs[a].at)))
			}
			out = append(out, fmt.Sprintf("%s: %d registrations share Created %d: %s", name, len(addrs), c, strings.Join(ds, ", ")))
		}
	}
	return out
}

// checkLeaderTokens is invariant 3: each Leader stream's successive
// leaders carry strictly increasing Created ("no leader" entries and
// re-announcements of the leader it already named are skipped).
func checkLeaderTokens(h *history) []string {
	var out []string
	for _, s := range h.Streams {
		if s.Kind != streamLeader {
			continue
		}
		var last *update
		for i := range s.Updates {
			u := &s.Updates[i]
			if u.Addr == "" {
				continue
			}
			if last != nil && u.Addr == last.Addr && u.Created == last.Created {
				continue
			}
			if last != nil && u.Created <= last.Created {
				out = append(out, fmt.Sprintf("%s: leader %s (Created %d, op %s) at %s, then leader %s (Created %d, op %s) at %s: the token did not increase",
					s.ID, last.Addr, last.Created, last.Op, ts(last.At), u.Addr, u.Created, u.Op, ts(u.At)))
			}
			last = u
		}
	}
	return out
}

// tenure is a stretch during which one live session certainly held a key:
// from its successful register until the next operation on the key that is
// not a successful register by the same session (or a heartbeat probe), or
// until the session ended.
type tenure struct {
	Key      regKey
	Session  string
	Ops      []int // the session's registers in the tenure
	Start    time.Time
	End      time.Time // zero: it lasted to the end of the run
	Why      string    // what ended it
	Previous string    // the session that held the key before, when certain and another one (a takeover)
}

func tenures(h *history, m *model) []tenure {
	byKey := make(map[regKey][]op)
	for _, o := range h.Ops {
		if o.Key != (regKey{}) && o.Kind != opProbeHeartbeat && o.Kind != opProbeUnregister {
			byKey[o.Key] = append(byKey[o.Key], o)
		}
	}
	var out []tenure
	for k, ops := range byKey {
		slices.SortStableFunc(ops, func(a, b op) int { return a.Start.Compare(b.Start) })
		var cur *tenure
		prevOwner := ""
		end := func(at time.Time, why string) {
			if cur != nil {
				cur.End, cur.Why = at, why
				out = append(out, *cur)
				prevOwner = cur.Session
				cur = nil
			} else {
				prevOwner = ""
			}
		}
		for _, o := range ops {
			if o.Kind == opRegister && o.Err == "" {
				if cur != nil && cur.Session == o.Session {
					cur.Ops = append(cur.Ops, o.ID)
					continue
				}
				end(o.Start, fmt.Sprintf("op %d %s by %s", o.ID, o.Kind, o.Session))
				cur = &tenure{Key: k, Session: o.Session, Ops: []int{o.ID}, Start: o.Start}
				if prevOwner != o.Session {
					cur.Previous = prevOwner
				}
				continue
			}
			end(o.Start, fmt.Sprintf("op %d %s by %s", o.ID, o.Kind, o.Session))
		}
		if cur != nil {
			cur.Why = "the end of the run"
			out = append(out, *cur)
		}
	}
	// A session's end ends its tenures.
	for i := range out {
		t := &out[i]
		if at, dead := m.dead[t.Session]; dead && (t.End.IsZero() || at.Before(t.End)) {
			t.End, t.Why = at, t.Session+" ended"
		}
	}
	return out
}

// falseOffline is an offline update for an instance whose owner held it
// at the time.
type falseOffline struct {
	Tenure  tenure
	Streams []string // where it was seen, with when
	First   time.Time
}

func falseOfflines(h *history) []falseOffline {
	m := replay(h)
	byOp := make(map[string]int) // version -> index in tens
	tens := tenures(h, m)
	for i, t := range tens {
		for _, id := range t.Ops {
			byOp[fmt.Sprint(id)] = i
		}
	}
	found := make(map[int]*falseOffline)
	for _, s := range h.Streams {
		if s.Kind != streamSubscribe {
			continue
		}
		for _, u := range s.Updates {
			if u.Online || u.Snapshot {
				continue
			}
			i, ok := byOp[u.Op]
			if !ok || tens[i].Key != (regKey{s.Name, u.Addr}) {
				continue
			}
			t := tens[i]
			if !t.End.IsZero() && u.At.After(t.End) {
				continue // after the end of the tenure, which caused it
			}
			f := found[i]
			if f == nil {
				f = &falseOffline{Tenure: t, First: u.At}
				found[i] = f
			}
			if u.At.Before(f.First) {
				f.First = u.At
			}
			f.Streams = append(f.Streams, fmt.Sprintf("%s at %s (Created %d)", s.ID, ts(u.At), u.Created))
		}
	}
	var out []falseOffline
	for _, f := range found {
		out = append(out, *f)
	}
	slices.SortFunc(out, func(a, b falseOffline) int { return a.First.Compare(b.First) })
	return out
}

// faultsAround lists the faults (store pauses, agent kills) that overlap
// [from, to].
func faultsAround(h *history, from, to time.Time) string {
	var fs []string
	for _, o := range h.Ops {
		if o.Kind != opPauseStore && o.Kind != opKillAgent {
			continue
		}
		if o.Start.After(to) || o.End.Before(from) {
			continue
		}
		fs = append(fs, o.String())
	}
	if len(fs) == 0 {
		return "no store pause or agent kill around it"
	}
	return "around it: " + strings.Join(fs, "; ")
}

// opsBefore lists the last n operations on k that started before at.
func opsBefore(h *history, m *model, k regKey, at time.Time, n int) string {
	var before []op
	for _, o := range h.Ops {
		if o.Key == k && o.Start.Before(at) {
			before = append(before, o)
		}
	}
	slices.SortStableFunc(before, func(a, b op) int { return a.Start.Compare(b.Start) })
	if len(before) > n {
		before = before[len(before)-n:]
	}
	if len(before) == 0 {
		return "nothing"
	}
	var ds []string
	for _, o := range before {
		d := o.String()
		if at, dead := m.dead[o.Session]; dead {
			d += fmt.Sprintf(" (%s ended at %s)", o.Session, ts(at))
		}
		ds = append(ds, d)
	}
	return strings.Join(ds, "; ")
}

// checkNoFalseOffline is invariant 4: no subscriber sees an instance go
// offline while its owner is alive, has not unregistered it and has not
// lost it to a takeover, store pauses included.
func checkNoFalseOffline(h *history) []string {
	var out []string
	m := replay(h)
	for _, f := range falseOfflines(h) {
		t := f.Tenure
		until := "still held at the end of the run"
		if !t.End.IsZero() {
			until = fmt.Sprintf("held until %s (%s)", ts(t.End), t.Why)
		}
		out = append(out, fmt.Sprintf("%s went offline although %s held it (registered by ops %v from %s, %s); seen by %d streams: %s; before it on the key: %s; %s",
			t.Key, t.Session, t.Ops, ts(t.Start), until, len(f.Streams), strings.Join(f.Streams, ", "),
			opsBefore(h, m, t.Key, t.Start, 2), faultsAround(h, f.First.Add(-3*h.TTL), f.First)))
	}
	return out
}

// checkOwnership is invariant 5: calls from a session that does not own a
// registration get permission_denied, and a session's end after it lost a
// registration to a takeover does not remove it.
// ownerAgent returns the agent of the last successful register of probe's
// key that ended before the probe started ("" if none).
func ownerAgent(h *history, probe op) string {
	agent, _ := lastRegister(h, probe)
	return agent
}

// lastRegister returns the agent and the session of the last successful
// register of probe's key that ended before the probe started.
func lastRegister(h *history, probe op) (agent, session string) {
	var end time.Time
	for _, o := range h.Ops {
		if o.Kind == opRegister && o.Err == "" && o.Key == probe.Key && o.End.Before(probe.Start) && o.End.After(end) {
			agent, session, end = o.Agent, o.Session, o.End
		}
	}
	return agent, session
}

// uncertainSince reports whether an operation of unknown outcome on
// probe's key (a close-at-once, a failed register) ran between the last
// successful register of the key and the probe: it may have taken the key
// over through another agent and ended, so that no agent holds it and
// not_found is a right answer. One that started earlier counts when a
// stream saw its write land after the last register began (the agent
// carries on with a Register whose connection closed).
func uncertainSince(h *history, probe op) bool {
	var last, lastStart time.Time
	for _, o := range h.Ops {
		if o.Kind == opRegister && o.Err == "" && o.Key == probe.Key && o.End.Before(probe.Start) && o.End.After(last) {
			last, lastStart = o.End, o.Start
		}
	}
	for _, o := range h.Ops {
		if o.Key != probe.Key || o.Err == "" || !o.Start.Before(probe.Start) {
			continue
		}
		if o.Kind != opRegister && o.Kind != opCloseAtOnce {
			continue
		}
		if !o.Start.Before(last) || landedAfter(h, o, lastStart, probe.Start) {
			return true
		}
	}
	return false
}

// landedAfter reports whether a stream saw o's write between from and to.
func landedAfter(h *history, o op, from, to time.Time) bool {
	id := fmt.Sprint(o.ID)
	for _, s := range h.Streams {
		if s.Kind != streamSubscribe || s.Name != o.Key.Name {
			continue
		}
		for _, u := range s.Updates {
			if u.Op == id && u.Addr == o.Key.Addr && u.Online && u.At.After(from) && u.At.Before(to) {
				return true
			}
		}
	}
	return false
}

// formerOwner reports whether probe's session registered probe's key
// successfully before the probe.
func formerOwner(h *history, probe op) bool {
	for _, o := range h.Ops {
		if o.Kind == opRegister && o.Err == "" && o.Key == probe.Key && o.Session == probe.Session && o.End.Before(probe.Start) {
			return true
		}
	}
	return false
}

func checkOwnership(h *history) []string {
	var out []string
	m := replay(h)
	for _, o := range h.Ops {
		if o.Kind != opProbeHeartbeat && o.Kind != opProbeUnregister {
			continue
		}
		// The probe's connection died (its agent was killed): no answer
		// to judge.
		if strings.HasPrefix(o.Err, rpc.ErrShutdown.Error()) || strings.HasPrefix(o.Err, "rpc: sending:") {
			continue
		}
		// An agent that does not hold the key at all (its owner registered
		// through another agent) answers not_found and changes nothing:
		// the store is not asked on a Heartbeat or Unregister.
		if strings.HasPrefix(o.Err, notFound) && (ownerAgent(h, o) != o.Agent || uncertainSince(h, o)) {
			continue
		}
		// The owner's session ended (closed, killed) before the probe was
		// answered: its registration went with it, and not_found is right.
		if _, owner := lastRegister(h, o); strings.HasPrefix(o.Err, notFound) && owner != "" {
			if at, dead := m.dead[owner]; dead && at.Before(o.End) {
				continue
			}
		}
		// Known gap (docs/API.md, Ownership): a former owner whose
		// registration was taken over through another agent is still
		// answered by its own agent, which learns of the takeover only at
		// its next anti-entropy pass: its heartbeats from memory, and its
		// Unregister of a key the new owner has removed meanwhile with
		// success (there is nothing left to delete; a key still there is
		// refused, the store write being conditional).
		// (Under a store outage its agent answers unavailable and retries
		// the conditional delete, which deletes nothing either.)
		answered := o.Err == "" || strings.HasPrefix(o.Err, string(api.CodeUnavailable))
		if answered && ownerAgent(h, o) != o.Agent && formerOwner(h, o) {
			h.KnownGaps = append(h.KnownGaps, fmt.Sprintf("%s: answered by the former owner's agent after a takeover through another agent", o))
			continue
		}
		if !strings.HasPrefix(o.Err, permissionDenied) {
			got := o.Err
			if got == "" {
				got = "success"
			}
			out = append(out, fmt.Sprintf("%s: a session that does not own %s got %q, want %s", o, o.Key, got, permissionDenied))
		}
	}
	for _, f := range falseOfflines(h) {
		t := f.Tenure
		if t.Previous == "" {
			continue
		}
		at, dead := m.dead[t.Previous]
		if !dead || at.Before(t.Start) || at.After(f.First) {
			continue
		}
		out = append(out, fmt.Sprintf("%s: %s took it over at %s from %s, which ended at %s; it went offline at %s though %s still held it (first seen by %s)",
			t.Key, t.Session, ts(t.Start), t.Previous, ts(at), ts(f.First), t.Session, f.Streams[0]))
	}
	return out
}
