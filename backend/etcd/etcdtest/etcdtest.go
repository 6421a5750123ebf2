// Package etcdtest starts real etcd servers inside a test process: one
// server, or a cluster whose members can be stopped and restarted.
//
//	func TestX(t *testing.T) {
//		srv := etcdtest.NewServer(t) // closed by t.Cleanup
//		b, err := etcd.Open(ctx, etcd.Config{Endpoints: srv.Endpoints(), TTL: time.Second})
//		...
//	}
//
// Servers listen on free 127.0.0.1 ports and keep their data in
// tb.TempDir().
package etcdtest

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/goleak"
	"go.uber.org/zap"

	"github.com/flynn/discoverd/backend/etcd/embedded"
)

// startTimeout bounds the start of a server or cluster (a loaded CI
// machine running -race is slow; a healthy start takes well under 1 s).
const startTimeout = 60 * time.Second

// NewServer starts a single-member etcd server and registers its Close
// with tb.Cleanup. It fails tb if the server cannot start.
func NewServer(tb testing.TB) *embedded.Server {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	srv, err := embedded.Start(ctx, embedded.Config{Dir: tb.TempDir()})
	if err != nil {
		tb.Fatalf("etcdtest: %v", err)
	}
	tb.Cleanup(func() { srv.Close() })
	return srv
}

// NewTLSServer starts a single-member etcd server that serves clients
// over TLS (https endpoints) with the given files, like NewServer.
func NewTLSServer(tb testing.TB, files embedded.TLS) *embedded.Server {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	srv, err := embedded.Start(ctx, embedded.Config{Dir: tb.TempDir(), ClientTLS: &files})
	if err != nil {
		tb.Fatalf("etcdtest: %v", err)
	}
	tb.Cleanup(func() { srv.Close() })
	return srv
}

// Cluster is an etcd cluster of embedded members on 127.0.0.1. Its
// methods are safe for concurrent use.
type Cluster struct {
	members []*Member
}

// Member is one member of a Cluster. Stop and Restart keep its name,
// addresses and data directory, as a real member's process restart would.
type Member struct {
	cfg embedded.Config

	mu  sync.Mutex
	srv *embedded.Server // nil while stopped
}

// NewCluster starts an n-member cluster and blocks until every member
// serves; tb.Cleanup stops it. It fails tb if the cluster cannot start.
func NewCluster(tb testing.TB, n int) *Cluster {
	tb.Helper()
	if n < 1 {
		tb.Fatalf("etcdtest: cluster of %d members", n)
	}
	c := &Cluster{}
	var peers []string
	for i := range n {
		clientAddr, peerAddr := freeAddr(tb), freeAddr(tb)
		cfg := embedded.Config{
			Dir:        tb.TempDir(),
			ClientAddr: clientAddr,
			PeerAddr:   peerAddr,
			Name:       fmt.Sprintf("m%d", i),
		}
		c.members = append(c.members, &Member{cfg: cfg})
		peers = append(peers, fmt.Sprintf("%s=http://%s", cfg.Name, peerAddr))
	}
	for _, m := range c.members {
		m.cfg.InitialCluster = strings.Join(peers, ",")
	}
	tb.Cleanup(c.stop)

	// The members of a new cluster only become ready together (they need
	// a quorum), so start them all at once.
	errs := make(chan error, n)
	for _, m := range c.members {
		go func() { errs <- m.Restart() }()
	}
	var failed []error
	for range n {
		if err := <-errs; err != nil {
			failed = append(failed, err)
		}
	}
	if len(failed) > 0 {
		tb.Fatalf("etcdtest: starting a %d-member cluster: %v", n, errors.Join(failed...))
	}
	return c
}

// Endpoints returns the client URLs of every member, running or not.
func (c *Cluster) Endpoints() []string {
	var eps []string
	for _, m := range c.members {
		eps = append(eps, m.Endpoint())
	}
	return eps
}

// Member returns member i, 0 ≤ i < n.
func (c *Cluster) Member(i int) *Member { return c.members[i] }

// Leader returns the index of the member that is the raft leader in the
// view of the first running member that answers, or -1 if none knows of
// a leader. It blocks at most a few seconds.
func (c *Cluster) Leader() int {
	ids := make(map[uint64]int) // member ID -> index
	leader := uint64(0)
	for i, m := range c.members {
		if !m.Running() {
			continue
		}
		st, err := status(m.Endpoint())
		if err != nil {
			continue
		}
		ids[st.Header.MemberId] = i
		if leader == 0 {
			leader = st.Leader
		}
	}
	if i, ok := ids[leader]; ok && leader != 0 {
		return i
	}
	return -1
}

func (c *Cluster) stop() {
	var wg sync.WaitGroup
	for _, m := range c.members {
		wg.Go(m.Stop)
	}
	wg.Wait()
}

// Endpoint returns the member's client URL.
func (m *Member) Endpoint() string { return "http://" + m.cfg.ClientAddr }

// Running reports whether the member is started.
func (m *Member) Running() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.srv != nil
}

// Stop stops the member at once, as a crash would (it does not hand over
// raft leadership; its data on disk is intact), and waits for it to stop.
// Its clients are cut off. Stopping a stopped member does nothing.
func (m *Member) Stop() {
	m.mu.Lock()
	srv := m.srv
	m.srv = nil
	m.mu.Unlock()
	if srv != nil {
		srv.CloseNow()
	}
}

// Restart starts a stopped member again on its addresses and data, and
// blocks until it serves (for a member of a larger cluster: until it has
// rejoined, which needs a quorum of running members). Restarting a
// running member does nothing.
func (m *Member) Restart() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.srv != nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	srv, err := embedded.Start(ctx, m.cfg)
	if err != nil {
		return fmt.Errorf("etcdtest: member %s: %w", m.cfg.Name, err)
	}
	m.srv = srv
	return nil
}

// leakGrace is how long VerifyTestMain gives goroutines to end.
const leakGrace = 10 * time.Second

// VerifyTestMain runs the tests and then, like goleak.VerifyTestMain,
// fails the run if goroutines are left over; but it gives them up to 10 s
// to end. The peer connections of a stopped cluster member only end when
// etcd's raft transport read timeout (5 s) expires on the peer side,
// after the test is over. A goroutine that outlives the grace period is
// reported as a leak.
//
//	func TestMain(m *testing.M) { etcdtest.VerifyTestMain(m) }
func VerifyTestMain(m *testing.M, opts ...goleak.Option) {
	code := m.Run()
	if code == 0 {
		deadline := time.Now().Add(leakGrace)
		for {
			err := goleak.Find(opts...)
			if err == nil {
				break
			}
			if time.Now().After(deadline) {
				fmt.Fprintf(os.Stderr, "goleak: errors on successful test run: %v\n", err)
				code = 1
				break
			}
		}
	}
	os.Exit(code)
}

// freeAddr returns a 127.0.0.1 address whose port was free a moment ago.
func freeAddr(tb testing.TB) string {
	tb.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatalf("etcdtest: picking a free port: %v", err)
	}
	defer l.Close()
	return l.Addr().String()
}

func status(endpoint string) (*clientv3.StatusResponse, error) {
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:   []string{endpoint},
		DialTimeout: 2 * time.Second,
		Logger:      zap.NewNop(),
	})
	if err != nil {
		return nil, err
	}
	defer cli.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	return cli.Status(ctx, endpoint)
}
