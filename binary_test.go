package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/flynn/discoverd/internal/testkit"
)

// TestBinary runs the real discoverd binary, as an operator does.
func TestBinary(t *testing.T) {
	bin := filepath.Join(t.TempDir(), "discoverd")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	// run runs bin to completion with only env in its environment.
	run := func(t *testing.T, env []string, args ...string) (int, string, string) {
		t.Helper()
		cmd := exec.Command(bin, args...)
		cmd.Env = env
		var stdout, stderr bytes.Buffer
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		err := cmd.Run()
		var exit *exec.ExitError
		if err != nil && !errors.As(err, &exit) {
			t.Fatal(err)
		}
		return cmd.ProcessState.ExitCode(), stdout.String(), stderr.String()
	}

	t.Run("help on stdout", func(t *testing.T) {
		for _, arg := range []string{"help", "-h", "--help", "-help"} {
			code, out, stderr := run(t, nil, arg)
			if code != 0 || stderr != "" {
				t.Fatalf("%s: exit %d, stderr %q", arg, code, stderr)
			}
			for _, want := range []string{"discoverd services [-agent ADDR] [-json] [NAME]", "discoverd version",
				"DISCOVERD ", "EXTERNAL_IP", "DISCOVERD_<FLAG>", "-log-format format", "env DISCOVERD_LOG_FORMAT",
				`(default "10s", env DISCOVERD_TTL)`, "env DISCOVERD_ETCD_CLIENT_ADDR"} {
				if !strings.Contains(out, want) {
					t.Fatalf("%s: help lacks %q:\n%s", arg, want, out)
				}
			}
		}
		// A -h among agent flags prints the same.
		if code, out, _ := run(t, nil, "-ttl", "5s", "-h"); code != 0 || !strings.Contains(out, "DISCOVERD_<FLAG>") {
			t.Fatalf("-ttl 5s -h: exit %d, out %q", code, out)
		}
	})

	t.Run("version", func(t *testing.T) {
		re := regexp.MustCompile(`^discoverd \S+ \(revision \S+, go1\.[0-9.]+\S*\)\n$`)
		for _, arg := range []string{"version", "-version", "--version"} {
			if code, out, stderr := run(t, nil, arg); code != 0 || !re.MatchString(out) || stderr != "" {
				t.Fatalf("%s: exit %d, out %q, stderr %q", arg, code, out, stderr)
			}
		}
	})

	t.Run("bad variable", func(t *testing.T) {
		code, _, stderr := run(t, []string{"DISCOVERD_TTL=soon"})
		if code != 2 || !strings.Contains(stderr, `invalid value "soon" for DISCOVERD_TTL (flag -ttl)`) {
			t.Fatalf("exit %d, stderr %q", code, stderr)
		}
		code, _, stderr = run(t, []string{"DISCOVERD_LOG_FORMAT=xml"})
		if code != 2 || !strings.Contains(stderr, "DISCOVERD_LOG_FORMAT") {
			t.Fatalf("exit %d, stderr %q", code, stderr)
		}
	})

	t.Run("agent configured by the environment", func(t *testing.T) {
		addr, client, peer := freeAddr(t), freeAddr(t), freeAddr(t)
		agent := exec.Command(bin, "-ttl", "3s", "-dns", "") // the flag wins over DISCOVERD_TTL; no shared DNS port
		agent.Env = []string{
			"DISCOVERD_BIND=" + addr, "DISCOVERD_DATA_DIR=" + filepath.Join(t.TempDir(), "etcd"),
			"DISCOVERD_ETCD_CLIENT_ADDR=" + client, "DISCOVERD_ETCD_PEER_ADDR=" + peer,
			"DISCOVERD_LOG_FORMAT=json", "DISCOVERD_TTL=100ms", "DISCOVERD_LOG_LEVEL=debug",
		}
		logs := startProc(t, agent)
		var serving map[string]any
		logs.waitLine(t, func(l string) bool {
			serving = nil
			_ = json.Unmarshal([]byte(l), &serving)
			return serving["msg"] == "discoverd serving"
		})
		if serving["ttl"] != "3s" || serving["version"] == nil || serving["revision"] == nil || serving["addr"] != addr {
			t.Fatalf("start log %v: want ttl 3s (the flag's), the version and revision, addr %s", serving, addr)
		}

		env := []string{"DISCOVERD=tcp://" + addr}
		reg := exec.Command(bin, "register", "web", "127.0.0.1:9", "v=1")
		reg.Env = env
		regOut := startProc(t, reg)
		regOut.waitLine(t, func(l string) bool { return l == "registered web 127.0.0.1:9" })
		code, out, stderr := run(t, env, "services")
		if code != 0 || !regexp.MustCompile(`(?m)^web +1 +127\.0\.0\.1:9$`).MatchString(out) || stderr != "" {
			t.Fatalf("services: exit %d, out %q, stderr %q", code, out, stderr)
		}

		// The agent stops: the registration's withdrawal cannot be
		// confirmed, and register says so instead of "unregistered".
		if err := agent.Process.Signal(os.Interrupt); err != nil {
			t.Fatal(err)
		}
		if err := logs.wait(t); err != nil {
			t.Fatalf("agent exit: %v", err)
		}
		regOut.waitStderr(t, "discoverd register: lost the connection to the agent")
		if err := reg.Process.Signal(os.Interrupt); err != nil {
			t.Fatal(err)
		}
		var exit *exec.ExitError
		if err := regOut.wait(t); !errors.As(err, &exit) || exit.ExitCode() != 1 {
			t.Fatalf("register exit: %v, want 1", err)
		}
		if rest := regOut.rest(); len(rest) != 0 || !strings.Contains(regOut.stderr.String(), "not confirmed") {
			t.Fatalf("register printed %q, stderr %q", rest, regOut.stderr.String())
		}
		// Its stderr holds notice lines only, no log records.
		for _, l := range strings.Split(strings.TrimSpace(regOut.stderr.String()), "\n") {
			if !strings.HasPrefix(l, "discoverd register: ") {
				t.Errorf("register's stderr line %q is not a notice", l)
			}
		}

		// Every log line is JSON with one component and no prefix in its
		// message.
		prefixed := regexp.MustCompile(`^[a-z]+: `)
		for _, l := range logs.all() {
			var rec map[string]any
			if err := json.Unmarshal([]byte(l), &rec); err != nil {
				t.Fatalf("log line is not JSON: %q", l)
			}
			if n := strings.Count(l, `"component":`); n != 1 {
				t.Errorf("%d component keys: %s", n, l)
			}
			if msg, _ := rec["msg"].(string); prefixed.MatchString(msg) {
				t.Errorf("message with a prefix: %s", l)
			}
		}
	})
}

func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// proc is a started process whose output lines (stdout, or stderr when
// stdout is not read) arrive on lines.
type proc struct {
	cmd    *exec.Cmd
	lines  chan string
	seen   []string
	stderr *testkit.SyncBuffer
	done   chan error
}

// startProc starts cmd. A command whose Stdout is nil has its stdout
// read as lines and its stderr buffered, unless it is an agent (its logs
// on stderr are the lines): a command with args[1:] starting with "-" or
// none.
func startProc(t *testing.T, cmd *exec.Cmd) *proc {
	t.Helper()
	p := &proc{cmd: cmd, lines: make(chan string, 1000), stderr: new(testkit.SyncBuffer), done: make(chan error, 1)}
	var r io.Reader
	var err error
	if isAgent := len(cmd.Args) < 2 || strings.HasPrefix(cmd.Args[1], "-"); isAgent {
		r, err = cmd.StderrPipe()
	} else {
		cmd.Stderr = p.stderr
		r, err = cmd.StdoutPipe()
	}
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { // ends when the process has exited and its output is read
		sc := bufio.NewScanner(r)
		for sc.Scan() {
			p.lines <- sc.Text()
		}
		close(p.lines)
		p.done <- cmd.Wait()
	}()
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGKILL)
		for range p.lines {
		}
		<-p.done
		p.done <- nil
	})
	return p
}

// waitLine reads lines until ok accepts one.
func (p *proc) waitLine(t *testing.T, ok func(string) bool) {
	t.Helper()
	timer := time.NewTimer(3 * waitTimeout)
	defer timer.Stop()
	for {
		select {
		case l, open := <-p.lines:
			if !open {
				t.Fatalf("%v ended; output %q, stderr %q", p.cmd.Args, p.seen, p.stderr.String())
			}
			p.seen = append(p.seen, l)
			if ok(l) {
				return
			}
		case <-timer.C:
			t.Fatalf("%v: no such line within %v; output %q", p.cmd.Args, 3*waitTimeout, p.seen)
		}
	}
}

// waitStderr waits until the buffered stderr contains s.
func (p *proc) waitStderr(t *testing.T, s string) {
	t.Helper()
	timer := time.NewTimer(waitTimeout)
	defer timer.Stop()
	for !strings.Contains(p.stderr.String(), s) {
		select {
		case <-p.stderr.Wrote():
		case <-timer.C:
			t.Fatalf("%v: stderr %q lacks %q", p.cmd.Args, p.stderr.String(), s)
		}
	}
}

// wait reads the rest of the output and returns the exit status.
func (p *proc) wait(t *testing.T) error {
	t.Helper()
	timer := time.NewTimer(3 * waitTimeout)
	defer timer.Stop()
	for {
		select {
		case l, open := <-p.lines:
			if open {
				p.seen = append(p.seen, l)
				continue
			}
			err := <-p.done
			p.done <- err
			return err
		case <-timer.C:
			t.Fatalf("%v did not exit within %v", p.cmd.Args, 3*waitTimeout)
		}
	}
}

// all returns every line read; rest, those after the last waitLine.
func (p *proc) all() []string { return p.seen }

func (p *proc) rest() []string {
	for i := len(p.seen) - 1; i >= 0; i-- {
		if strings.HasPrefix(p.seen[i], "registered ") {
			return p.seen[i+1:]
		}
	}
	return p.seen
}
