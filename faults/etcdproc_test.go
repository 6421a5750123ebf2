package faults_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

// etcdProcCluster is a 3-member etcd cluster of etcd server processes
// (Debian's etcd-server package, /usr/bin/etcd), so that a test can stall
// the store for real: SIGSTOP freezes every member with its connections
// open, as a VM pause or a disk stall does, and SIGCONT resumes it. The
// embedded members of etcdtest cannot be frozen that way, as they share the
// test's process.
type etcdProcCluster struct {
	members []*etcdProc
	eps     []string

	mu     sync.Mutex
	paused bool
}

type etcdProc struct {
	name string
	cmd  *exec.Cmd
	log  *logBuffer
	done chan struct{} // closed when the process has exited
}

// etcdServerBinary returns the path of the etcd server, or skips tb when it
// is not installed (fails it under CI, whose .ci/run installs it).
func etcdServerBinary(tb testing.TB) string {
	tb.Helper()
	if p := os.Getenv("ETCD_SERVER"); p != "" {
		return p
	}
	p, err := exec.LookPath("etcd")
	if err != nil {
		if os.Getenv("CI") != "" {
			tb.Fatalf("the etcd server binary is missing (apt-get install etcd-server): %v", err)
		}
		tb.Skipf("no etcd server binary (apt-get install etcd-server): %v", err)
	}
	return p
}

// startEtcdProcs starts a 3-member cluster on free loopback ports and
// blocks until it answers a linearizable read. tb's cleanup resumes and
// kills every member. A port found free can be taken by another test
// process before etcd binds it; the cluster then starts again on other
// ports (at most startAttempts times).
func startEtcdProcs(tb testing.TB) *etcdProcCluster {
	tb.Helper()
	bin := etcdServerBinary(tb)
	const startAttempts = 3
	for attempt := 1; ; attempt++ {
		c, err := tryStartEtcdProcs(tb, bin)
		if err == nil {
			return c
		}
		if !errors.Is(err, errPortTaken) || attempt == startAttempts {
			tb.Fatal(err)
		}
		tb.Logf("starting the etcd cluster again on other ports: %v", err)
	}
}

// errPortTaken: a member could not bind its port.
var errPortTaken = errors.New("a port was taken before etcd bound it")

// tryStartEtcdProcs is one attempt of startEtcdProcs. On error every
// member it started has been stopped.
func tryStartEtcdProcs(tb testing.TB, bin string) (*etcdProcCluster, error) {
	tb.Helper()
	const n = 3
	type addrs struct{ client, peer string }
	var as []addrs
	var peers []string
	for i := range n {
		a := addrs{freeAddr(tb), freeAddr(tb)}
		as = append(as, a)
		peers = append(peers, fmt.Sprintf("m%d=http://%s", i, a.peer))
	}
	c := &etcdProcCluster{}
	ok := false
	tb.Cleanup(c.stop)
	defer func() {
		if !ok {
			c.stop()
		}
	}()
	for i, a := range as {
		name := fmt.Sprintf("m%d", i)
		lb := &logBuffer{}
		cmd := exec.Command(bin,
			"--name", name,
			"--data-dir", filepath.Join(tb.TempDir(), name),
			"--listen-client-urls", "http://"+a.client,
			"--advertise-client-urls", "http://"+a.client,
			"--listen-peer-urls", "http://"+a.peer,
			"--initial-advertise-peer-urls", "http://"+a.peer,
			"--initial-cluster", strings.Join(peers, ","),
			"--initial-cluster-state", "new",
			"--initial-cluster-token", "faults-checker",
			// etcd's defaults (100 ms heartbeat, 1 s election): a 2 s
			// lease is the smallest such a cluster grants.
			"--heartbeat-interval", "100",
			"--election-timeout", "1000",
			"--logger", "zap",
			"--log-level", "warn",
		)
		cmd.Stdout, cmd.Stderr = lb, lb
		cmd.SysProcAttr = childAttr()
		m := &etcdProc{name: name, cmd: cmd, log: lb, done: make(chan struct{})}
		if err := cmd.Start(); err != nil {
			return nil, fmt.Errorf("starting etcd %s: %w", name, err)
		}
		go func() { cmd.Wait(); close(m.done) }() // ends with the process
		c.members = append(c.members, m)
		c.eps = append(c.eps, "http://"+a.client)
	}
	eps := c.Endpoints()
	cli, err := clientv3.New(clientv3.Config{Endpoints: eps, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		return nil, err
	}
	defer cli.Close()
	deadline := time.Now().Add(wait)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		_, err := cli.Get(ctx, "ready-probe")
		cancel()
		if err == nil {
			break
		}
		for _, m := range c.members {
			select {
			case <-m.done:
				log := m.log.String()
				if strings.Contains(log, "address already in use") {
					return nil, fmt.Errorf("etcd %s: %w:\n%s", m.name, errPortTaken, log)
				}
				return nil, fmt.Errorf("etcd %s exited at start:\n%s", m.name, log)
			default:
			}
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("the etcd cluster does not answer within %v: %v", wait, err)
		}
	}
	ok = true
	tb.Cleanup(func() {
		if tb.Failed() {
			for _, m := range c.members {
				s := m.log.String()
				if len(s) > 16<<10 {
					s = "..." + s[len(s)-16<<10:]
				}
				tb.Logf("log of etcd %s:\n%s", m.name, s)
			}
		}
	})
	return c, nil
}

// Endpoints returns the client URLs of the members.
func (c *etcdProcCluster) Endpoints() []string { return c.eps }

// Pause freezes every member (SIGSTOP). Its connections stay open.
func (c *etcdProcCluster) Pause() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.paused = true
	return c.signal(syscall.SIGSTOP)
}

// Resume lets every member run again (SIGCONT). It is idempotent.
func (c *etcdProcCluster) Resume() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.paused = false
	return c.signal(syscall.SIGCONT)
}

func (c *etcdProcCluster) signal(sig syscall.Signal) error {
	var errs []error
	for _, m := range c.members {
		if err := m.cmd.Process.Signal(sig); err != nil {
			errs = append(errs, fmt.Errorf("etcd %s: %v: %w%s", m.name, sig, err, m.exit()))
		}
	}
	return errors.Join(errs...)
}

// exit tells how the member ended ("" while it runs): its exit status
// (a signal when something outside the test killed it) and its last log
// lines.
func (m *etcdProc) exit() string {
	select {
	case <-m.done:
	default:
		return ""
	}
	s := m.log.String()
	if len(s) > 2<<10 {
		s = "..." + s[len(s)-2<<10:]
	}
	return fmt.Sprintf(" (%v; last output:\n%s)", m.cmd.ProcessState, s)
}

// stop resumes and kills every member and waits for them to exit.
func (c *etcdProcCluster) stop() {
	c.Resume()
	for _, m := range c.members {
		m.cmd.Process.Kill()
	}
	for _, m := range c.members {
		select {
		case <-m.done:
		case <-time.After(wait):
		}
	}
}
