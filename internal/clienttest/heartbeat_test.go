package discoverd_test

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/flynn/discoverd/agent"
	"github.com/flynn/discoverd/api"
	discoverd "github.com/flynn/discoverd/client"

	"github.com/flynn/discoverd/internal/testkit"
)

// stallMode says which calls a stallingAgent leaves unanswered.
type stallMode int

const (
	// stallHeartbeat: Heartbeat(stuck) is never answered.
	stallHeartbeat stallMode = iota
	// forgetStuck: Heartbeat(stuck) answers not_found, and every
	// Register(stuck) after the first is never answered.
	forgetStuck
	// stallRegister: Register(stuck) is never answered.
	stallRegister
)

// stallingAgent is the RPC front end of a real agent core that answers as
// the agent does, except for some calls about the address stuck, which it
// answers only when their connection closes: it stands in for an agent
// whose store hangs on one key.
type stallingAgent struct {
	legacyAgent
	stuck      string
	mode       stallMode
	registered atomic.Bool // Register(stuck) was answered once
}

func (s *stallingAgent) Register(ctx context.Context, args *api.Args, reply *string) error {
	if args.Addr == s.stuck && (s.mode == stallRegister || (s.mode == forgetStuck && s.registered.Swap(true))) {
		<-ctx.Done()
		return ctx.Err()
	}
	return s.legacyAgent.Register(ctx, args, reply)
}

func (s *stallingAgent) Heartbeat(ctx context.Context, args *api.Args, _ *struct{}) error {
	if args.Addr == s.stuck {
		switch s.mode {
		case stallHeartbeat:
			<-ctx.Done()
			return ctx.Err()
		case forgetStuck:
			return api.Errorf(api.CodeNotFound, "unknown registration")
		}
	}
	return s.s.Heartbeat(ctx, *args)
}

// startStallingAgent serves a stallingAgent over a's core.
func startStallingAgent(t *testing.T, a *agent.Agent, stuck string, mode stallMode) *testAgent {
	t.Helper()
	sess := a.NewSession(-1)
	t.Cleanup(sess.Close) // after the front end has stopped
	return &testAgent{Addr: serveFrontEnd(t, &stallingAgent{legacyAgent: legacyAgent{a: a, s: sess}, stuck: stuck, mode: mode})}
}

// TestStuckCallDelaysNoOtherHeartbeat: a registration whose calls the agent
// never answers does not keep the client's other registrations from being
// heartbeated within the TTL (CallTimeout is 10 s, the TTL 2 s).
func TestStuckCallDelaysNoOtherHeartbeat(t *testing.T) {
	const stuck, healthy = "127.0.0.1:9301", "127.0.0.1:9302"
	for _, tc := range []struct {
		name string
		mode stallMode
	}{
		{"heartbeat never answered", stallHeartbeat},
		{"re-registration never answered", forgetStuck},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ta := startAgent(t)
			c := newClient(t, startStallingAgent(t, ta.Agent, stuck, tc.mode)) // heartbeats every TTL/4
			name := testkit.ServiceName(t, "svc")
			obs := newClient(t, ta)
			set, err := obs.NewServiceSet(name)
			if err != nil {
				t.Fatal(err)
			}
			defer set.Close()
			updates := set.Watch(false)
			if err := c.Register(testkit.ServiceName(t, "stuck"), stuck); err != nil {
				t.Fatal(err)
			}
			if err := c.Register(name, healthy); err != nil {
				t.Fatal(err)
			}
			waitUpdate(t, updates, "online", online(healthy))
			noRecv(t, updates, 2*agentTTL, "updates of the healthy registration")
		})
	}
}

// TestCallTimeoutIsUnavailable: a call the agent does not answer within
// CallTimeout fails with CodeUnavailable, as the agent reports its own
// deadlines, and still matches context.DeadlineExceeded.
func TestCallTimeoutIsUnavailable(t *testing.T) {
	const stuck = "127.0.0.1:9303"
	ta := startAgent(t)
	c := newClient(t, startStallingAgent(t, ta.Agent, stuck, stallRegister),
		func(cfg *discoverd.Config) { cfg.CallTimeout = 50 * time.Millisecond })
	err := c.Register(testkit.ServiceName(t, "svc"), stuck)
	if api.ErrorCode(err) != api.CodeUnavailable || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Register = %v (code %q), want CodeUnavailable and DeadlineExceeded", err, api.ErrorCode(err))
	}
}
