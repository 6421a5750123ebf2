// Package zktest runs a real, single-node ZooKeeper server for tests, from
// the Debian package `zookeeper` (apt-get install zookeeper).
//
//	func TestSomething(t *testing.T) {
//		srv := zktest.NewServer(t) // skips the test when ZooKeeper is not installed
//		b, err := zookeeper.Open(ctx, zookeeper.Config{Servers: srv.Servers(), TTL: time.Second})
//		...
//		srv.Stop(t)  // the store goes away (data kept)
//		srv.Start(t) // and comes back on the same port
//	}
//
// The server listens on a free loopback port, keeps its data in a
// temporary directory, runs with a 100 ms tick so that session timeouts
// from 200 ms to 60 s are allowed, checks for empty container znodes every
// 100 ms, and has its admin server disabled.
package zktest

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// Where Debian's zookeeper package installs the server. The jar's manifest
// names its dependencies (netty, slf4j, jute, ...) by absolute path, so the
// classpath needs only the conf dir and the jar.
const (
	Jar     = "/usr/share/java/zookeeper.jar"
	ConfDir = "/etc/zookeeper/conf"
	mainCls = "org.apache.zookeeper.server.quorum.QuorumPeerMain"

	slf4jSimple = "/usr/share/java/slf4j-simple.jar"
)

// Timing of the test server. MinSessionTimeout is 2 ticks, ZooKeeper's
// floor.
const (
	TickTime          = 100 * time.Millisecond
	MinSessionTimeout = 2 * TickTime
	MaxSessionTimeout = 60 * time.Second
	startTimeout      = 60 * time.Second
)

// Available reports whether a ZooKeeper server can be started here: nil,
// or an error that says what is missing and how to install it.
func Available() error {
	if _, err := exec.LookPath("java"); err != nil {
		return errors.New("java not found in PATH; install ZooKeeper with `apt-get install zookeeper`")
	}
	if _, err := os.Stat(Jar); err != nil {
		return fmt.Errorf("%s not found; install ZooKeeper with `apt-get install zookeeper`", Jar)
	}
	return nil
}

// Server is one ZooKeeper server process. Its methods are safe for
// concurrent use.
type Server struct {
	dir  string // holds zoo.cfg, data/ and server.log
	port int

	mu   sync.Mutex
	proc *exec.Cmd
	exit chan struct{} // closed when proc has exited
}

// NewServer starts a ZooKeeper server for tb and stops it in tb.Cleanup.
// When ZooKeeper is not installed it skips tb, or fails it when the
// environment variable CI is "true".
func NewServer(tb testing.TB) *Server {
	tb.Helper()
	SkipIfUnavailable(tb)
	s, err := Start(tb.TempDir())
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(s.Close)
	return s
}

// SkipIfUnavailable skips tb when ZooKeeper is not installed, or fails it
// when running under CI (CI=true), where it must be.
func SkipIfUnavailable(tb testing.TB) {
	tb.Helper()
	if err := Available(); err != nil {
		if os.Getenv("CI") == "true" {
			tb.Fatalf("zktest: %v (required under CI)", err)
		}
		tb.Skipf("zktest: %v", err)
	}
}

// Start starts a ZooKeeper server with its files in dir (which must exist)
// and blocks until it answers. The caller must call Close.
func Start(dir string) (*Server, error) {
	if err := Available(); err != nil {
		return nil, err
	}
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	s := &Server{dir: dir, port: port}
	cfg := fmt.Sprintf(`tickTime=%d
initLimit=10
syncLimit=5
dataDir=%s
clientPort=%d
clientPortAddress=127.0.0.1
minSessionTimeout=%d
maxSessionTimeout=%d
maxClientCnxns=0
admin.enableServer=false
4lw.commands.whitelist=ruok,srvr,stat,cons,dump
`, TickTime.Milliseconds(), filepath.Join(dir, "data"), port, MinSessionTimeout.Milliseconds(), MaxSessionTimeout.Milliseconds())
	if err := os.WriteFile(filepath.Join(dir, "zoo.cfg"), []byte(cfg), 0o644); err != nil {
		return nil, fmt.Errorf("zktest: %w", err)
	}
	if err := s.start(); err != nil {
		return nil, err
	}
	return s, nil
}

// Addr is the server's client address, 127.0.0.1:port.
func (s *Server) Addr() string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(s.port)) }

// Servers is the server list for a client: []string{Addr()}.
func (s *Server) Servers() []string { return []string{s.Addr()} }

// Stop kills the server process (its data stays) and waits for it to exit.
// Stopping a stopped server does nothing.
func (s *Server) Stop(tb testing.TB) {
	tb.Helper()
	s.kill()
}

// Start starts a stopped server again on the same port with the same data
// and blocks until it answers. Starting a running server does nothing.
func (s *Server) Start(tb testing.TB) {
	tb.Helper()
	if err := s.start(); err != nil {
		tb.Fatal(err)
	}
}

// Close kills the server process and waits for it to exit. It is
// idempotent.
func (s *Server) Close() { s.kill() }

func (s *Server) start() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.proc != nil {
		return nil
	}
	logPath := filepath.Join(s.dir, "server.log")
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return fmt.Errorf("zktest: %w", err)
	}
	defer logf.Close() // the child has its own copy
	cp := []string{ConfDir, Jar}
	if _, err := os.Stat(slf4jSimple); err == nil {
		cp = append(cp, slf4jSimple) // server logs in server.log, else slf4j drops them
	}
	cmd := exec.Command("java",
		"-Xmx256m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
		"-Dzookeeper.admin.enableServer=false",
		"-Dznode.container.checkIntervalMs=100", // empty containers go quickly
		"-cp", strings.Join(cp, string(os.PathListSeparator)),
		mainCls, filepath.Join(s.dir, "zoo.cfg"))
	cmd.Stdout, cmd.Stderr = logf, logf
	setDeathSignal(cmd)
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("zktest: start java: %w", err)
	}
	exit := make(chan struct{})
	go func() { // owned: ends when the process exits, which kill forces
		cmd.Wait()
		close(exit)
	}()
	s.proc, s.exit = cmd, exit

	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	if err := s.waitReady(ctx, exit); err != nil {
		s.killLocked()
		return fmt.Errorf("zktest: ZooKeeper on %s: %w\n%s", s.Addr(), err, tail(logPath))
	}
	return nil
}

// waitReady polls the server with the "ruok" command until it answers
// "imok", the process exits, or ctx ends.
func (s *Server) waitReady(ctx context.Context, exit <-chan struct{}) error {
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		if s.ruok() {
			return nil
		}
		select {
		case <-exit:
			return errors.New("server process exited during startup")
		case <-ctx.Done():
			return fmt.Errorf("not ready within %v", startTimeout)
		case <-tick.C:
		}
	}
}

// HasSession reports whether the server still knows the session id: it
// is open, or it expired but its ephemeral znodes are not all deleted yet.
// Once it returns false, everything the session's expiry removes is gone.
// It asks with the "dump" four-letter command, so it must not be used
// while the server is stopped.
func (s *Server) HasSession(id int64) (bool, error) {
	out, err := s.fourLetter("dump")
	if err != nil {
		return false, err
	}
	if !strings.Contains(out, "SessionTracker dump") {
		return false, fmt.Errorf("zktest: unexpected dump output %q", out)
	}
	want := fmt.Sprintf("%#x", id)
	for _, f := range strings.Fields(out) {
		if strings.TrimSuffix(f, ":") == want {
			return true, nil
		}
	}
	return false, nil
}

// fourLetter sends one of ZooKeeper's four-letter commands and returns the
// answer.
func (s *Server) fourLetter(cmd string) (string, error) {
	c, err := net.DialTimeout("tcp", s.Addr(), 5*time.Second)
	if err != nil {
		return "", fmt.Errorf("zktest: %s: %w", cmd, err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write([]byte(cmd)); err != nil {
		return "", fmt.Errorf("zktest: %s: %w", cmd, err)
	}
	out, err := io.ReadAll(io.LimitReader(c, 1<<20))
	if err != nil {
		return "", fmt.Errorf("zktest: %s: %w", cmd, err)
	}
	return string(out), nil
}

func (s *Server) ruok() bool {
	c, err := net.DialTimeout("tcp", s.Addr(), time.Second)
	if err != nil {
		return false
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := c.Write([]byte("ruok")); err != nil {
		return false
	}
	line, _ := bufio.NewReader(c).ReadString('\n')
	return strings.HasPrefix(line, "imok")
}

func (s *Server) kill() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.killLocked()
}

func (s *Server) killLocked() {
	if s.proc == nil {
		return
	}
	s.proc.Process.Kill()
	<-s.exit
	s.proc, s.exit = nil, nil
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("zktest: find a free port: %w", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// tail returns the last lines of the server log, for error messages.
func tail(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	lines := bytes.Split(bytes.TrimSpace(b), []byte("\n"))
	if len(lines) > 30 {
		lines = lines[len(lines)-30:]
	}
	return string(bytes.Join(lines, []byte("\n")))
}
