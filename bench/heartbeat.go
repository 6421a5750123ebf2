package main

import (
	"context"
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/flynn/discoverd/api"
	"github.com/flynn/discoverd/rpc"
)

// HeartbeatResult is scenario 3.
type HeartbeatResult struct {
	Registrations  int     `json:"registrations"`
	Conns          int     `json:"conns"`
	TTLSeconds     float64 `json:"ttl_s"`
	WindowSeconds  float64 `json:"window_s"`
	RegisterSecs   float64 `json:"register_s"` // time to make the registrations
	HeartbeatCalls int64   `json:"heartbeat_calls"`
	// Per TTL, over the window: key writes (store revision delta), raft
	// proposals committed, lease keepalive requests received by etcd.
	WritesPerTTL     float64 `json:"writes_per_ttl"`
	ProposalsPerTTL  float64 `json:"raft_proposals_per_ttl"`
	KeepalivesPerTTL float64 `json:"lease_keepalives_per_ttl"`
	HeldAtEnd        int     `json:"held_at_end"` // registrations the agent still held
	// Growth of this process (agent, rpc clients and the embedded etcd
	// together: an upper bound of the agent's share) per registration,
	// from before the registrations to after them: Go heap and stacks in
	// use after a GC, and RSS.
	GoBytesPerReg  float64 `json:"process_go_bytes_per_registration"`
	RSSBytesPerReg float64 `json:"process_rss_bytes_per_registration"`
	// CPU of this process during the window (heartbeat calls, the
	// agent's sweeps, etcd's lease keepalives), as a share of one core.
	WindowCPUShare float64 `json:"window_cpu_share"`
	Expired        uint64  `json:"expired"`
}

// benchHeartbeat holds conns × perConn idle registrations on one agent,
// each connection heartbeating its registrations as clients do (every
// api.HeartbeatInterval, or TTL/2 if shorter; half of the connections
// re-register as go-discoverd does, half call Heartbeat), and counts what
// reaches etcd during one TTL.
func benchHeartbeat(ctx context.Context, env *env, cfg *config) (*HeartbeatResult, error) {
	ttl := cfg.HeartbeatTTL
	res := &HeartbeatResult{Conns: cfg.HeartbeatConns, Registrations: cfg.HeartbeatConns * cfg.HeartbeatPerConn, TTLSeconds: ttl.Seconds()}
	la, err := startAgent(ctx, env.endpoints, agentOptions{TTL: ttl}, env.log)
	if err != nil {
		return nil, err
	}
	conns := make([]*rpc.Client, cfg.HeartbeatConns)
	defer func() { closeAgentFirst(la, conns...) }()
	for i := range conns {
		if conns[i], err = dial(ctx, la.Addr()); err != nil {
			return nil, err
		}
	}
	const name = "bench-heartbeat"
	attrs := map[string]string{"v": "1"}
	addrOf := func(c, j int) string { return instanceAddr(c*cfg.HeartbeatPerConn + j) }

	// Each connection registers its share, then heartbeats it until
	// stop (a registration made long before the last one must not expire
	// while the others are still being made: 100,000 take longer than a
	// TTL). The window is measured once all are registered.
	go0, rss0 := goInUse(), rssBytes(0)
	start := time.Now()
	interval := min(api.HeartbeatInterval, ttl/2)
	hctx, stop := context.WithCancel(ctx)
	var calls atomic.Int64
	var wg, registered sync.WaitGroup
	errs := make(chan error, len(conns))
	for c := range conns {
		wg.Add(1)
		registered.Add(1)
		go func() { // registers, then heartbeats, conn c's registrations until stop
			defer wg.Done()
			var regErr error
			for j := range cfg.HeartbeatPerConn {
				if regErr = register(hctx, conns[c], name, addrOf(c, j), attrs); regErr != nil {
					break
				}
			}
			registered.Done()
			if regErr != nil {
				errs <- regErr
				return
			}
			offset := interval * time.Duration(c) / time.Duration(len(conns))
			t := time.NewTimer(offset)
			defer t.Stop()
			for {
				select {
				case <-hctx.Done():
					return
				case <-t.C:
				}
				t.Reset(interval)
				for j := range cfg.HeartbeatPerConn {
					args := &api.Args{Name: name, Addr: addrOf(c, j), Attrs: attrs}
					cctx, cancel := context.WithTimeout(hctx, opTimeout)
					var err error
					if c%2 == 0 {
						err = conns[c].Call(cctx, api.MethodHeartbeat, args, &struct{}{})
					} else {
						var reply string
						err = conns[c].Call(cctx, api.MethodRegister, args, &reply)
					}
					cancel()
					if err != nil {
						if hctx.Err() == nil {
							errs <- fmt.Errorf("heartbeat %s: %w", args.Addr, err)
						}
						return
					}
					calls.Add(1)
				}
			}
		}()
	}
	stopHeartbeats := func() { stop(); wg.Wait() }
	defer stopHeartbeats()
	allRegistered := make(chan struct{})
	go func() { registered.Wait(); close(allRegistered) }() // ends: every goroutine passes registered.Done
	select {
	case <-allRegistered:
	case err := <-errs:
		return nil, err
	}
	select {
	case err := <-errs:
		return nil, err
	default:
	}
	res.RegisterSecs = time.Since(start).Seconds()
	res.GoBytesPerReg = float64(goInUse()-go0) / float64(res.Registrations)
	res.RSSBytesPerReg = float64(rssBytes(0)-rss0) / float64(res.Registrations)

	rev0, err := revision(ctx, env.client)
	if err != nil {
		return nil, err
	}
	prop0, _ := etcdMetric("etcd_server_proposals_committed_total", nil)
	ka0, _ := etcdMetric("grpc_server_msg_received_total", map[string]string{"grpc_method": "LeaseKeepAlive"})
	t0, cpu0 := time.Now(), cpuTime(0)
	timer := time.NewTimer(ttl)
	select {
	case <-timer.C:
	case err := <-errs:
		timer.Stop()
		return nil, err
	case <-ctx.Done():
		timer.Stop()
		return nil, ctx.Err()
	}
	rev1, err := revision(ctx, env.client)
	if err != nil {
		return nil, err
	}
	prop1, _ := etcdMetric("etcd_server_proposals_committed_total", nil)
	ka1, _ := etcdMetric("grpc_server_msg_received_total", map[string]string{"grpc_method": "LeaseKeepAlive"})
	window := time.Since(t0)
	res.WindowCPUShare = float64(cpuTime(0)-cpu0) / float64(window)
	stopHeartbeats()

	perTTL := ttl.Seconds() / window.Seconds()
	res.WindowSeconds = window.Seconds()
	res.HeartbeatCalls = calls.Load()
	// The revision probe itself is a read: it does not move the revision.
	res.WritesPerTTL = float64(rev1-rev0) * perTTL
	res.ProposalsPerTTL = (prop1 - prop0) * perTTL
	res.KeepalivesPerTTL = (ka1 - ka0) * perTTL
	st := la.agent.Stats()
	res.HeldAtEnd, res.Expired = st.Registrations, st.Expired

	fig := fmt.Sprintf("%d idle registrations (%d conns), TTL %v", res.Registrations, res.Conns, ttl)
	env.row(Row{Scenario: "3 heartbeat", Figure: "etcd key writes per TTL, " + fig,
		Value:  fmt.Sprintf("%.1f", res.WritesPerTTL),
		Etcd:   fmt.Sprintf("%d (a put per heartbeat)", 2*res.Registrations),
		Target: "≤ 1", Verdict: verdict(res.WritesPerTTL <= 1 && res.HeldAtEnd == res.Registrations)})
	env.row(Row{Scenario: "3 heartbeat", Figure: "raft proposals / lease keepalives per TTL",
		Value: fmt.Sprintf("%.1f / %.1f", res.ProposalsPerTTL, res.KeepalivesPerTTL),
		Etcd:  fmt.Sprintf("%d keepalives (a lease each)", 3*res.Registrations)})
	env.row(Row{Scenario: "3 heartbeat", Figure: "heartbeat calls answered in the window; held/expired",
		Value: fmt.Sprintf("%d; %d/%d", res.HeartbeatCalls, res.HeldAtEnd, res.Expired)})
	env.row(Row{Scenario: "3 heartbeat", Figure: "process growth per registration, Go heap+stacks (RSS); agent+clients+etcd",
		Value: fmt.Sprintf("%.1f KiB (%.1f KiB)", res.GoBytesPerReg/1024, res.RSSBytesPerReg/1024)})
	env.row(Row{Scenario: "3 heartbeat", Figure: "process CPU in the window (heartbeats, sweeps, keepalives)",
		Value: fmt.Sprintf("%.0f %% of a core", 100*res.WindowCPUShare)})
	return res, nil
}

// goInUse returns this process's Go heap and stacks in use after a GC.
func goInUse() int64 {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return int64(ms.HeapInuse + ms.StackInuse)
}
