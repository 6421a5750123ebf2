package main

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/flynn/discoverd/rpc"
)

// ThroughputRun is one registration throughput measurement.
type ThroughputRun struct {
	Target  string  `json:"target"`   // "agent" or "etcd"
	Conns   int     `json:"conns"`    // rpc connections (agent) or etcd clients
	PerConn int     `json:"per_conn"` // calls in flight per connection
	Ops     int64   `json:"ops"`
	Seconds float64 `json:"seconds"`
	PerSec  float64 `json:"per_sec"`
}

// ThroughputResult is scenario 1.
type ThroughputResult struct {
	Runs []ThroughputRun `json:"runs"`
}

// shape is a concurrency: conns connections with perConn callers each.
type shape struct{ conns, perConn int }

// throughputShapes: one caller; 64 connections with one caller each; one
// connection with 64 calls in flight (rpc multiplexes calls).
var throughputShapes = []shape{{1, 1}, {64, 1}, {1, 64}}

// benchThroughput measures registrations/s through one fresh agent per
// shape, each of distinct addrs, against raw etcd puts with a lease by as
// many concurrent callers over one etcd client (the agent, too, writes
// through one etcd client).
func benchThroughput(ctx context.Context, env *env, cfg *config) (*ThroughputResult, error) {
	res := &ThroughputResult{}
	raw := map[int]float64{}
	for _, sh := range throughputShapes {
		workers := sh.conns * sh.perConn
		if _, ok := raw[workers]; !ok {
			r, err := rawPutThroughput(ctx, env, workers, cfg.Duration)
			if err != nil {
				return res, err
			}
			res.Runs = append(res.Runs, r)
			raw[workers] = r.PerSec
		}
		r, err := agentThroughput(ctx, env, sh, cfg.Duration)
		if err != nil {
			return res, err
		}
		res.Runs = append(res.Runs, r)
		env.row(Row{
			Scenario: "1 throughput",
			Figure:   fmt.Sprintf("registrations/s, %d conn × %d in flight", sh.conns, sh.perConn),
			Value:    fmt.Sprintf("%.0f/s", r.PerSec),
			Etcd:     fmt.Sprintf("%.0f puts/s", raw[workers]),
			Ratio:    ratio(r.PerSec, raw[workers]),
			Target:   "≥ raw etcd (same concurrency)",
			Verdict:  verdict(r.PerSec >= raw[workers]),
		})
	}
	return res, nil
}

// agentThroughput registers distinct addrs through a fresh agent for d.
func agentThroughput(ctx context.Context, env *env, sh shape, d time.Duration) (ThroughputRun, error) {
	run := ThroughputRun{Target: "agent", Conns: sh.conns, PerConn: sh.perConn}
	la, err := startAgent(ctx, env.endpoints, agentOptions{MaxRegistrationsPerConn: 1 << 30}, env.log)
	if err != nil {
		return run, err
	}
	conns := make([]*rpc.Client, sh.conns)
	defer closeAgentFirst(la, conns...)
	for i := range conns {
		if conns[i], err = dial(ctx, la.Addr()); err != nil {
			return run, err
		}
	}
	name := fmt.Sprintf("bench-tput-%d-%d", sh.conns, sh.perConn)
	ops, secs, err := hammer(ctx, sh.conns*sh.perConn, d, func(ctx context.Context, w, i int) error {
		return register(ctx, conns[w%sh.conns], name, instanceAddr(i), map[string]string{"v": "1"})
	})
	run.Ops, run.Seconds, run.PerSec = ops, secs, float64(ops)/secs
	return run, err
}

// rawPutThroughput puts distinct keys with a lease through one etcd
// client from workers goroutines for d.
func rawPutThroughput(ctx context.Context, env *env, workers int, d time.Duration) (ThroughputRun, error) {
	run := ThroughputRun{Target: "etcd", Conns: 1, PerConn: workers}
	c, err := newEtcdClient(env.endpoints)
	if err != nil {
		return run, err
	}
	defer c.Close()
	lease, stopLease, err := rawLease(ctx, c)
	if err != nil {
		return run, err
	}
	defer stopLease()
	prefix := fmt.Sprintf("/bench/raw/tput-%d/", workers)
	ops, secs, err := hammer(ctx, workers, d, func(ctx context.Context, _, i int) error {
		_, err := c.Put(ctx, prefix+instanceAddr(i), `{"v":"1"}`, clientv3.WithLease(lease))
		return err
	})
	run.Ops, run.Seconds, run.PerSec = ops, secs, float64(ops)/secs
	return run, err
}

// hammer runs op from workers goroutines for d after a short warm-up
// (not counted), each op with a distinct i, and returns the ops completed
// in the measured interval and its length. The first error stops it.
func hammer(ctx context.Context, workers int, d time.Duration, op func(ctx context.Context, worker, i int) error) (int64, float64, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var (
		next     atomic.Int64
		counted  atomic.Int64
		counting atomic.Bool
		errOnce  sync.Once
		firstErr error
		wg       sync.WaitGroup
	)
	stop := make(chan struct{})
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				octx, ocancel := context.WithTimeout(ctx, opTimeout)
				err := op(octx, w, int(next.Add(1)))
				ocancel()
				if err != nil {
					errOnce.Do(func() { firstErr = err; cancel() })
					return
				}
				if counting.Load() {
					counted.Add(1)
				}
			}
		}()
	}
	warm := min(d/5, time.Second)
	var secs float64
	func() {
		t := time.NewTimer(warm)
		defer t.Stop()
		select {
		case <-t.C:
		case <-ctx.Done():
			return
		}
		start := time.Now()
		counting.Store(true)
		t.Reset(d)
		select {
		case <-t.C:
		case <-ctx.Done():
		}
		counting.Store(false)
		secs = time.Since(start).Seconds()
	}()
	close(stop)
	wg.Wait()
	if firstErr == nil && ctx.Err() != nil && !errors.Is(ctx.Err(), context.Canceled) {
		firstErr = ctx.Err()
	}
	if firstErr != nil {
		return 0, 0, firstErr
	}
	if secs == 0 {
		return 0, 0, ctx.Err()
	}
	return counted.Load(), secs, nil
}
