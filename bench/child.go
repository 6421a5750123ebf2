package main

// Child processes. The tool re-executes its own binary with a first
// argument "-child=agent" or "-child=client" (see childMain) so that it can
// SIGKILL an agent or a client, and measure an agent's memory apart from
// the load generator. A child reports on stdout, one JSON object per line,
// reads commands from stdin, and exits when stdin closes (so it does not
// outlive the tool even if the tool dies without killing it).

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"strings"
	"sync"
	"time"

	"github.com/flynn/discoverd/agent"
	"github.com/flynn/discoverd/api"
	"github.com/flynn/discoverd/backend/etcd/embedded"
	"github.com/flynn/discoverd/checks"
)

// childFlag is the first argument that selects a child mode.
const childFlag = "-child="

// isChild reports whether args (os.Args[1:]) select a child mode.
func isChild(args []string) bool { return len(args) > 0 && strings.HasPrefix(args[0], childFlag) }

// childReport is a child's stdout line.
type childReport struct {
	Addr  string      `json:"addr,omitempty"`  // agent: listening; client: registered addr
	Stats *childStats `json:"stats,omitempty"` // answer to "stats"
	Err   string      `json:"err,omitempty"`
}

// childStats is an agent child's memory and agent gauges, after a GC.
type childStats struct {
	HeapInuse  uint64      `json:"heap_inuse"`
	StackInuse uint64      `json:"stack_inuse"`
	RSS        int64       `json:"rss"`
	Goroutines int         `json:"goroutines"`
	Agent      agent.Stats `json:"agent"`
	// Checks is the health checks' stats (-checks only).
	Checks *checks.Stats `json:"checks,omitempty"`
}

// childMain runs a child mode and returns the exit code.
func childMain(args []string) int {
	mode := strings.TrimPrefix(args[0], childFlag)
	out := json.NewEncoder(os.Stdout)
	var err error
	switch mode {
	case "agent":
		err = childAgent(args[1:], out)
	case "client":
		err = childClient(args[1:], out)
	default:
		err = fmt.Errorf("unknown child mode %q", mode)
	}
	if err != nil {
		out.Encode(childReport{Err: err.Error()})
		fmt.Fprintf(os.Stderr, "bench child %s: %v\n", mode, err)
		return 1
	}
	return 0
}

// childAgent runs an agent (on -etcd, or on its own embedded etcd when
// -etcd is empty) until stdin closes; it answers "stats" lines. With
// -register it registers that many instances of -name through an
// in-process session and heartbeats them, like a host whose applications
// run beside their agent.
func childAgent(args []string, out *json.Encoder) error {
	fs := flag.NewFlagSet("child agent", flag.ContinueOnError)
	endpoints := fs.String("etcd", "", "comma-separated etcd endpoints; empty: embedded etcd in a temp dir")
	bind := fs.String("bind", "127.0.0.1:0", "listen address")
	ttl := fs.Duration("ttl", api.DefaultTTL, "agent TTL")
	name := fs.String("name", "bench", "service name of -register")
	regAddr := fs.String("register", "", "addr to register through an in-process session")
	cpuProfile := fs.String("cpuprofile", "", "write a CPU profile of the agent to this file on exit")
	heapProfile := fs.String("heapprofile", "", "write a heap profile to this file at each \"stats\"")
	withChecks := fs.Bool("checks", false, "run health checks (journal in a temp dir)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *cpuProfile != "" {
		f, err := os.Create(*cpuProfile)
		if err != nil {
			return err
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			return err
		}
		defer pprof.StopCPUProfile()
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelError}))
	ctx := context.Background()
	eps := splitComma(*endpoints)
	if len(eps) == 0 {
		dir, err := os.MkdirTemp("", "discoverd-bench-agent-")
		if err != nil {
			return err
		}
		defer os.RemoveAll(dir)
		e, err := embedded.Start(ctx, embedded.Config{Dir: filepath.Join(dir, "etcd"), Logger: log})
		if err != nil {
			return err
		}
		defer e.Close()
		eps = e.Endpoints()
	}
	opts := agentOptions{TTL: *ttl}
	if *withChecks {
		dir, err := os.MkdirTemp("", "discoverd-bench-checks-")
		if err != nil {
			return err
		}
		defer os.RemoveAll(dir)
		opts.ChecksFile = filepath.Join(dir, "checks.journal")
	}
	la, err := startAgentOn(ctx, *bind, eps, opts, log)
	if err != nil {
		return err
	}
	defer la.Close()

	stop := make(chan struct{})
	var wg sync.WaitGroup
	defer wg.Wait()
	defer close(stop)
	if *regAddr != "" {
		sess := la.agent.NewSession(0)
		defer sess.Close()
		a := api.Args{Name: *name, Addr: *regAddr}
		if _, err := sess.Register(ctx, a); err != nil {
			return err
		}
		wg.Add(1)
		go func() { // heartbeats until stop
			defer wg.Done()
			t := time.NewTicker(max(*ttl/3, 100*time.Millisecond))
			defer t.Stop()
			for {
				select {
				case <-stop:
					return
				case <-t.C:
					sess.Heartbeat(ctx, a)
				}
			}
		}()
	}
	if err := out.Encode(childReport{Addr: la.Addr()}); err != nil {
		return err
	}
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		switch in.Text() {
		case "stats":
			runtime.GC()
			runtime.GC()
			var ms runtime.MemStats
			runtime.ReadMemStats(&ms)
			st := &childStats{
				HeapInuse:  ms.HeapInuse,
				StackInuse: ms.StackInuse,
				RSS:        rssBytes(0),
				Goroutines: runtime.NumGoroutine(),
				Agent:      la.agent.Stats(),
			}
			if la.checks != nil {
				cs := la.checks.Stats()
				st.Checks = &cs
			}
			if *heapProfile != "" {
				if err := writeHeapProfile(*heapProfile); err != nil {
					return err
				}
			}
			if err := out.Encode(childReport{Stats: st}); err != nil {
				return err
			}
		}
	}
	return nil // stdin closed: stop cleanly
}

// childClient registers -addr of -name on the agent at -agent through one
// rpc connection, reports, and heartbeats every api.HeartbeatInterval
// until stdin closes.
func childClient(args []string, out *json.Encoder) error {
	fs := flag.NewFlagSet("child client", flag.ContinueOnError)
	agentAddr := fs.String("agent", "", "agent host:port")
	name := fs.String("name", "bench", "service name")
	addr := fs.String("addr", "", "instance addr")
	if err := fs.Parse(args); err != nil {
		return err
	}
	ctx := context.Background()
	c, err := dial(ctx, *agentAddr)
	if err != nil {
		return err
	}
	defer c.Close()
	if err := register(ctx, c, *name, *addr, nil); err != nil {
		return err
	}
	if err := out.Encode(childReport{Addr: *addr}); err != nil {
		return err
	}
	eof := make(chan struct{})
	go func() { // ends when stdin closes, which also ends the process
		io.Copy(io.Discard, os.Stdin)
		close(eof)
	}()
	t := time.NewTicker(api.HeartbeatInterval)
	defer t.Stop()
	for {
		select {
		case <-eof:
			return nil
		case <-t.C:
			if err := register(ctx, c, *name, *addr, nil); err != nil {
				return err
			}
		}
	}
}

func writeHeapProfile(path string) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if err := pprof.WriteHeapProfile(f); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

func splitComma(s string) []string {
	var out []string
	for p := range strings.SplitSeq(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

// child is a running child process, seen from the tool.
type child struct {
	cmd     *exec.Cmd
	stdin   io.WriteCloser
	reports chan childReport // closed when stdout ends
	waitErr chan error       // Wait's result; buffered
	exited  chan struct{}    // closed when the process has exited
	once    sync.Once
}

// startChild starts the tool's own binary in a child mode (args[0] is
// "-child=..."), with extra environment env. The caller must stop it.
func startChild(args []string, env ...string) (*child, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("finding the tool's binary: %w", err)
	}
	return startProcess(exe, args, env...)
}

// startProcess starts path with args; it is the tool's child (its stdout
// carries reports) and is killed if the tool dies (Linux).
func startProcess(path string, args []string, env ...string) (*child, error) {
	cmd := exec.Command(path, args...)
	cmd.Env = append(os.Environ(), env...)
	cmd.Stderr = os.Stderr
	cmd.SysProcAttr = childSysProcAttr()
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting %s: %w", filepath.Base(path), err)
	}
	c := &child{cmd: cmd, stdin: stdin, reports: make(chan childReport, 4), waitErr: make(chan error, 1), exited: make(chan struct{})}
	go func() { // reads stdout until the process closes it, then reaps it
		dec := json.NewDecoder(stdout)
		for {
			var r childReport
			if err := dec.Decode(&r); err != nil {
				break
			}
			c.reports <- r
		}
		close(c.reports)
		io.Copy(io.Discard, stdout)
		c.waitErr <- cmd.Wait()
		close(c.exited)
	}()
	return c, nil
}

// report waits for the child's next report line.
func (c *child) report(timeout time.Duration) (childReport, error) {
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case r, ok := <-c.reports:
		if !ok {
			return childReport{}, errors.New("child exited without reporting (see its stderr)")
		}
		if r.Err != "" {
			return r, fmt.Errorf("child: %s", r.Err)
		}
		return r, nil
	case <-t.C:
		return childReport{}, fmt.Errorf("child did not report within %v", timeout)
	}
}

// stats asks an agent child for its stats.
func (c *child) stats() (*childStats, error) {
	if _, err := io.WriteString(c.stdin, "stats\n"); err != nil {
		return nil, err
	}
	r, err := c.report(opTimeout)
	if err != nil {
		return nil, err
	}
	if r.Stats == nil {
		return nil, errors.New("child answered without stats")
	}
	return r.Stats, nil
}

// kill sends SIGKILL and waits for the process to exit.
func (c *child) kill() {
	c.cmd.Process.Kill()
	<-c.exited
}

// stop asks the child to exit by closing its stdin, and kills it if it
// has not exited within grace. It is idempotent.
func (c *child) stop(grace time.Duration) {
	c.once.Do(func() {
		c.stdin.Close()
		t := time.NewTimer(grace)
		defer t.Stop()
		select {
		case <-c.exited:
		case <-t.C:
			c.kill()
		}
	})
	<-c.exited
}
