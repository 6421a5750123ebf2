package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"time"

	"github.com/miekg/dns"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/flynn/discoverd/agent"
	"github.com/flynn/discoverd/api"
	"github.com/flynn/discoverd/dnsserver"
)

// DNSResult is the DNS scenario: dnsperf against the agent's DNS server
// and, side by side in the same run, against Unbound serving the same
// records from a static local-zone; and how soon a registration is
// answered by DNS.
type DNSResult struct {
	Dnsperf string    `json:"dnsperf"` // version line, or why it did not run
	Unbound string    `json:"unbound"` // version line, or why it did not run
	Command string    `json:"command"` // the saturation command line (server and port vary)
	Cases   []DNSCase `json:"cases"`
	// Register → first DNS answer that has it: on the agent that serves
	// DNS (Register returns once its own cache shows the write), and on
	// another agent of the same store (the watch's delay).
	VisibleSameAgent  Dist `json:"visible_same_agent"`
	VisibleOtherAgent Dist `json:"visible_other_agent"`
}

// DNSCase is one query against both servers.
type DNSCase struct {
	Name      string     `json:"name"`
	Query     string     `json:"query"`
	Instances int        `json:"instances"`
	Transport string     `json:"transport"`
	EDNS      bool       `json:"edns"`
	Discoverd DNSFigures `json:"discoverd"`
	Unbound   DNSFigures `json:"unbound"`
	Load      string     `json:"loadavg"` // /proc/loadavg as the case started
	// ServerP99 is discoverd's own time per query during its half-load
	// run, from reading the query to sending the reply (its
	// discoverd_dns_query_duration_seconds histogram): the upper bound
	// of the bucket holding the 99th percentile, ms.
	ServerP99 float64 `json:"server_p99_ms"`
}

// DNSFigures are one server's figures for one case.
type DNSFigures struct {
	QPS          float64 `json:"qps"`           // at saturation
	Lost         float64 `json:"lost_percent"`  // at saturation
	ResponseSize float64 `json:"response_size"` // average, bytes
	HalfQPS      float64 `json:"half_qps"`      // the rate of the latency run
	HalfLatency  Dist    `json:"half_latency"`  // at half the saturation rate
	// At the same offered rate for both servers: half the lower of their
	// saturation rates (for the slower server, its HalfLatency run).
	SameQPS     float64 `json:"same_qps"`
	SameLatency Dist    `json:"same_latency"`
}

// dnsperfClients and dnsperfOutstanding are the load at saturation: a
// few sockets, each with up to dnsperfOutstanding queries in flight.
const (
	dnsperfClients     = 4
	dnsperfOutstanding = 100
)

func benchDNS(ctx context.Context, e *env, cfg *config) (*DNSResult, error) {
	res := &DNSResult{}
	// The in-process session below does not heartbeat: a TTL longer than
	// the scenario keeps its registrations.
	la, err := startAgent(ctx, e.endpoints, agentOptions{TTL: time.Hour}, e.log)
	if err != nil {
		return nil, err
	}
	defer la.Close()
	view := agent.NewView(la.agent, agent.ViewConfig{}, dnsserver.Compile)
	defer view.Close()
	srv, err := dnsserver.Listen(dnsserver.Config{Addr: "127.0.0.1:0", Cache: view, Logger: e.log})
	if err != nil {
		return nil, err
	}
	defer srv.Close()
	dnsAddr := srv.UDPAddr().String()

	sess := la.agent.NewSession(0)
	defer sess.Close()
	records := map[string][]string{} // name → IPs, for Unbound
	for _, svc := range []struct {
		name string
		n    int
	}{{"web3", 3}, {"big300", 300}} {
		for i := range svc.n {
			ip := fmt.Sprintf("10.3.%d.%d", i/250, i%250+1)
			rctx, cancel := context.WithTimeout(ctx, opTimeout)
			_, err := sess.Register(rctx, api.Args{Name: svc.name, Addr: net.JoinHostPort(ip, "8080")})
			cancel()
			if err != nil {
				return nil, err
			}
			records[svc.name] = append(records[svc.name], ip)
		}
		if _, err := dnsQuery(dnsAddr, svc.name+".discoverd.", dns.TypeA); err != nil { // cache it
			return nil, err
		}
	}

	if res.VisibleSameAgent, err = dnsVisible(ctx, la.agent, dnsAddr, "vis-same", cfg.DNSVisible); err != nil {
		return nil, err
	}
	other, err := startAgent(ctx, e.endpoints, agentOptions{}, e.log)
	if err != nil {
		return nil, err
	}
	defer other.Close()
	if res.VisibleOtherAgent, err = dnsVisible(ctx, other.agent, dnsAddr, "vis-other", cfg.DNSVisible); err != nil {
		return nil, err
	}
	e.row(Row{Scenario: "8 dns", Figure: "register→DNS visible, same agent p50/p99",
		Value:  fmt.Sprintf("%s / %s", fmtMs(res.VisibleSameAgent.P50), fmtMs(res.VisibleSameAgent.P99)),
		Target: "< 5 ms", Verdict: verdict(res.VisibleSameAgent.P99 < 5)})
	e.row(Row{Scenario: "8 dns", Figure: "register→DNS visible, other agent p50/p99",
		Value: fmt.Sprintf("%s / %s", fmtMs(res.VisibleOtherAgent.P50), fmtMs(res.VisibleOtherAgent.P99))})

	perf, err := exec.LookPath("dnsperf")
	if err != nil {
		res.Dnsperf = "not installed (apt-get install dnsperf)"
		e.row(Row{Scenario: "8 dns", Figure: "queries/s", Value: "SKIPPED: dnsperf not installed (apt-get install dnsperf unbound)"})
		return res, nil
	}
	res.Dnsperf = commandVersion(perf, "-h", "Version")
	unboundAddr, stopUnbound, err := startUnbound(ctx, e.dir, records)
	if err != nil {
		res.Unbound = "not run: " + oneLine(err)
	} else {
		defer stopUnbound()
		res.Unbound = commandVersion("unbound", "-V", "Version")
	}

	cases := []DNSCase{
		{Name: "3 instances, UDP", Query: "web3.discoverd A", Instances: 3, Transport: "udp"},
		{Name: "300 instances, UDP EDNS0 4096", Query: "big300.discoverd A", Instances: 300, Transport: "udp", EDNS: true},
		{Name: "300 instances, TCP", Query: "big300.discoverd A", Instances: 300, Transport: "tcp"},
	}
	for i := range cases {
		c := &cases[i]
		qfile := filepath.Join(e.dir, fmt.Sprintf("dns-queries-%d", i))
		if err := os.WriteFile(qfile, []byte(c.Query+"\n"), 0o644); err != nil {
			return nil, err
		}
		c.Load = readTrim("/proc/loadavg")
		// Alternate which server goes first, so that neither always
		// gets the quieter moment of a shared machine.
		type server struct {
			addr string
			figs *DNSFigures
		}
		servers := []server{{dnsAddr, &c.Discoverd}}
		if unboundAddr != "" {
			servers = append(servers, server{unboundAddr, &c.Unbound})
			if i%2 == 1 {
				servers[0], servers[1] = servers[1], servers[0]
			}
		}
		// Saturation, then latency at half of it, for each; then the
		// faster one again at the slower one's half rate.
		for _, s := range servers {
			args := dnsperfArgs(s.addr, qfile, c)
			res.Command = "dnsperf " + strings.Join(args, " ")
			if err := dnsperfSaturation(ctx, perf, s.figs, args, cfg.DNSDuration); err != nil {
				return nil, fmt.Errorf("dnsperf %s on %s: %w", c.Name, s.addr, err)
			}
		}
		for _, s := range servers {
			s.figs.HalfQPS = s.figs.QPS / 2
			before := serverTimes(srv)
			d, err := dnsperfLatency(ctx, perf, dnsperfArgs(s.addr, qfile, c), s.figs.HalfQPS, cfg.DNSDuration, e.dir)
			if err != nil {
				return nil, fmt.Errorf("dnsperf %s on %s: %w", c.Name, s.addr, err)
			}
			s.figs.HalfLatency = d
			if s.figs == &c.Discoverd {
				c.ServerP99 = p99Bound(before, serverTimes(srv))
			}
		}
		if len(servers) == 2 {
			slow, fast := servers[0], servers[1]
			if slow.figs.QPS > fast.figs.QPS {
				slow, fast = fast, slow
			}
			slow.figs.SameQPS, slow.figs.SameLatency = slow.figs.HalfQPS, slow.figs.HalfLatency
			fast.figs.SameQPS = slow.figs.HalfQPS
			d, err := dnsperfLatency(ctx, perf, dnsperfArgs(fast.addr, qfile, c), fast.figs.SameQPS, cfg.DNSDuration, e.dir)
			if err != nil {
				return nil, fmt.Errorf("dnsperf %s on %s: %w", c.Name, fast.addr, err)
			}
			fast.figs.SameLatency = d
		}
		row := Row{Scenario: "8 dns", Figure: "queries/s, " + c.Name, Value: fmt.Sprintf("%.0f", c.Discoverd.QPS)}
		if c.Unbound.QPS > 0 {
			row.Etcd = fmt.Sprintf("unbound %.0f", c.Unbound.QPS)
			row.Ratio = ratio(c.Discoverd.QPS, c.Unbound.QPS)
			row.Target = "≥ 0.50×"
			row.Verdict = verdict(c.Discoverd.QPS >= 0.5*c.Unbound.QPS)
		}
		e.row(row)
		row = Row{Scenario: "8 dns", Figure: "p99 at half load, " + c.Name, Value: fmtMs(c.Discoverd.HalfLatency.P99),
			Target: "< 1 ms", Verdict: verdict(c.Discoverd.HalfLatency.P99 < 1)}
		if c.Unbound.QPS > 0 {
			row.Etcd = "unbound " + fmtMs(c.Unbound.HalfLatency.P99)
			row.Ratio = diffMs(c.Discoverd.HalfLatency.P99, c.Unbound.HalfLatency.P99)
		}
		e.row(row)
		e.row(Row{Scenario: "8 dns", Figure: "server's own time p99 at half load, " + c.Name, Value: "≤ " + fmtMs(c.ServerP99)})
		if c.Unbound.QPS > 0 {
			e.row(Row{Scenario: "8 dns", Figure: fmt.Sprintf("p99 at %.0f q/s (both), %s", c.Discoverd.SameQPS, c.Name),
				Value: fmtMs(c.Discoverd.SameLatency.P99), Etcd: "unbound " + fmtMs(c.Unbound.SameLatency.P99),
				Ratio: diffMs(c.Discoverd.SameLatency.P99, c.Unbound.SameLatency.P99)})
		}
	}
	res.Cases = cases
	return res, nil
}

func dnsperfArgs(addr, qfile string, c *DNSCase) []string {
	host, port, _ := net.SplitHostPort(addr)
	args := []string{"-s", host, "-p", port, "-d", qfile, "-m", c.Transport}
	if c.EDNS {
		args = append(args, "-e")
	}
	return args
}

var (
	reQPS   = regexp.MustCompile(`Queries per second:\s+([0-9.]+)`)
	reLost  = regexp.MustCompile(`Queries lost:\s+\d+ \(([0-9.]+)%\)`)
	reSize  = regexp.MustCompile(`Average packet size:\s+request \d+, response (\d+)`)
	reQuery = regexp.MustCompile(`^> (\S+) \S+ \S+ ([0-9.]+)$`)
)

// dnsperfSaturation measures one server's queries/s at saturation.
func dnsperfSaturation(ctx context.Context, perf string, figs *DNSFigures, args []string, d time.Duration) error {
	sat := append(clone(args), "-l", seconds(d), "-c", strconv.Itoa(dnsperfClients), "-q", strconv.Itoa(dnsperfOutstanding))
	out, err := exec.CommandContext(ctx, perf, sat...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%v: %s", err, lastLines(out, 3))
	}
	m := reQPS.FindSubmatch(out)
	if m == nil {
		return fmt.Errorf("no queries/s in dnsperf's output: %s", lastLines(out, 5))
	}
	figs.QPS, _ = strconv.ParseFloat(string(m[1]), 64)
	if m := reLost.FindSubmatch(out); m != nil {
		figs.Lost, _ = strconv.ParseFloat(string(m[1]), 64)
	}
	if m := reSize.FindSubmatch(out); m != nil {
		figs.ResponseSize, _ = strconv.ParseFloat(string(m[1]), 64)
	}
	return nil
}

// dnsperfLatency returns the latency of every query sent at qps queries/s
// (dnsperf -Q, -v: one line per query). dnsperf writes to a file, read
// once it is done: parsing its lines as they come would compete for the
// CPU (and, in this process, for the Go runtime) with the agent it
// measures.
func dnsperfLatency(ctx context.Context, perf string, args []string, qps float64, d time.Duration, dir string) (Dist, error) {
	f, err := os.CreateTemp(dir, "dnsperf-*.out")
	if err != nil {
		return Dist{}, err
	}
	defer os.Remove(f.Name())
	defer f.Close()
	cmd := exec.CommandContext(ctx, perf, append(clone(args), "-l", seconds(d), "-Q", strconv.Itoa(max(1, int(qps))), "-v")...)
	cmd.Stdout = f
	if err := cmd.Run(); err != nil {
		return Dist{}, fmt.Errorf("dnsperf at %.0f q/s: %w", qps, err)
	}
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		return Dist{}, err
	}
	var lat []time.Duration
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if m := reQuery.FindStringSubmatch(sc.Text()); m != nil {
			s, _ := strconv.ParseFloat(m[2], 64)
			lat = append(lat, time.Duration(s*float64(time.Second)))
		}
	}
	if err := sc.Err(); err != nil {
		return Dist{}, err
	}
	if len(lat) == 0 {
		return Dist{}, fmt.Errorf("dnsperf at %.0f q/s: no query answered", qps)
	}
	return summarize(lat), nil
}

// histogram is a snapshot of a Prometheus histogram: cumulative counts
// by upper bound (seconds), and the count of all observations.
type histogram struct {
	bounds []float64
	counts []uint64
	total  uint64
}

// serverTimes snapshots srv's histogram of its time per query.
func serverTimes(srv *dnsserver.Server) histogram {
	ch := make(chan prometheus.Metric, 1)
	srv.Collectors()[1].Collect(ch)
	var m dto.Metric
	if err := (<-ch).Write(&m); err != nil || m.Histogram == nil {
		return histogram{}
	}
	h := histogram{total: m.Histogram.GetSampleCount()}
	for _, b := range m.Histogram.Bucket {
		h.bounds = append(h.bounds, b.GetUpperBound())
		h.counts = append(h.counts, b.GetCumulativeCount())
	}
	return h
}

// p99Bound returns the upper bound (ms) of the bucket that holds the 99th
// percentile of the observations made between two snapshots; +Inf beyond
// the last bucket, 0 without observations.
func p99Bound(before, after histogram) float64 {
	n := after.total - before.total
	if n == 0 || len(before.counts) != len(after.counts) {
		return 0
	}
	for i, b := range after.bounds {
		if float64(after.counts[i]-before.counts[i]) >= 0.99*float64(n) {
			return b * 1000
		}
	}
	return math.Inf(1)
}

func seconds(d time.Duration) string { return strconv.Itoa(max(1, int(d/time.Second))) }

func clone(s []string) []string { return append([]string(nil), s...) }

func lastLines(out []byte, n int) string {
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "; ")
}

// dnsVisible registers n instances of name, one at a time, through a,
// and times each from Register's return to the first answer of the DNS
// server at dnsAddr that has it (queried in a loop). Each instance is
// removed before the next.
func dnsVisible(ctx context.Context, a *agent.Agent, dnsAddr, name string, n int) (Dist, error) {
	sess := a.NewSession(0)
	defer sess.Close()
	if _, err := dnsQuery(dnsAddr, name+".discoverd.", dns.TypeA); err != nil { // cache the name
		return Dist{}, err
	}
	c := &dns.Client{Net: "udp", Timeout: time.Second}
	conn, err := c.Dial(dnsAddr)
	if err != nil {
		return Dist{}, err
	}
	defer conn.Close()
	var lat []time.Duration
	for i := range n {
		ip := fmt.Sprintf("10.4.%d.%d", i/250, i%250+1)
		args := api.Args{Name: name, Addr: net.JoinHostPort(ip, "80")}
		rctx, cancel := context.WithTimeout(ctx, opTimeout)
		_, err := sess.Register(rctx, args)
		cancel()
		if err != nil {
			return Dist{}, err
		}
		acked := time.Now()
		q := new(dns.Msg)
		q.SetQuestion(name+".discoverd.", dns.TypeA)
		for {
			resp, _, err := c.ExchangeWithConn(q, conn)
			if err != nil {
				return Dist{}, err
			}
			if len(resp.Answer) == 1 && resp.Answer[0].(*dns.A).A.String() == ip {
				lat = append(lat, time.Since(acked))
				break
			}
			if time.Since(acked) > opTimeout {
				return Dist{}, fmt.Errorf("%s not answered by DNS %v after its registration", ip, opTimeout)
			}
		}
		rctx, cancel = context.WithTimeout(ctx, opTimeout)
		err = sess.Unregister(rctx, args)
		cancel()
		if err != nil {
			return Dist{}, err
		}
	}
	return summarize(lat), nil
}

func dnsQuery(addr, name string, qtype uint16) (*dns.Msg, error) {
	q := new(dns.Msg)
	q.SetQuestion(name, qtype)
	resp, _, err := (&dns.Client{Timeout: opTimeout}).Exchange(q, addr)
	return resp, err
}

// startUnbound runs unbound with a static local-zone "discoverd." holding
// records (name → IPs, TTL 5 s), on a free loopback port; its threads as
// many as the CPUs (as the Go runtime's). It returns its address and a
// function that stops it.
func startUnbound(ctx context.Context, dir string, records map[string][]string) (string, func(), error) {
	bin, err := exec.LookPath("unbound")
	if err != nil {
		return "", nil, errors.New("unbound not installed (apt-get install unbound)")
	}
	port, err := freeUDPTCPPort()
	if err != nil {
		return "", nil, err
	}
	udir := filepath.Join(dir, "unbound")
	if err := os.MkdirAll(udir, 0o755); err != nil {
		return "", nil, err
	}
	var conf strings.Builder
	fmt.Fprintf(&conf, `server:
  interface: 127.0.0.1
  port: %d
  do-daemonize: no
  username: ""
  chroot: ""
  directory: %q
  pidfile: ""
  use-syslog: no
  logfile: ""
  verbosity: 0
  num-threads: %d
  do-ip6: no
  access-control: 127.0.0.0/8 allow
  module-config: "iterator"
  local-zone: "discoverd." static
`, port, udir, runtime.NumCPU())
	for name, ips := range records {
		for _, ip := range ips {
			fmt.Fprintf(&conf, "  local-data: \"%s.discoverd. 5 IN A %s\"\n", name, ip)
		}
	}
	conf.WriteString("remote-control:\n  control-enable: no\n")
	cfile := filepath.Join(udir, "unbound.conf")
	if err := os.WriteFile(cfile, []byte(conf.String()), 0o644); err != nil {
		return "", nil, err
	}
	cmd := exec.Command(bin, "-d", "-c", cfile)
	logf, err := os.Create(filepath.Join(udir, "unbound.log"))
	if err != nil {
		return "", nil, err
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		logf.Close()
		return "", nil, err
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); logf.Close(); close(done) }() // ends with the process
	stop := func() {
		cmd.Process.Kill()
		<-done
	}
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	deadline := time.Now().Add(10 * time.Second)
	for {
		q := new(dns.Msg)
		q.SetQuestion("web3.discoverd.", dns.TypeA)
		resp, _, err := (&dns.Client{Timeout: 200 * time.Millisecond}).Exchange(q, addr)
		if err == nil && len(resp.Answer) == 3 {
			return addr, stop, nil
		}
		select {
		case <-done:
			b, _ := os.ReadFile(filepath.Join(udir, "unbound.log"))
			return "", nil, fmt.Errorf("unbound exited: %s", lastLines(b, 3))
		case <-ctx.Done():
			stop()
			return "", nil, ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			stop()
			return "", nil, fmt.Errorf("unbound not answering on %s after 10s (last: %v)", addr, err)
		}
	}
}

// freeUDPTCPPort returns a loopback port that was free for both UDP and
// TCP a moment ago.
func freeUDPTCPPort() (int, error) {
	for range 10 {
		pc, err := net.ListenPacket("udp", "127.0.0.1:0")
		if err != nil {
			return 0, err
		}
		port := pc.LocalAddr().(*net.UDPAddr).Port
		ln, err := net.Listen("tcp", pc.LocalAddr().String())
		pc.Close()
		if err == nil {
			ln.Close()
			return port, nil
		}
	}
	return 0, errors.New("no free port for both UDP and TCP")
}

// commandVersion runs bin args and returns its first output line holding
// marker.
func commandVersion(bin string, args ...string) string {
	marker := args[len(args)-1]
	out, _ := exec.Command(bin, args[:len(args)-1]...).CombinedOutput()
	for line := range strings.SplitSeq(string(out), "\n") {
		if strings.Contains(line, marker) {
			return strings.TrimSpace(line)
		}
	}
	return "unknown version"
}
