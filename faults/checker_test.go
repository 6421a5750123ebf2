package faults_test

import (
	"context"
	"encoding/gob"
	"flag"
	"fmt"
	"io"
	"maps"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/flynn/discoverd/api"
	"github.com/flynn/discoverd/rpc"
)

var (
	checkerSeed     = flag.Uint64("checker.seed", 0, "seed of TestMembershipChecker (also CHECKER_SEED); 0 picks one")
	checkerDuration = flag.Duration("checker.duration", 0, "how long TestMembershipChecker runs operations and faults (also CHECKER_DURATION); default 20s")
	checkerHistory  = flag.String("checker.history", "", "file to write the whole history to, as text, when TestMembershipChecker fails")
)

// The shape of a checker run.
const (
	checkerAgents      = 3 // agent processes at any time
	checkerSessions    = 3 // in-process connections per agent
	checkerWorkers     = 4 // goroutines running client operations
	checkerMaxChildren = 4 // client processes at once
	checkerNames       = 2 // service names
	checkerAddrs       = 6 // addresses per name: few, so that keys are reused and taken over
	checkerCallTimeout = 10 * time.Second
)

func checkerParams(t *testing.T) (seed uint64, duration time.Duration) {
	seed, duration = *checkerSeed, *checkerDuration
	if seed == 0 {
		if s := os.Getenv("CHECKER_SEED"); s != "" {
			v, err := strconv.ParseUint(s, 10, 64)
			if err != nil {
				t.Fatalf("CHECKER_SEED: %v", err)
			}
			seed = v
		}
	}
	if seed == 0 {
		seed = uint64(time.Now().UnixNano())
	}
	if duration == 0 {
		if s := os.Getenv("CHECKER_DURATION"); s != "" {
			v, err := time.ParseDuration(s)
			if err != nil {
				t.Fatalf("CHECKER_DURATION: %v", err)
			}
			duration = v
		}
	}
	if duration == 0 {
		duration = 20 * time.Second
	}
	return seed, duration
}

// TestMembershipChecker is issue 11's randomized checker, in the style of
// Jepsen's and etcd's robustness tests. Agent processes on a 3-member etcd
// cluster of etcd server processes serve in-process client connections
// and client processes (faults/checkerclient) that register, register again
// with other attributes, unregister, close at once after a Register, take
// over each other's registrations, and get SIGKILLed; meanwhile agents are
// SIGKILLed (and replaced) and the whole store is frozen (SIGSTOP) for more
// than the TTL. Every update of a Subscribe and a Leader stream per name on
// every agent, and every operation with its outcome, is recorded; at
// quiescence the checks of history_test.go run on the history.
//
// The run is seeded (-checker.seed or CHECKER_SEED); the seed is printed
// at the start and on failure. The interleaving depends on timing as well,
// so a seed replays the same choices, not always the same history.
// -checker.duration (or CHECKER_DURATION) sets the length: 20 s by default
// (make test); make soak runs 10 minutes. Every run fails on any report
// of any invariant.
func TestMembershipChecker(t *testing.T) {
	seed, duration := checkerParams(t)
	t.Logf("checker seed %d, duration %v (replay: go test -race -run TestMembershipChecker ./faults/ -args -checker.seed=%d)", seed, duration, seed)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("checker FAILED with seed %d: replay with -checker.seed=%d (or CHECKER_SEED=%d)", seed, seed, seed)
		}
	})
	c := newChecker(t, seed)
	c.run(duration)
	h := c.quiesce()
	c.report(h)
	if t.Failed() && *checkerHistory != "" {
		if err := os.WriteFile(*checkerHistory, []byte(h.dump()), 0o644); err != nil {
			t.Errorf("writing the history: %v", err)
		} else {
			t.Logf("history written to %s", *checkerHistory)
		}
	}
}

type checker struct {
	t        *testing.T
	seed     uint64
	etcd     *etcdProcCluster
	eps      []string
	childBin string
	keys     []regKey
	names    []string
	stop     chan struct{}
	workers  sync.WaitGroup
	streams  sync.WaitGroup

	mu         sync.Mutex
	ops        []op
	streamLogs []*streamLog
	model      *model
	nextID     int
	agents     map[string]*checkerAgent
	sessions   map[string]*session
	children   map[string]*child
	keyLocks   map[regKey]*sync.Mutex
	hbFailures int
	hbSample   []string
	agentLogs  []*logBuffer // of every agent started, killed ones too
}

type checkerAgent struct {
	id      string
	addr    string
	p       *proc
	streams *rpc.Client
	dead    bool
}

// session is an in-process client connection that heartbeats what it
// holds every TTL/4.
type session struct {
	id    string
	agent string
	c     *rpc.Client
	quit  chan struct{}
	done  chan struct{}

	mu   sync.Mutex
	held map[regKey]bool
}

// child is a client process holding one registration.
type child struct {
	id    string
	agent string
	cmd   *exec.Cmd
	stdin io.WriteCloser
	out   *logBuffer
	done  chan struct{}
}

func newChecker(t *testing.T, seed uint64) *checker {
	c := &checker{
		t:        t,
		seed:     seed,
		stop:     make(chan struct{}),
		model:    newModel(),
		agents:   make(map[string]*checkerAgent),
		sessions: make(map[string]*session),
		children: make(map[string]*child),
		keyLocks: make(map[regKey]*sync.Mutex),
	}
	for n := range checkerNames {
		name := fmt.Sprintf("svc%d", n)
		c.names = append(c.names, name)
		for a := range checkerAddrs {
			k := regKey{name, fmt.Sprintf("10.%d.0.%d:80", n, a+1)}
			c.keys = append(c.keys, k)
			c.keyLocks[k] = &sync.Mutex{}
		}
	}
	discoverdBinary(t)
	c.childBin = filepath.Join(t.TempDir(), "checkerclient")
	if out, err := exec.Command("go", "build", "-o", c.childBin, "github.com/flynn/discoverd/faults/checkerclient").CombinedOutput(); err != nil {
		t.Fatalf("building checkerclient: %v\n%s", err, out)
	}
	c.etcd = startEtcdProcs(t)
	c.eps = c.etcd.Endpoints()
	// Cleanups run last-registered first: this one, registered after the
	// etcd cluster's, runs before it.
	t.Cleanup(c.close)
	for range checkerAgents {
		c.startAgent()
	}
	return c
}

func (c *checker) id(prefix string) string {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.nextID++
	return fmt.Sprintf("%s%d", prefix, c.nextID)
}

func (c *checker) newOpID() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.nextID++
	return c.nextID
}

// record appends o to the history and to the live model.
func (c *checker) record(o op) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.ops = append(c.ops, o)
	c.model.apply(o)
}

// repairs counts, in the logs of every agent of the run, what the etcd
// backend did to keep the store equal to what its sessions hold: the
// anti-entropy's repairs (metric discoverd_store_repairs_total), the
// lease renewals that restored registrations, and the registrations
// dropped because another session had taken them over.
func (c *checker) repairs() string {
	kinds := []struct{ what, line string }{
		{"anti-entropy deletions", "etcd anti-entropy: deleted a key"},
		{"anti-entropy rewrites", "etcd anti-entropy: wrote again"},
		{"lease renewals with restores", "etcd lease renewed; registrations restored"},
		{"registrations dropped as taken over", "registration taken over by another session; no longer held here"},
	}
	c.mu.Lock()
	logs := slices.Clone(c.agentLogs)
	c.mu.Unlock()
	n := make([]int, len(kinds))
	for _, lb := range logs {
		text := lb.String()
		for i, k := range kinds {
			n[i] += strings.Count(text, k.line)
		}
	}
	var parts []string
	for i, k := range kinds {
		parts = append(parts, fmt.Sprintf("%d %s", n[i], k.what))
	}
	return fmt.Sprintf("%s (%d agents)", strings.Join(parts, ", "), len(logs))
}

// startAgent starts an agent process on a new port, its streams and its
// sessions. It runs on the test's goroutine.
func (c *checker) startAgent() {
	t := c.t
	id := c.id("a")
	_, lb := newLog(t, "agent "+id)
	addr := freeAddr(t)
	p := startProc(t, lb, "-etcd", strings.Join(c.eps, ","), "-bind", addr, "-ttl", ttl.String())
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	sc, err := rpc.Dial(ctx, addr, rpc.Gob)
	if err != nil {
		t.Fatalf("dial %s: %v", id, err)
	}
	a := &checkerAgent{id: id, addr: addr, p: p, streams: sc}
	c.mu.Lock()
	c.agents[id] = a
	c.agentLogs = append(c.agentLogs, lb)
	c.mu.Unlock()
	for _, name := range c.names {
		c.openStream(a, streamSubscribe, name)
		c.openStream(a, streamLeader, name)
	}
	for range checkerSessions {
		if _, err := c.newSession(a); err != nil {
			t.Fatalf("session on %s: %v", id, err)
		}
	}
}

func (c *checker) openStream(a *checkerAgent, kind streamKind, name string) {
	method := api.MethodSubscribe
	if kind == streamLeader {
		method = api.MethodLeader
	}
	ch := make(chan *api.ServiceUpdate, 1024)
	sc, err := a.streams.Stream(context.Background(), method, &api.Args{Name: name}, ch)
	if err != nil {
		c.t.Fatalf("%s %s on %s: %v", method, name, a.id, err)
	}
	log := &streamLog{ID: fmt.Sprintf("%s %s @%s", kind, name, a.id), Kind: kind, Agent: a.id, Name: name}
	c.mu.Lock()
	c.streamLogs = append(c.streamLogs, log)
	c.mu.Unlock()
	c.streams.Go(func() {
		snapshot := kind == streamSubscribe
		for u := range ch {
			now := time.Now()
			if snapshot && u.IsSentinel() {
				snapshot = false
				continue
			}
			c.mu.Lock()
			log.Updates = append(log.Updates, update{At: now, Snapshot: snapshot, Addr: u.Addr, Online: u.Online, Created: u.Created, Op: u.Attrs["op"]})
			c.mu.Unlock()
		}
		c.mu.Lock()
		defer c.mu.Unlock()
		switch {
		case a.dead:
			log.Ended = "agent killed"
		case sc.Err() != nil:
			log.Ended = sc.Err().Error()
		default:
			log.Ended = "ended cleanly"
		}
	})
}

func (c *checker) newSession(a *checkerAgent) (*session, error) {
	ctx, cancel := context.WithTimeout(context.Background(), checkerCallTimeout)
	defer cancel()
	rc, err := rpc.Dial(ctx, a.addr, rpc.Gob)
	if err != nil {
		return nil, err
	}
	s := &session{id: c.id("s"), agent: a.id, c: rc, quit: make(chan struct{}), done: make(chan struct{}), held: make(map[regKey]bool)}
	go c.heartbeat(s) // ended by s.close
	c.mu.Lock()
	c.sessions[s.id] = s
	c.mu.Unlock()
	return s, nil
}

func (c *checker) heartbeat(s *session) {
	defer close(s.done)
	tick := time.NewTicker(ttl / 4)
	defer tick.Stop()
	for {
		select {
		case <-s.quit:
			return
		case <-tick.C:
		}
		s.mu.Lock()
		keys := slices.Collect(maps.Keys(s.held))
		s.mu.Unlock()
		for _, k := range keys {
			ctx, cancel := context.WithTimeout(context.Background(), ttl)
			err := s.c.Call(ctx, api.MethodHeartbeat, &api.Args{Name: k.Name, Addr: k.Addr}, &struct{}{})
			cancel()
			if err != nil {
				c.mu.Lock()
				c.hbFailures++
				if len(c.hbSample) < 10 {
					c.hbSample = append(c.hbSample, fmt.Sprintf("%s heartbeat %s at %s: %v", s.id, k, ts(time.Now()), err))
				}
				c.mu.Unlock()
			}
		}
	}
}

func (s *session) hold(k regKey, on bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if on {
		s.held[k] = true
	} else {
		delete(s.held, k)
	}
}

// close stops the heartbeats and closes the connection. Idempotent.
func (s *session) close() {
	select {
	case <-s.quit:
	default:
		close(s.quit)
	}
	<-s.done
	s.c.Close()
}

func (ch *child) kill() {
	ch.cmd.Process.Signal(syscall.SIGKILL)
	select {
	case <-ch.done:
	case <-time.After(wait):
	}
}

// close ends everything the run started but the etcd cluster and the
// agent processes (their own cleanups stop them).
func (c *checker) close() {
	select {
	case <-c.stop:
	default:
		close(c.stop)
	}
	c.workers.Wait()
	c.etcd.Resume()
	c.mu.Lock()
	sessions := slices.Collect(maps.Values(c.sessions))
	children := slices.Collect(maps.Values(c.children))
	agents := slices.Collect(maps.Values(c.agents))
	c.mu.Unlock()
	for _, s := range sessions {
		s.close()
	}
	for _, ch := range children {
		ch.stdin.Close()
		ch.kill()
	}
	for _, a := range agents {
		a.streams.Close()
	}
	c.streams.Wait()
}

// run drives the workers for d, and injects the faults itself, on the
// test's goroutine: a store pause and an agent kill first (in a random
// order), then random ones.
func (c *checker) run(d time.Duration) {
	for i := range checkerWorkers {
		rng := rand.New(rand.NewPCG(c.seed, uint64(i+1)))
		c.workers.Go(func() { c.work(rng) })
	}
	rng := rand.New(rand.NewPCG(c.seed, 0))
	end := time.Now().Add(d)
	faults := []opKind{opPauseStore, opKillAgent}
	rng.Shuffle(len(faults), func(i, j int) { faults[i], faults[j] = faults[j], faults[i] })
	for i := 0; ; i++ {
		gap := time.Duration(2000+rng.IntN(4000)) * time.Millisecond
		if !c.sleep(min(gap, time.Until(end))) || time.Now().After(end) {
			break
		}
		kind := opPauseStore
		if i < len(faults) {
			kind = faults[i]
		} else if rng.IntN(2) == 0 {
			kind = opKillAgent
		}
		switch kind {
		case opPauseStore:
			c.pauseStore(time.Duration(float64(ttl) * (1.5 + 1.5*rng.Float64())))
		case opKillAgent:
			c.killAgent(rng)
		}
	}
	close(c.stop)
	done := make(chan struct{})
	go func() { c.workers.Wait(); close(done) }() // ends with the workers
	select {
	case <-done:
	case <-time.After(2 * checkerCallTimeout):
		c.t.Fatalf("the workers did not stop within %v", 2*checkerCallTimeout)
	}
}

// sleep waits d unless the run is stopped; it reports whether it waited.
func (c *checker) sleep(d time.Duration) bool {
	if d <= 0 {
		return true
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-c.stop:
		return false
	}
}

func (c *checker) pauseStore(d time.Duration) {
	o := op{ID: c.newOpID(), Kind: opPauseStore, Start: time.Now()}
	if err := c.etcd.Pause(); err != nil {
		c.t.Errorf("pausing the store: %v", err)
	}
	// The pause itself: nothing to wait on but the clock.
	c.sleep(d)
	if err := c.etcd.Resume(); err != nil {
		c.t.Errorf("resuming the store: %v", err)
	}
	o.End = time.Now()
	c.record(o)
}

// killAgent SIGKILLs a random agent with its client connections and client
// processes, and starts a replacement on another port.
func (c *checker) killAgent(rng *rand.Rand) {
	c.mu.Lock()
	var live []*checkerAgent
	for _, a := range c.agents {
		live = append(live, a)
	}
	slices.SortFunc(live, func(x, y *checkerAgent) int { return strings.Compare(x.id, y.id) })
	a := live[rng.IntN(len(live))]
	a.dead = true
	delete(c.agents, a.id)
	var sessions []*session
	var children []*child
	var ids []string
	for id, s := range c.sessions {
		if s.agent == a.id {
			sessions = append(sessions, s)
			ids = append(ids, id)
			delete(c.sessions, id)
		}
	}
	for id, ch := range c.children {
		if ch.agent == a.id {
			children = append(children, ch)
			ids = append(ids, id)
			delete(c.children, id)
		}
	}
	c.mu.Unlock()
	slices.Sort(ids)
	o := op{ID: c.newOpID(), Kind: opKillAgent, Agent: a.id, Sessions: ids, Start: time.Now()}
	a.p.cmd.Process.Signal(syscall.SIGKILL)
	for _, ch := range children {
		ch.kill()
	}
	select {
	case <-a.p.done:
	case <-time.After(wait):
		c.t.Errorf("agent %s still running %v after SIGKILL", a.id, wait)
	}
	o.End = time.Now()
	c.record(o)
	for _, s := range sessions {
		s.close()
	}
	a.streams.Close()
	c.startAgent()
}

// pick returns a random element of the live sessions (in-process) other
// than not, or nil.
func (c *checker) pickSession(rng *rand.Rand, not string) *session {
	c.mu.Lock()
	defer c.mu.Unlock()
	var ids []string
	for id := range c.sessions {
		if id != not {
			ids = append(ids, id)
		}
	}
	if len(ids) == 0 {
		return nil
	}
	slices.Sort(ids)
	return c.sessions[ids[rng.IntN(len(ids))]]
}

func (c *checker) pickAgent(rng *rand.Rand) *checkerAgent {
	c.mu.Lock()
	defer c.mu.Unlock()
	var ids []string
	for id := range c.agents {
		ids = append(ids, id)
	}
	if len(ids) == 0 {
		return nil
	}
	slices.Sort(ids)
	return c.agents[ids[rng.IntN(len(ids))]]
}

func (c *checker) owner(k regKey) (string, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.model.owner(k)
}

// work runs random client operations until the run stops.
func (c *checker) work(rng *rand.Rand) {
	for c.sleep(time.Duration(5+rng.IntN(45)) * time.Millisecond) {
		k := c.keys[rng.IntN(len(c.keys))]
		lock := c.keyLocks[k]
		lock.Lock()
		switch r := rng.IntN(100); {
		case r < 35:
			c.register(rng, k)
		case r < 50:
			c.unregister(k)
		case r < 60:
			c.closeAtOnce(rng, k)
		case r < 65:
			c.closeSession(rng)
		case r < 77:
			c.spawnChild(rng, k)
		case r < 84:
			c.killChild(rng)
		default:
			c.probe(rng, k)
		}
		lock.Unlock()
	}
}

// call makes one call with the checker's timeout and returns its error
// text ("" for success).
func callErr(s *session, method string, args *api.Args, reply any) string {
	ctx, cancel := context.WithTimeout(context.Background(), checkerCallTimeout)
	defer cancel()
	if err := s.c.Call(ctx, method, args, reply); err != nil {
		return err.Error()
	}
	return ""
}

// register registers k through a session: its owner's (an update) or
// another one (a takeover).
func (c *checker) register(rng *rand.Rand, k regKey) {
	owner, _ := c.owner(k)
	c.mu.Lock()
	s := c.sessions[owner]
	c.mu.Unlock()
	if s == nil || rng.IntN(3) == 0 {
		s = c.pickSession(rng, "")
	}
	if s == nil {
		return
	}
	c.registerVia(s, k)
	if owner != "" && owner != s.id {
		c.mu.Lock()
		if prev := c.sessions[owner]; prev != nil {
			prev.hold(k, false)
		}
		c.mu.Unlock()
	}
}

func (c *checker) registerVia(s *session, k regKey) op {
	o := op{ID: c.newOpID(), Kind: opRegister, Session: s.id, Agent: s.agent, Key: k, Start: time.Now()}
	var got string
	o.Err = callErr(s, api.MethodRegister, &api.Args{Name: k.Name, Addr: k.Addr, Attrs: map[string]string{"op": strconv.Itoa(o.ID)}}, &got)
	o.End = time.Now()
	s.hold(k, true)
	c.record(o)
	return o
}

func (c *checker) unregister(k regKey) {
	owner, ok := c.owner(k)
	c.mu.Lock()
	s := c.sessions[owner]
	c.mu.Unlock()
	if !ok || s == nil {
		return
	}
	o := op{ID: c.newOpID(), Kind: opUnregister, Session: s.id, Agent: s.agent, Key: k, Start: time.Now()}
	s.hold(k, false)
	o.Err = callErr(s, api.MethodUnregister, &api.Args{Name: k.Name, Addr: k.Addr}, &struct{}{})
	o.End = time.Now()
	c.record(o)
}

// closeAtOnce sends a Register of a free key on a new connection and
// closes it 0-2 ms later, as issue 11's orphan reproduction does.
func (c *checker) closeAtOnce(rng *rand.Rand, k regKey) {
	if owner, ok := c.owner(k); !ok || owner != "" {
		return
	}
	a := c.pickAgent(rng)
	if a == nil {
		return
	}
	o := op{ID: c.newOpID(), Kind: opCloseAtOnce, Session: c.id("x"), Agent: a.id, Key: k, Err: "unknown", Start: time.Now()}
	defer func() { o.End = time.Now(); c.record(o) }()
	conn, err := net.DialTimeout("tcp", a.addr, checkerCallTimeout)
	if err != nil {
		o.Err = err.Error()
		return
	}
	defer conn.Close()
	br, err := upgrade(conn, "application/vnd.flynn.rpc-hijack+gob")
	if err != nil {
		o.Err = err.Error()
		return
	}
	raw := &rawConn{Conn: conn, br: br}
	raw.enc = gob.NewEncoder(conn)
	o.Start = time.Now()
	if err := raw.send(api.MethodRegister, 1, &api.Args{Name: k.Name, Addr: k.Addr, Attrs: map[string]string{"op": strconv.Itoa(o.ID)}}); err != nil {
		o.Err = err.Error()
		return
	}
	t := time.NewTimer(time.Duration(rng.IntN(2001)) * time.Microsecond)
	defer t.Stop()
	<-t.C // the fault itself: close 0-2 ms after the request
}

func (c *checker) closeSession(rng *rand.Rand) {
	s := c.pickSession(rng, "")
	if s == nil {
		return
	}
	c.mu.Lock()
	delete(c.sessions, s.id)
	a := c.agents[s.agent]
	c.mu.Unlock()
	o := op{ID: c.newOpID(), Kind: opClose, Session: s.id, Agent: s.agent, Start: time.Now()}
	s.close()
	o.End = time.Now()
	c.record(o)
	if a == nil {
		return
	}
	if _, err := c.newSession(a); err != nil {
		c.mu.Lock()
		dead := a.dead
		c.mu.Unlock()
		if !dead {
			c.t.Errorf("a new session on %s: %v", a.id, err)
		}
	}
}

// spawnChild starts a client process that registers k (a takeover if
// someone holds it).
func (c *checker) spawnChild(rng *rand.Rand, k regKey) {
	c.mu.Lock()
	n := len(c.children)
	c.mu.Unlock()
	if n >= checkerMaxChildren {
		return
	}
	a := c.pickAgent(rng)
	if a == nil {
		return
	}
	owner, _ := c.owner(k)
	id := c.id("c")
	o := op{ID: c.newOpID(), Kind: opRegister, Session: id, Agent: a.id, Key: k, Start: time.Now()}
	ch := &child{id: id, agent: a.id, out: &logBuffer{}, done: make(chan struct{})}
	ch.cmd = exec.Command(c.childBin, "-agent", a.addr, "-name", k.Name, "-addr", k.Addr, "-op", strconv.Itoa(o.ID), "-hb", (ttl / 4).String())
	ch.cmd.Stdout, ch.cmd.Stderr = ch.out, ch.out
	ch.cmd.SysProcAttr = childAttr()
	stdin, err := ch.cmd.StdinPipe()
	if err != nil {
		c.t.Errorf("child: %v", err)
		return
	}
	ch.stdin = stdin
	from := ch.out.mark()
	if err := ch.cmd.Start(); err != nil {
		c.t.Errorf("starting checkerclient: %v", err)
		return
	}
	go func() { ch.cmd.Wait(); close(ch.done) }() // ends with the process
	c.mu.Lock()
	if a.dead {
		c.mu.Unlock()
		stdin.Close()
		ch.kill()
		return
	}
	c.children[id] = ch
	c.mu.Unlock()
	select {
	case <-ch.out.waitFor("registered\n", from):
	case <-ch.done:
		o.Err = strings.TrimSpace(ch.out.String())
		if o.Err == "" {
			o.Err = "exited before registering"
		}
	case <-time.After(checkerCallTimeout):
		o.Err = "no answer within the call timeout"
	}
	o.End = time.Now()
	c.record(o)
	if o.Err != "" {
		c.endChild(ch, opClose)
	}
	if owner != "" && owner != id {
		c.mu.Lock()
		if prev := c.sessions[owner]; prev != nil {
			prev.hold(k, false)
		}
		c.mu.Unlock()
	}
}

func (c *checker) endChild(ch *child, kind opKind) {
	c.mu.Lock()
	_, live := c.children[ch.id]
	delete(c.children, ch.id)
	c.mu.Unlock()
	if !live {
		return // its agent's kill took it
	}
	o := op{ID: c.newOpID(), Kind: kind, Session: ch.id, Agent: ch.agent, Start: time.Now()}
	ch.kill()
	ch.stdin.Close()
	o.End = time.Now()
	c.record(o)
}

func (c *checker) killChild(rng *rand.Rand) {
	c.mu.Lock()
	var ids []string
	for id := range c.children {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	var ch *child
	if len(ids) > 0 {
		ch = c.children[ids[rng.IntN(len(ids))]]
	}
	c.mu.Unlock()
	if ch != nil {
		c.endChild(ch, opKillClient)
	}
}

// probe calls Heartbeat (or, once ownership is enforced, Unregister) on a
// key that another session certainly holds.
func (c *checker) probe(rng *rand.Rand, k regKey) {
	owner, ok := c.owner(k)
	if !ok || owner == "" {
		return
	}
	s := c.pickSession(rng, owner)
	if s == nil {
		return
	}
	kind, method := opProbeHeartbeat, api.MethodHeartbeat
	if rng.IntN(2) == 0 {
		kind, method = opProbeUnregister, api.MethodUnregister
	}
	o := op{ID: c.newOpID(), Kind: kind, Session: s.id, Agent: s.agent, Key: k, Start: time.Now()}
	o.Err = callErr(s, method, &api.Args{Name: k.Name, Addr: k.Addr}, &struct{}{})
	o.End = time.Now()
	c.record(o)
}

// quiesce settles the keys whose state the outcomes left open (a live
// session registers each again), waits (bounded) for the store to hold
// the expected set and the streams to show it, and returns the history.
func (c *checker) quiesce() *history {
	t := c.t
	rng := rand.New(rand.NewPCG(c.seed, 1<<32))
	deadline := time.Now().Add(wait)
	for _, k := range c.keys {
		for {
			if _, ok := c.owner(k); ok {
				break
			}
			s := c.pickSession(rng, "")
			if s == nil {
				t.Fatal("no live session to settle the keys with")
			}
			c.registerVia(s, k)
			if time.Now().After(deadline) {
				t.Errorf("%s: could not settle its state by a Register before %s", k, ts(deadline))
				break
			}
		}
	}
	quiet := time.Now()
	c.mu.Lock()
	expect := make(map[regKey]keyState)
	for _, k := range c.keys {
		expect[k] = c.model.final(k)
	}
	c.mu.Unlock()
	// Dead owners' registrations go when their lease expires, a TTL after
	// the kill; the wait is bounded by 3×TTL plus the convergence bound.
	storeDeadline := quiet.Add(3*ttl + converge)
	var store map[regKey]storedReg
	for {
		var err error
		store, err = c.readAll()
		if err == nil && storeMatches(store, expect) {
			break
		}
		if time.Now().After(storeDeadline) {
			if err != nil {
				t.Fatalf("reading the store at quiescence: %v", err)
			}
			t.Logf("the store did not reach the expected set within %v of quiescence; the agents say: %s", storeDeadline.Sub(quiet), c.agentGauges())
			break
		}
		c.sleep(100 * time.Millisecond) // polling the store: nothing to wait on
	}
	t.Logf("store read %v after quiescence", time.Since(quiet).Round(time.Millisecond))
	streamDeadline := time.Now().Add(converge)
	for !c.streamsMatch(store) && time.Now().Before(streamDeadline) {
		c.sleep(50 * time.Millisecond) // polling the recorded streams
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	h := &history{TTL: ttl, Ops: slices.Clone(c.ops), Store: store}
	for _, s := range c.streamLogs {
		cp := *s
		cp.Updates = slices.Clone(s.Updates)
		h.Streams = append(h.Streams, &cp)
	}
	return h
}

// agentGauges returns a few of each live agent's metrics, for a failure
// report.
func (c *checker) agentGauges() string {
	c.mu.Lock()
	agents := slices.SortedFunc(maps.Values(c.agents), func(x, y *checkerAgent) int { return strings.Compare(x.id, y.id) })
	c.mu.Unlock()
	var out []string
	for _, a := range agents {
		var vs []string
		for _, m := range []string{"discoverd_sessions", "discoverd_registrations", "discoverd_registrations_expired_total", "discoverd_store_session_up", "discoverd_store_sessions_established_total"} {
			v, err := metricValue(a.addr, m)
			if err != nil {
				vs = append(vs, err.Error())
				break
			}
			vs = append(vs, fmt.Sprintf("%s=%g", strings.TrimPrefix(m, "discoverd_"), v))
		}
		out = append(out, a.id+": "+strings.Join(vs, " "))
	}
	return strings.Join(out, "; ")
}

func storeMatches(store map[regKey]storedReg, expect map[regKey]keyState) bool {
	for k, st := range expect {
		got, stored := store[k]
		if len(st) > 1 && st[free] {
			continue
		}
		if st[free] != !stored {
			return false
		}
		if stored {
			id, _ := strconv.Atoi(got.Op)
			found := false
			for h := range st {
				found = found || h.Op == id
			}
			if !found {
				return false
			}
		}
	}
	return true
}

func (c *checker) streamsMatch(store map[regKey]storedReg) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	h := &history{Store: store, Streams: c.streamLogs}
	return len(checkConverged(h)) == 0
}

// readAll reads every registration of the checker's names from etcd.
func (c *checker) readAll() (map[regKey]storedReg, error) {
	out := make(map[regKey]storedReg)
	for _, name := range c.names {
		keys, err := readStore(c.eps, name)
		if err != nil {
			return nil, err
		}
		for addr, st := range keys {
			out[regKey{name, addr}] = storedReg{Created: st.Created, Op: st.Attrs["op"]}
		}
	}
	return out, nil
}

// report runs every check on h, one subtest each.
func (c *checker) report(h *history) {
	t := c.t
	counts := make(map[opKind]int)
	failed := 0
	for _, o := range h.Ops {
		counts[o.Kind]++
		if o.Err != "" && o.Kind != opCloseAtOnce {
			failed++
		}
	}
	updates := 0
	for _, s := range h.Streams {
		updates += len(s.Updates)
	}
	c.mu.Lock()
	hbFailures, hbSample := c.hbFailures, slices.Clone(c.hbSample)
	c.mu.Unlock()
	t.Logf("history: %d operations (%d failed) %v; %d streams, %d updates; %d stored registrations; %d heartbeat failures %q",
		len(h.Ops), failed, counts, len(h.Streams), updates, len(h.Store), hbFailures, hbSample)
	t.Logf("agents' repairs: %s", c.repairs())
	fail := func(t *testing.T, what string, vs []string) {
		t.Helper()
		const show = 20
		for i, v := range vs {
			if i == show {
				t.Errorf("... and %d more", len(vs)-show)
				break
			}
			t.Errorf("%s: %s", what, v)
		}
	}
	t.Run("StoreEqualsLiveSessions", func(t *testing.T) {
		vs, open := checkStore(h)
		t.Logf("%d keys whose state the outcomes left open (not checked)", open)
		fail(t, "invariant 1", vs)
	})
	t.Run("SubscribersConverge", func(t *testing.T) { fail(t, "invariant 1", checkConverged(h)) })
	t.Run("UniqueCreated", func(t *testing.T) { fail(t, "invariant 2", checkUniqueCreated(h)) })
	t.Run("LeaderTokensIncrease", func(t *testing.T) { fail(t, "invariant 3", checkLeaderTokens(h)) })
	t.Run("NoOfflineWhileOwned", func(t *testing.T) { fail(t, "invariant 4", checkNoFalseOffline(h)) })
	t.Run("Ownership", func(t *testing.T) {
		fail(t, "invariant 5", checkOwnership(h))
		for _, g := range h.KnownGaps {
			t.Logf("known gap: %s", g)
		}
	})
}
