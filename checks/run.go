package checks

import (
	"context"
	"fmt"
	"math/rand/v2"
	"slices"
	"time"

	"github.com/flynn/discoverd/api"
)

// check is one checked registration and its runner.
type check struct {
	k      key
	args   api.Args // expanded, validated, the check's defaults applied
	cancel context.CancelFunc
	done   chan struct{} // closed when the runner returns

	// guarded by Manager.mu
	st   api.CheckStatus
	flap flapState
	// failingSince is the first failure since the last pass (zero while
	// passing): the start of the deregister_after countdown.
	failingSince time.Time
}

// flapState is the damping of one registration.
type flapState struct {
	changes  []time.Time // online/offline changes within FlapWindow
	level    int         // holds so far in this streak: the next is FlapHold<<level
	lastHold time.Time   // when the last hold began
}

// stop ends c's runner and waits for it.
func (c *check) stop() {
	c.cancel()
	<-c.done
}

func (c *check) statusLocked() api.CheckStatus {
	st := c.st
	st.Transitions = slices.Clone(c.st.Transitions)
	return st
}

// period returns the interval varied uniformly by ±10 %.
func period(interval time.Duration) time.Duration {
	return interval - interval/10 + time.Duration(rand.Int64N(int64(interval/5)+1))
}

// run probes c every period until ctx ends, the first time after first.
func (m *Manager) run(ctx context.Context, c *check, first time.Duration) {
	defer m.wg.Done()
	defer close(c.done)
	spec := *c.args.Check
	delay := first
	for {
		due := m.clock.Now().Add(delay)
		t := m.clock.NewTimer(delay)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.Chan():
		}
		select {
		case m.sem <- struct{}{}:
		case <-ctx.Done():
			return
		}
		m.stats.startDelay.observe(max(m.clock.Since(due), 0))
		start := time.Now()
		err := m.probe(ctx, &spec)
		latency := time.Since(start)
		<-m.sem
		if ctx.Err() != nil {
			return // removed or closed: the result means nothing
		}
		switch {
		case spec.HTTP != "":
			m.stats.httpLatency.observe(latency)
		case spec.GRPC != "":
			m.stats.grpcLatency.observe(latency)
		default:
			m.stats.tcpLatency.observe(latency)
		}
		m.stats.probes.Add(1)
		if err != nil {
			m.stats.probeFailures.Add(1)
		}
		if expire := m.apply(ctx, c, err, latency); expire {
			m.wg.Add(1)
			go m.expire(c)
			return
		}
		delay = period(time.Duration(spec.Interval))
	}
}

// apply records one probe result, moves c's state as rise, fall and the
// flapping rules say, and writes the store when the state changed (or a
// write is still owed). It reports whether c must be dropped for having
// failed longer than deregister_after.
func (m *Manager) apply(ctx context.Context, c *check, probeErr error, latency time.Duration) (expire bool) {
	spec := c.args.Check
	now := m.clock.Now()
	m.mu.Lock()
	st := &c.st
	st.LastProbe, st.LastLatency = now, api.Duration(latency)
	if probeErr == nil {
		st.LastResult, st.LastError = "pass", ""
		st.Passes++
		st.Fails = 0
		c.failingSince = time.Time{}
	} else {
		st.LastResult, st.LastError = "fail", truncate(probeErr.Error())
		st.Fails++
		st.Passes = 0
		if c.failingSince.IsZero() {
			c.failingSince = now
		}
	}
	if st.State == api.CheckFlapping && !now.Before(st.HeldUntil) {
		m.transitionLocked(c, now, api.CheckOffline, "flapping hold over")
	}
	switch {
	case st.State == api.CheckOffline && st.Passes >= spec.Rise:
		m.changeLocked(c, now, api.CheckOnline, fmt.Sprintf("passed %d in a row (rise %d)", st.Passes, spec.Rise))
	case st.State == api.CheckOnline && st.Fails >= spec.Fall:
		m.changeLocked(c, now, api.CheckOffline, fmt.Sprintf("failed %d in a row (fall %d): %s", st.Fails, spec.Fall, st.LastError))
	}
	want := st.State == api.CheckOnline
	owed := want != st.Stored
	expire = spec.DeregisterAfter > 0 && !c.failingSince.IsZero() && now.Sub(c.failingSince) >= time.Duration(spec.DeregisterAfter)
	m.mu.Unlock()
	if owed && !expire {
		m.write(ctx, c, want)
	}
	return expire
}

// changeLocked moves c between online and offline, unless that change
// makes it flapping: then it is held offline instead.
func (m *Manager) changeLocked(c *check, now time.Time, to api.CheckState, reason string) {
	f := &c.flap
	f.changes = append(f.changes, now)
	for len(f.changes) > 0 && now.Sub(f.changes[0]) >= FlapWindow {
		f.changes = f.changes[1:]
	}
	if len(f.changes) <= FlapChanges {
		m.transitionLocked(c, now, to, reason)
		return
	}
	if !f.lastHold.IsZero() && now.Sub(f.lastHold) >= FlapForget {
		f.level = 0
	}
	hold := min(FlapHold<<f.level, MaxFlapHold)
	if FlapHold<<f.level < MaxFlapHold {
		f.level++
	}
	f.lastHold, f.changes = now, nil
	c.st.HeldUntil = now.Add(hold)
	m.stats.damped.Add(1)
	m.transitionLocked(c, now, api.CheckFlapping, fmt.Sprintf("more than %d changes within %v; held offline for %v", FlapChanges, FlapWindow, hold))
	m.log.Warn("checks: instance is flapping; held offline", "name", c.k.name, "addr", c.k.addr, "hold", hold)
}

// transitionLocked sets c's state and records the transition.
func (m *Manager) transitionLocked(c *check, now time.Time, to api.CheckState, reason string) {
	st := &c.st
	tr := api.CheckTransition{At: now, From: st.State, To: to, Reason: reason}
	st.State = to
	if to != api.CheckFlapping {
		st.HeldUntil = time.Time{}
	}
	st.Transitions = append(st.Transitions, tr)
	if n := len(st.Transitions); n > maxTransitions {
		st.Transitions = slices.Clone(st.Transitions[n-maxTransitions:])
	}
	m.stats.transitions.Add(1)
	m.log.Info("checks: state changed", "name", c.k.name, "addr", c.k.addr, "from", tr.From, "to", to, "reason", reason)
}

// write puts c in the store (online) or takes it out. A failed write is
// retried after the next probe; a failed removal is the agent's to retry.
func (m *Manager) write(ctx context.Context, c *check, online bool) {
	ctx, cancel := context.WithTimeout(ctx, storeTimeout)
	defer cancel()
	args := api.Args{Name: c.k.name, Addr: c.k.addr, Attrs: c.args.Attrs}
	var err error
	m.stats.storeWrites.Add(1)
	if online {
		_, err = m.cfg.Registrar.Register(ctx, args)
	} else {
		err = m.cfg.Registrar.Unregister(ctx, args)
		if api.ErrorCode(err) == api.CodeNotFound {
			err = nil
		}
	}
	if err != nil {
		m.stats.storeErrors.Add(1)
		m.log.Warn("checks: store write failed", "name", c.k.name, "addr", c.k.addr, "online", online, "err", err)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	switch {
	case err == nil:
		c.st.Stored, c.st.StoreError = online, ""
	case online:
		c.st.Stored, c.st.StoreError = false, truncate(err.Error())
	default:
		// The agent dropped it and retries the removal itself.
		c.st.Stored, c.st.StoreError = false, truncate(err.Error())
	}
}

// expire drops c after deregister_after of failures. It runs on its own
// goroutine (owned by m.wg) since it waits for c's runner to end.
func (m *Manager) expire(c *check) {
	defer m.wg.Done()
	unlock, err := m.locks.Lock(m.ctx, c.k)
	if err != nil {
		return // closing
	}
	defer unlock()
	<-c.done
	_ = m.remove(c.k, c, fmt.Sprintf("failing for deregister_after (%v)", c.args.Check.DeregisterAfter))
}
