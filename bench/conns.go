package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/flynn/discoverd/api"
	"github.com/flynn/discoverd/rpc"
)

// ConnsResult is scenario 7: the agent binary under `ulimit -n Nofile`
// (soft and hard) is sent more idle upgraded RPC connections than it has
// descriptors.
type ConnsResult struct {
	Nofile    int `json:"nofile"`
	Attempted int `json:"attempted"`
	// Held were upgraded (200) and stay open; Refused got the 503 with
	// the reason; Unanswered were closed without one (beyond the
	// refusals the agent answers at once).
	Held       int `json:"held"`
	Refused    int `json:"refused"`
	Unanswered int `json:"unanswered"`
	// FDs is the agent's open descriptors before and with the connections
	// held; RSS likewise.
	FDsBefore int   `json:"fds_before"`
	FDsHeld   int   `json:"fds_held"`
	RSSBefore int64 `json:"rss_before_bytes"`
	RSSHeld   int64 `json:"rss_held_bytes"`
	// BytesPerConn is (RSSHeld - RSSBefore) / Held.
	BytesPerConn int64 `json:"bytes_per_conn"`
	// StoreWriteOK: a client connected before the flood still registers
	// (a store write) while the agent is at its cap.
	StoreWriteOK  bool   `json:"store_write_ok"`
	StoreWriteErr string `json:"store_write_error,omitempty"`
	Exited        bool   `json:"agent_exited"`
}

// benchConns runs scenario 7.
func benchConns(ctx context.Context, env *env, cfg *config) (*ConnsResult, error) {
	bin, err := buildDiscoverd(ctx, env.dir)
	if err != nil {
		return nil, err
	}
	addrs, err := freeAddrs(3)
	if err != nil {
		return nil, err
	}
	res := &ConnsResult{Nofile: cfg.ConnsNofile}
	c, err := startProcess("/bin/sh", []string{"-c", fmt.Sprintf(`ulimit -n %d && exec "$0" "$@"`, cfg.ConnsNofile), bin,
		"-bind", addrs[0], "-etcd-client-addr", addrs[1], "-etcd-peer-addr", addrs[2], "-dns", "",
		"-data-dir", filepath.Join(env.dir, "conns", "etcd"), "-log-level", "error", "-rpc-idle-timeout", "10m"})
	if err != nil {
		return nil, err
	}
	env.track(c)
	defer func() {
		c.cmd.Process.Signal(syscall.SIGTERM)
		c.stop(5 * time.Second)
	}()
	if err := waitAnswers(ctx, c, addrs[0]); err != nil {
		return nil, err
	}
	pid := c.cmd.Process.Pid
	owner, err := rpc.Dial(ctx, addrs[0], rpc.Gob)
	if err != nil {
		return nil, err
	}
	defer owner.Close()
	if err := sleepCtx(ctx, time.Second); err != nil {
		return nil, err
	}
	res.FDsBefore, res.RSSBefore = openFDs(pid), rssBytes(pid)

	var conns []net.Conn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	res.Attempted = cfg.ConnsNofile * 5 / 4
	for range res.Attempted {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		conn, err := net.DialTimeout("tcp", addrs[0], opTimeout)
		if err != nil {
			return nil, fmt.Errorf("dial: %w", err)
		}
		io.WriteString(conn, "CONNECT "+rpc.DefaultPath+" HTTP/1.0\r\n\r\n")
		conn.SetReadDeadline(time.Now().Add(opTimeout))
		line, err := bufio.NewReader(conn).ReadString('\n')
		conn.SetReadDeadline(time.Time{})
		switch {
		case strings.HasPrefix(line, "HTTP/1.0 200"):
			res.Held++
			conns = append(conns, conn)
			continue
		case strings.HasPrefix(line, "HTTP/1.0 503"):
			res.Refused++
		case err != nil:
			res.Unanswered++
		default:
			conn.Close()
			return nil, fmt.Errorf("CONNECT answered %q", line)
		}
		conn.Close()
	}
	if err := sleepCtx(ctx, time.Second); err != nil {
		return nil, err
	}
	res.FDsHeld, res.RSSHeld = openFDs(pid), rssBytes(pid)
	if res.Held > 0 {
		res.BytesPerConn = (res.RSSHeld - res.RSSBefore) / int64(res.Held)
	}
	var got string
	if err := owner.Call(ctx, api.MethodRegister, &api.Args{Name: "bench-conns", Addr: "127.0.0.1:1"}, &got); err != nil {
		res.StoreWriteErr = err.Error()
	} else {
		res.StoreWriteOK = true
	}
	select {
	case <-c.exited:
		res.Exited = true
	default:
	}

	env.row(Row{Scenario: "7 conns", Figure: fmt.Sprintf("idle upgraded RPC connections held at the cap, ulimit -n %d (%d attempted)", res.Nofile, res.Attempted),
		Value: fmt.Sprintf("%d held, %d refused with a reason, %d closed unanswered", res.Held, res.Refused, res.Unanswered)})
	env.row(Row{Scenario: "7 conns", Figure: "agent descriptors: idle / at the cap", Value: fmt.Sprintf("%d / %d of %d", res.FDsBefore, res.FDsHeld, res.Nofile)})
	env.row(Row{Scenario: "7 conns", Figure: "memory per idle upgraded connection (RSS delta / held)", Value: fmt.Sprintf("%.1f KiB", float64(res.BytesPerConn)/1024)})
	env.row(Row{Scenario: "7 conns", Figure: "store write by an earlier client at the cap; agent alive", Value: fmt.Sprintf("%v; %v %s", res.StoreWriteOK, !res.Exited, res.StoreWriteErr),
		Target: "true; true", Verdict: verdict(res.StoreWriteOK && !res.Exited)})
	if res.Exited {
		return res, errors.New("the agent exited under the connection flood")
	}
	return res, nil
}

// openFDs is the number of descriptors pid has open.
func openFDs(pid int) int {
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		return 0
	}
	return len(ents)
}

func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
