// Package agenttest runs a real discoverd agent for the tests and examples
// of the client module.
//
// The client module depends on nothing of the server, so it cannot start
// an agent in process. Instead Main builds the agent from the repository
// that holds the module (the directory above it whose go.mod is
// github.com/flynn/discoverd), runs it as a child process with an embedded
// etcd in a temporary directory on free loopback ports, and points
// DISCOVERD at it. Outside such a checkout (the module read from the
// module cache) the package's tests are skipped, unless CI is set, when
// that is a failure.
package agenttest

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"
)

// startTimeout bounds building and starting the agent.
const startTimeout = 3 * time.Minute

// Main runs m against a fresh agent, with DISCOVERD set to its address,
// stops the agent, checks that no goroutine outlives the tests (goleak)
// and returns the exit code for os.Exit.
func Main(m *testing.M) int {
	root, err := repoRoot()
	if err != nil {
		if os.Getenv("CI") != "" {
			fmt.Fprintln(os.Stderr, "agenttest:", err)
			return 1
		}
		fmt.Fprintln(os.Stderr, "agenttest: skipping the tests that need an agent:", err)
		return 0
	}
	a, err := start(root)
	if err != nil {
		fmt.Fprintln(os.Stderr, "agenttest:", err)
		return 1
	}
	os.Setenv("DISCOVERD", a.addr)
	code := m.Run()
	os.Unsetenv("DISCOVERD")
	if err := a.close(); err != nil && code == 0 {
		fmt.Fprintln(os.Stderr, "agenttest: stop the agent:", err)
		code = 1
	}
	if code == 0 {
		if err := goleak.Find(); err != nil {
			fmt.Fprintln(os.Stderr, "goleak:", err)
			code = 1
		}
	}
	return code
}

// repoRoot finds the checkout of github.com/flynn/discoverd above the
// working directory (a test runs in its package's directory).
func repoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		mod, err := os.ReadFile(filepath.Join(dir, "go.mod"))
		if err == nil && bytes.HasPrefix(mod, []byte("module github.com/flynn/discoverd\n")) {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("no checkout of github.com/flynn/discoverd above the working directory")
		}
		dir = parent
	}
}

type agent struct {
	dir  string // build output and the embedded etcd's data
	cmd  *exec.Cmd
	addr string
	done chan error // the process's exit
}

// start builds the agent from root and runs it until it logs the address
// it serves on.
func start(root string) (_ *agent, err error) {
	dir, err := os.MkdirTemp("", "discoverd-agenttest")
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			os.RemoveAll(dir)
		}
	}()
	bin := filepath.Join(dir, "discoverd")
	build := exec.Command("go", "build", "-o", bin, ".")
	build.Dir = root
	if out, err := build.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("build the agent: %v\n%s", err, out)
	}
	// Free ports for everything: the client packages' tests run at once,
	// each with its own agent (the embedded etcd's defaults, 2379 and
	// 2380, made one of them fail to start).
	cmd := exec.Command(bin, "-bind", "127.0.0.1:0", "-dns", "", "-etcd-client-addr", "", "-etcd-peer-addr", "",
		"-data-dir", filepath.Join(dir, "data"),
		"-ttl", "2s", "-log-level", "info")
	stderr, err := cmd.StderrPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start the agent: %w", err)
	}
	done := make(chan error, 1)
	serving := make(chan string, 1)
	go func() {
		// Read the log until the agent serves, then drain it.
		var log bytes.Buffer
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			line := sc.Text()
			if addr, ok := servingAddr(line); ok {
				serving <- addr
				break
			}
			log.WriteString(line + "\n")
		}
		io.Copy(io.Discard, stderr)
		err := cmd.Wait()
		if err != nil && log.Len() > 0 {
			err = fmt.Errorf("%w\n%s", err, log.Bytes())
		}
		done <- err
	}()
	select {
	case addr := <-serving:
		return &agent{dir: dir, cmd: cmd, addr: addr, done: done}, nil
	case err := <-done:
		return nil, fmt.Errorf("the agent exited before serving: %v", err)
	case <-time.After(startTimeout):
		cmd.Process.Kill()
		<-done
		return nil, fmt.Errorf("the agent did not serve within %v", startTimeout)
	}
}

// servingAddr parses the agent's "discoverd serving" log line (slog text).
func servingAddr(line string) (string, bool) {
	if !strings.Contains(line, `msg="discoverd serving"`) {
		return "", false
	}
	for _, field := range strings.Fields(line) {
		if addr, ok := strings.CutPrefix(field, "addr="); ok {
			return addr, true
		}
	}
	return "", false
}

// close stops the agent as an operator would (SIGINT: it withdraws its
// registrations and stops the embedded etcd) and removes its files.
func (a *agent) close() error {
	defer os.RemoveAll(a.dir)
	a.cmd.Process.Signal(os.Interrupt)
	select {
	case err := <-a.done:
		return err
	case <-time.After(30 * time.Second):
		a.cmd.Process.Kill()
		<-a.done
		return errors.New("the agent did not stop within 30s of SIGINT; killed")
	}
}
