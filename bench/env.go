package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strings"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/flynn/discoverd/acl"
	"github.com/flynn/discoverd/agent"
	"github.com/flynn/discoverd/api"
	"github.com/flynn/discoverd/backend/etcd"
	"github.com/flynn/discoverd/checks"
	"github.com/flynn/discoverd/rpc"
	"github.com/flynn/discoverd/server"
)

// opTimeout bounds every single operation of the tool (a call, a wait for
// an event): a figure that needs longer is a failure, not a slow sample.
const opTimeout = 30 * time.Second

// localAgent is an agent served in this process over real TCP, wired as
// main.go wires it: etcd backend, agent, server, http.Server.
type localAgent struct {
	backend   *etcd.Backend
	agent     *agent.Agent
	checks    *checks.Manager // with agentOptions.ChecksFile only
	server    *server.Server
	http      *http.Server
	ln        net.Listener
	serveDone chan error
}

// agentOptions are the settings of an in-process agent that differ from
// main.go's defaults.
type agentOptions struct {
	TTL time.Duration // default api.DefaultTTL
	// MaxRegistrationsPerConn raises the per-connection cap (default
	// api.DefaultMaxRegistrationsPerConn) for the scenarios that register
	// more than that through one connection.
	MaxRegistrationsPerConn int
	// ACL, if set, holds the agent's access rules (server.Options.ACL).
	ACL *atomic.Pointer[acl.ACL]
	// ChecksFile, if set, runs health checks (journalled there), as
	// main.go wires them.
	ChecksFile string
}

// startAgent starts an agent on the etcd at endpoints, listening on a
// free loopback port. The caller must Close it.
func startAgent(ctx context.Context, endpoints []string, opts agentOptions, log *slog.Logger) (*localAgent, error) {
	return startAgentOn(ctx, "127.0.0.1:0", endpoints, opts, log)
}

// startAgentOn is startAgent listening on bind.
func startAgentOn(ctx context.Context, bind string, endpoints []string, opts agentOptions, log *slog.Logger) (_ *localAgent, err error) {
	if opts.TTL == 0 {
		opts.TTL = api.DefaultTTL
	}
	la := &localAgent{}
	defer func() {
		if err != nil {
			la.Close()
		}
	}()
	la.ln, err = net.Listen("tcp", bind)
	if err != nil {
		return nil, fmt.Errorf("agent: listen: %w", err)
	}
	la.backend, err = etcd.Open(ctx, etcd.Config{Endpoints: endpoints, TTL: opts.TTL, Logger: log})
	if err != nil {
		return nil, err
	}
	la.agent, err = agent.New(agent.Config{
		Backend:                    la.backend,
		TTL:                        opts.TTL,
		MaxRegistrationsPerSession: opts.MaxRegistrationsPerConn,
		Logger:                     log,
	})
	if err != nil {
		return nil, err
	}
	sopts := server.Options{Logger: log, ACL: opts.ACL}
	if opts.ChecksFile != "" {
		la.checks, err = checks.New(checks.Config{Registrar: la.agent.NewKeptSession(), File: opts.ChecksFile, Logger: log})
		if err != nil {
			return nil, err
		}
		sopts.Checks = la.checks
	}
	la.server, err = server.New(la.agent, sopts)
	if err != nil {
		return nil, err
	}
	la.http = &http.Server{
		Handler:           la.server,
		ReadHeaderTimeout: 10 * time.Second,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}
	la.serveDone = make(chan error, 1)
	go func() { la.serveDone <- la.http.Serve(la.ln) }() // stopped by Close
	return la, nil
}

// Addr is the agent's host:port.
func (la *localAgent) Addr() string { return la.ln.Addr().String() }

// Close stops the agent in main.go's order: agent, front ends, HTTP
// server, backend (revoking its lease removes its registrations at once).
func (la *localAgent) Close() error {
	var errs []error
	if la.checks != nil {
		errs = append(errs, la.checks.Close())
	}
	if la.agent != nil {
		errs = append(errs, la.agent.Close())
	}
	if la.server != nil {
		errs = append(errs, la.server.Close())
	}
	if la.http != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		if err := la.http.Shutdown(ctx); err != nil {
			errs = append(errs, la.http.Close())
		}
		cancel()
		if err := <-la.serveDone; !errors.Is(err, http.ErrServerClosed) {
			errs = append(errs, err)
		}
	} else if la.ln != nil {
		la.ln.Close()
	}
	if la.backend != nil {
		errs = append(errs, la.backend.Close())
	}
	return errors.Join(errs...)
}

// closeAgentFirst closes la, then the connections: closing the agent
// first makes the connections' sessions end without unregistering one
// key at a time (the backend's lease revocation removes them all), which
// keeps teardown out of the next measurement.
func closeAgentFirst(la *localAgent, conns ...*rpc.Client) {
	la.Close()
	for _, c := range conns {
		if c != nil {
			c.Close()
		}
	}
}

// newEtcdClient returns a raw etcd client: the baseline's, and the tool's
// window on the store (revision).
func newEtcdClient(endpoints []string) (*clientv3.Client, error) {
	c, err := clientv3.New(clientv3.Config{
		Endpoints:   endpoints,
		DialTimeout: 5 * time.Second,
		Logger:      zap.NewNop(),
	})
	if err != nil {
		return nil, fmt.Errorf("etcd client: %w", err)
	}
	return c, nil
}

// revision returns the store's current revision: every key write (put or
// delete) increments it; lease keepalives do not.
func revision(ctx context.Context, c *clientv3.Client) (int64, error) {
	resp, err := c.Get(ctx, "/bench/revision-probe", clientv3.WithCountOnly())
	if err != nil {
		return 0, fmt.Errorf("etcd revision: %w", err)
	}
	return resp.Header.Revision, nil
}

// dial opens an rpc connection to an agent.
func dial(ctx context.Context, addr string) (*rpc.Client, error) {
	ctx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	c, err := rpc.Dial(ctx, addr, rpc.Gob)
	if err != nil {
		return nil, fmt.Errorf("dial agent %s: %w", addr, err)
	}
	return c, nil
}

// register registers name/addr through c.
func register(ctx context.Context, c *rpc.Client, name, addr string, attrs map[string]string) error {
	ctx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	var reply string
	if err := c.Call(ctx, api.MethodRegister, &api.Args{Name: name, Addr: addr, Attrs: attrs}, &reply); err != nil {
		return fmt.Errorf("register %s %s: %w", name, addr, err)
	}
	return nil
}

// instanceAddr returns a distinct valid address for each i.
func instanceAddr(i int) string {
	return fmt.Sprintf("10.%d.%d.%d:%d", (i>>16)&255, (i>>8)&255, i&255, 1000+(i>>24))
}

// stamped is an update seen by a subscriber, with the time it was read.
type stamped struct {
	Addr   string
	Online bool
	At     time.Time
}

// subscriber is one Subscribe stream whose reader goroutine stamps every
// live update (after the sentinel) and forwards it on Events.
type subscriber struct {
	stream  *rpc.StreamCall
	current chan struct{} // closed at the sentinel
	Events  chan stamped  // live updates; the reader drops none (it blocks)
	done    chan struct{} // closed when the reader returns
}

// subscribe starts a Subscribe stream of name on c and a reader that owns
// it; eventBuffer is the capacity of Events. Close the stream (or c) to
// stop the reader, then wait on done.
func subscribe(ctx context.Context, c *rpc.Client, name string, eventBuffer int) (*subscriber, error) {
	ch := make(chan *api.ServiceUpdate, 16)
	sc, err := c.Stream(ctx, api.MethodSubscribe, &api.Args{Name: name}, ch)
	if err != nil {
		return nil, fmt.Errorf("subscribe %s: %w", name, err)
	}
	s := &subscriber{stream: sc, current: make(chan struct{}), Events: make(chan stamped, eventBuffer), done: make(chan struct{})}
	go func() {
		defer close(s.done)
		defer close(s.Events)
		live := false
		for u := range ch {
			now := time.Now()
			if !live {
				if u.IsSentinel() {
					live = true
					close(s.current)
				}
				continue
			}
			select {
			case s.Events <- stamped{Addr: u.Addr, Online: u.Online, At: now}:
			case <-sc.Done():
			}
		}
	}()
	return s, nil
}

// waitCurrent waits for the subscriber's sentinel.
func (s *subscriber) waitCurrent(ctx context.Context) error {
	t := time.NewTimer(opTimeout)
	defer t.Stop()
	select {
	case <-s.current:
		return nil
	case <-s.done:
		return fmt.Errorf("subscription ended before its snapshot: %v", s.stream.Err())
	case <-t.C:
		return errors.New("timed out waiting for the subscription's snapshot")
	case <-ctx.Done():
		return ctx.Err()
	}
}

// waitFor returns the time the subscriber saw addr go online (or offline),
// skipping other updates; it fails after timeout.
func (s *subscriber) waitFor(ctx context.Context, addr string, online bool, timeout time.Duration) (time.Time, error) {
	t := time.NewTimer(timeout)
	defer t.Stop()
	for {
		select {
		case ev, ok := <-s.Events:
			if !ok {
				return time.Time{}, fmt.Errorf("subscription ended: %v", s.stream.Err())
			}
			if ev.Addr == addr && ev.Online == online {
				return ev.At, nil
			}
		case <-t.C:
			return time.Time{}, fmt.Errorf("timed out after %v waiting for %s online=%v", timeout, addr, online)
		case <-ctx.Done():
			return time.Time{}, ctx.Err()
		}
	}
}

// close ends the stream and waits for the reader.
func (s *subscriber) close() {
	s.stream.Close()
	<-s.done
}

// etcdMetric sums the samples of the metric family name in this process's
// default Prometheus registry (where the embedded etcd registers) whose
// labels include every label of match. ok is false when the family is
// missing.
func etcdMetric(name string, match map[string]string) (sum float64, ok bool) {
	fams, err := prometheus.DefaultGatherer.Gather()
	if err != nil {
		return 0, false
	}
	for _, f := range fams {
		if f.GetName() != name {
			continue
		}
		ok = true
		for _, m := range f.GetMetric() {
			if !labelsMatch(m.GetLabel(), match) {
				continue
			}
			switch {
			case m.Counter != nil:
				sum += m.Counter.GetValue()
			case m.Gauge != nil:
				sum += m.Gauge.GetValue()
			}
		}
	}
	return sum, ok
}

func labelsMatch(labels []*dto.LabelPair, match map[string]string) bool {
	n := 0
	for _, l := range labels {
		if v, ok := match[l.GetName()]; ok {
			if v != l.GetValue() {
				return false
			}
			n++
		}
	}
	return n == len(match)
}

// cpuTime returns the user+system CPU time process pid (0 = this one) has
// used, from /proc (clock ticks of 10 ms); 0 when it cannot be read.
func cpuTime(pid int) time.Duration {
	path := "/proc/self/stat"
	if pid != 0 {
		path = fmt.Sprintf("/proc/%d/stat", pid)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return 0
	}
	// The command name (field 2) may hold spaces: fields count from ")".
	i := strings.LastIndexByte(string(b), ')')
	if i < 0 {
		return 0
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 13 {
		return 0
	}
	var utime, stime int64
	fmt.Sscanf(f[11], "%d", &utime)
	fmt.Sscanf(f[12], "%d", &stime)
	return time.Duration(utime+stime) * 10 * time.Millisecond
}

// rssBytes returns the resident set size of process pid (0 = this one)
// from /proc; 0 when it cannot be read.
func rssBytes(pid int) int64 {
	path := "/proc/self/status"
	if pid != 0 {
		path = fmt.Sprintf("/proc/%d/status", pid)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return 0
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			var kb int64
			fmt.Sscanf(strings.TrimSpace(rest), "%d", &kb)
			return kb << 10
		}
	}
	return 0
}
