package main

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"time"

	"github.com/flynn/discoverd/rpc"
)

// FanoutResult is scenario 4.
type FanoutResult struct {
	Subscribers int `json:"subscribers"`
	Conns       int `json:"conns"`
	Rounds      int `json:"rounds"`
	// Per-subscriber latency from the Register call to the update read by
	// the subscriber, over every round; AllSeen is, per round, the time
	// until the last subscriber had it.
	Latency    Dist      `json:"latency"`
	AllSeenMax float64   `json:"all_seen_max_ms"`
	AllSeen    []float64 `json:"all_seen_ms"`
	// The agent child's memory, after a GC, before and with the
	// subscribers: Go heap and stacks in use, and RSS.
	Before           childStats `json:"agent_before"`
	After            childStats `json:"agent_after"`
	GoBytesPerSub    float64    `json:"go_bytes_per_subscriber"`
	RSSBytesPerSub   float64    `json:"rss_bytes_per_subscriber"`
	GoroutinesPerSub float64    `json:"goroutines_per_subscriber"`
	AgentWatches     int        `json:"agent_watches"`
	// CPU time used per change, by the agent process and by this process
	// (the subscribers' side: rpc clients decoding, one goroutine per
	// subscriber stamping; and the embedded etcd).
	AgentCPUPerChangeMs  float64 `json:"agent_cpu_per_change_ms"`
	ClientCPUPerChangeMs float64 `json:"client_cpu_per_change_ms"`
	EtcdWatchers         float64 `json:"etcd_watchers"`        // etcd's watcher gauge with the subscribers
	EtcdWatchersBefore   float64 `json:"etcd_watchers_before"` // and before the agent started
}

// benchFanout runs an agent as a child process (so that its memory is
// its own), opens cfg.FanoutSubs Subscribe streams of one name over
// cfg.FanoutConns connections from this process, and times how long each
// subscriber takes to see a registration made through the same agent,
// over cfg.FanoutRounds registrations.
func benchFanout(ctx context.Context, env *env, cfg *config) (*FanoutResult, error) {
	res := &FanoutResult{Subscribers: cfg.FanoutSubs, Conns: cfg.FanoutConns, Rounds: cfg.FanoutRounds}
	res.EtcdWatchersBefore, _ = etcdMetric("etcd_debugging_mvcc_watcher_total", nil)
	args := []string{childFlag + "agent", "-etcd", strings.Join(env.endpoints, ",")}
	if cfg.AgentProfile != "" {
		args = append(args, "-cpuprofile", filepath.Join(cfg.AgentProfile, "fanout-agent-cpu.pprof"),
			"-heapprofile", filepath.Join(cfg.AgentProfile, "fanout-agent-heap.pprof"))
	}
	ch, err := startChild(args)
	if err != nil {
		return nil, err
	}
	env.track(ch)
	defer ch.stop(10 * time.Second)
	r, err := ch.report(opTimeout)
	if err != nil {
		return nil, err
	}
	addr := r.Addr
	reg, err := dial(ctx, addr)
	if err != nil {
		return nil, err
	}
	defer reg.Close()
	const name = "bench-fanout"
	if err := register(ctx, reg, name, instanceAddr(0), nil); err != nil {
		return nil, err
	}
	before, err := ch.stats()
	if err != nil {
		return nil, err
	}

	conns := make([]*rpc.Client, cfg.FanoutConns)
	subs := make([]*subscriber, 0, cfg.FanoutSubs)
	defer func() { // closing the connections ends their streams
		for _, c := range conns {
			if c != nil {
				c.Close()
			}
		}
		for _, s := range subs {
			<-s.done
		}
	}()
	for i := range conns {
		if conns[i], err = dial(ctx, addr); err != nil {
			return nil, err
		}
	}
	for i := range cfg.FanoutSubs {
		s, err := subscribe(ctx, conns[i%len(conns)], name, 4)
		if err != nil {
			return nil, err
		}
		subs = append(subs, s)
	}
	for _, s := range subs {
		if err := s.waitCurrent(ctx); err != nil {
			return nil, err
		}
	}
	after, err := ch.stats()
	if err != nil {
		return nil, err
	}
	res.EtcdWatchers, _ = etcdMetric("etcd_debugging_mvcc_watcher_total", nil)
	n := float64(cfg.FanoutSubs)
	res.Before, res.After = *before, *after
	res.GoBytesPerSub = (float64(after.HeapInuse+after.StackInuse) - float64(before.HeapInuse+before.StackInuse)) / n
	res.RSSBytesPerSub = float64(after.RSS-before.RSS) / n
	res.GoroutinesPerSub = float64(after.Goroutines-before.Goroutines) / n
	res.AgentWatches = after.Agent.Watches

	agentCPU0, clientCPU0 := cpuTime(ch.cmd.Process.Pid), cpuTime(0)
	var lat []time.Duration
	for round := 1; round <= cfg.FanoutRounds; round++ {
		a := instanceAddr(round)
		t0 := time.Now()
		if err := register(ctx, reg, name, a, nil); err != nil {
			return nil, err
		}
		var last time.Duration
		for _, s := range subs {
			at, err := s.waitFor(ctx, a, true, opTimeout)
			if err != nil {
				return nil, err
			}
			d := at.Sub(t0)
			lat = append(lat, d)
			last = max(last, d)
		}
		res.AllSeen = append(res.AllSeen, ms(last))
		res.AllSeenMax = max(res.AllSeenMax, ms(last))
	}
	res.Latency = summarize(lat)
	res.AgentCPUPerChangeMs = ms(cpuTime(ch.cmd.Process.Pid)-agentCPU0) / float64(cfg.FanoutRounds)
	res.ClientCPUPerChangeMs = ms(cpuTime(0)-clientCPU0) / float64(cfg.FanoutRounds)

	// Round-2 targets (issue 18): p99 < 25 ms to 10,000 subscribers,
	// < 250 ms to 100,000; at most 4 KiB of agent memory per subscriber.
	p99Target := 25.0
	if cfg.FanoutSubs >= 100_000 {
		p99Target = 250
	}
	fig := fmt.Sprintf("%d subscribers on %d conns, %d changes", cfg.FanoutSubs, cfg.FanoutConns, cfg.FanoutRounds)
	env.row(Row{Scenario: "4 fan-out", Figure: "register→update p50, " + fig, Value: fmtMs(res.Latency.P50)})
	env.row(Row{Scenario: "4 fan-out", Figure: "register→update p99 (all seen: max over changes)",
		Value:  fmt.Sprintf("%s (%s)", fmtMs(res.Latency.P99), fmtMs(res.AllSeenMax)),
		Target: fmt.Sprintf("< %.0f ms", p99Target), Verdict: verdict(res.Latency.P99 < p99Target)})
	env.row(Row{Scenario: "4 fan-out", Figure: "CPU per change: agent process / subscribers' process",
		Value: fmt.Sprintf("%.0f ms / %.0f ms", res.AgentCPUPerChangeMs, res.ClientCPUPerChangeMs)})
	env.row(Row{Scenario: "4 fan-out", Figure: "agent memory per subscriber: Go heap+stacks (RSS)",
		Value:  fmt.Sprintf("%.1f KiB (%.1f KiB)", res.GoBytesPerSub/1024, res.RSSBytesPerSub/1024),
		Target: "≤ 4 KiB", Verdict: verdict(res.GoBytesPerSub <= 4<<10)})
	env.row(Row{Scenario: "4 fan-out", Figure: "etcd watches held by the agent (etcd watcher gauge delta)",
		Value:  fmt.Sprintf("%d (%.0f)", res.AgentWatches, res.EtcdWatchers-res.EtcdWatchersBefore),
		Target: "1", Verdict: verdict(res.AgentWatches == 1 && res.EtcdWatchers-res.EtcdWatchersBefore <= 1)})
	return res, nil
}
