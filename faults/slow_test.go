package faults_test

import (
	"fmt"
	"net"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/flynn/discoverd/api"
	"github.com/flynn/discoverd/backend/etcd/etcdtest"
	"github.com/flynn/discoverd/rpc"
)

// TestSlowSubscriber: a subscriber that stops reading its connection
// delays no one: another subscriber of the same name receives every
// update and registrations go on. The agent (a real discoverd process,
// so that its heap is the agent's alone) keeps a bounded backlog for it,
// then ends its stream with resource_exhausted.
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

	// The load: attribute updates of 64 KiB each (64 attributes of 1000
	// bytes), 4 writers in parallel, far more than the slow stream may
	// queue (rpc.DefaultStreamBuffer) plus what the sockets hold.
	const (
		writers    = 4
		perWriter  = 200
		updates    = writers * perWriter
		attrs      = 64
		valueBytes = 1000
		updateSize = attrs * valueBytes
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
				if j%25 == 0 {
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

	// The slow stream was ended, and counted.
	cut := `discoverd_rpc_calls_total{code="resource_exhausted",method="Agent.Subscribe"}`
	for metric(t, addr, cut) != 1 {
		select {
		case <-deadline.C:
			t.Fatalf("%s is %v, want 1", cut, metric(t, addr, cut))
		case <-time.After(50 * time.Millisecond): // polling /metrics
		}
	}
	if n := metric(t, addr, "discoverd_rpc_streams"); n != 1 {
		t.Errorf("discoverd_rpc_streams = %v after the cut, want 1 (the reading subscriber)", n)
	}

	// Bounded memory. The agent holds at most rpc.DefaultStreamBuffer
	// replies for the stream that is not read; each refers to one update's
	// attributes (about updateSize bytes, plus map and string headers:
	// count 2×). Everything else the agent holds does not depend on the
	// number of updates. The Go heap in use may reach twice the live heap
	// before a collection (GOGC=100), so the bound is
	// 2 × (base + 256 × 2 × updateSize) + 16 MiB of slack (≈ 85 MiB). A
	// backlog that grew with the updates would hold all 800 of them:
	// 800 × 2 × 62 KiB ≈ 100 MiB live, up to twice that in use.
	bound := 2*(baseHeap+float64(rpc.DefaultStreamBuffer*2*updateSize)) + 16<<20
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
	// What the operator sees: a log line and a counter for the cut.
	if n := metric(t, addr, "discoverd_rpc_streams_cut_total"); n != 1 {
		t.Errorf("discoverd_rpc_streams_cut_total = %v, want 1", n)
	}
	if line := lastLine(lb.String(), "rpc stream cut off"); line == "" {
		t.Errorf("no log line for the cut; log:\n%s", lb.String())
	} else {
		t.Logf("what the operator sees: log %q", line)
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
