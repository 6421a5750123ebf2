// Command bench is discoverd's load tool: it measures the performance
// targets of DESIGN.md §8, each beside raw etcd where a baseline applies,
// and prints a table (and, with -json, writes every figure to a file).
//
//	go run ./bench -json bench-results.json   # make bench: the full run, < 5 min on 2 cores
//	go run ./bench -quick                     # a smoke run at tiny sizes
//	go run ./bench -run latency -cpuprofile cpu.out
//
// It starts its own embedded etcd (free loopback ports, a temp dir), agents
// in this process served over real TCP as main.go serves them, and child
// processes (this binary re-executed with a hidden first argument
// "-child=agent" or "-child=client") for what must be killed or measured
// apart. docs/BENCHMARKS.md describes each scenario and its figures.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"strings"
	"sync"
	"syscall"
	"text/tabwriter"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/flynn/discoverd/backend/etcd/embedded"
)

func main() {
	if isChild(os.Args[1:]) {
		os.Exit(childMain(os.Args[1:]))
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

// scenarios in the order they run.
var scenarios = []string{"throughput", "latency", "heartbeat", "fanout", "failure", "start", "conns", "dns", "acl", "checks"}

// config is the sizes of a run.
type config struct {
	Run        map[string]bool
	JSON       string
	CPUProfile string
	// AgentProfile is a directory for the CPU and heap profiles of the
	// fan-out scenario's agent process.
	AgentProfile string
	Quick        bool

	Duration         time.Duration // each throughput measurement
	LatencyEvents    int
	LatencyBudget    time.Duration
	HeartbeatConns   int
	HeartbeatPerConn int
	HeartbeatTTL     time.Duration
	FanoutSubs       int
	FanoutConns      int
	FanoutRounds     int
	ClientKills      int
	AgentKills       []killSpec
	Starts           int
	StartMode        string        // "binary" or "child"
	ConnsNofile      int           // the agent's descriptor limit in scenario 7
	DNSDuration      time.Duration // each dnsperf run (scenario 8)
	DNSVisible       int           // register→DNS visible samples per case
	Checks           int           // checked registrations (scenario 10)
	ChecksInterval   time.Duration // their check interval
	ChecksWindow     time.Duration // the steady window measured
}

// fullConfig is make bench's run; quickConfig a smoke run.
func fullConfig() config {
	return config{
		Duration:      3 * time.Second,
		LatencyEvents: 10000, LatencyBudget: 60 * time.Second,
		HeartbeatConns: 100, HeartbeatPerConn: 100, HeartbeatTTL: 10 * time.Second,
		FanoutSubs: 10000, FanoutConns: 100, FanoutRounds: 5,
		ClientKills: 20,
		AgentKills:  []killSpec{{10 * time.Second, 4}, {3 * time.Second, 6}},
		Starts:      3, StartMode: "binary",
		ConnsNofile: 4096,
		DNSDuration: 5 * time.Second, DNSVisible: 200,
		Checks: 5000, ChecksInterval: 10 * time.Second, ChecksWindow: time.Minute,
	}
}

func quickConfig() config {
	return config{
		Duration:      300 * time.Millisecond,
		LatencyEvents: 100, LatencyBudget: 5 * time.Second,
		HeartbeatConns: 4, HeartbeatPerConn: 5, HeartbeatTTL: 2 * time.Second,
		FanoutSubs: 100, FanoutConns: 4, FanoutRounds: 2,
		ClientKills: 2,
		AgentKills:  []killSpec{{time.Second, 2}},
		Starts:      1, StartMode: "child",
		ConnsNofile: 256,
		DNSDuration: time.Second, DNSVisible: 10,
		Checks: 50, ChecksInterval: time.Second, ChecksWindow: 3 * time.Second,
	}
}

// parseFlags returns the run's config. -quick selects the smoke sizes;
// explicit size flags override either set.
func parseFlags(args []string, stderr io.Writer) (*config, error) {
	full, quick := fullConfig(), quickConfig()
	cfg := full
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	runList := fs.String("run", strings.Join(scenarios, ","), "comma-separated scenarios to run: "+strings.Join(scenarios, ", "))
	fs.StringVar(&cfg.JSON, "json", "", "write every figure to this JSON `file`")
	fs.StringVar(&cfg.CPUProfile, "cpuprofile", "", "write a CPU profile of this process (load generator, in-process agents and etcd) to `file`")
	fs.StringVar(&cfg.AgentProfile, "agent-profile", "", "write CPU and heap profiles of the fan-out agent process into `dir`")
	fs.BoolVar(&cfg.Quick, "quick", false, "tiny sizes, for a smoke run")
	fs.DurationVar(&cfg.Duration, "duration", cfg.Duration, "length of each throughput measurement")
	fs.IntVar(&cfg.LatencyEvents, "latency-events", cfg.LatencyEvents, "register→event samples (and as many raw etcd ones)")
	fs.DurationVar(&cfg.LatencyBudget, "latency-budget", cfg.LatencyBudget, "time budget of the latency scenario; fewer samples if it runs out")
	fs.IntVar(&cfg.HeartbeatConns, "heartbeat-conns", cfg.HeartbeatConns, "connections holding idle registrations")
	fs.IntVar(&cfg.HeartbeatPerConn, "heartbeat-per-conn", cfg.HeartbeatPerConn, "idle registrations per connection")
	fs.DurationVar(&cfg.HeartbeatTTL, "heartbeat-ttl", cfg.HeartbeatTTL, "agent TTL of the heartbeat scenario (its measurement window)")
	fs.IntVar(&cfg.FanoutSubs, "fanout-subs", cfg.FanoutSubs, "subscribers of one name on one agent")
	fs.IntVar(&cfg.FanoutConns, "fanout-conns", cfg.FanoutConns, "connections the subscribers are spread over")
	fs.IntVar(&cfg.FanoutRounds, "fanout-rounds", cfg.FanoutRounds, "changes timed at every subscriber")
	fs.IntVar(&cfg.ClientKills, "client-kills", cfg.ClientKills, "client processes SIGKILLed")
	agentKills := fs.String("agent-kills", formatKills(cfg.AgentKills), "agent processes SIGKILLed, as `ttl:count,...`")
	fs.IntVar(&cfg.Starts, "starts", cfg.Starts, "agent starts timed")
	fs.DurationVar(&cfg.DNSDuration, "dns-duration", cfg.DNSDuration, "length of each dnsperf run (whole seconds)")
	fs.StringVar(&cfg.StartMode, "start-mode", cfg.StartMode, "binary: go build the discoverd binary and time it; child: time this tool re-executed as an agent")
	fs.IntVar(&cfg.ConnsNofile, "conns-nofile", cfg.ConnsNofile, "descriptor limit (ulimit -n) of the agent flooded with connections")
	fs.IntVar(&cfg.Checks, "checks", cfg.Checks, "checked registrations on one agent (scenario 10)")
	fs.DurationVar(&cfg.ChecksInterval, "checks-interval", cfg.ChecksInterval, "their check interval")
	fs.DurationVar(&cfg.ChecksWindow, "checks-window", cfg.ChecksWindow, "steady window measured in scenario 10")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	if cfg.Quick {
		keep := cfg
		cfg = quick
		cfg.JSON, cfg.CPUProfile, cfg.AgentProfile, cfg.Quick = keep.JSON, keep.CPUProfile, keep.AgentProfile, true
		for name, v := range map[string]func(){
			"duration":           func() { cfg.Duration = keep.Duration },
			"latency-events":     func() { cfg.LatencyEvents = keep.LatencyEvents },
			"latency-budget":     func() { cfg.LatencyBudget = keep.LatencyBudget },
			"heartbeat-conns":    func() { cfg.HeartbeatConns = keep.HeartbeatConns },
			"heartbeat-per-conn": func() { cfg.HeartbeatPerConn = keep.HeartbeatPerConn },
			"heartbeat-ttl":      func() { cfg.HeartbeatTTL = keep.HeartbeatTTL },
			"fanout-subs":        func() { cfg.FanoutSubs = keep.FanoutSubs },
			"fanout-conns":       func() { cfg.FanoutConns = keep.FanoutConns },
			"fanout-rounds":      func() { cfg.FanoutRounds = keep.FanoutRounds },
			"client-kills":       func() { cfg.ClientKills = keep.ClientKills },
			"starts":             func() { cfg.Starts = keep.Starts },
			"start-mode":         func() { cfg.StartMode = keep.StartMode },
			"conns-nofile":       func() { cfg.ConnsNofile = keep.ConnsNofile },
			"dns-duration":       func() { cfg.DNSDuration = keep.DNSDuration },
			"checks":             func() { cfg.Checks = keep.Checks },
			"checks-interval":    func() { cfg.ChecksInterval = keep.ChecksInterval },
			"checks-window":      func() { cfg.ChecksWindow = keep.ChecksWindow },
		} {
			if set[name] {
				v()
			}
		}
	}
	if set["agent-kills"] || !cfg.Quick {
		k, err := parseKills(*agentKills)
		if err != nil {
			return nil, err
		}
		cfg.AgentKills = k
	}
	cfg.Run = map[string]bool{}
	for _, s := range splitComma(*runList) {
		known := false
		for _, k := range scenarios {
			known = known || k == s
		}
		if !known {
			return nil, fmt.Errorf("-run: unknown scenario %q (have %s)", s, strings.Join(scenarios, ", "))
		}
		cfg.Run[s] = true
	}
	switch {
	case cfg.Duration <= 0, cfg.LatencyEvents <= 0, cfg.LatencyBudget <= 0,
		cfg.HeartbeatConns <= 0, cfg.HeartbeatPerConn <= 0, cfg.HeartbeatTTL < time.Second,
		cfg.FanoutSubs <= 0, cfg.FanoutConns <= 0, cfg.FanoutRounds <= 0,
		cfg.ClientKills < 0, cfg.Starts <= 0, cfg.DNSDuration < time.Second,
		cfg.Checks <= 0, cfg.ChecksInterval < time.Second, cfg.ChecksWindow < time.Second:
		return nil, errors.New("sizes must be positive (and -heartbeat-ttl and -dns-duration at least 1s)")
	case cfg.StartMode != "binary" && cfg.StartMode != "child":
		return nil, fmt.Errorf("-start-mode %q: want binary or child", cfg.StartMode)
	case cfg.FanoutSubs > cfg.FanoutConns*250:
		return nil, fmt.Errorf("-fanout-subs %d over %d conns: at most 250 streams per connection (the agent's cap is 256)", cfg.FanoutSubs, cfg.FanoutConns)
	}
	return &cfg, nil
}

func formatKills(ks []killSpec) string {
	var parts []string
	for _, k := range ks {
		parts = append(parts, fmt.Sprintf("%v:%d", k.TTL, k.N))
	}
	return strings.Join(parts, ",")
}

func parseKills(s string) ([]killSpec, error) {
	var out []killSpec
	for _, p := range splitComma(s) {
		ttl, n, ok := strings.Cut(p, ":")
		d, err := time.ParseDuration(ttl)
		var count int
		if _, serr := fmt.Sscanf(n, "%d", &count); !ok || err != nil || serr != nil || d < time.Second || count < 0 {
			return nil, fmt.Errorf("-agent-kills %q: want ttl:count,... with ttl ≥ 1s", s)
		}
		out = append(out, killSpec{TTL: d, N: count})
	}
	return out, nil
}

// Row is one line of the table.
type Row struct {
	Scenario string `json:"scenario"`
	Figure   string `json:"figure"`
	Value    string `json:"value"`
	Etcd     string `json:"etcd,omitempty"`  // the raw etcd baseline
	Ratio    string `json:"ratio,omitempty"` // agent vs baseline
	Target   string `json:"target,omitempty"`
	Verdict  string `json:"verdict,omitempty"` // met / MISSED
}

// Report is the JSON file.
type Report struct {
	Machine    Machine           `json:"machine"`
	Command    string            `json:"command"`
	Quick      bool              `json:"quick"`
	Started    time.Time         `json:"started"`
	Seconds    float64           `json:"seconds"`
	LoadAfter  string            `json:"loadavg_after"`
	Rows       []Row             `json:"rows"`
	Errors     []string          `json:"errors,omitempty"`
	Throughput *ThroughputResult `json:"throughput,omitempty"`
	Latency    *LatencyResult    `json:"latency,omitempty"`
	Heartbeat  *HeartbeatResult  `json:"heartbeat,omitempty"`
	Fanout     *FanoutResult     `json:"fanout,omitempty"`
	Failure    *FailureResult    `json:"failure,omitempty"`
	Start      *StartResult      `json:"start,omitempty"`
	Conns      *ConnsResult      `json:"conns,omitempty"`
	DNS        *DNSResult        `json:"dns,omitempty"`
	ACL        *ACLResult        `json:"acl,omitempty"`
	Checks     *ChecksResult     `json:"checks,omitempty"`
}

// Machine describes where the figures were taken.
type Machine struct {
	CPUs       int    `json:"cpus"`
	GOMAXPROCS int    `json:"gomaxprocs"`
	CPUModel   string `json:"cpu_model"`
	MemTotal   string `json:"mem_total"`
	GoVersion  string `json:"go_version"`
	Kernel     string `json:"kernel"`
	LoadBefore string `json:"loadavg_before"`
}

func machine() Machine {
	m := Machine{CPUs: runtime.NumCPU(), GOMAXPROCS: runtime.GOMAXPROCS(0), GoVersion: runtime.Version()}
	m.CPUModel = procField("/proc/cpuinfo", "model name")
	m.MemTotal = procField("/proc/meminfo", "MemTotal")
	m.Kernel = readTrim("/proc/sys/kernel/osrelease")
	m.LoadBefore = readTrim("/proc/loadavg")
	return m
}

func procField(path, key string) string {
	b, _ := os.ReadFile(path)
	for line := range strings.SplitSeq(string(b), "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == key {
			return strings.TrimSpace(v)
		}
	}
	return ""
}

func readTrim(path string) string {
	b, _ := os.ReadFile(path)
	return strings.TrimSpace(string(b))
}

// env is what the scenarios share: the embedded etcd, a raw client on it,
// a temp dir, the rows of the table, and the child processes to reap.
type env struct {
	endpoints []string
	client    *clientv3.Client
	dir       string
	log       *slog.Logger

	mu       sync.Mutex
	rows     []Row
	children []*child
}

func (e *env) row(r Row) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.rows = append(e.rows, r)
}

// track records a child so that it is killed when the run ends, whatever
// happened to the scenario that started it.
func (e *env) track(c *child) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.children = append(e.children, c)
}

func (e *env) killChildren() {
	e.mu.Lock()
	cs := e.children
	e.children = nil
	e.mu.Unlock()
	for _, c := range cs {
		c.kill()
	}
}

// run is the tool without the process; it returns the exit code: 0 when
// every scenario ran (targets missed or not), 1 when one failed, 2 for bad
// flags.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	cfg, err := parseFlags(args, stderr)
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		fmt.Fprintf(stderr, "bench: %v\n", err)
		return 2
	}
	if cfg.CPUProfile != "" {
		f, err := os.Create(cfg.CPUProfile)
		if err != nil {
			fmt.Fprintf(stderr, "bench: %v\n", err)
			return 1
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			fmt.Fprintf(stderr, "bench: %v\n", err)
			return 1
		}
		defer pprof.StopCPUProfile()
	}
	rep := &Report{Machine: machine(), Command: "bench " + strings.Join(args, " "), Quick: cfg.Quick, Started: time.Now()}
	if err := runScenarios(ctx, cfg, rep, stderr); err != nil {
		rep.Errors = append(rep.Errors, err.Error())
	}
	rep.Seconds = time.Since(rep.Started).Seconds()
	rep.LoadAfter = readTrim("/proc/loadavg")
	printTable(stdout, rep)
	if cfg.JSON != "" {
		b, err := json.MarshalIndent(rep, "", "  ")
		if err == nil {
			err = os.WriteFile(cfg.JSON, append(b, '\n'), 0o644)
		}
		if err != nil {
			fmt.Fprintf(stderr, "bench: writing %s: %v\n", cfg.JSON, err)
			return 1
		}
	}
	if len(rep.Errors) > 0 {
		for _, e := range rep.Errors {
			fmt.Fprintf(stderr, "bench: %s\n", e)
		}
		return 1
	}
	return 0
}

// runScenarios starts the shared etcd and runs each selected scenario;
// a failed scenario is recorded and the next one runs.
func runScenarios(ctx context.Context, cfg *config, rep *Report, stderr io.Writer) error {
	dir, err := os.MkdirTemp("", "discoverd-bench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelError}))
	srv, err := embedded.Start(ctx, embedded.Config{Dir: filepath.Join(dir, "etcd"), Logger: log})
	if err != nil {
		return err
	}
	defer srv.Close()
	client, err := newEtcdClient(srv.Endpoints())
	if err != nil {
		return err
	}
	defer client.Close()
	e := &env{endpoints: srv.Endpoints(), client: client, dir: dir, log: log}
	defer e.killChildren()

	step := func(name string, f func() error) {
		if !cfg.Run[name] || ctx.Err() != nil {
			return
		}
		t0 := time.Now()
		fmt.Fprintf(stderr, "bench: %s...\n", name)
		if err := f(); err != nil {
			rep.Errors = append(rep.Errors, fmt.Sprintf("%s: %v", name, err))
			e.row(Row{Scenario: name, Figure: "FAILED", Value: oneLine(err)})
		}
		fmt.Fprintf(stderr, "bench: %s done in %.1fs (load %s)\n", name, time.Since(t0).Seconds(), readTrim("/proc/loadavg"))
	}
	step("throughput", func() (err error) { rep.Throughput, err = benchThroughput(ctx, e, cfg); return })
	step("latency", func() (err error) { rep.Latency, err = benchLatency(ctx, e, cfg); return })
	step("heartbeat", func() (err error) { rep.Heartbeat, err = benchHeartbeat(ctx, e, cfg); return })
	step("fanout", func() (err error) { rep.Fanout, err = benchFanout(ctx, e, cfg); return })
	step("failure", func() (err error) { rep.Failure, err = benchFailure(ctx, e, cfg); return })
	step("start", func() (err error) { rep.Start, err = benchStart(ctx, e, cfg); return })
	step("conns", func() (err error) { rep.Conns, err = benchConns(ctx, e, cfg); return })
	step("dns", func() (err error) { rep.DNS, err = benchDNS(ctx, e, cfg); return })
	step("acl", func() (err error) { rep.ACL, err = benchACL(ctx, e, cfg); return })
	step("checks", func() (err error) { rep.Checks, err = benchChecks(ctx, e, cfg); return })
	rep.Rows = e.rows
	return ctx.Err()
}

func printTable(w io.Writer, rep *Report) {
	m := rep.Machine
	fmt.Fprintf(w, "discoverd bench: %d CPUs (%s), %s, %s; load before %q after %q; %.0fs\n",
		m.CPUs, m.CPUModel, m.MemTotal, m.GoVersion, m.LoadBefore, rep.LoadAfter, rep.Seconds)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "SCENARIO\tFIGURE\tDISCOVERD\tRAW ETCD\tRATIO/DIFF\tTARGET\tVERDICT")
	for _, r := range rep.Rows {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", r.Scenario, r.Figure, r.Value, dash(r.Etcd), dash(r.Ratio), dash(r.Target), dash(r.Verdict))
	}
	tw.Flush()
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func verdict(ok bool) string {
	if ok {
		return "met"
	}
	return "MISSED"
}

func ratio(a, b float64) string {
	if b == 0 {
		return ""
	}
	return fmt.Sprintf("%.2f×", a/b)
}

func fmtMs(v float64) string { return fmt.Sprintf("%.2f ms", v) }

func diffMs(a, b float64) string { return fmt.Sprintf("%+.2f ms", a-b) }
