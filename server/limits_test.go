package server_test

import (
	"context"
	"fmt"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/flynn/discoverd/api"
	"github.com/flynn/discoverd/rpc"
	"github.com/flynn/discoverd/server"
)

// registerMany registers n instances of name, 10.1.x.y:80, with attrs,
// over c from several goroutines (the store batches concurrent writes).
func registerMany(t *testing.T, c *rpc.Client, name string, n int, attrs map[string]string) {
	t.Helper()
	const workers = 32
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := range workers {
		wg.Go(func() {
			for i := w; i < n; i += workers {
				var got string
				args := &api.Args{Name: name, Addr: fmt.Sprintf("10.1.%d.%d:80", i/250, i%250+1), Attrs: attrs}
				if err := c.Call(callCtx(t), api.MethodRegister, args, &got); err != nil {
					errs <- fmt.Errorf("Register %s: %w", args.Addr, err)
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
}

// A Subscribe stream whose snapshot is far longer than the rpc layer's
// stream buffer (rpc.DefaultStreamBuffer, 256), and a burst of live changes
// longer still, reach a client that keeps up whole, over both codecs: the
// stream goes at the reader's pace and is not cut. The agent's queue is
// made large enough here that only the rpc layer could cut the stream.
func TestLongSnapshotAndBurstReachAFastReader(t *testing.T) {
	const instances, burst = 1000, 2000
	e := newEnv(t, envConfig{subscriberBuffer: 2 * burst})
	c := mustDial(t, e.addr)
	registerMany(t, c, "big", instances, nil)

	subs := map[rpc.Codec]*stream{}
	for _, codec := range []rpc.Codec{rpc.Gob, rpc.JSON} {
		sc, err := rpc.Dial(callCtx(t), e.addr, codec)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { sc.Close() })
		s := mustStream(t, sc, api.MethodSubscribe, "big")
		for i := range instances {
			if u := s.next(); !u.Online || u.Name != "big" {
				t.Fatalf("%v: snapshot update %d = %+v", codec, i, u)
			}
		}
		if u := s.next(); !u.IsSentinel() {
			t.Fatalf("%v: after %d instances got %+v, want the sentinel", codec, instances, u)
		}
		subs[codec] = s
	}

	// The burst: every instance's attributes change twice, as fast as the
	// store takes it; both subscribers read every change.
	for round := range burst / instances {
		registerMany(t, c, "big", instances, map[string]string{"round": fmt.Sprint(round)})
	}
	for codec, s := range subs {
		for i := range burst {
			if u := s.next(); !u.Online || u.Attrs["round"] == "" {
				t.Fatalf("%v: live update %d = %+v", codec, i, u)
			}
		}
	}
}

// While a connection's Register calls are stuck on a store that does not
// answer, holding every call slot of the connection, its Heartbeats are
// still answered (Heartbeat is an express method), and the stuck calls
// fail with unavailable once CallTimeout passes, which frees their slots.
func TestStuckCallsDoNotStarveHeartbeats(t *testing.T) {
	const slots = 4
	rs := rpc.NewServer()
	rs.MaxCallsPerConn = slots
	e := newEnv(t, envConfig{opts: server.Options{RPC: rs, CallTimeout: 3 * time.Second}})
	c := mustDial(t, e.addr)
	mustRegister(t, c, "hb", "10.0.0.1:80", nil)

	if err := e.etcd.Close(); err != nil {
		t.Fatal(err)
	}
	stuck := make([]*rpc.Call, slots)
	for i := range stuck {
		stuck[i] = c.Go(api.MethodRegister, &api.Args{Name: "hb", Addr: fmt.Sprintf("10.0.1.%d:80", i+1)}, new(string), nil)
	}
	if err := c.Call(callCtx(t), api.MethodHeartbeat, &api.Args{Name: "hb", Addr: "10.0.0.1:80"}, &struct{}{}); err != nil {
		t.Fatalf("Heartbeat while Registers are stuck: %v", err)
	}
	// Replies are read in order, so had the Heartbeat waited for a slot, the
	// reply of the Register that freed it would have come first.
	for i, call := range stuck {
		select {
		case <-call.Done:
			t.Fatalf("Register %d ended (%v) before the Heartbeat was answered: the Heartbeat waited for its slot", i, call.Error)
		default:
		}
	}
	for i, call := range stuck {
		select {
		case <-call.Done:
		case <-time.After(waitTimeout):
			t.Fatalf("Register %d still stuck after %v (CallTimeout is 3 s)", i, waitTimeout)
		}
		if codeOf(call.Error) != api.CodeUnavailable {
			t.Errorf("Register %d with the store down: %v, want unavailable", i, call.Error)
		}
	}
}

// HTTP registrations share one session, capped by MaxHTTPRegistrations:
// one more is answered 429 resource_exhausted; a PUT of one already held
// (a heartbeat) still works.
func TestHTTPRegistrationCap(t *testing.T) {
	e := newEnv(t, envConfig{opts: server.Options{MaxHTTPRegistrations: 2}})
	mustPut(t, e.url, "web", "10.0.0.1:80", "")
	mustPut(t, e.url, "web", "10.0.0.2:80", "")
	resp := mustDo(t, newRequest(t, http.MethodPut, e.url+"/services/web/instances/10.0.0.3:80", ""))
	wantError(t, resp, http.StatusTooManyRequests, api.CodeResourceExhausted)
	mustPut(t, e.url, "web", "10.0.0.1:80", `{"attrs":{"k":"v"}}`)
	if n := len(mustList(t, e.url, "web")); n != 2 {
		t.Errorf("%d instances listed, want 2", n)
	}
}

// SSE streams are capped by MaxSSEStreams: one more is answered 429
// resource_exhausted, and a stream's slot is free again once it ended.
func TestSSEStreamCap(t *testing.T) {
	e := newEnv(t, envConfig{opts: server.Options{MaxSSEStreams: 1}})
	first := openSSE(t, e.url+"/services/web")
	if ev := first.mustNext(); ev.event != "current" {
		t.Fatalf("first event %+v", ev)
	}
	resp := mustDo(t, sseRequest(t, e.url+"/services/other"))
	wantError(t, resp, http.StatusTooManyRequests, api.CodeResourceExhausted)
	first.resp.Body.Close()

	// The first stream's handler returns once it notices its client left.
	deadline := time.After(waitTimeout)
	for {
		ctx, cancel := context.WithCancel(context.Background())
		resp := mustDo(t, sseRequest(t, e.url+"/services/web").WithContext(ctx))
		status := resp.StatusCode
		cancel()
		resp.Body.Close()
		if status == http.StatusOK {
			break
		}
		if status != http.StatusTooManyRequests {
			t.Fatalf("SSE request answered %d", status)
		}
		select {
		case <-deadline:
			t.Fatal("the SSE slot was not freed after its client left")
		case <-time.After(20 * time.Millisecond): // polling the handler's end
		}
	}
}
