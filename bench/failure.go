package main

import (
	"context"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"time"

	"github.com/flynn/discoverd/rpc"
)

// FailureResult is scenario 5.
type FailureResult struct {
	// ClientKill: a client process holding one registration on agent A is
	// SIGKILLed → the subscriber on agent B sees it offline.
	ClientKill Dist `json:"client_kill"`
	// AgentKill: an agent process holding one registration is SIGKILLed →
	// the subscriber on agent B sees it offline, per TTL.
	AgentKill []AgentKillResult `json:"agent_kill"`
}

// AgentKillResult is the agent-kill distribution for one TTL.
type AgentKillResult struct {
	TTLSeconds float64 `json:"ttl_s"`
	Dist
}

// killSpec is a number of agent kills with one TTL.
type killSpec struct {
	TTL time.Duration
	N   int
}

// benchFailure measures failure detection: client processes and agent
// processes SIGKILLed, seen by a subscriber on another (in-process) agent.
func benchFailure(ctx context.Context, env *env, cfg *config) (*FailureResult, error) {
	res := &FailureResult{}
	b, err := startAgent(ctx, env.endpoints, agentOptions{}, env.log)
	if err != nil {
		return nil, err
	}
	defer b.Close()
	cb, err := dial(ctx, b.Addr())
	if err != nil {
		return nil, err
	}
	defer cb.Close()

	if cfg.ClientKills > 0 {
		d, err := clientKills(ctx, env, cfg.ClientKills, cb)
		if err != nil {
			return res, err
		}
		res.ClientKill = d
		env.row(Row{Scenario: "5 failure", Figure: fmt.Sprintf("client SIGKILL → offline at remote subscriber, p50 (n=%d)", d.N),
			Value: fmtMs(d.P50)})
		env.row(Row{Scenario: "5 failure", Figure: "client SIGKILL → offline, p99 (max)",
			Value:  fmt.Sprintf("%s (%s)", fmtMs(d.P99), fmtMs(d.Max)),
			Target: "< 100 ms", Verdict: verdict(d.P99 < 100)})
	}
	for _, spec := range cfg.AgentKills {
		d, err := agentKills(ctx, env, spec, cb)
		if err != nil {
			return res, err
		}
		res.AgentKill = append(res.AgentKill, AgentKillResult{TTLSeconds: spec.TTL.Seconds(), Dist: d})
		env.row(Row{Scenario: "5 failure", Figure: fmt.Sprintf("agent SIGKILL → offline, -ttl %v: min/p50/max (n=%d)", spec.TTL, d.N),
			Value:   fmt.Sprintf("%.2f/%.2f/%.2f s", d.Min/1000, d.P50/1000, d.Max/1000),
			Target:  fmt.Sprintf("≤ TTL+1 s = %v", spec.TTL+time.Second),
			Verdict: verdict(d.Max <= ms(spec.TTL+time.Second))})
	}
	return res, nil
}

// clientKills starts n client processes, each registering one instance on
// a fresh agent A, then SIGKILLs them one at a time and times each
// offline update at a subscriber of agent B (on cb).
func clientKills(ctx context.Context, env *env, n int, cb *rpc.Client) (Dist, error) {
	a, err := startAgent(ctx, env.endpoints, agentOptions{}, env.log)
	if err != nil {
		return Dist{}, err
	}
	defer a.Close()
	const name = "bench-fail-client"
	sub, err := subscribe(ctx, cb, name, 64)
	if err != nil {
		return Dist{}, err
	}
	defer sub.close()
	if err := sub.waitCurrent(ctx); err != nil {
		return Dist{}, err
	}
	children, addrs, err := startHolders(ctx, env, sub, n, func(addr string) []string {
		return []string{childFlag + "client", "-agent", a.Addr(), "-name", name, "-addr", addr}
	})
	defer stopAll(children)
	if err != nil {
		return Dist{}, err
	}
	var lat []time.Duration
	for i, c := range children {
		t0 := time.Now()
		c.kill()
		at, err := sub.waitFor(ctx, addrs[i], false, opTimeout)
		if err != nil {
			return Dist{}, err
		}
		lat = append(lat, at.Sub(t0))
	}
	return summarize(lat), nil
}

// agentKills starts spec.N agent processes with spec.TTL, each holding one
// registration, SIGKILLs each at a random moment within TTL/3 (so the
// kills fall at every phase of the lease keepalive, which runs every
// TTL/3), and times each offline update at the subscriber on cb.
func agentKills(ctx context.Context, env *env, spec killSpec, cb *rpc.Client) (Dist, error) {
	name := fmt.Sprintf("bench-fail-agent-%d", spec.TTL.Milliseconds())
	sub, err := subscribe(ctx, cb, name, 64)
	if err != nil {
		return Dist{}, err
	}
	defer sub.close()
	if err := sub.waitCurrent(ctx); err != nil {
		return Dist{}, err
	}
	eps := strings.Join(env.endpoints, ",")
	children, addrs, err := startHolders(ctx, env, sub, spec.N, func(addr string) []string {
		return []string{childFlag + "agent", "-etcd", eps, "-ttl", spec.TTL.String(), "-name", name, "-register", addr}
	})
	defer stopAll(children)
	if err != nil {
		return Dist{}, err
	}

	killedAt := make([]time.Time, spec.N)
	var wg sync.WaitGroup
	for i, c := range children {
		delay := rand.N(spec.TTL / 3)
		wg.Add(1)
		go func() { // kills child i after delay (or at once if ctx ends)
			defer wg.Done()
			t := time.NewTimer(delay)
			defer t.Stop()
			select {
			case <-t.C:
			case <-ctx.Done():
			}
			killedAt[i] = time.Now()
			c.kill()
		}()
	}
	seen := make(map[string]time.Time, spec.N)
	timeout := time.NewTimer(spec.TTL + opTimeout)
	defer timeout.Stop()
	for len(seen) < spec.N {
		select {
		case ev, ok := <-sub.Events:
			if !ok {
				wg.Wait()
				return Dist{}, fmt.Errorf("subscription ended: %v", sub.stream.Err())
			}
			if !ev.Online {
				seen[ev.Addr] = ev.At
			}
		case <-timeout.C:
			wg.Wait()
			return Dist{}, fmt.Errorf("only %d of %d killed agents' registrations went offline", len(seen), spec.N)
		case <-ctx.Done():
			wg.Wait()
			return Dist{}, ctx.Err()
		}
	}
	wg.Wait()
	var lat []time.Duration
	for i, a := range addrs {
		lat = append(lat, seen[a].Sub(killedAt[i]))
	}
	return summarize(lat), nil
}

// waitAll waits until sub has seen every addr in addrs reach online.
func waitAll(ctx context.Context, sub *subscriber, addrs []string, online bool, timeout time.Duration) error {
	want := make(map[string]bool, len(addrs))
	for _, a := range addrs {
		want[a] = true
	}
	t := time.NewTimer(timeout)
	defer t.Stop()
	for len(want) > 0 {
		select {
		case ev, ok := <-sub.Events:
			if !ok {
				return fmt.Errorf("subscription ended: %v", sub.stream.Err())
			}
			if ev.Online == online {
				delete(want, ev.Addr)
			}
		case <-t.C:
			return fmt.Errorf("%d instances not seen online=%v within %v", len(want), online, timeout)
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return nil
}

// startHolders starts n child processes, child i holding the registration
// instanceAddr(i) (args gives its command line), and waits until each has
// reported and sub has seen every instance online. The children it started
// are returned even on error, for the caller to stop.
func startHolders(ctx context.Context, env *env, sub *subscriber, n int, args func(addr string) []string) ([]*child, []string, error) {
	var children []*child
	addrs := make([]string, n)
	for i := range n {
		addrs[i] = instanceAddr(i)
		c, err := startChild(args(addrs[i]))
		if err != nil {
			return children, addrs, err
		}
		env.track(c)
		children = append(children, c)
	}
	for _, c := range children {
		if _, err := c.report(opTimeout); err != nil {
			return children, addrs, err
		}
	}
	return children, addrs, waitAll(ctx, sub, addrs, true, opTimeout)
}

// stopAll stops each child, waiting at most 5 s for each.
func stopAll(children []*child) {
	for _, c := range children {
		c.stop(5 * time.Second)
	}
}
