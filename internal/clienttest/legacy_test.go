package discoverd_test

import (
	"context"
	"errors"
	"net"
	"net/http"
	"testing"

	"github.com/flynn/discoverd/agent"
	"github.com/flynn/discoverd/api"
	"github.com/flynn/discoverd/rpc"

	"github.com/flynn/discoverd/internal/testkit"
)

// legacyAgent is the RPC front end of an agent older than Agent.Heartbeat:
// it answers Register, Unregister and Subscribe only, on one session. It
// stands in for an old agent binary; the agent core and store behind it
// are real.
type legacyAgent struct {
	a *agent.Agent
	s *agent.Session
}

func (l *legacyAgent) Register(ctx context.Context, args *api.Args, reply *string) error {
	addr, err := l.s.Register(ctx, *args)
	*reply = addr
	return err
}

func (l *legacyAgent) Unregister(ctx context.Context, args *api.Args, _ *struct{}) error {
	return l.s.Unregister(ctx, *args)
}

func (l *legacyAgent) Subscribe(ctx context.Context, args *api.Args, stream rpc.Stream) error {
	sub, err := l.a.Subscribe(ctx, args.Name)
	if err != nil {
		return err
	}
	defer sub.Close()
	for {
		u, err := sub.Next(ctx)
		if err != nil {
			if errors.Is(err, context.Canceled) {
				return nil
			}
			return err
		}
		if err := stream.Send(&u); err != nil {
			return err
		}
	}
}

// startLegacyAgent serves a legacyAgent on a loopback port.
func startLegacyAgent(t *testing.T, a *agent.Agent) string {
	t.Helper()
	sess := a.NewSession(-1)
	t.Cleanup(sess.Close) // after the front end has stopped
	return serveFrontEnd(t, &legacyAgent{a: a, s: sess})
}

// serveFrontEnd serves rcvr as the RPC receiver "Agent" on a loopback
// port until the test ends (its calls' contexts are then cancelled).
func serveFrontEnd(t *testing.T, rcvr any) string {
	t.Helper()
	rs := rpc.NewServer()
	rs.Logger = quiet()
	if err := rs.RegisterName("Agent", rcvr); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.Handle(rpc.DefaultPath, rs)
	hs := &http.Server{Handler: mux}
	done := make(chan struct{})
	go func() {
		defer close(done)
		hs.Serve(ln)
	}()
	t.Cleanup(func() {
		rs.Close(context.Background())
		hs.Close()
		<-done
	})
	return ln.Addr().String()
}

// TestLegacyAgentHeartbeat: against an agent without Agent.Heartbeat, the
// client keeps its registration alive with Agent.Register.
func TestLegacyAgentHeartbeat(t *testing.T) {
	ta := startAgent(t)
	legacy := &testAgent{Addr: startLegacyAgent(t, ta.Agent)}
	c := newClient(t, legacy) // heartbeats every TTL/4
	name := testkit.ServiceName(t, "old")
	set, err := c.NewServiceSet(name)
	if err != nil {
		t.Fatal(err)
	}
	defer set.Close()
	updates := set.Watch(false)
	if err := c.Register(name, "127.0.0.1:9901"); err != nil {
		t.Fatal(err)
	}
	waitUpdate(t, updates, "online", online("127.0.0.1:9901"))
	// Without the fallback, the registration would expire after the TTL.
	noRecv(t, updates, 2*agentTTL, "updates while heartbeating with Register")
	if err := c.Unregister(name, "127.0.0.1:9901"); err != nil {
		t.Fatal(err)
	}
	waitUpdate(t, updates, "offline", offline("127.0.0.1:9901"))
}
