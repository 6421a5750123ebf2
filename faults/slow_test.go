package faults_test

import (
	"fmt"
	"net"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/flynn/discoverd/agent"
	"github.com/flynn/discoverd/api"
	"github.com/flynn/discoverd/backend/etcd/etcdtest"
	"github.com/flynn/discoverd/rpc"
)

// TestSlowSubscriber: a subscriber that stops reading its connection
// delays no one: another subscriber of the same name receives every
// update and registrations go on. The agent (a real discoverd process,
// so that its heap is the agent's alone) keeps a bounded backlog for it:
// the rpc layer's stream queue, then the agent's subscription queue, which
// cuts it off when full; once it reads again it gets the backlog, then the
// end of its stream with resource_exhausted.
func TestSlowSubscriber(t *testing.T) {
	srv := etcdtest.NewServer(t)
	addr := freeAddr(t)
	_, lb := newLog(t, "discoverd")
	startProc(t, lb, "-etcd", strings.Join(srv.Endpoints(), ","), "-bind", addr, "-ttl", "10s")
	const name = "slow"

	// The slow subscriber: a connection with a small receive buffer that
	// subscribes, reads the snapshot's end, and then never reads again.
	d := net.Dialer{Timeout: wait, Control: func(_, _ string, rc syscall.RawConn) error {
		var serr error
		err := rc.Control(func(fd uintptr) {
			serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4096)
		})
		if err != nil {
			return err
		}
		return serr
	}}
	conn, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	slow := upgradeRaw(t, conn)
	if err := slow.send(api.MethodSubscribe, 1, api.Args{Name: name}); err != nil {
		t.Fatal(err)
	}
	var u api.ServiceUpdate
	if h, err := slow.recv(&u); err != nil || h.Error != "" || !u.IsSentinel() {
		t.Fatalf("slow subscriber's first reply: %+v %+v %v", h, u, err)
	}

	// A subscriber that keeps up, on its own connection.
	w := newWatcher(t, addr, name)

	// The load: attribute updates of 8 KiB each (8 attributes of 1000
	// bytes), 4 writers in parallel, far more than the slow subscriber may
	// have queued (agent.DefaultSubscriberBuffer in the agent, plus
	// rpc.DefaultStreamBuffer in the rpc layer) plus what the sockets hold.
	const (
		writers    = 4
		perWriter  = 2000
		updates    = writers * perWriter
		attrs      = 8
		valueBytes = 1000
		updateSize = attrs * valueBytes
		backlog    = agent.DefaultSubscriberBuffer + rpc.DefaultStreamBuffer + 1 // +1: in the writer
	)
	heapSeries := "go_memstats_heap_inuse_bytes"
	baseHeap := metric(t, addr, heapSeries)
	var (
		mu      sync.Mutex
		maxHeap = baseHeap
		wg      sync.WaitGroup
		errs    = make(chan error, writers)
	)
	start := time.Now()
	for i := range writers {
		c := mustDial(t, addr, rpc.Gob)
		wg.Go(func() {
			for j := range perWriter {
				a := make(map[string]string, attrs)
				for k := range attrs {
					v := fmt.Sprintf("%d.%d.", j, k)
					a[fmt.Sprintf("k%02d", k)] = v + strings.Repeat("v", valueBytes-len(v))
				}
				var got string
				if err := call(c, api.MethodRegister, &api.Args{Name: name, Addr: fmt.Sprintf("10.0.0.%d:80", i+1), Attrs: a}, &got); err != nil {
					errs <- fmt.Errorf("writer %d, update %d: %w", i, j, err)
					return
				}
				if j%100 == 0 {
					h, err := metricValue(addr, heapSeries)
					if err != nil {
						errs <- err
						return
					}
					mu.Lock()
					maxHeap = max(maxHeap, h)
					mu.Unlock()
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatalf("registrations were delayed or failed while a subscriber did not read: %v", err)
	}
	t.Logf("%d updates of %d KiB written in %v", updates, updateSize>>10, time.Since(start).Round(time.Millisecond))

	// The other subscriber got every update, while the slow one still has
	// not read a byte.
	deadline := time.NewTimer(wait)
	defer deadline.Stop()
	for n := 0; n < updates; n = len(w.eventsSince(time.Time{})) {
		select {
		case <-w.changed:
		case <-deadline.C:
			t.Fatalf("the reading subscriber got %d of %d updates", n, updates)
		}
	}

	// The agent cut the slow subscriber off, and counted it.
	cut := "discoverd_slow_subscribers_cut_total"
	for metric(t, addr, cut) != 1 {
		select {
		case <-deadline.C:
			t.Fatalf("%s is %v, want 1", cut, metric(t, addr, cut))
		case <-time.After(50 * time.Millisecond): // polling /metrics
		}
	}

	// Bounded memory. The agent holds at most the backlog for the stream
	// that is not read; each update in it refers to one update's
	// attributes (updateSize bytes of values, plus map and string headers:
	// count 1.25×). Everything else the agent holds does not depend on the
	// number of updates. The Go heap in use may reach twice the live heap
	// before a collection (GOGC=100), so the bound is
	// 2 × (base + backlog × 1.25 × updateSize) + 16 MiB of slack (≈ 40 MiB
	// plus twice the base). A backlog that grew with the updates would
	// hold all 8000 of them: 8000 × 8000 bytes ≈ 61 MiB live at the very
	// least, up to twice that in use.
	bound := 2*(baseHeap+float64(backlog*updateSize)*1.25) + 16<<20
	t.Logf("agent heap in use: %.1f MiB before, at most %.1f MiB during the load; bound %.1f MiB",
		baseHeap/(1<<20), maxHeap/(1<<20), bound/(1<<20))
	if maxHeap > bound {
		t.Errorf("agent heap reached %.1f MiB, over the bound of %.1f MiB", maxHeap/(1<<20), bound/(1<<20))
	}

	// Now read the slow connection: the replies that were queued, then
	// the end of the stream, with resource_exhausted.
	var replies int
	var end respHeader
	for {
		var u api.ServiceUpdate
		h, err := slow.recv(&u)
		if err != nil {
			t.Fatalf("reading the slow stream after %d replies: %v", replies, err)
		}
		if h.Error != "" {
			end = h
			break
		}
		replies++
	}
	t.Logf("the slow subscriber received %d of %d updates, then %q", replies, updates, end.Error)
	if replies >= updates {
		t.Errorf("the slow subscriber was not cut off: it received all %d updates", replies)
	}
	if !strings.HasPrefix(end.Error, string(api.CodeResourceExhausted)+": ") {
		t.Errorf("the slow stream ended with %q, want a %s error", end.Error, api.CodeResourceExhausted)
	}

	// What the operator sees: the cut counted on the stream's method, the
	// stream gone, and log lines for the cut and for the stream's end,
	// which names the client.
	ended := `discoverd_rpc_calls_total{code="resource_exhausted",method="Agent.Subscribe"}`
	for metric(t, addr, ended) != 1 || metric(t, addr, "discoverd_rpc_streams") != 1 {
		select {
		case <-deadline.C:
			t.Fatalf("%s is %v, want 1; discoverd_rpc_streams is %v, want 1 (the reading subscriber)",
				ended, metric(t, addr, ended), metric(t, addr, "discoverd_rpc_streams"))
		case <-time.After(50 * time.Millisecond): // polling /metrics
		}
	}
	for _, msg := range []string{"subscriber cut off", "rpc stream cut off"} {
		if line := lastLine(lb.String(), msg); line == "" {
			t.Errorf("no log line %q; log:\n%s", msg, lb.String())
		} else {
			t.Logf("what the operator sees: log %q", line)
		}
	}
	// The connection itself goes on.
	if err := slow.send(api.MethodRegister, 2, api.Args{Name: "other", Addr: "10.0.1.1:80"}); err != nil {
		t.Fatal(err)
	}
	var got string
	if h, err := slow.recv(&got); err != nil || h.Seq != 2 || h.Error != "" {
		t.Fatalf("a call on the slow subscriber's connection after the cut: %+v %v", h, err)
	}
}
