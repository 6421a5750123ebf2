package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/flynn/discoverd/api"
	"github.com/flynn/discoverd/rpc"

	"github.com/flynn/discoverd/internal/testkit"
)

// The test binary runs as a real agent process when agentChildEnv is set:
// main() with the arguments given to startAgent, under the descriptor limit
// in agentNofileEnv (soft and hard), as `ulimit -n` would set it.
const (
	agentChildEnv  = "DISCOVERD_TEST_AGENT_CHILD"
	agentNofileEnv = "DISCOVERD_TEST_AGENT_NOFILE"
)

func runAgentChild() {
	if s := os.Getenv(agentNofileEnv); s != "" {
		n, err := strconv.ParseUint(s, 10, 64)
		if err == nil {
			err = syscall.Setrlimit(syscall.RLIMIT_NOFILE, &syscall.Rlimit{Cur: n, Max: n})
		}
		if err != nil {
			fmt.Fprintf(os.Stderr, "test child: setrlimit %q: %v\n", s, err)
			os.Exit(3)
		}
	}
	main()
}

// agentProc is an agent running as a child process.
type agentProc struct {
	t      *testing.T
	cmd    *exec.Cmd
	addr   string // its -bind
	stderr *testkit.SyncBuffer
	exited chan struct{} // closed once the process has exited
	code   int           // its exit status, valid once exited is closed
}

// startAgent starts the agent as a child process, on a free port, with
// nofile as its descriptor limit (0: inherited) and args added. It is
// killed at the end of the test if still running; its log is shown if the
// test failed.
func startAgent(t *testing.T, nofile int, args ...string) *agentProc {
	t.Helper()
	p := &agentProc{t: t, addr: freeAddr(t), stderr: new(testkit.SyncBuffer), exited: make(chan struct{})}
	p.cmd = exec.Command(os.Args[0], append([]string{"-bind", p.addr, "-dns", ""}, args...)...) // no shared DNS port
	p.cmd.Env = append(os.Environ(), agentChildEnv+"=1", "HOME="+t.TempDir(), "XDG_STATE_HOME=")
	if nofile > 0 {
		p.cmd.Env = append(p.cmd.Env, agentNofileEnv+"="+strconv.Itoa(nofile))
	}
	p.cmd.Stdout = p.stderr
	p.cmd.Stderr = p.stderr
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { // ends when the process does; the cleanup below makes sure it does
		p.cmd.Wait()
		p.code = p.cmd.ProcessState.ExitCode()
		close(p.exited)
	}()
	t.Cleanup(func() {
		p.cmd.Process.Kill()
		<-p.exited
		if t.Failed() {
			t.Logf("agent %s log:\n%s", p.addr, p.stderr.String())
		}
	})
	return p
}

// embeddedArgs are the flags of an agent with its own embedded etcd on
// free ports in dir.
func embeddedArgs(dir string) []string {
	return []string{"-data-dir", dir, "-etcd-client-addr", "", "-etcd-peer-addr", ""}
}

// wait waits for the process to exit and returns its status.
func (p *agentProc) wait(timeout time.Duration) int {
	p.t.Helper()
	select {
	case <-p.exited:
		return p.code
	case <-time.After(timeout):
		p.t.Fatalf("agent still running after %v", timeout)
		panic("unreachable")
	}
}

func (p *agentProc) running() bool {
	select {
	case <-p.exited:
		return false
	default:
		return true
	}
}

func (p *agentProc) signal(sig os.Signal) {
	p.t.Helper()
	if err := p.cmd.Process.Signal(sig); err != nil {
		p.t.Fatal(err)
	}
}

// health does GET /health on a new connection and returns the status and
// the "status" field of the body (0 and "" when there is no answer).
func (p *agentProc) health() (int, string) {
	c := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := c.Get("http://" + p.addr + "/health")
	if err != nil {
		return 0, ""
	}
	defer resp.Body.Close()
	var body struct{ Status string }
	_ = json.NewDecoder(resp.Body).Decode(&body)
	return resp.StatusCode, body.Status
}

// waitHealth polls /health until it answers status, for up to timeout;
// it fails the test if the process exits meanwhile.
func (p *agentProc) waitHealth(status int, timeout time.Duration) {
	p.t.Helper()
	deadline := time.After(timeout)
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		if got, _ := p.health(); got == status {
			return
		}
		select {
		case <-deadline:
			p.t.Fatalf("/health did not answer %d within %v", status, timeout)
		case <-p.exited:
			p.t.Fatalf("agent exited with status %d while waiting for /health %d", p.code, status)
		case <-tick.C:
		}
	}
}

// TestAgentSurvivesDescriptorExhaustion drives a real agent process, with
// `ulimit -n 256`, past its descriptor limit with idle upgraded RPC
// connections and HTTP requests whose body stalls. The agent refuses the
// excess with a reason, keeps serving the clients it had (registrations,
// a subscription, store writes), never exits, and frees the attackers'
// slots once their idle and body timeouts pass.
func TestAgentSurvivesDescriptorExhaustion(t *testing.T) {
	const nofile = 256
	p := startAgent(t, nofile, append(embeddedArgs(t.TempDir()),
		"-rpc-idle-timeout", "3s", "-http-body-timeout", "2s", "-ttl", "1m")...)
	p.waitHealth(http.StatusOK, 3*waitTimeout)
	ctx, cancel := context.WithTimeout(context.Background(), 6*waitTimeout)
	defer cancel()

	owner, err := rpc.Dial(ctx, p.addr, rpc.Gob)
	if err != nil {
		t.Fatal(err)
	}
	defer owner.Close()
	register := func(addr string) error {
		var got string
		return owner.Call(ctx, api.MethodRegister, &api.Args{Name: "web", Addr: addr}, &got)
	}
	if err := register("10.0.0.1:80"); err != nil {
		t.Fatal(err)
	}
	watcher, err := rpc.Dial(ctx, p.addr, rpc.Gob)
	if err != nil {
		t.Fatal(err)
	}
	defer watcher.Close()
	updates := make(chan *api.ServiceUpdate, 16)
	sc, err := watcher.Stream(ctx, api.MethodSubscribe, &api.Args{Name: "web"}, updates)
	if err != nil {
		t.Fatal(err)
	}
	defer sc.Close()
	next := func(what string) *api.ServiceUpdate {
		t.Helper()
		select {
		case u, ok := <-updates:
			if !ok {
				t.Fatalf("%s: stream ended: %v", what, sc.Err())
			}
			return u
		case <-ctx.Done():
			t.Fatalf("%s: no update", what)
		}
		panic("unreachable")
	}
	for u := next("snapshot"); !u.IsSentinel(); u = next("sentinel") {
	}

	// The attack: more connections than the process has descriptors,
	// alternately an upgraded RPC connection left idle and a PUT whose
	// body stalls after one byte.
	var upgraded, stalled, refused, unanswered int
	var attackers []net.Conn
	defer func() {
		for _, c := range attackers {
			c.Close()
		}
	}()
	for i := range nofile + 64 {
		c, err := net.DialTimeout("tcp", p.addr, waitTimeout)
		if err != nil {
			t.Fatalf("dial %d: %v", i, err)
		}
		attackers = append(attackers, c)
		if i%2 == 0 {
			io.WriteString(c, "CONNECT "+rpc.DefaultPath+" HTTP/1.0\r\n\r\n")
			c.SetReadDeadline(time.Now().Add(waitTimeout))
			line, err := bufio.NewReader(c).ReadString('\n')
			switch {
			case strings.HasPrefix(line, "HTTP/1.0 200"):
				upgraded++
			case strings.HasPrefix(line, "HTTP/1.0 503 unavailable: the agent is at its limit"):
				refused++
			case err != nil:
				unanswered++
			default:
				t.Fatalf("CONNECT %d answered %q", i, line)
			}
			continue
		}
		io.WriteString(c, "PUT /services/x/instances/10.1.0.1:80 HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
		stalled++
	}
	t.Logf("attack: %d upgraded and idle, %d stalled bodies, %d CONNECTs refused with a reason, %d closed unanswered",
		upgraded, stalled, refused, unanswered)
	if refused == 0 {
		t.Fatal("no connection refused with a reason")
	}

	// The agent still serves its clients, writes to its store, and fans
	// out the change.
	if err := register("10.0.0.2:80"); err != nil {
		t.Fatalf("register while saturated: %v", err)
	}
	if u := next("update while saturated"); u.Addr != "10.0.0.2:80" || !u.Online {
		t.Fatalf("update %+v, want 10.0.0.2:80 online", u)
	}
	if !p.running() {
		t.Fatalf("agent exited with status %d", p.code)
	}

	// Stalled bodies are cut after 2 s and idle connections closed after
	// 3 s, although the attackers keep their ends open: the agent answers
	// new clients again.
	p.waitHealth(http.StatusOK, 3*waitTimeout)
	if err := register("10.0.0.3:80"); err != nil {
		t.Fatalf("register after the attack: %v", err)
	}
	if u := next("update after the attack"); u.Addr != "10.0.0.3:80" {
		t.Fatalf("update %+v, want 10.0.0.3:80", u)
	}
	var refusedMetric float64
	if resp, err := http.Get("http://" + p.addr + "/metrics"); err == nil {
		sc := bufio.NewScanner(resp.Body)
		for sc.Scan() {
			if v, ok := strings.CutPrefix(sc.Text(), "discoverd_client_conns_refused_total "); ok {
				refusedMetric, _ = strconv.ParseFloat(v, 64)
			}
		}
		resp.Body.Close()
	}
	if refusedMetric < float64(refused) {
		t.Errorf("discoverd_client_conns_refused_total %v, want at least %d", refusedMetric, refused)
	}
	if log := p.stderr.String(); strings.Contains(log, "too many open files") {
		t.Errorf("the agent ran out of descriptors:\n%s", log)
	}
	p.signal(syscall.SIGTERM)
	if code := p.wait(3 * waitTimeout); code != 0 {
		t.Fatalf("exit status %d after SIGTERM, want 0", code)
	}
}

// TestSecondAgentOnLockedDataDir: a second agent on the data dir of a
// running one exits 1 well within -store-timeout with one line that names
// the first.
func TestSecondAgentOnLockedDataDir(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "etcd")
	first := startAgent(t, 0, embeddedArgs(dir)...)
	first.waitHealth(http.StatusOK, 3*waitTimeout)
	second := startAgent(t, 0, append(embeddedArgs(dir), "-store-timeout", "20s")...)
	if code := second.wait(3 * waitTimeout); code != 1 {
		t.Fatalf("second agent exit status %d, want 1", code)
	}
	last := lastLine(second.stderr.String())
	if !strings.HasPrefix(last, "discoverd: ") || !strings.Contains(last, "in use") ||
		!strings.Contains(last, "process "+strconv.Itoa(first.cmd.Process.Pid)) {
		t.Fatalf("last line %q, want the reason naming process %d", last, first.cmd.Process.Pid)
	}
	if code, _ := first.health(); code != http.StatusOK {
		t.Fatalf("first agent /health %d after the second failed", code)
	}
}

// TestSignalsDuringStartup: while the agent retries an unreachable store,
// /health answers 503 "starting" and RPC calls fail at once with
// unavailable; SIGINT or SIGTERM then stops it promptly, with status 0.
func TestSignalsDuringStartup(t *testing.T) {
	for _, sig := range []syscall.Signal{syscall.SIGINT, syscall.SIGTERM} {
		t.Run(sig.String(), func(t *testing.T) {
			p := startAgent(t, 0, "-etcd", "http://"+freeAddr(t), "-store-timeout", "10m")
			p.waitHealth(http.StatusServiceUnavailable, 3*waitTimeout)
			if code, status := p.health(); code != http.StatusServiceUnavailable || status != "starting" {
				t.Fatalf("/health while starting: %d %q, want 503 starting", code, status)
			}
			ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
			defer cancel()
			c, err := rpc.Dial(ctx, p.addr, rpc.Gob)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			var got string
			err = c.Call(ctx, api.MethodRegister, &api.Args{Name: "web", Addr: "10.0.0.1:80"}, &got)
			if err == nil || api.ErrorCode(api.ParseError(err.Error())) != api.CodeUnavailable {
				t.Fatalf("Register while starting: %v, want unavailable", err)
			}
			p.signal(sig)
			if code := p.wait(waitTimeout); code != 0 {
				t.Fatalf("exit status %d after %v during start-up, want 0", code, sig)
			}
		})
	}
}

// TestSignalDuringEmbeddedStart: a SIGTERM as soon as the port answers,
// usually while the embedded etcd is still starting, stops the agent
// promptly with status 0 (whichever step of the start it falls in).
func TestSignalDuringEmbeddedStart(t *testing.T) {
	p := startAgent(t, 0, embeddedArgs(t.TempDir())...)
	deadline := time.After(3 * waitTimeout)
	for {
		if code, _ := p.health(); code != 0 {
			t.Logf("/health answered %d before the signal", code)
			break
		}
		select {
		case <-deadline:
			t.Fatal("the port never answered")
		case <-p.exited:
			t.Fatalf("agent exited with status %d before the signal", p.code)
		case <-time.After(5 * time.Millisecond):
		}
	}
	p.signal(syscall.SIGTERM)
	if code := p.wait(waitTimeout); code != 0 {
		t.Fatalf("exit status %d after SIGTERM during the start, want 0", code)
	}
}
