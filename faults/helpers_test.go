package faults_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/gob"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/goleak"
	"go.uber.org/zap"

	"github.com/flynn/discoverd/agent"
	"github.com/flynn/discoverd/api"
	"github.com/flynn/discoverd/backend/etcd"
	discoverd "github.com/flynn/discoverd/client"
	"github.com/flynn/discoverd/rpc"
	"github.com/flynn/discoverd/server"
)

// Timing of the suite. ttl is the agents' registration TTL and their etcd
// lease TTL: 2 s is the smallest lease a 3-member embedded cluster grants
// (1.5 × its 1 s election timeout, rounded up). converge is the bound the
// scenarios promise for subscribers to reach the exact set once the store
// is back. wait bounds every other wait: reaching it is a failure, never a
// pass.
const (
	ttl      = 2 * time.Second
	converge = 5 * time.Second
	wait     = 30 * time.Second
)

func TestMain(m *testing.M) {
	code := m.Run()
	if code == 0 {
		// Every agent, server, etcd member, client and child process of
		// the suite is stopped by its test's cleanups. The raft peer
		// connections between etcd members that were stopped end only
		// when etcd's peer read timeout (5 s) expires on the other side,
		// so they get leakGrace to go.
		const leakGrace = 10 * time.Second
		deadline := time.Now().Add(leakGrace)
		for {
			err := goleak.Find()
			if err == nil {
				break
			}
			if time.Now().After(deadline) {
				fmt.Fprintf(os.Stderr, "faults: goroutines leaked (after %v): %v\n", leakGrace, err)
				code = 1
				break
			}
			time.Sleep(200 * time.Millisecond) // polling for goroutines to end; nothing to wait on
		}
	}
	if binDir != "" {
		os.RemoveAll(binDir)
	}
	os.Exit(code)
}

// The discoverd binary, built once on first use (fuzz workers never need
// it). TestMain removes it.
var (
	binOnce sync.Once
	binDir  string
	binPath string
	binErr  error
)

func discoverdBinary(tb testing.TB) string {
	tb.Helper()
	binOnce.Do(func() {
		if binDir, binErr = os.MkdirTemp("", "discoverd-faults-"); binErr != nil {
			return
		}
		binPath = filepath.Join(binDir, "discoverd")
		// The go command puts its own GOROOT/bin first in the PATH of the
		// test binary, so this is the toolchain running the tests.
		cmd := exec.Command("go", "build", "-o", binPath, "github.com/flynn/discoverd")
		if out, err := cmd.CombinedOutput(); err != nil {
			binErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if binErr != nil {
		tb.Fatalf("building the discoverd binary: %v", binErr)
	}
	return binPath
}

// logBuffer collects log lines (of in-process agents, or of a child
// process) so that tests can assert what an operator would see; a failed
// test prints it. It can signal the first line that contains a string.
type logBuffer struct {
	mu      sync.Mutex
	buf     bytes.Buffer
	waiters []logWaiter
}

type logWaiter struct {
	substr string
	from   int // offset in buf where the search starts
	ch     chan struct{}
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.buf.Write(p)
	kept := l.waiters[:0]
	for _, w := range l.waiters {
		if bytes.Contains(l.buf.Bytes()[w.from:], []byte(w.substr)) {
			close(w.ch)
		} else {
			kept = append(kept, w)
		}
	}
	l.waiters = kept
	return len(p), nil
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.String()
}

// count returns the number of lines that contain substr.
func (l *logBuffer) count(substr string) int {
	n := 0
	for line := range strings.Lines(l.String()) {
		if strings.Contains(line, substr) {
			n++
		}
	}
	return n
}

// mark returns the current end of the log, for waitFor.
func (l *logBuffer) mark() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Len()
}

// waitFor returns a channel closed once the log, from offset from on,
// contains substr.
func (l *logBuffer) waitFor(substr string, from int) <-chan struct{} {
	l.mu.Lock()
	defer l.mu.Unlock()
	ch := make(chan struct{})
	if bytes.Contains(l.buf.Bytes()[from:], []byte(substr)) {
		close(ch)
		return ch
	}
	l.waiters = append(l.waiters, logWaiter{substr: substr, from: from, ch: ch})
	return ch
}

// newLog returns a logger writing into a fresh logBuffer, printed (its
// last 64 KiB) if the test fails.
func newLog(tb testing.TB, name string) (*slog.Logger, *logBuffer) {
	lb := &logBuffer{}
	tb.Cleanup(func() {
		if tb.Failed() {
			s := lb.String()
			if len(s) > 64<<10 {
				s = "..." + s[len(s)-64<<10:]
			}
			tb.Logf("log of %s:\n%s", name, s)
		}
	})
	return slog.New(slog.NewTextHandler(lb, &slog.HandlerOptions{Level: slog.LevelInfo})), lb
}

// node is one in-process agent wired as main.go wires it: an etcd
// backend, the agent, its RPC/HTTP server, on a real TCP listener.
type node struct {
	Addr    string
	Backend *etcd.Backend
	Agent   *agent.Agent
	Server  *server.Server
	Log     *logBuffer

	http      *http.Server
	served    chan error
	closeOnce sync.Once
}

// startNode starts a node on the etcd endpoints; tb's cleanup closes it.
func startNode(tb testing.TB, endpoints []string, ttl time.Duration) *node {
	tb.Helper()
	logger, lb := newLog(tb, "node")
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	b, err := etcd.Open(ctx, etcd.Config{Endpoints: endpoints, TTL: ttl, Logger: logger})
	if err != nil {
		tb.Fatalf("etcd.Open: %v", err)
	}
	a, err := agent.New(agent.Config{Backend: b, TTL: ttl, Logger: logger.With("component", "agent")})
	if err != nil {
		b.Close()
		tb.Fatalf("agent.New: %v", err)
	}
	s, err := server.New(a, server.Options{Logger: logger.With("component", "server")})
	if err != nil {
		a.Close()
		b.Close()
		tb.Fatalf("server.New: %v", err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		s.Close()
		a.Close()
		b.Close()
		tb.Fatalf("listen: %v", err)
	}
	n := &node{
		Addr:    ln.Addr().String(),
		Backend: b,
		Agent:   a,
		Server:  s,
		Log:     lb,
		http: &http.Server{
			Handler:           s,
			ReadHeaderTimeout: 10 * time.Second,
			ErrorLog:          slog.NewLogLogger(logger.Handler(), slog.LevelWarn),
		},
		served: make(chan error, 1),
	}
	go func() { n.served <- n.http.Serve(ln) }() // ended by close
	tb.Cleanup(n.close)
	return n
}

// close stops the node in main.go's order: agent, front ends, HTTP
// server, backend (which revokes the lease).
func (n *node) close() {
	n.closeOnce.Do(func() {
		n.Agent.Close()
		n.Server.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		n.http.Shutdown(ctx)
		cancel()
		n.http.Close()
		<-n.served
		n.Backend.Close()
	})
}

// event is one live change seen by a watcher.
type event struct {
	Addr    string
	Online  bool
	Created uint
	At      time.Time
}

// watcher is a subscriber over a real RPC connection. Its goroutine drains
// the stream into the current set of online instances and a log of the
// live events (those after the snapshot).
type watcher struct {
	name    string
	client  *rpc.Client
	stream  *rpc.StreamCall
	changed chan struct{} // capacity 1: signalled after each update
	done    chan struct{} // closed when the stream has ended

	mu     sync.Mutex
	set    map[string]api.ServiceUpdate
	events []event
}

// newWatcher subscribes to name on the agent at addr and returns once the
// snapshot is complete. tb's cleanup closes it.
func newWatcher(tb testing.TB, addr, name string) *watcher {
	tb.Helper()
	c := mustDial(tb, addr, rpc.Gob)
	ch := make(chan *api.ServiceUpdate, 256)
	sc, err := c.Stream(context.Background(), api.MethodSubscribe, &api.Args{Name: name}, ch)
	if err != nil {
		tb.Fatalf("Subscribe %s: %v", name, err)
	}
	w := &watcher{
		name:    name,
		client:  c,
		stream:  sc,
		changed: make(chan struct{}, 1),
		done:    make(chan struct{}),
		set:     make(map[string]api.ServiceUpdate),
	}
	current := make(chan struct{})
	go w.run(ch, current)
	tb.Cleanup(w.close)
	select {
	case <-current:
	case <-w.done:
		tb.Fatalf("Subscribe %s ended before its snapshot: %v", name, sc.Err())
	case <-time.After(wait):
		tb.Fatalf("Subscribe %s: no snapshot within %v", name, wait)
	}
	return w
}

func (w *watcher) run(ch <-chan *api.ServiceUpdate, current chan struct{}) {
	defer close(w.done)
	live := false
	for u := range ch {
		w.mu.Lock()
		switch {
		case !live && u.IsSentinel():
			live = true
			close(current)
		case u.Online:
			w.set[u.Addr] = *u
		default:
			delete(w.set, u.Addr)
		}
		if live && !u.IsSentinel() {
			w.events = append(w.events, event{Addr: u.Addr, Online: u.Online, Created: u.Created, At: time.Now()})
		}
		w.mu.Unlock()
		select {
		case w.changed <- struct{}{}:
		default:
		}
	}
}

func (w *watcher) close() {
	w.stream.Close()
	w.client.Close()
	<-w.done
}

// current returns a copy of the set of online instances.
func (w *watcher) current() map[string]api.ServiceUpdate {
	w.mu.Lock()
	defer w.mu.Unlock()
	return maps.Clone(w.set)
}

// eventsSince returns the live events seen at or after t.
func (w *watcher) eventsSince(t time.Time) []event {
	w.mu.Lock()
	defer w.mu.Unlock()
	var out []event
	for _, e := range w.events {
		if !e.At.Before(t) {
			out = append(out, e)
		}
	}
	return out
}

// waitSet waits until the watcher's set of addresses is exactly want, and
// fails tb if it is not by deadline.
func (w *watcher) waitSet(tb testing.TB, want map[string]bool, deadline time.Time, what string) {
	tb.Helper()
	t := time.NewTimer(time.Until(deadline))
	defer t.Stop()
	for {
		got := w.current()
		if sameAddrs(got, want) {
			return
		}
		select {
		case <-w.changed:
		case <-w.done:
			tb.Fatalf("%s: the subscription to %s ended: %v", what, w.name, w.stream.Err())
		case <-t.C:
			tb.Fatalf("%s: subscriber's set of %s is not the expected one by the deadline:\n%s", what, w.name, diffAddrs(got, want))
		}
	}
}

func sameAddrs[V any](got map[string]V, want map[string]bool) bool {
	if len(got) != len(want) {
		return false
	}
	for a := range got {
		if !want[a] {
			return false
		}
	}
	return true
}

func diffAddrs[V any](got map[string]V, want map[string]bool) string {
	var missing, extra []string
	for a := range want {
		if _, ok := got[a]; !ok {
			missing = append(missing, a)
		}
	}
	for a := range got {
		if !want[a] {
			extra = append(extra, a)
		}
	}
	slices.Sort(missing)
	slices.Sort(extra)
	return fmt.Sprintf("  %d expected, %d present\n  missing %v\n  unexpected %v", len(want), len(got), missing, extra)
}

// stored is one registration as etcd holds it.
type stored struct {
	Created int64 // the fencing token (etcd.Decode)
	Lease   int64
	Attrs   map[string]string
}

// storeKeys reads the registrations of name straight from etcd (a
// linearizable read), by address.
func storeKeys(tb testing.TB, endpoints []string, name string) map[string]stored {
	tb.Helper()
	keys, err := readStore(endpoints, name)
	if err != nil {
		tb.Fatalf("reading the store: %v", err)
	}
	return keys
}

func readStore(endpoints []string, name string) (map[string]stored, error) {
	cli, err := clientv3.New(clientv3.Config{Endpoints: endpoints, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		return nil, err
	}
	defer cli.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	prefix := etcd.DefaultPrefix + name + "/"
	resp, err := cli.Get(ctx, prefix, clientv3.WithPrefix())
	if err != nil {
		return nil, err
	}
	out := make(map[string]stored, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		in, err := etcd.Decode(prefix, name, kv)
		if err != nil {
			return nil, err
		}
		out[strings.TrimPrefix(string(kv.Key), prefix)] = stored{Created: int64(in.Created), Lease: kv.Lease, Attrs: in.Attrs}
	}
	return out, nil
}

// waitStore waits until ok accepts the registrations of name in the store,
// and fails tb if it does not by deadline. It polls: the store has no
// notification the test could wait on without going through the code
// under test.
func waitStore(tb testing.TB, endpoints []string, name string, deadline time.Time, what string, ok func(map[string]stored) string) map[string]stored {
	tb.Helper()
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	timeout := time.NewTimer(time.Until(deadline))
	defer timeout.Stop()
	var last string
	for {
		keys, err := readStore(endpoints, name)
		if err == nil {
			if last = ok(keys); last == "" {
				return keys
			}
		} else {
			last = err.Error()
		}
		select {
		case <-tick.C:
		case <-timeout.C:
			tb.Fatalf("%s: the store is not as expected by the deadline: %s", what, last)
		}
	}
}

// exactly returns a check for waitStore: the stored addresses are want.
func exactly(want map[string]bool) func(map[string]stored) string {
	return func(keys map[string]stored) string {
		if sameAddrs(keys, want) {
			return ""
		}
		return "\n" + diffAddrs(keys, want)
	}
}

// mustDial opens an RPC connection to addr; tb's cleanup closes it.
func mustDial(tb testing.TB, addr string, codec rpc.Codec) *rpc.Client {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	c, err := rpc.Dial(ctx, addr, codec)
	if err != nil {
		tb.Fatalf("rpc.Dial %s: %v", addr, err)
	}
	tb.Cleanup(func() { c.Close() })
	return c
}

// call makes one RPC call bounded by wait.
func call(c *rpc.Client, method string, args, reply any) error {
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	return c.Call(ctx, method, args, reply)
}

// mustCall makes one RPC call that must succeed.
func mustCall(tb testing.TB, c *rpc.Client, method string, args, reply any) {
	tb.Helper()
	if err := call(c, method, args, reply); err != nil {
		tb.Fatalf("%s(%+v): %v", method, args, err)
	}
}

// newClient returns a Go client library Client of the agent at addr,
// heartbeating every hb and reconnecting quickly; tb's cleanup closes it.
func newClient(tb testing.TB, addr string, hb time.Duration, logger *slog.Logger) *discoverd.Client {
	tb.Helper()
	c, err := discoverd.NewClientWithConfig(discoverd.Config{
		Addr:              addr,
		HeartbeatInterval: hb,
		DialTimeout:       5 * time.Second,
		CallTimeout:       20 * time.Second, // longer than an etcd election
		MinBackoff:        20 * time.Millisecond,
		MaxBackoff:        200 * time.Millisecond,
		Logger:            logger,
	})
	if err != nil {
		tb.Fatalf("client of %s: %v", addr, err)
	}
	tb.Cleanup(func() { c.Close() })
	return c
}

// registerRetry registers name/addr through c, retrying what an
// application would retry (the store unavailable, the client
// reconnecting) until it succeeds or deadline passes.
func registerRetry(c *discoverd.Client, name, addr string, attrs map[string]string, deadline time.Time) error {
	for {
		err := c.RegisterWithAttributes(name, addr, attrs)
		if err == nil {
			return nil
		}
		switch api.ErrorCode(err) {
		case api.CodeInvalidArgument, api.CodeResourceExhausted:
			return err
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("register %s %s: still failing at the deadline: %w", name, addr, err)
		}
		time.Sleep(100 * time.Millisecond) // the application's retry backoff, not a synchronisation
	}
}

// freeAddr returns a 127.0.0.1 address whose port was free a moment ago.
func freeAddr(tb testing.TB) string {
	tb.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatalf("listen: %v", err)
	}
	defer l.Close()
	return l.Addr().String()
}

// proc is a discoverd agent running as a child process.
type proc struct {
	cmd  *exec.Cmd
	Log  *logBuffer
	done chan struct{} // closed when the process has exited and its output is read
	err  error         // Wait's result, set before done is closed
}

// startProc runs the discoverd binary with args and waits until it logs
// that it serves. tb's cleanup stops it (SIGTERM, then SIGKILL).
func startProc(tb testing.TB, lb *logBuffer, args ...string) *proc {
	tb.Helper()
	args = append([]string{"-dns", ""}, args...) // agents of one test cannot share -dns's default port
	p := &proc{cmd: exec.Command(discoverdBinary(tb), args...), Log: lb, done: make(chan struct{})}
	p.cmd.Stdout, p.cmd.Stderr = lb, lb
	p.cmd.SysProcAttr = childAttr()
	from := lb.mark()
	if err := p.cmd.Start(); err != nil {
		tb.Fatalf("starting discoverd: %v", err)
	}
	go func() { p.err = p.cmd.Wait(); close(p.done) }() // ends with the process
	tb.Cleanup(p.stop)
	select {
	case <-lb.waitFor(`msg="discoverd serving"`, from):
	case <-p.done:
		tb.Fatalf("discoverd %v exited before serving: %v", args, p.err)
	case <-time.After(wait):
		tb.Fatalf("discoverd %v: not serving within %v", args, wait)
	}
	return p
}

// kill sends SIGKILL and waits for the process to be gone.
func (p *proc) kill(tb testing.TB) {
	tb.Helper()
	if err := p.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		tb.Fatalf("SIGKILL: %v", err)
	}
	select {
	case <-p.done:
	case <-time.After(wait):
		tb.Fatalf("discoverd still running %v after SIGKILL", wait)
	}
}

// stop ends the process: SIGTERM, then SIGKILL if it has not exited
// within 10 s. It is idempotent.
func (p *proc) stop() {
	select {
	case <-p.done:
		return
	default:
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		p.cmd.Process.Kill()
		<-p.done
	}
}

// metric returns the value of the Prometheus series (name with its
// labels, exactly as exposed, e.g. `x{a="b"}`) from the agent's /metrics,
// or 0 when absent.
func metric(tb testing.TB, addr, series string) float64 {
	tb.Helper()
	v, err := metricValue(addr, series)
	if err != nil {
		tb.Fatal(err)
	}
	return v
}

func metricValue(addr, series string) (float64, error) {
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		return 0, fmt.Errorf("GET /metrics: %w", err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if rest, ok := strings.CutPrefix(line, series+" "); ok {
			v, err := strconv.ParseFloat(strings.TrimSpace(rest), 64)
			if err != nil {
				return 0, fmt.Errorf("metric %s: %w", line, err)
			}
			return v, nil
		}
	}
	if err := sc.Err(); err != nil {
		return 0, fmt.Errorf("reading /metrics: %w", err)
	}
	return 0, nil
}

// health returns the status code of GET /health.
func health(tb testing.TB, addr string) int {
	tb.Helper()
	code, err := healthCode(addr)
	if err != nil {
		tb.Fatal(err)
	}
	return code
}

func healthCode(addr string) (int, error) {
	resp, err := http.Get("http://" + addr + "/health")
	if err != nil {
		return 0, fmt.Errorf("GET /health: %w", err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode, nil
}

// Raw RPC: the gob wire format of DESIGN §4, written by hand so that
// tests can send what no well-behaved client sends.

type reqHeader struct {
	ServiceMethod string
	Seq           uint64
}

type respHeader struct {
	ServiceMethod string
	Seq           uint64
	Error         string
}

// rawConn is an upgraded connection spoken to with gob by hand.
type rawConn struct {
	net.Conn
	br  *bufio.Reader
	enc *gob.Encoder
	dec *gob.Decoder
}

// dialRaw opens a TCP connection to addr and performs the CONNECT
// upgrade for gob. tb's cleanup closes it.
func dialRaw(tb testing.TB, addr string) *rawConn {
	tb.Helper()
	conn, err := net.DialTimeout("tcp", addr, wait)
	if err != nil {
		tb.Fatalf("dial %s: %v", addr, err)
	}
	tb.Cleanup(func() { conn.Close() })
	return upgradeRaw(tb, conn)
}

func upgradeRaw(tb testing.TB, conn net.Conn) *rawConn {
	tb.Helper()
	br, err := upgrade(conn, "application/vnd.flynn.rpc-hijack+gob")
	if err != nil {
		tb.Fatalf("upgrade: %v", err)
	}
	return &rawConn{Conn: conn, br: br, enc: gob.NewEncoder(conn), dec: gob.NewDecoder(br)}
}

// upgrade writes the CONNECT request and reads the answer.
func upgrade(conn net.Conn, accept string) (*bufio.Reader, error) {
	conn.SetDeadline(time.Now().Add(wait))
	defer conn.SetDeadline(time.Time{})
	if _, err := io.WriteString(conn, "CONNECT "+rpc.DefaultPath+" HTTP/1.0\r\nAccept: "+accept+"\r\n\r\n"); err != nil {
		return nil, err
	}
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodConnect})
	if err != nil {
		return nil, err
	}
	if resp.Status != "200 Connected to Go RPC" {
		return nil, fmt.Errorf("upgrade answered %q", resp.Status)
	}
	return br, nil
}

// send writes one request: its header, then body.
func (c *rawConn) send(method string, seq uint64, body any) error {
	if err := c.enc.Encode(reqHeader{ServiceMethod: method, Seq: seq}); err != nil {
		return err
	}
	return c.enc.Encode(body)
}

// recv reads one reply header and decodes its body into body (nil
// discards it). It gives up after wait.
func (c *rawConn) recv(body any) (respHeader, error) {
	c.SetReadDeadline(time.Now().Add(wait))
	defer c.SetReadDeadline(time.Time{})
	var h respHeader
	if err := c.dec.Decode(&h); err != nil {
		return h, err
	}
	if h.Error != "" || body == nil {
		return h, c.dec.DecodeValue(reflect.Value{}) // discard
	}
	return h, c.dec.Decode(body)
}

// waitClosed reads from c until the server closes it (EOF or reset), and
// fails tb if that does not happen within wait.
func waitClosed(tb testing.TB, c net.Conn) {
	tb.Helper()
	c.SetReadDeadline(time.Now().Add(wait))
	_, err := io.Copy(io.Discard, c)
	if ne, ok := err.(net.Error); ok && ne.Timeout() {
		tb.Fatalf("the server did not close the connection within %v", wait)
	}
}
