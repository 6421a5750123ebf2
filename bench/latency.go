package main

import (
	"context"
	"fmt"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/flynn/discoverd/rpc"
)

// LatencyResult is scenario 2.
type LatencyResult struct {
	// Agent: Register on agent A → the update read by a subscriber on
	// agent B. Etcd: Put → the event read by a watcher on another client.
	Agent Dist `json:"agent_register_to_event"`
	Etcd  Dist `json:"etcd_put_to_event"`
	// The write alone: the Register reply, the Put response.
	AgentCall Dist `json:"agent_register_call"`
	EtcdCall  Dist `json:"etcd_put_call"`
	Wanted    int  `json:"wanted"`
	// Truncated is set when the time budget ended the run before Wanted
	// samples of each.
	Truncated bool    `json:"truncated"`
	Seconds   float64 `json:"seconds"`
}

// benchLatency measures, one write at a time and alternating the two so
// that both see the same machine load, the latency from a registration on
// agent A to its update at a subscriber on agent B, and from a raw etcd
// put to a watch event on a second etcd client.
func benchLatency(ctx context.Context, env *env, cfg *config) (*LatencyResult, error) {
	res := &LatencyResult{Wanted: cfg.LatencyEvents}
	opts := agentOptions{MaxRegistrationsPerConn: 1 << 30}
	a, err := startAgent(ctx, env.endpoints, opts, env.log)
	if err != nil {
		return nil, err
	}
	var ca, cb *rpc.Client
	defer func() { closeAgentFirst(a, ca) }()
	b, err := startAgent(ctx, env.endpoints, opts, env.log)
	if err != nil {
		return nil, err
	}
	defer func() { closeAgentFirst(b, cb) }()
	if ca, err = dial(ctx, a.Addr()); err != nil {
		return nil, err
	}
	if cb, err = dial(ctx, b.Addr()); err != nil {
		return nil, err
	}
	const name = "bench-latency"
	sub, err := subscribe(ctx, cb, name, 1024)
	if err != nil {
		return nil, err
	}
	defer sub.close()
	if err := sub.waitCurrent(ctx); err != nil {
		return nil, err
	}

	putter, err := newEtcdClient(env.endpoints)
	if err != nil {
		return nil, err
	}
	defer putter.Close()
	watcher, err := newEtcdClient(env.endpoints)
	if err != nil {
		return nil, err
	}
	defer watcher.Close()
	lease, stopLease, err := rawLease(ctx, putter)
	if err != nil {
		return nil, err
	}
	defer stopLease()
	const prefix = "/bench/raw/latency/"
	wctx, wcancel := context.WithCancel(ctx)
	defer wcancel()
	watched := watchStamped(wctx, watcher, prefix)

	var agentLat, etcdLat, agentCall, etcdCall []time.Duration
	start := time.Now()
	for i := range cfg.LatencyEvents {
		if time.Since(start) > cfg.LatencyBudget {
			res.Truncated = true
			break
		}
		addr := instanceAddr(i)
		t0 := time.Now()
		if err := register(ctx, ca, name, addr, map[string]string{"v": "1"}); err != nil {
			return nil, err
		}
		agentCall = append(agentCall, time.Since(t0))
		at, err := sub.waitFor(ctx, addr, true, opTimeout)
		if err != nil {
			return nil, err
		}
		agentLat = append(agentLat, at.Sub(t0))

		key := prefix + addr
		t0 = time.Now()
		pctx, cancel := context.WithTimeout(ctx, opTimeout)
		_, err = putter.Put(pctx, key, `{"v":"1"}`, clientv3.WithLease(lease))
		cancel()
		if err != nil {
			return nil, fmt.Errorf("etcd put: %w", err)
		}
		etcdCall = append(etcdCall, time.Since(t0))
		at, err = waitKey(ctx, watched, key)
		if err != nil {
			return nil, err
		}
		etcdLat = append(etcdLat, at.Sub(t0))
	}
	res.Seconds = time.Since(start).Seconds()
	res.Agent, res.Etcd = summarize(agentLat), summarize(etcdLat)
	res.AgentCall, res.EtcdCall = summarize(agentCall), summarize(etcdCall)

	n := fmt.Sprintf(" (n=%d)", res.Agent.N)
	if res.Truncated {
		n = fmt.Sprintf(" (n=%d, time budget)", res.Agent.N)
	}
	env.row(Row{Scenario: "2 latency", Figure: "register→event p50" + n,
		Value: fmtMs(res.Agent.P50), Etcd: fmtMs(res.Etcd.P50), Ratio: diffMs(res.Agent.P50, res.Etcd.P50),
		Target: "< 2 ms", Verdict: verdict(res.Agent.P50 < 2)})
	env.row(Row{Scenario: "2 latency", Figure: "register→event p90",
		Value: fmtMs(res.Agent.P90), Etcd: fmtMs(res.Etcd.P90), Ratio: diffMs(res.Agent.P90, res.Etcd.P90)})
	env.row(Row{Scenario: "2 latency", Figure: "register→event p99",
		Value: fmtMs(res.Agent.P99), Etcd: fmtMs(res.Etcd.P99), Ratio: diffMs(res.Agent.P99, res.Etcd.P99),
		Target: "< 10 ms", Verdict: verdict(res.Agent.P99 < 10)})
	env.row(Row{Scenario: "2 latency", Figure: "register→event max",
		Value: fmtMs(res.Agent.Max), Etcd: fmtMs(res.Etcd.Max), Ratio: diffMs(res.Agent.Max, res.Etcd.Max)})
	env.row(Row{Scenario: "2 latency", Figure: "p50 overhead over raw etcd",
		Value: diffMs(res.Agent.P50, res.Etcd.P50), Target: "within 1 ms", Verdict: verdict(res.Agent.P50-res.Etcd.P50 <= 1)})
	return res, nil
}

// rawLease grants a lease for the raw etcd baseline (TTL 10 s, as the
// agent's default) and keeps it alive until stop, which revokes it.
func rawLease(ctx context.Context, c *clientv3.Client) (_ clientv3.LeaseID, stop func(), err error) {
	resp, err := c.Grant(ctx, 10)
	if err != nil {
		return 0, nil, fmt.Errorf("etcd grant: %w", err)
	}
	kctx, cancel := context.WithCancel(context.Background())
	ch, err := c.KeepAlive(kctx, resp.ID)
	if err != nil {
		cancel()
		return 0, nil, fmt.Errorf("etcd keepalive: %w", err)
	}
	done := make(chan struct{})
	go func() { // drains the keepalive responses until stop
		defer close(done)
		for range ch {
		}
	}()
	return resp.ID, func() {
		cancel()
		<-done
		rctx, rcancel := context.WithTimeout(context.Background(), 5*time.Second)
		c.Revoke(rctx, resp.ID)
		rcancel()
	}, nil
}

// keyEvent is a watch event seen at a time.
type keyEvent struct {
	Key    string
	Delete bool
	At     time.Time
}

// watchStamped watches prefix from now on and forwards each event, stamped
// with the time its response was read, until ctx is done (then the
// channel is closed). The forwarding blocks: the reader must keep up.
func watchStamped(ctx context.Context, c *clientv3.Client, prefix string) <-chan keyEvent {
	out := make(chan keyEvent, 1024)
	wch := c.Watch(ctx, prefix, clientv3.WithPrefix())
	go func() {
		defer close(out)
		for resp := range wch {
			now := time.Now()
			for _, ev := range resp.Events {
				select {
				case out <- keyEvent{Key: string(ev.Kv.Key), Delete: ev.Type == clientv3.EventTypeDelete, At: now}:
				case <-ctx.Done():
					return
				}
			}
		}
	}()
	return out
}

// waitKey returns the time a put of key was seen on ch.
func waitKey(ctx context.Context, ch <-chan keyEvent, key string) (time.Time, error) {
	t := time.NewTimer(opTimeout)
	defer t.Stop()
	for {
		select {
		case ev, ok := <-ch:
			if !ok {
				return time.Time{}, fmt.Errorf("etcd watch ended")
			}
			if ev.Key == key && !ev.Delete {
				return ev.At, nil
			}
		case <-t.C:
			return time.Time{}, fmt.Errorf("timed out waiting for the watch event of %s", key)
		case <-ctx.Done():
			return time.Time{}, ctx.Err()
		}
	}
}
