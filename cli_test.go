package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	discoverd "github.com/flynn/discoverd/client"
	"github.com/flynn/discoverd/server"
)

func TestIsCommand(t *testing.T) {
	for name, want := range map[string]bool{
		"register": true, "services": true, "watch": true, "leader": true,
		"-agent": true, "--agent=127.0.0.1:1": true,
		"-bind": false, "-etcd": false, "": false, "agent": false, "-agentx": false,
	} {
		if got := isCommand(name); got != want {
			t.Errorf("isCommand(%q) = %v, want %v", name, got, want)
		}
	}
}

// cliRun runs one command to completion and returns its exit code and
// output.
func cliRun(t *testing.T, addr string, args ...string) (int, string, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	var stdout, stderr bytes.Buffer
	code := runCommand(ctx, args, envWith(addr), &stdout, &stderr)
	return code, stdout.String(), stderr.String()
}

func envWith(addr string) func(string) string {
	return func(k string) string {
		if k == "DISCOVERD" {
			return addr
		}
		return ""
	}
}

// background runs a long-running command; its stdout arrives line by line
// on lines, and stop cancels it and returns its exit code.
type background struct {
	lines  chan string
	cancel context.CancelFunc
	code   chan int
	stderr *bytes.Buffer
}

func startCommand(t *testing.T, addr string, args ...string) *background {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	pr, pw := io.Pipe()
	b := &background{lines: make(chan string, 100), cancel: cancel, code: make(chan int, 1), stderr: new(bytes.Buffer)}
	go func() {
		code := runCommand(ctx, args, envWith(addr), pw, b.stderr)
		pw.Close()
		b.code <- code
	}()
	go func() {
		defer close(b.lines)
		sc := bufio.NewScanner(pr)
		for sc.Scan() {
			b.lines <- sc.Text()
		}
	}()
	t.Cleanup(func() {
		cancel()
		<-b.lines // the scanner ends when the command has returned
	})
	return b
}

func (b *background) line(t *testing.T) string {
	t.Helper()
	select {
	case l, ok := <-b.lines:
		if !ok {
			t.Fatalf("command ended; stderr: %s", b.stderr)
		}
		return l
	case <-time.After(waitTimeout):
		t.Fatalf("no output line within %v", waitTimeout)
	}
	return ""
}

func (b *background) stop(t *testing.T) (int, []string) {
	t.Helper()
	b.cancel()
	var rest []string
	for l := range b.lines {
		rest = append(rest, l)
	}
	select {
	case code := <-b.code:
		return code, rest
	case <-time.After(waitTimeout):
		t.Fatal("command did not stop")
	}
	return 0, nil
}

func TestCLIUsage(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"services", "-bogus"}, "usage: discoverd services"},
		{[]string{"services", "a", "b"}, `unexpected argument "b"`},
		{[]string{"register", "web"}, "usage: discoverd register"},
		{[]string{"register", "web", "127.0.0.1:1", "novalue"}, `attribute "novalue" is not key=value`},
		{[]string{"watch", "-bogus", "web"}, "flag provided but not defined"},
		{[]string{"-agent"}, "flag needs an argument"},
		{[]string{"-agent", "127.0.0.1:1"}, "usage: discoverd [-agent ADDR] COMMAND"},
		{[]string{"-agent", "127.0.0.1:1", "frobnicate"}, `unknown command "frobnicate"`},
	} {
		code, _, stderr := cliRun(t, "127.0.0.1:1", tc.args...)
		if code != 2 || !strings.Contains(stderr, tc.want) {
			t.Errorf("%v: exit %d, stderr %q; want 2 and %q", tc.args, code, stderr, tc.want)
		}
	}
}

func TestCLICommandHelp(t *testing.T) {
	for _, cmd := range []string{"register", "services", "watch", "leader"} {
		code, out, stderr := cliRun(t, "127.0.0.1:1", cmd, "-h")
		if code != 0 || !strings.HasPrefix(out, "usage: discoverd "+cmd) || stderr != "" {
			t.Errorf("%s -h: exit %d, stdout %q, stderr %q", cmd, code, out, stderr)
		}
	}
}

func TestCLIEndToEnd(t *testing.T) {
	m := testMain(t)
	m.ExternalIP = "127.0.0.2"
	mustStart(t, m)
	addr := m.Addr().String()

	if code, _, stderr := cliRun(t, addr, "leader", "web"); code != 1 || !strings.Contains(stderr, "no online instance") {
		t.Fatalf("leader of an empty service: exit %d, stderr %q", code, stderr)
	}

	reg := startCommand(t, addr, "register", "web", "127.0.0.1:9001", "role=primary", "zone=a")
	if l := reg.line(t); l != "registered web 127.0.0.1:9001" {
		t.Fatalf("register printed %q", l)
	}

	watch := startCommand(t, addr, "watch", "web")
	if l := watch.line(t); l != "online 127.0.0.1:9001 role=primary zone=a" {
		t.Fatalf("watch printed %q", l)
	}
	if l := watch.line(t); l != "current" {
		t.Fatalf("watch printed %q, want current", l)
	}
	follow := startCommand(t, addr, "leader", "-watch", "web")
	if l := follow.line(t); l != "127.0.0.1:9001" {
		t.Fatalf("leader -watch printed %q", l)
	}

	// One-shot commands, with the agent given by flag or by DISCOVERD.
	if code, out, stderr := cliRun(t, "127.0.0.1:1", "services", "-agent", addr, "web"); code != 0 || out != "127.0.0.1:9001\n" {
		t.Fatalf("services: exit %d, out %q, stderr %q", code, out, stderr)
	}
	code, out, stderr := cliRun(t, addr, "services", "web", "-json")
	var got []server.Instance
	if err := json.Unmarshal([]byte(out), &got); code != 0 || err != nil || strings.Count(out, "\n") != 1 {
		t.Fatalf("services -json: exit %d, %v, out %q, stderr %q", code, err, out, stderr)
	}
	if len(got) != 1 || got[0].Addr != "127.0.0.1:9001" || got[0].Name != "web" || got[0].Attrs["role"] != "primary" || got[0].Created == 0 {
		t.Fatalf("services -json = %+v", got)
	}
	// The same JSON as the HTTP API's.
	resp, err := http.Get("http://" + addr + "/services/web")
	if err != nil {
		t.Fatal(err)
	}
	httpBody, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(httpBody) != out {
		t.Fatalf("services -json printed %s, GET /services/web answers %s", out, httpBody)
	}
	if code, out, _ := cliRun(t, "", "-agent", addr, "leader", "web"); code != 0 || out != "127.0.0.1:9001\n" {
		t.Fatalf("leader: exit %d, out %q", code, out)
	}
	if code, out, _ := cliRun(t, addr, "leader", "-json", "web"); code != 0 || out != string(httpBody[1:len(httpBody)-2])+"\n" {
		t.Fatalf("leader -json: exit %d, out %q, want the instance of %s", code, out, httpBody)
	}
	// Without a name: every service.
	if code, out, stderr := cliRun(t, addr, "services"); code != 0 ||
		!regexp.MustCompile(`^NAME +INSTANCES +LEADER\nweb +1 +127\.0\.0\.1:9001\n$`).MatchString(out) {
		t.Fatalf("services: exit %d, out %q, stderr %q", code, out, stderr)
	}
	if code, out, _ := cliRun(t, addr, "services", "-json"); code != 0 ||
		!regexp.MustCompile(`^\[\{"name":"web","instances":1,"leader":"127\.0\.0\.1:9001","leader_created":\d+\}\]\n$`).MatchString(out) {
		t.Fatalf("services -json: exit %d, out %q", code, out)
	}
	jsonWatch := startCommand(t, addr, "watch", "-json", "web")
	if l := jsonWatch.line(t); !regexp.MustCompile(`^\{"event":"online","instance":\{"name":"web","addr":"127\.0\.0\.1:9001","attrs":\{"role":"primary","zone":"a"\},"created":\d+\}\}$`).MatchString(l) {
		t.Fatalf("watch -json printed %q", l)
	}
	if l := jsonWatch.line(t); l != `{"event":"current"}` {
		t.Fatalf("watch -json printed %q, want current", l)
	}
	jsonLeader := startCommand(t, addr, "leader", "-watch", "-json", "web")
	if l := jsonLeader.line(t); !strings.HasPrefix(l, `{"name":"web","addr":"127.0.0.1:9001",`) {
		t.Fatalf("leader -watch -json printed %q", l)
	}

	// Interrupting register unregisters.
	code, rest := reg.stop(t)
	if code != 0 || len(rest) != 1 || rest[0] != "unregistered web 127.0.0.1:9001" {
		t.Fatalf("register stopped with %d, %q; stderr %s", code, rest, reg.stderr)
	}
	if l := watch.line(t); !strings.HasPrefix(l, "offline 127.0.0.1:9001") {
		t.Fatalf("watch printed %q, want the offline line", l)
	}
	if l := follow.line(t); l != "none" {
		t.Fatalf("leader -watch printed %q, want none", l)
	}
	if l := jsonWatch.line(t); !strings.HasPrefix(l, `{"event":"offline","instance":{"name":"web","addr":"127.0.0.1:9001",`) {
		t.Fatalf("watch -json printed %q, want the offline line", l)
	}
	if l := jsonLeader.line(t); l != "null" {
		t.Fatalf("leader -watch -json printed %q, want null", l)
	}
	for _, b := range []*background{watch, follow, jsonWatch, jsonLeader} {
		if code, rest := b.stop(t); code != 0 || len(rest) != 0 {
			t.Fatalf("stopped with %d, extra output %q, stderr %s", code, rest, b.stderr)
		}
	}

	t.Run("register expands :port", func(t *testing.T) {
		reg := startCommand(t, addr, "register", "web", ":9002")
		if l := reg.line(t); l != "registered web 127.0.0.2:9002" {
			t.Fatalf("register printed %q", l)
		}
		if code, rest := reg.stop(t); code != 0 || len(rest) != 1 || rest[0] != "unregistered web 127.0.0.2:9002" {
			t.Fatalf("register stopped with %d, %q; stderr %s", code, rest, reg.stderr)
		}
	})

	t.Run("register in a big service", func(t *testing.T) {
		// The registration does not depend on watching the service (a
		// snapshot this big is more than an agent may queue for one
		// stream at once).
		c, err := discoverd.NewClientWithAddr(addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		var wg sync.WaitGroup
		sem := make(chan struct{}, 32)
		for i := range 1000 {
			sem <- struct{}{}
			wg.Go(func() {
				defer func() { <-sem }()
				if err := c.Register("big", fmt.Sprintf("127.0.0.1:%d", 10000+i)); err != nil {
					t.Error(err)
				}
			})
		}
		wg.Wait()
		reg := startCommand(t, addr, "register", "big", "127.0.0.1:9003")
		if l := reg.line(t); l != "registered big 127.0.0.1:9003" {
			t.Fatalf("register printed %q", l)
		}
		if code, rest := reg.stop(t); code != 0 || len(rest) != 1 {
			t.Fatalf("register stopped with %d, %q; stderr %s", code, rest, reg.stderr)
		}
	})
}

func TestCLIRuntimeErrors(t *testing.T) {
	m := testMain(t)
	mustStart(t, m)
	addr := m.Addr().String()
	if code, _, stderr := cliRun(t, addr, "register", "bad name", "127.0.0.1:1"); code != 1 || !strings.Contains(stderr, "invalid_argument") ||
		strings.Count(stderr, "discoverd") != 1 {
		t.Fatalf("register with a bad name: exit %d, stderr %q", code, stderr)
	}
	m.Close() // nothing listens at addr any more
	if code, _, stderr := cliRun(t, addr, "services", "web"); code != 1 || !strings.Contains(stderr, "discoverd services:") {
		t.Fatalf("services without an agent: exit %d, stderr %q", code, stderr)
	}
}
