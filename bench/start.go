package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/flynn/discoverd/api"
	"github.com/flynn/discoverd/rpc"
)

// StartResult is scenario 6.
type StartResult struct {
	// Mode is "binary" (the discoverd binary built from this tree) or
	// "child" (this tool re-executed as an agent with embedded etcd, wired
	// as main.go wires it), with the reason when the binary could not be
	// built.
	Mode         string  `json:"mode"`
	BuildSeconds float64 `json:"build_s,omitempty"`
	// Start: from exec until the agent answers an rpc call; IdleRSS one
	// second later; Stop: from SIGTERM until exit (binary mode).
	Start   Dist    `json:"start"`
	IdleRSS []int64 `json:"idle_rss_bytes"`
	Stop    Dist    `json:"stop"`
}

// benchStart starts cfg.Starts agents with embedded etcd, one after
// another, each in a fresh data dir, and times each until it answers.
func benchStart(ctx context.Context, env *env, cfg *config) (*StartResult, error) {
	res := &StartResult{Mode: "child"}
	var bin string
	if cfg.StartMode == "binary" {
		t0 := time.Now()
		b, err := buildDiscoverd(ctx, env.dir)
		if err != nil {
			res.Mode = fmt.Sprintf("child (building the binary failed: %v)", oneLine(err))
		} else {
			bin, res.Mode, res.BuildSeconds = b, "binary", time.Since(t0).Seconds()
		}
	}
	var starts, stops []time.Duration
	for i := range cfg.Starts {
		addrs, err := freeAddrs(3)
		if err != nil {
			return nil, err
		}
		dataDir := filepath.Join(env.dir, fmt.Sprintf("start-%d", i))
		var c *child
		t0 := time.Now()
		if bin != "" {
			c, err = startProcess(bin, []string{"-bind", addrs[0], "-etcd-client-addr", addrs[1], "-etcd-peer-addr", addrs[2],
				"-data-dir", filepath.Join(dataDir, "etcd"), "-log-level", "warn", "-dns", ""})
		} else {
			c, err = startChild([]string{childFlag + "agent", "-bind", addrs[0]})
		}
		if err != nil {
			return nil, err
		}
		env.track(c)
		if err := waitAnswers(ctx, c, addrs[0]); err != nil {
			c.stop(5 * time.Second)
			return nil, err
		}
		starts = append(starts, time.Since(t0))
		idle := time.NewTimer(time.Second)
		select {
		case <-idle.C:
		case <-ctx.Done():
			idle.Stop()
			c.stop(5 * time.Second)
			return nil, ctx.Err()
		}
		res.IdleRSS = append(res.IdleRSS, rssBytes(c.cmd.Process.Pid))
		if bin != "" {
			t1 := time.Now()
			c.cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-c.exited:
			case <-time.After(opTimeout):
				c.kill()
				return nil, errors.New("discoverd did not exit within 30 s of SIGTERM")
			}
			stops = append(stops, time.Since(t1))
			if err := <-c.waitErr; err != nil {
				return nil, fmt.Errorf("discoverd exited after SIGTERM: %w", err)
			}
		}
		c.stop(5 * time.Second)
	}
	res.Start, res.Stop = summarize(starts), summarize(stops)
	var rss int64
	for _, r := range res.IdleRSS {
		rss = max(rss, r)
	}
	env.row(Row{Scenario: "6 start", Figure: fmt.Sprintf("agent start, embedded etcd, exec→rpc answer: p50/max (n=%d, %s)", res.Start.N, strings.SplitN(res.Mode, " ", 2)[0]),
		Value: fmt.Sprintf("%.0f/%.0f ms", res.Start.P50, res.Start.Max)})
	env.row(Row{Scenario: "6 start", Figure: "idle RSS (max)", Value: fmt.Sprintf("%.1f MiB", float64(rss)/(1<<20))})
	if res.Stop.N > 0 {
		env.row(Row{Scenario: "6 start", Figure: "SIGTERM→exit p50/max", Value: fmt.Sprintf("%.0f/%.0f ms", res.Stop.P50, res.Stop.Max)})
	}
	return res, nil
}

// buildDiscoverd builds the discoverd binary of the module this tool
// belongs to into dir.
func buildDiscoverd(ctx context.Context, dir string) (string, error) {
	out, err := exec.CommandContext(ctx, "go", "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("go env GOMOD: %w", err)
	}
	gomod := strings.TrimSpace(string(out))
	if gomod == "" || gomod == os.DevNull {
		return "", errors.New("not inside the discoverd module")
	}
	bin := filepath.Join(dir, "discoverd")
	cmd := exec.CommandContext(ctx, "go", "build", "-o", bin, ".")
	cmd.Dir = filepath.Dir(gomod)
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build: %w: %s", err, out)
	}
	return bin, nil
}

// waitAnswers polls addr until the agent answers an rpc call (a Heartbeat
// of an unknown registration: not_found is an answer, unavailable while it
// starts is not), or the process exits.
func waitAnswers(ctx context.Context, c *child, addr string) error {
	deadline := time.Now().Add(2 * opTimeout)
	for {
		if answers(ctx, addr) {
			return nil
		}
		select {
		case <-c.exited:
			return errors.New("the agent exited before answering (see its stderr)")
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(2 * time.Millisecond): // poll interval
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("the agent did not answer on %s within %v", addr, 2*opTimeout)
		}
	}
}

func answers(ctx context.Context, addr string) bool {
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	c, err := rpc.Dial(ctx, addr, rpc.Gob)
	if err != nil {
		return false
	}
	defer c.Close()
	err = c.Call(ctx, api.MethodHeartbeat, &api.Args{Name: "bench-probe", Addr: "127.0.0.1:1"}, &struct{}{})
	var se rpc.ServerError
	if !errors.As(err, &se) {
		return err == nil
	}
	// While the store is not ready every call answers unavailable ("agent
	// is starting"): that is not the agent serving yet.
	return api.ErrorCode(api.ParseError(string(se))) != api.CodeUnavailable
}

// freeAddrs returns n loopback addresses whose ports were free a moment
// ago.
func freeAddrs(n int) ([]string, error) {
	var addrs []string
	var lns []net.Listener
	defer func() {
		for _, l := range lns {
			l.Close()
		}
	}()
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		lns = append(lns, l)
		addrs = append(addrs, l.Addr().String())
	}
	return addrs, nil
}

func oneLine(err error) string {
	s := strings.ReplaceAll(strings.TrimSpace(err.Error()), "\n", "; ")
	if len(s) > 300 {
		s = s[:300] + "…"
	}
	return s
}
