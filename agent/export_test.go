package agent

import (
	"fmt"
	"slices"
	"time"

	"github.com/jonboulle/clockwork"
)

// NewWithBackendTimeout is New with the internal backend timeout set to d,
// so that tests of an unreachable store need not wait seconds.
func NewWithBackendTimeout(cfg Config, d time.Duration) (*Agent, error) {
	return newAgent(cfg, d, clockwork.NewRealClock())
}

// NewWithClock is New with the clock of expiry set to c (a
// clockwork.FakeClock in tests): heartbeats, the janitor's period, the
// orphans' backoff and the watches' linger follow c.
func NewWithClock(cfg Config, c clockwork.Clock) (*Agent, error) {
	return newAgent(cfg, backendTimeout, c)
}

// RemoveParallelism is how many store removals a batch runs at once.
const RemoveParallelism = removeParallelism

// HeldAddrs returns the addresses of name that the agent holds, sorted.
func HeldAddrs(a *Agent, name string) []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	var addrs []string
	for k := range a.regs {
		if k.name == name {
			addrs = append(addrs, k.addr)
		}
	}
	slices.Sort(addrs)
	return addrs
}

// Orphans returns how many keys the agent still has to remove from the
// store, and how many batches of retries failed in a row.
func Orphans(a *Agent) (orphans, failedBatches int) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return len(a.orphans), a.orphanFails
}

// SetLocalWait sets how long lookups wait for the agent's watch to show
// a write the agent made (a second by default), before the agent is used.
func SetLocalWait(a *Agent, d time.Duration) { a.localWait = d }

// HoldFake makes s hold n registrations of name in memory only, as if
// registered and heartbeated now, without store writes: for benchmarks of
// the agent's in-memory paths (the janitor's sweep).
func HoldFake(s *Session, name string, n int) {
	a := s.a
	a.mu.Lock()
	defer a.mu.Unlock()
	for i := range n {
		k := regKey{name, fmt.Sprintf("10.%d.%d.%d:80", i>>16&255, i>>8&255, i&255)}
		r := &registration{key: k, owner: s, attrs: map[string]string{"v": "1"}}
		a.regs[k] = r
		s.regs[k] = struct{}{}
		a.beatLocked(r)
	}
}

// Sweep runs one janitor sweep now.
func Sweep(a *Agent) { a.sweep(a.clock.Now()) }
