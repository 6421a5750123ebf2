// Package checks runs the agent's health checks: registrations handed to
// the agent with an api.Check, kept online in the store while their check
// passes, without heartbeats or a connection, and kept across restarts in
// a journal file.
//
//	sess := a.NewKeptSession() // the agent's own owner class
//	m, err := checks.New(checks.Config{
//		Registrar: sess,
//		File:      filepath.Join(dataDir, "checks.journal"),
//	})
//	if err != nil {
//		return err
//	}
//	defer m.Close() // before the agent: stops every probe
//	addr, err := m.Add(ctx, api.Args{Name: "web", Addr: "10.0.0.1:8080",
//		Check: &api.Check{HTTP: "http://10.0.0.1:8080/healthz"}})
//
// Each registration starts offline (not in the store). Rise passes in a
// row put it online (a store write), Fall failures in a row take it
// offline (a store removal); nothing else writes the store. An instance
// that changes state more than FlapChanges times within FlapWindow is
// flapping: it is held offline, first for FlapHold, doubling for each
// new episode up to MaxFlapHold. The first probe of each registration is
// spread uniformly over its interval, each later period varies by ±10 %,
// and at most Config.MaxInFlight probes run at once.
//
// Time (intervals, rise/fall, flapping, deregister_after) follows the
// manager's clock (real, or fake in tests); the timeouts of probes and store calls are real time,
// since they bound real I/O.
package checks

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"math/rand/v2"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/flynn/discoverd/api"
	"github.com/flynn/discoverd/internal/keylock"
	"github.com/jonboulle/clockwork"
)

// Registrar is what the manager needs of the agent: the session of the
// agent-owned class (agent.Agent.NewKeptSession) that holds the checked
// registrations while they are online. *agent.Session implements it.
type Registrar interface {
	Register(ctx context.Context, args api.Args) (string, error)
	Unregister(ctx context.Context, args api.Args) error
}

// Flapping damping and defaults.
const (
	// DefaultMaxInFlight is the default cap on probes running at once.
	DefaultMaxInFlight = 64
	// DefaultMaxChecks is the default cap on checked registrations.
	DefaultMaxChecks = 10000
	// FlapWindow and FlapChanges: more than FlapChanges online/offline
	// changes within FlapWindow make an instance flapping.
	FlapWindow  = time.Minute
	FlapChanges = 4
	// FlapHold is the first hold of a flapping instance; each new episode
	// doubles it, up to MaxFlapHold. An instance without an episode for
	// FlapForget starts again at FlapHold.
	FlapHold    = time.Minute
	MaxFlapHold = 16 * time.Minute
	FlapForget  = 30 * time.Minute
	// maxTransitions is how many transitions a status keeps.
	maxTransitions = 8
	// storeTimeout bounds each store write or removal (real time).
	storeTimeout = 5 * time.Second
	// maxErrorLen bounds the probe error kept in a status.
	maxErrorLen = 256
)

// Config configures a Manager. Registrar is required.
type Config struct {
	// Registrar holds the registrations while they are online.
	Registrar Registrar
	// ExternalIP expands addresses written as ":port", as the agent does
	// (agent.Config.ExternalIP).
	ExternalIP string
	// File is the journal that keeps the checked registrations across
	// restarts. Empty: they are kept in memory only.
	File string
	// MaxInFlight caps the probes running at once. Default
	// DefaultMaxInFlight.
	MaxInFlight int
	// MaxChecks caps the checked registrations held at once. Default
	// DefaultMaxChecks.
	MaxChecks int
	// Logger receives the manager's logs. Default slog.Default().
	Logger *slog.Logger
}

type key struct{ name, addr string }

// Manager runs the checks of the registrations handed to the agent. Its
// methods are safe for concurrent use.
type Manager struct {
	cfg     Config
	clock   clockwork.Clock
	log     *slog.Logger
	sem     chan struct{}
	http    *http.Client
	dialer  *net.Dialer
	journal *journal // nil: not persisted
	locks   keylock.Set[key]

	ctx    context.Context // cancelled by Close
	cancel context.CancelFunc
	wg     sync.WaitGroup // every runner and expiry

	mu      sync.Mutex
	closed  bool
	checks  map[key]*check
	pending int // new checks being added, counted against MaxChecks

	stats counters
}

// New opens the journal (if any), starts a check for every registration
// it holds (each offline until it passes Rise probes), and returns the
// manager. The caller must call Close. It fails if the journal cannot be
// read or written.
func New(cfg Config) (*Manager, error) {
	return newManager(cfg, clockwork.NewRealClock())
}

// newManager is New on clock, which drives intervals, rise/fall, flapping
// and deregister_after (a fake clock in tests: export_test.go).
func newManager(cfg Config, clock clockwork.Clock) (*Manager, error) {
	if cfg.Registrar == nil {
		return nil, errors.New("checks: Config.Registrar is required")
	}
	if cfg.MaxInFlight < 0 || cfg.MaxChecks < 0 {
		return nil, errors.New("checks: Config.MaxInFlight and MaxChecks must not be negative")
	}
	if cfg.MaxChecks == 0 {
		cfg.MaxChecks = DefaultMaxChecks
	}
	if cfg.MaxInFlight == 0 {
		cfg.MaxInFlight = DefaultMaxInFlight
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	ctx, cancel := context.WithCancel(context.Background())
	m := &Manager{
		cfg:    cfg,
		clock:  clock,
		log:    cfg.Logger,
		sem:    make(chan struct{}, cfg.MaxInFlight),
		dialer: &net.Dialer{},
		ctx:    ctx,
		cancel: cancel,
		checks: make(map[key]*check),
	}
	m.http = &http.Client{
		Transport: &http.Transport{
			Proxy:             nil, // probes go straight to the instance
			DialContext:       m.dialer.DialContext,
			DisableKeepAlives: true, // one connection per probe: no idle sockets per instance
		},
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
	if cfg.File != "" {
		j, saved, err := openJournal(cfg.File, m.log)
		if err != nil {
			cancel()
			return nil, err
		}
		m.journal = j
		for _, args := range saved {
			if err := m.validate(&args); err != nil {
				m.log.Warn("checks: dropping a saved checked registration that is no longer valid", "name", args.Name, "addr", args.Addr, "err", err)
				continue
			}
			m.launch(m.newCheck(key{args.Name, args.Addr}, args, nil))
		}
		if len(saved) > 0 {
			m.log.Info("checks: checked registrations restored; each is offline until its check passes", "count", len(m.checks), "file", cfg.File)
		}
	}
	return m, nil
}

var errClosed = api.Errorf(api.CodeUnavailable, "agent shutting down")

// validate checks args (Check required), expands a ":port" address and
// applies the check's defaults, in place.
func (m *Manager) validate(args *api.Args) error {
	if args.Check == nil {
		return api.Errorf(api.CodeInvalidArgument, "no check given")
	}
	addr, err := api.ExpandAddr(args.Addr, m.cfg.ExternalIP)
	if err != nil {
		return err
	}
	args.Addr = addr
	if err := args.Validate(); err != nil {
		return err
	}
	if err := args.Check.Validate(); err != nil {
		return err
	}
	c := args.Check.WithDefaults()
	args.Check = &c
	args.Attrs = maps.Clone(args.Attrs)
	return nil
}

// Add hands the registration args to the agent with its check
// (args.Check, required) and returns its address (":port" expanded). It
// is saved in the journal before Add returns. A new registration starts
// offline; the same name/addr added again replaces the attributes and
// the check, keeping its state (an online registration whose attributes
// changed is written to the store at once). Adding exactly what is held
// changes nothing.
//
// It blocks for the journal write, and for the store write of an
// attribute change; ctx bounds the wait for another Add or Remove of the
// same registration. Errors: *api.Error with CodeInvalidArgument (bad
// args or check), CodeResourceExhausted (MaxChecks reached),
// CodeUnavailable (the journal could not be written, or the manager is
// closed); or ctx.Err().
func (m *Manager) Add(ctx context.Context, args api.Args) (string, error) {
	if err := m.validate(&args); err != nil {
		return "", err
	}
	k := key{args.Name, args.Addr}
	unlock, err := m.locks.Lock(ctx, k)
	if err != nil {
		return "", err
	}
	defer unlock()
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return "", errClosed
	}
	old := m.checks[k]
	if old == nil {
		if len(m.checks)+m.pending >= m.cfg.MaxChecks {
			m.mu.Unlock()
			return "", api.Errorf(api.CodeResourceExhausted, "too many checked registrations on this agent: the limit is %d", m.cfg.MaxChecks)
		}
		m.pending++
		defer func() {
			m.mu.Lock()
			m.pending--
			m.mu.Unlock()
		}()
	}
	m.mu.Unlock()
	if old != nil && maps.Equal(old.args.Attrs, args.Attrs) && *old.args.Check == *args.Check {
		return k.addr, nil
	}
	if m.journal != nil {
		if err := m.journal.put(args); err != nil {
			m.log.Error("checks: journal write failed", "file", m.cfg.File, "err", err)
			return "", api.Errorf(api.CodeUnavailable, "could not save the checked registration (details in the agent's log)")
		}
	}
	if old != nil {
		old.stop()
	}
	c := m.newCheck(k, args, old)
	if old != nil && !maps.Equal(old.args.Attrs, args.Attrs) {
		m.mu.Lock()
		stored := c.st.Stored
		m.mu.Unlock()
		if stored { // before the runner starts: no write races this one
			m.write(ctx, c, true)
		}
	}
	m.launch(c)
	return k.addr, nil
}

// newCheck creates the check of k, inheriting the state of prev (a
// replaced check, stopped) if any. launch starts it.
func (m *Manager) newCheck(k key, args api.Args, prev *check) *check {
	c := &check{k: k, args: args, done: make(chan struct{})}
	c.st = api.CheckStatus{Name: k.name, Addr: k.addr, State: api.CheckOffline, Transitions: []api.CheckTransition{}}
	if prev != nil {
		m.mu.Lock()
		c.st, c.flap = prev.st, prev.flap
		c.st.Transitions = slices.Clone(prev.st.Transitions)
		m.mu.Unlock()
	}
	c.st.Attrs = args.Attrs
	if c.st.Attrs == nil {
		c.st.Attrs = map[string]string{}
	}
	c.st.Check = *args.Check
	return c
}

// launch makes c the check of its key and starts its runner, its first
// probe at a uniformly random moment within its interval. It does
// nothing once the manager is closed.
func (m *Manager) launch(c *check) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		close(c.done)
		c.cancel = func() {}
		return
	}
	ctx, cancel := context.WithCancel(m.ctx)
	c.cancel = cancel
	m.checks[c.k] = c
	m.wg.Add(1)
	interval := time.Duration(c.args.Check.Interval)
	first := time.Duration(rand.Int64N(int64(interval))) // spread over the interval
	go m.run(ctx, c, first)
}

// Remove withdraws the checked registration name/addr: its check stops,
// it is removed from the store if it is there, and from the journal. It
// blocks until then (the store removal is bounded by an internal
// timeout; on failure the agent retries it in the background). Errors:
// *api.Error with CodeNotFound (not a checked registration of this
// agent), CodeInvalidArgument (bad addr), CodeUnavailable (journal write
// failed, manager closed); or ctx.Err().
func (m *Manager) Remove(ctx context.Context, name, addr string) error {
	addr, err := api.ExpandAddr(addr, m.cfg.ExternalIP)
	if err != nil {
		return err
	}
	k := key{name, addr}
	unlock, err := m.locks.Lock(ctx, k)
	if err != nil {
		return err
	}
	defer unlock()
	return m.remove(k, nil, "unregistered")
}

// remove drops k (only if it is still c, when c is not nil). The caller
// holds k's key lock.
func (m *Manager) remove(k key, c *check, why string) error {
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return errClosed
	}
	cur := m.checks[k]
	if cur == nil || (c != nil && cur != c) {
		m.mu.Unlock()
		return api.Errorf(api.CodeNotFound, "no checked registration %s/%s on this agent", k.name, k.addr)
	}
	m.mu.Unlock()
	if m.journal != nil {
		if err := m.journal.del(k.name, k.addr); err != nil {
			m.log.Error("checks: journal write failed", "file", m.cfg.File, "err", err)
			return api.Errorf(api.CodeUnavailable, "could not save the removal (details in the agent's log)")
		}
	}
	m.mu.Lock()
	delete(m.checks, k)
	m.mu.Unlock()
	cur.stop()
	// The runner may have been stopped in the middle of a write: remove
	// whatever the store may hold.
	ctx, cancel := context.WithTimeout(m.ctx, storeTimeout)
	defer cancel()
	err := m.cfg.Registrar.Unregister(ctx, api.Args{Name: k.name, Addr: k.addr})
	if err != nil && api.ErrorCode(err) != api.CodeNotFound {
		m.log.Warn("checks: removing a checked registration from the store failed", "name", k.name, "addr", k.addr, "err", err)
	}
	m.log.Info("checks: checked registration removed", "name", k.name, "addr", k.addr, "reason", why)
	return nil
}

// Has reports whether name/addr (addr expanded) is a checked
// registration of this agent.
func (m *Manager) Has(name, addr string) bool {
	addr, err := api.ExpandAddr(addr, m.cfg.ExternalIP)
	if err != nil {
		return false
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.checks[key{name, addr}] != nil
}

// Status returns the status of the checked registration name/addr, and
// whether there is one.
func (m *Manager) Status(name, addr string) (api.CheckStatus, bool) {
	addr, err := api.ExpandAddr(addr, m.cfg.ExternalIP)
	if err != nil {
		return api.CheckStatus{}, false
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	c := m.checks[key{name, addr}]
	if c == nil {
		return api.CheckStatus{}, false
	}
	return c.statusLocked(), true
}

// List returns the status of every checked registration of name (every
// one when name is empty), sorted by name then address.
func (m *Manager) List(name string) []api.CheckStatus {
	m.mu.Lock()
	out := make([]api.CheckStatus, 0, len(m.checks))
	for k, c := range m.checks {
		if name == "" || k.name == name {
			out = append(out, c.statusLocked())
		}
	}
	m.mu.Unlock()
	slices.SortFunc(out, func(a, b api.CheckStatus) int {
		return cmp.Or(strings.Compare(a.Name, b.Name), strings.Compare(a.Addr, b.Addr))
	})
	return out
}

// Close stops every check and waits for the runners. It leaves the
// registrations in the store and in the journal: closing the agent's
// backend afterwards removes them from the store, and the next New
// starts their checks again. It is idempotent and returns the journal's
// close error.
func (m *Manager) Close() error {
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		m.wg.Wait()
		return nil
	}
	m.closed = true
	m.mu.Unlock()
	m.cancel()
	m.wg.Wait()
	if m.journal != nil {
		return m.journal.close()
	}
	return nil
}

// Stats is a snapshot of the manager's gauges and counters, for metrics.
type Stats struct {
	// Checked registrations by state.
	Online, Offline, Flapping int
	// Probes run, and how many failed.
	Probes, ProbeFailures uint64
	// Transitions between online and offline (flapping holds included).
	Transitions uint64
	// Damped counts the times an instance was held for flapping.
	Damped uint64
	// StoreWrites counts the store writes and removals made for state
	// changes; StoreErrors those that failed.
	StoreWrites, StoreErrors uint64
	// InFlight is how many probes run now; MaxInFlight the cap.
	InFlight, MaxInFlight int
	// Latency is the duration of probes, by kind ("http", "tcp", "grpc").
	Latency map[string]Histogram
	// StartDelay is how late probes started after their scheduled time
	// (the timer, then the wait for a slot under MaxInFlight).
	StartDelay Histogram
}

type counters struct {
	probes, probeFailures, transitions, damped, storeWrites, storeErrors atomic.Uint64

	httpLatency, tcpLatency, grpcLatency, startDelay hist
}

// Stats returns the current gauges and counters. It is safe for
// concurrent use and costs a pass over the checked registrations.
func (m *Manager) Stats() Stats {
	s := Stats{MaxInFlight: m.cfg.MaxInFlight, InFlight: len(m.sem)}
	m.mu.Lock()
	for _, c := range m.checks {
		switch c.st.State {
		case api.CheckOnline:
			s.Online++
		case api.CheckFlapping:
			s.Flapping++
		default:
			s.Offline++
		}
	}
	m.mu.Unlock()
	s.Probes = m.stats.probes.Load()
	s.ProbeFailures = m.stats.probeFailures.Load()
	s.Transitions = m.stats.transitions.Load()
	s.Damped = m.stats.damped.Load()
	s.StoreWrites = m.stats.storeWrites.Load()
	s.StoreErrors = m.stats.storeErrors.Load()
	s.Latency = map[string]Histogram{"http": m.stats.httpLatency.snapshot(), "tcp": m.stats.tcpLatency.snapshot(), "grpc": m.stats.grpcLatency.snapshot()}
	s.StartDelay = m.stats.startDelay.snapshot()
	return s
}

// truncate bounds an error text kept in a status, as valid UTF-8.
func truncate(s string) string {
	if len(s) > maxErrorLen {
		s = s[:maxErrorLen] + "..."
	}
	return strings.ToValidUTF8(s, "\uFFFD")
}

func (k key) String() string { return fmt.Sprintf("%s/%s", k.name, k.addr) }
