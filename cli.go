package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"slices"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/flynn/discoverd/api"
	discoverd "github.com/flynn/discoverd/client"
	"github.com/flynn/discoverd/server"
)

// The CLI subcommands. Each talks to an agent through the client library.
// Results go to stdout; errors and notices to stderr.
var commands = map[string]struct {
	usage string
	help  string
	run   func(cl *cli, ctx context.Context, args []string) error
}{
	"register": {"register [-agent ADDR] [-check-http URL | -check-tcp ADDR | -check-grpc ADDR[/SERVICE] [-interval D] [-timeout D] [-rise N] [-fall N] [-deregister-after D] [-detach]] NAME ADDR [key=value...]",
		"register an instance and keep it registered until interrupted; with a check, the agent keeps it online while the check passes (-detach: and this command exits)", (*cli).register},
	"unregister": {"unregister [-agent ADDR] NAME ADDR",
		"remove a registration the agent keeps for a health check", (*cli).unregister},
	"services": {"services [-agent ADDR] [-json] [NAME]",
		"without NAME: every service with its instance count and leader; with NAME: its online instances, oldest first", (*cli).services},
	"watch": {"watch [-agent ADDR] [-json] NAME",
		"print the instances of NAME, then every change, until interrupted", (*cli).watch},
	"leader": {"leader [-agent ADDR] [-json] [-watch] NAME",
		"print the leader of NAME (the oldest instance); -watch: each new leader until interrupted", (*cli).leader},
}

// isCommand reports whether name is a CLI subcommand (register, services,
// watch, leader), or the global -agent flag that may precede one, rather
// than the agent's own flags.
func isCommand(name string) bool {
	if _, ok := commands[name]; ok {
		return true
	}
	flagName, _, _ := strings.Cut(strings.TrimLeft(name, "-"), "=")
	return strings.HasPrefix(name, "-") && flagName == "agent"
}

// usageError is a bad invocation: runCommand prints it with the usage line
// and exits 2.
type usageError struct{ msg string }

func (e *usageError) Error() string { return e.msg }

func usagef(format string, args ...any) error { return &usageError{fmt.Sprintf(format, args...)} }

type cli struct {
	cmd    string // the subcommand, for notices
	agent  string
	stdout io.Writer
	stderr io.Writer
	// client is connected lazily by connect; runCommand closes it.
	client *discoverd.Client
}

// runCommand runs the CLI subcommand args[0] (optionally preceded by
// "-agent ADDR") with the rest of args, reading DISCOVERD through getenv,
// and returns the process exit code: 0 on success (and for -h, which
// prints the command's usage on stdout), 1 on a runtime error (its
// message on stderr), 2 on bad arguments (with a usage line).
// Commands that run until interrupted stop on SIGINT, SIGTERM or when ctx
// is done.
func runCommand(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) int {
	cl := &cli{agent: getenv("DISCOVERD"), stdout: stdout, stderr: stderr}
	if cl.agent == "" {
		cl.agent = api.DefaultAgentAddr
	}
	global := flag.NewFlagSet("discoverd", flag.ContinueOnError)
	global.SetOutput(io.Discard)
	global.StringVar(&cl.agent, "agent", cl.agent, "agent address (default $DISCOVERD or "+api.DefaultAgentAddr+")")
	if err := global.Parse(args); err != nil {
		fmt.Fprintf(stderr, "discoverd: %v\n", err)
		printUsage(stderr)
		return 2
	}
	args = global.Args()
	if len(args) == 0 {
		printUsage(stderr)
		return 2
	}
	cmd, ok := commands[args[0]]
	if !ok {
		fmt.Fprintf(stderr, "discoverd: unknown command %q\n", args[0])
		printUsage(stderr)
		return 2
	}

	ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
	defer stop()
	cl.cmd = args[0]
	err := cmd.run(cl, ctx, args[1:])
	if cl.client != nil {
		cl.client.Close()
	}
	var ue *usageError
	switch {
	case errors.As(err, &ue):
		fmt.Fprintf(stderr, "discoverd %s: %s\nusage: discoverd %s\n", args[0], ue.msg, cmd.usage)
		return 2
	case errors.Is(err, flag.ErrHelp): // asked for: on stdout
		fmt.Fprintf(stdout, "usage: discoverd %s\n  %s\n", cmd.usage, cmd.help)
		return 0
	case err != nil:
		// The client's errors start with "discoverd: ", as this line does.
		fmt.Fprintf(stderr, "discoverd %s: %s\n", args[0], strings.TrimPrefix(err.Error(), "discoverd: "))
		return 1
	}
	return 0
}

func printUsage(w io.Writer) {
	fmt.Fprintln(w, "usage: discoverd [-agent ADDR] COMMAND ...   (or: discoverd [agent flags] to run the agent)")
	for _, name := range slices.Sorted(maps.Keys(commands)) {
		fmt.Fprintf(w, "  discoverd %s\n", commands[name].usage)
	}
	fmt.Fprintln(w, "The agent address defaults to $DISCOVERD, else "+api.DefaultAgentAddr+". See discoverd help.")
}

// parse parses a subcommand's flags, which may come before, between or
// after its positional arguments, and checks the positional count.
func (cl *cli) parse(fs *flag.FlagSet, args []string, minArgs, maxArgs int) ([]string, error) {
	fs.SetOutput(io.Discard)
	fs.StringVar(&cl.agent, "agent", cl.agent, "agent address")
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				return nil, err
			}
			return nil, usagef("%v", err)
		}
		args = fs.Args()
		if len(args) == 0 {
			break
		}
		if args[0] == "--" {
			pos = append(pos, args[1:]...)
			break
		}
		pos = append(pos, args[0])
		args = args[1:]
	}
	switch {
	case len(pos) < minArgs:
		return nil, usagef("missing arguments")
	case maxArgs >= 0 && len(pos) > maxArgs:
		return nil, usagef("unexpected argument %q", pos[maxArgs])
	}
	return pos, nil
}

func (cl *cli) connect() (*discoverd.Client, error) {
	c, err := discoverd.NewClientWithConfig(discoverd.Config{
		Addr: cl.agent,
		// The client library's warnings become notice lines on stderr.
		Logger: slog.New(&noticeHandler{w: cl.stderr, prefix: "discoverd " + cl.cmd + ": ", level: slog.LevelWarn}),
	})
	if err != nil {
		return nil, err
	}
	cl.client = c
	return c, nil
}

// openSet parses the arguments of a command that takes one NAME (and
// fs's flags), connects, and opens the ServiceSet of NAME, which the
// caller closes.
func (cl *cli) openSet(fs *flag.FlagSet, args []string) (set discoverd.ServiceSet, name string, err error) {
	pos, err := cl.parse(fs, args, 1, 1)
	if err != nil {
		return nil, "", err
	}
	c, err := cl.connect()
	if err != nil {
		return nil, "", err
	}
	if set, err = c.NewServiceSet(pos[0]); err != nil {
		return nil, "", err
	}
	return set, pos[0], nil
}

// register NAME ADDR [key=value...]: register, stay registered until
// interrupted, then unregister.
func (cl *cli) register(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("register", flag.ContinueOnError)
	var cf checkFlags
	cf.define(fs)
	pos, err := cl.parse(fs, args, 2, -1)
	if err != nil {
		return err
	}
	check, err := cf.check(fs)
	if err != nil {
		return err
	}
	name, addr := pos[0], pos[1]
	attrs := make(map[string]string)
	for _, kv := range pos[2:] {
		k, v, ok := strings.Cut(kv, "=")
		if !ok || k == "" {
			return usagef("attribute %q is not key=value", kv)
		}
		attrs[k] = v
	}
	c, err := cl.connect()
	if err != nil {
		return err
	}
	if check != nil {
		return cl.registerChecked(ctx, c, name, addr, attrs, check, cf.detach)
	}
	events := c.WatchReconnects()
	expanded, err := c.RegisterInstance(name, addr, attrs)
	if err != nil {
		return err
	}
	fmt.Fprintf(cl.stdout, "registered %s %s\n", name, expanded)
	connected := true
	apply := func(ev discoverd.ConnEvent) {
		switch ev.Status {
		case discoverd.ConnStatusDisconnected:
			connected = false // the client's notice says so
		case discoverd.ConnStatusConnected:
			connected = true
			fmt.Fprintln(cl.stderr, "discoverd register: reconnected; registered again")
		}
	}
	// drain applies the connection events already queued.
	drain := func() {
		for {
			select {
			case ev := <-events:
				apply(ev)
			default:
				return
			}
		}
	}
	notConfirmed := fmt.Errorf("withdrawal of %s %s not confirmed: not connected to the agent, "+
		"which removes the registration when it sees the connection gone, or after its TTL", name, expanded)
	for {
		select {
		case <-ctx.Done():
			// The client forgets a registration without telling anyone
			// while it is disconnected: say "unregistered" only when
			// the agent answered.
			drain()
			if !connected {
				return notConfirmed
			}
			if err := c.Unregister(name, addr); err != nil {
				return err
			}
			if drain(); !connected {
				return notConfirmed
			}
			fmt.Fprintf(cl.stdout, "unregistered %s %s\n", name, expanded)
			return nil
		case ev := <-events:
			apply(ev)
		}
	}
}

// instanceJSON is the JSON form of an instance, the same as the HTTP
// API's (server.Instance, docs/API.md).
func instanceJSON(name, addr string, attrs map[string]string, created uint) server.Instance {
	return server.InstanceOf(api.ServiceUpdate{Name: name, Addr: addr, Attrs: attrs, Created: created, Online: true})
}

// writeJSON writes v as one line of JSON.
func (cl *cli) writeJSON(v any) error { return json.NewEncoder(cl.stdout).Encode(v) }

// services [-json] [NAME]: without NAME, every service in the store
// with its instance count and leader; with NAME, its online instances,
// oldest first.
func (cl *cli) services(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("services", flag.ContinueOnError)
	asJSON := fs.Bool("json", false, "print JSON")
	pos, err := cl.parse(fs, args, 0, 1)
	if err != nil {
		return err
	}
	if len(pos) == 0 {
		return cl.listServices(ctx, *asJSON)
	}
	c, err := cl.connect()
	if err != nil {
		return err
	}
	set, err := c.NewServiceSet(pos[0])
	if err != nil {
		return err
	}
	defer set.Close()
	services := set.Services()
	if *asJSON {
		out := make([]server.Instance, 0, len(services))
		for _, s := range services {
			out = append(out, instanceJSON(s.Name, s.Addr, s.Attrs, s.Created))
		}
		sts, err := cl.fetchChecks(ctx, pos[0])
		if err != nil {
			return err
		}
		return cl.writeJSON(withChecks(out, sts))
	}
	for _, s := range services {
		fmt.Fprintln(cl.stdout, s.Addr)
	}
	return nil
}

// listTimeout bounds each page request of "services" without a name.
const listTimeout = 30 * time.Second

// listServices prints every service, reading GET /services page by page.
func (cl *cli) listServices(ctx context.Context, asJSON bool) error {
	addr, useTLS, err := discoverd.ParseAgentAddr(cl.agent)
	if err != nil {
		return err
	}
	base := "http://" + addr + "/services"
	tr := &http.Transport{Proxy: nil} // the agent is local, or at least not behind a proxy
	if useTLS {
		base = "https://" + addr + "/services"
		if tr.TLSClientConfig, err = discoverd.TLSConfigFromEnv(nil); err != nil {
			return err
		}
	}
	token := os.Getenv(discoverd.EnvToken)
	defer tr.CloseIdleConnections()
	hc := &http.Client{Transport: tr, Timeout: listTimeout}
	all := []server.ServiceSummary{}
	for after := ""; ; {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, base+"?after="+url.QueryEscape(after), nil)
		if err != nil {
			return err
		}
		if token != "" {
			req.Header.Set("Authorization", "Bearer "+token)
		}
		resp, err := hc.Do(req)
		if err != nil {
			return fmt.Errorf("listing services: %w", err)
		}
		var page server.ServiceList
		var errBody server.ErrorBody
		dec := json.NewDecoder(io.LimitReader(resp.Body, 64<<20))
		if resp.StatusCode == http.StatusOK {
			err = dec.Decode(&page)
		} else if err = dec.Decode(&errBody); err == nil {
			err = &api.Error{Code: errBody.Code, Message: errBody.Error}
		}
		resp.Body.Close()
		if err != nil {
			return fmt.Errorf("listing services: %w", err)
		}
		all = append(all, page.Services...)
		if page.Next == "" {
			break
		}
		if page.Next == after {
			return fmt.Errorf("listing services: the agent answered the cursor %q with itself", after)
		}
		after = page.Next
	}
	if asJSON {
		return cl.writeJSON(all)
	}
	tw := tabwriter.NewWriter(cl.stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tINSTANCES\tLEADER")
	for _, s := range all {
		fmt.Fprintf(tw, "%s\t%d\t%s\n", s.Name, s.Instances, s.Leader)
	}
	return tw.Flush()
}

// watchEvent is one line of "watch -json": event is "online", "offline"
// or "current" (the instances that existed have been listed; no
// instance), as the events of the HTTP API's SSE stream.
type watchEvent struct {
	Event    string           `json:"event"`
	Instance *server.Instance `json:"instance,omitempty"`
}

// watch NAME: print the agent's stream as lines until interrupted:
// "online ADDR [key=value...]", "offline ADDR", and "current" once the
// instances that already existed have been listed.
func (cl *cli) watch(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("watch", flag.ContinueOnError)
	asJSON := fs.Bool("json", false, "print one JSON object per line")
	pos, err := cl.parse(fs, args, 1, 1)
	if err != nil {
		return err
	}
	c, err := cl.connect()
	if err != nil {
		return err
	}
	stream, err := c.Subscribe(ctx, pos[0])
	if err != nil {
		return err
	}
	defer stream.Close()
	for u := range stream.Updates() {
		if !*asJSON {
			fmt.Fprintln(cl.stdout, formatUpdate(u))
			continue
		}
		ev := watchEvent{Event: "current"}
		if !u.IsSentinel() {
			in := instanceJSON(u.Name, u.Addr, u.Attrs, u.Created)
			ev = watchEvent{Event: "offline", Instance: &in}
			if u.Online {
				ev.Event = "online"
			}
		}
		if err := cl.writeJSON(ev); err != nil {
			return err
		}
	}
	if ctx.Err() != nil {
		return nil // interrupted
	}
	return stream.Err()
}

func formatUpdate(u *discoverd.ServiceUpdate) string {
	if u.IsSentinel() {
		return "current"
	}
	var b strings.Builder
	if u.Online {
		b.WriteString("online ")
	} else {
		b.WriteString("offline ")
	}
	b.WriteString(u.Addr)
	for _, k := range slices.Sorted(maps.Keys(u.Attrs)) {
		fmt.Fprintf(&b, " %s=%s", k, u.Attrs[k])
	}
	return b.String()
}

// leader NAME [-watch] [-json]: print the leader's address (an error if
// there is none); with -watch, print each new leader ("none" when the
// service has no instance) until interrupted. With -json each leader is
// one line: the instance as JSON, or null for none.
func (cl *cli) leader(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("leader", flag.ContinueOnError)
	follow := fs.Bool("watch", false, "print each new leader until interrupted")
	asJSON := fs.Bool("json", false, "print one JSON object per line")
	set, name, err := cl.openSet(fs, args)
	if err != nil {
		return err
	}
	defer set.Close()
	if !*follow {
		l := set.Leader()
		if l == nil {
			return fmt.Errorf("service %q has no online instance", name)
		}
		return cl.printLeader(l, *asJSON)
	}
	leaders := set.Leaders()
	for {
		select {
		case <-ctx.Done():
			return nil
		case l, ok := <-leaders:
			if !ok {
				return errors.New("the service set was closed")
			}
			if err := cl.printLeader(l, *asJSON); err != nil {
				return err
			}
		}
	}
}

// printLeader prints l's address, or "none" for nil; as JSON, the
// instance, or null.
func (cl *cli) printLeader(l *discoverd.Service, asJSON bool) error {
	switch {
	case asJSON && l == nil:
		return cl.writeJSON(nil)
	case asJSON:
		return cl.writeJSON(instanceJSON(l.Name, l.Addr, l.Attrs, l.Created))
	case l == nil:
		_, err := fmt.Fprintln(cl.stdout, "none")
		return err
	}
	_, err := fmt.Fprintln(cl.stdout, l.Addr)
	return err
}
