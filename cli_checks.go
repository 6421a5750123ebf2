package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/flynn/discoverd/api"
	discoverd "github.com/flynn/discoverd/client"
	"github.com/flynn/discoverd/server"
)

// checkFlags are the flags of "register" that hand the registration to
// the agent with a health check.
type checkFlags struct {
	http, tcp, grpc                    string
	interval, timeout, deregisterAfter time.Duration
	rise, fall                         int
	detach                             bool
}

func (f *checkFlags) define(fs *flag.FlagSet) {
	fs.StringVar(&f.http, "check-http", "", "health-check `URL` (GET; 2xx and 3xx pass): the agent keeps the registration")
	fs.StringVar(&f.tcp, "check-tcp", "", "health-check `host:port` (a TCP connect): the agent keeps the registration")
	fs.StringVar(&f.grpc, "check-grpc", "", "health-check `host:port[/service]` (gRPC health service; SERVING passes): the agent keeps the registration")
	fs.DurationVar(&f.interval, "interval", 0, "time between probes (default 10s)")
	fs.DurationVar(&f.timeout, "timeout", 0, "bound on one probe (default min(interval/2, 5s))")
	fs.IntVar(&f.rise, "rise", 0, "passes in a row to go online (default 2)")
	fs.IntVar(&f.fall, "fall", 0, "failures in a row to go offline (default 3)")
	fs.DurationVar(&f.deregisterAfter, "deregister-after", 0, "drop the registration after failing this long (default never; at least 1m)")
	fs.BoolVar(&f.detach, "detach", false, "with a check: leave the registration to the agent and exit")
}

// check returns the check the flags describe, or nil without -check-http
// or -check-tcp; a usage error for check flags given without one.
func (f *checkFlags) check(fs *flag.FlagSet) (*api.Check, error) {
	if f.http == "" && f.tcp == "" && f.grpc == "" {
		var stray []string
		fs.Visit(func(fl *flag.Flag) {
			switch fl.Name {
			case "interval", "timeout", "rise", "fall", "deregister-after", "detach":
				stray = append(stray, "-"+fl.Name)
			}
		})
		if len(stray) > 0 {
			return nil, usagef("%s needs -check-http, -check-tcp or -check-grpc", strings.Join(stray, ", "))
		}
		return nil, nil
	}
	c := &api.Check{HTTP: f.http, TCP: f.tcp, GRPC: f.grpc, Interval: api.Duration(f.interval), Timeout: api.Duration(f.timeout),
		Rise: f.rise, Fall: f.fall, DeregisterAfter: api.Duration(f.deregisterAfter)}
	if err := c.Validate(); err != nil {
		return nil, usagef("%s", err.(*api.Error).Message)
	}
	return c, nil
}

// registerChecked hands name/addr to the agent with check; without
// detach it waits for an interrupt and then removes it.
func (cl *cli) registerChecked(ctx context.Context, c *discoverd.Client, name, addr string, attrs map[string]string, check *api.Check, detach bool) error {
	expanded, err := c.RegisterChecked(name, addr, attrs, *check)
	if err != nil {
		return err
	}
	d := check.WithDefaults()
	if detach {
		fmt.Fprintf(cl.stdout, "registered %s %s, kept by the agent with a %s check of %s every %v (discoverd unregister %s %s removes it)\n",
			name, expanded, d.Kind(), d.Target(), d.Interval, name, expanded)
		return nil
	}
	fmt.Fprintf(cl.stdout, "registered %s %s with a %s check of %s every %v; online after %d passes\n",
		name, expanded, d.Kind(), d.Target(), d.Interval, d.Rise)
	<-ctx.Done()
	if err := c.UnregisterChecked(name, expanded); err != nil {
		return err
	}
	fmt.Fprintf(cl.stdout, "unregistered %s %s\n", name, expanded)
	return nil
}

// unregister NAME ADDR: remove a registration the agent keeps for a
// check (or one of this command's own connection, which has none).
func (cl *cli) unregister(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("unregister", flag.ContinueOnError)
	pos, err := cl.parse(fs, args, 2, 2)
	if err != nil {
		return err
	}
	c, err := cl.connect()
	if err != nil {
		return err
	}
	if err := c.UnregisterChecked(pos[0], pos[1]); err != nil {
		if api.ErrorCode(err) == api.CodeNotFound {
			return fmt.Errorf("the agent keeps no registration %s %s", pos[0], pos[1])
		}
		return err
	}
	fmt.Fprintf(cl.stdout, "unregistered %s %s\n", pos[0], pos[1])
	return nil
}

// fetchChecks reads GET /checks?service=NAME: the checked registrations
// of name on the agent. An agent without checks (404) has none.
func (cl *cli) fetchChecks(ctx context.Context, name string) ([]api.CheckStatus, error) {
	u := "http://" + strings.TrimPrefix(cl.agent, "tcp://") + "/checks?service=" + url.QueryEscape(name)
	tr := &http.Transport{Proxy: nil}
	defer tr.CloseIdleConnections()
	hc := &http.Client{Transport: tr, Timeout: listTimeout}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return nil, err
	}
	resp, err := hc.Do(req)
	if err != nil {
		return nil, fmt.Errorf("reading checks: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode == http.StatusNotFound {
		return nil, nil
	}
	dec := json.NewDecoder(io.LimitReader(resp.Body, 64<<20))
	if resp.StatusCode != http.StatusOK {
		var e server.ErrorBody
		if err := dec.Decode(&e); err != nil {
			return nil, fmt.Errorf("reading checks: HTTP %s", resp.Status)
		}
		return nil, &api.Error{Code: e.Code, Message: e.Error}
	}
	var out []api.CheckStatus
	if err := dec.Decode(&out); err != nil {
		return nil, fmt.Errorf("reading checks: %w", err)
	}
	return out, nil
}

// withChecks attaches to each instance its check status, and appends the
// checked registrations of the agent that are not online (Created 0).
func withChecks(list []server.Instance, sts []api.CheckStatus) []server.Instance {
	byAddr := make(map[string]*api.CheckStatus, len(sts))
	for i := range sts {
		byAddr[sts[i].Addr] = &sts[i]
	}
	for i := range list {
		if st := byAddr[list[i].Addr]; st != nil {
			list[i].Check = st
			delete(byAddr, list[i].Addr)
		}
	}
	for i := range sts {
		if st := byAddr[sts[i].Addr]; st != nil {
			inst := server.InstanceOf(api.ServiceUpdate{Name: st.Name, Addr: st.Addr, Attrs: st.Attrs})
			inst.Check = st
			list = append(list, inst)
		}
	}
	return list
}
