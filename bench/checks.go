package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/flynn/discoverd/checks"
)

// ChecksResult is scenario 10: checked registrations on one agent.
type ChecksResult struct {
	Registrations   int     `json:"registrations"`
	IntervalSeconds float64 `json:"interval_s"`
	RegisterSecs    float64 `json:"register_s"` // time to make them (HTTP PUTs, journalled)
	OnlineSecs      float64 `json:"online_s"`   // from the first PUT until every one is online
	WindowSeconds   float64 `json:"window_s"`
	// Over the steady window: the agent process's CPU (user+system, % of
	// one core), store key writes per minute, probes per second.
	AgentCPUPercent float64 `json:"agent_cpu_percent"`
	WritesPerMinute float64 `json:"store_writes_per_min"`
	ProbesPerSecond float64 `json:"probes_per_s"`
	// FirstProbe: when each HTTP target got its first probe, after its
	// PUT (uniform over the interval if the start is spread).
	FirstProbe Dist `json:"first_probe"`
	// FirstProbeBuckets counts first probes per tenth of the interval.
	FirstProbeBuckets []int `json:"first_probe_buckets"`
	// Period: the gaps between consecutive probes of one HTTP target in
	// the window (the interval ±10 %, plus any start delay).
	Period Dist `json:"period"`
	// StartDelay: how late probes started after their scheduled time
	// (the agent's histogram; bucket bounds).
	StartDelayP99Ms float64 `json:"start_delay_p99_ms"`
	StartDelayMaxMs float64 `json:"start_delay_max_ms"`
	LatencyP99Ms    float64 `json:"probe_latency_p99_ms"`
	Flapping        int     `json:"flapping"`
	StoreErrors     uint64  `json:"store_errors"`
}

// benchChecks runs an agent child with health checks, hands it
// cfg.Checks registrations (half HTTP checks of distinct URLs on one
// server of this process, half TCP checks of one listener), waits until
// all are online, and measures one steady window in which every check
// passes.
func benchChecks(ctx context.Context, env *env, cfg *config) (*ChecksResult, error) {
	n, interval, window := cfg.Checks, cfg.ChecksInterval, cfg.ChecksWindow
	res := &ChecksResult{Registrations: n, IntervalSeconds: interval.Seconds()}

	// The targets: arrivals per HTTP check, and a TCP listener.
	var mu sync.Mutex
	arrivals := make([][]time.Time, n)
	hln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	hs := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		i, err := strconv.Atoi(strings.TrimPrefix(r.URL.Path, "/h/"))
		if err == nil && i >= 0 && i < n {
			now := time.Now()
			mu.Lock()
			arrivals[i] = append(arrivals[i], now)
			mu.Unlock()
		}
		w.WriteHeader(http.StatusNoContent)
	}), ReadHeaderTimeout: opTimeout}
	go hs.Serve(hln) // stopped below
	defer hs.Close()
	tln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	tcpDone := make(chan struct{})
	go func() { // accepts and closes until tln closes
		defer close(tcpDone)
		for {
			c, err := tln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	defer func() { tln.Close(); <-tcpDone }()

	ch, err := startChild([]string{childFlag + "agent", "-etcd", strings.Join(env.endpoints, ","), "-checks"})
	if err != nil {
		return nil, err
	}
	env.track(ch)
	defer ch.stop(10 * time.Second)
	rep, err := ch.report(opTimeout)
	if err != nil {
		return nil, err
	}
	base := "http://" + rep.Addr
	hc := &http.Client{Transport: &http.Transport{Proxy: nil, MaxIdleConnsPerHost: 32}, Timeout: opTimeout}
	defer hc.CloseIdleConnections()

	const name = "bench-checks"
	put := make([]time.Time, n)
	start := time.Now()
	const workers = 32
	if err := inParallel(ctx, workers, func(ctx context.Context, w int) error {
		for i := w; i < n; i += workers {
			check := fmt.Sprintf(`{"tcp":%q,"interval":%q}`, tln.Addr().String(), interval)
			if i%2 == 0 {
				check = fmt.Sprintf(`{"http":"http://%s/h/%d","interval":%q}`, hln.Addr(), i, interval)
			}
			body := `{"attrs":{"i":"` + strconv.Itoa(i) + `"},"check":` + check + `}`
			req, err := http.NewRequestWithContext(ctx, http.MethodPut, base+"/services/"+name+"/instances/"+instanceAddr(i), bytes.NewReader([]byte(body)))
			if err != nil {
				return err
			}
			put[i] = time.Now()
			resp, err := hc.Do(req)
			if err != nil {
				return fmt.Errorf("PUT %d: %w", i, err)
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				return fmt.Errorf("PUT %d: %s %s", i, resp.Status, b)
			}
		}
		return nil
	}); err != nil {
		return nil, err
	}
	res.RegisterSecs = time.Since(start).Seconds()

	// Every one online: rise (2) passes, the first within one interval.
	deadline := time.Now().Add(3*interval + opTimeout)
	for {
		st, err := ch.stats()
		if err != nil {
			return nil, err
		}
		if st.Checks != nil && st.Checks.Online == n {
			break
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("not every check online after %v: %+v", time.Since(start), st.Checks)
		}
		if err := sleepCtx(ctx, time.Second); err != nil {
			return nil, err
		}
	}
	res.OnlineSecs = time.Since(start).Seconds()

	pid := ch.cmd.Process.Pid
	st0, err := ch.stats()
	if err != nil {
		return nil, err
	}
	rev0, err := revision(ctx, env.client)
	if err != nil {
		return nil, err
	}
	cpu0, err := processCPU(pid)
	if err != nil {
		return nil, err
	}
	t0 := time.Now()
	if err := sleepCtx(ctx, window); err != nil {
		return nil, err
	}
	cpu1, err := processCPU(pid)
	if err != nil {
		return nil, err
	}
	rev1, err := revision(ctx, env.client)
	if err != nil {
		return nil, err
	}
	t1 := time.Now()
	st1, err := ch.stats()
	if err != nil {
		return nil, err
	}
	w := t1.Sub(t0)
	res.WindowSeconds = w.Seconds()
	res.AgentCPUPercent = 100 * (cpu1 - cpu0).Seconds() / w.Seconds()
	res.WritesPerMinute = float64(rev1-rev0) / w.Minutes()
	c0, c1 := st0.Checks, st1.Checks
	res.ProbesPerSecond = float64(c1.Probes-c0.Probes) / w.Seconds()
	res.StartDelayP99Ms = ms(c1.StartDelay.Quantile(0.99))
	res.StartDelayMaxMs = ms(c1.StartDelay.Max)
	res.LatencyP99Ms = ms(mergeHist(c1.Latency["http"], c1.Latency["tcp"]).Quantile(0.99))
	res.Flapping = c1.Flapping
	res.StoreErrors = c1.StoreErrors

	mu.Lock()
	var first, gaps []time.Duration
	res.FirstProbeBuckets = make([]int, 10)
	for i := 0; i < n; i += 2 {
		a := arrivals[i]
		if len(a) == 0 {
			continue
		}
		d := a[0].Sub(put[i])
		first = append(first, d)
		res.FirstProbeBuckets[min(max(int(10*d/interval), 0), 9)]++
		for j := 1; j < len(a); j++ {
			if !a[j-1].Before(t0) && !a[j].After(t1) {
				gaps = append(gaps, a[j].Sub(a[j-1]))
			}
		}
	}
	mu.Unlock()
	res.FirstProbe, res.Period = summarize(first), summarize(gaps) // sorts first and gaps

	fig := fmt.Sprintf("%d checked registrations (half HTTP, half TCP), interval %v", n, interval)
	env.row(Row{Scenario: "10 checks", Figure: "store key writes per minute at steady state, " + fig,
		Value: fmt.Sprintf("%.1f", res.WritesPerMinute), Target: "0", Verdict: verdict(res.WritesPerMinute == 0)})
	env.row(Row{Scenario: "10 checks", Figure: fmt.Sprintf("agent CPU (%% of one core) over %.0fs; probes/s", w.Seconds()),
		Value: fmt.Sprintf("%.1f %%; %.0f/s", res.AgentCPUPercent, res.ProbesPerSecond)})
	env.row(Row{Scenario: "10 checks", Figure: "first probe after PUT p10/p50/p90 (uniform: 0.1/0.5/0.9 × interval)",
		Value: fmt.Sprintf("%.2f / %.2f / %.2f s", rank(first, 0.10).Seconds(), rank(first, 0.50).Seconds(), rank(first, 0.90).Seconds())})
	env.row(Row{Scenario: "10 checks", Figure: "first probes per tenth of the interval (HTTP half)",
		Value: fmt.Sprint(res.FirstProbeBuckets)})
	env.row(Row{Scenario: "10 checks", Figure: "probe period of one target min/p50/max (interval ±10 %)",
		Value: fmt.Sprintf("%.2f / %.2f / %.2f s", res.Period.Min/1000, res.Period.P50/1000, res.Period.Max/1000)})
	env.row(Row{Scenario: "10 checks", Figure: "probe start delay p99 / max (timer + in-flight cap); probe latency p99",
		Value: fmt.Sprintf("≤ %.1f / %.1f ms; ≤ %.1f ms", res.StartDelayP99Ms, res.StartDelayMaxMs, res.LatencyP99Ms)})
	env.row(Row{Scenario: "10 checks", Figure: "time to PUT all / all online",
		Value: fmt.Sprintf("%.1f s / %.1f s", res.RegisterSecs, res.OnlineSecs)})
	return res, nil
}

func mergeHist(a, b checks.Histogram) checks.Histogram {
	out := checks.Histogram{Counts: make([]uint64, max(len(a.Counts), len(b.Counts))), Count: a.Count + b.Count, Sum: a.Sum + b.Sum, Max: max(a.Max, b.Max)}
	for i := range out.Counts {
		if i < len(a.Counts) {
			out.Counts[i] += a.Counts[i]
		}
		if i < len(b.Counts) {
			out.Counts[i] += b.Counts[i]
		}
	}
	return out
}

// processCPU returns the user+system CPU time of process pid so far, from
// /proc/PID/stat (Linux; clock ticks of 1/100 s).
func processCPU(pid int) (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, fmt.Errorf("agent CPU: %w", err)
	}
	// The command name (field 2) may hold spaces: fields count from the
	// last ')'.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, fmt.Errorf("agent CPU: unexpected /proc stat %q", b)
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 13 {
		return 0, fmt.Errorf("agent CPU: unexpected /proc stat %q", b)
	}
	utime, err1 := strconv.ParseInt(f[11], 10, 64)
	stime, err2 := strconv.ParseInt(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, fmt.Errorf("agent CPU: unexpected /proc stat %q", b)
	}
	return time.Duration(utime+stime) * 10 * time.Millisecond, nil
}

// inParallel runs f(ctx, i) for i in [0, n) concurrently and returns the
// first error; the first error cancels ctx for the others.
func inParallel(ctx context.Context, n int, f func(ctx context.Context, i int) error) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	errs := make(chan error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			if err := f(ctx, i); err != nil {
				errs <- err
				cancel()
			}
		})
	}
	wg.Wait()
	close(errs)
	return <-errs
}
