package server

import (
	"context"
	"net/http"

	"github.com/flynn/discoverd/api"
	"github.com/flynn/discoverd/checks"
	"github.com/prometheus/client_golang/prometheus"
)

// Checker is what the front ends need of the agent's health checks
// (docs/API.md, "Health checks"). *checks.Manager implements it.
type Checker interface {
	Add(ctx context.Context, args api.Args) (string, error)
	Remove(ctx context.Context, name, addr string) error
	Has(name, addr string) bool
	Status(name, addr string) (api.CheckStatus, bool)
	List(name string) []api.CheckStatus
	Stats() checks.Stats
}

var _ Checker = (*checks.Manager)(nil)

var errNoChecks = api.Errorf(api.CodeUnavailable, "this agent does not run health checks")

// checkRoutes mounts the routes of checked registrations.
func (s *Server) checkRoutes() {
	s.handle("GET /services/{name}/instances/{addr}", "/services/{name}/instances/{addr}", s.getInstance)
	s.handle("GET /checks", "/checks", s.listChecks)
	if s.opts.Checks != nil {
		s.metrics.reg.MustRegister(checksCollector{s.opts.Checks})
	}
}

// addChecked answers a PUT with a check: the registration is handed to
// the agent's checker.
func (s *Server) addChecked(w http.ResponseWriter, r *http.Request, args api.Args) {
	if s.opts.Checks == nil {
		s.writeError(w, "register", errNoChecks)
		return
	}
	addr, err := s.opts.Checks.Add(r.Context(), args)
	if err != nil {
		s.writeError(w, "register", err)
		return
	}
	st, _ := s.opts.Checks.Status(args.Name, addr)
	writeJSON(w, http.StatusOK, st)
}

// isChecked reports whether name/addr is a checked registration.
func (s *Server) isChecked(name, addr string) bool {
	return s.opts.Checks != nil && s.opts.Checks.Has(name, addr)
}

// getInstance answers GET /services/{name}/instances/{addr}: the status
// of a checked registration (its check, state, last result, transitions),
// or else the instance as the store holds it; 404 when neither.
func (s *Server) getInstance(w http.ResponseWriter, r *http.Request) {
	name, addr := r.PathValue("name"), r.PathValue("addr")
	if s.opts.Checks != nil {
		if st, ok := s.opts.Checks.Status(name, addr); ok {
			writeJSON(w, http.StatusOK, st)
			return
		}
	}
	ups, err := s.agent.Instances(r.Context(), name)
	if err != nil {
		s.writeError(w, "get instance", err)
		return
	}
	for _, u := range ups {
		if u.Addr == addr {
			writeJSON(w, http.StatusOK, instanceOf(u))
			return
		}
	}
	s.writeError(w, "get instance", api.Errorf(api.CodeNotFound, "no instance %s/%s online and no checked registration of that name on this agent", name, addr))
}

// listChecks answers GET /checks?service=NAME: the status of every checked
// registration of this agent (of NAME only, if given).
func (s *Server) listChecks(w http.ResponseWriter, r *http.Request) {
	name := r.URL.Query().Get("service")
	if s.auth.acl() != nil { // the route has no {name}: check the read right here
		if name == "" {
			s.writeError(w, "list checks", api.Errorf(api.CodePermissionDenied, "with an ACL, GET /checks needs ?service=NAME"))
			return
		}
		cred, credErr := credentialOf(r, true)
		if err := s.check("http", r.RemoteAddr, cred, credErr, rightRead, name); err != nil {
			s.writeError(w, "list checks", err)
			return
		}
	}
	if s.opts.Checks == nil {
		writeJSON(w, http.StatusOK, []api.CheckStatus{})
		return
	}
	writeJSON(w, http.StatusOK, s.opts.Checks.List(name))
}

// offlineChecked counts this agent's checked registrations that are not
// in the store now, by service (nil without checks).
func (s *Server) offlineChecked() map[string]int {
	if s.opts.Checks == nil {
		return nil
	}
	var n map[string]int
	for _, st := range s.opts.Checks.List("") {
		if !st.Stored {
			if n == nil {
				n = make(map[string]int)
			}
			n[st.Name]++
		}
	}
	return n
}

// checksCollector exports checks.Stats.
type checksCollector struct{ c Checker }

var (
	descChecks = prometheus.NewDesc("discoverd_checks",
		"Checked registrations held by this agent, by state (online, offline, flapping).", []string{"state"}, nil)
	descCheckProbes = prometheus.NewDesc("discoverd_check_probes_total",
		"Health-check probes run, by result (pass, fail).", []string{"result"}, nil)
	descCheckTransitions = prometheus.NewDesc("discoverd_check_transitions_total",
		"State changes of checked registrations (flapping holds included).", nil, nil)
	descCheckDamped = prometheus.NewDesc("discoverd_check_flapping_total",
		"Times a checked registration was held offline for flapping.", nil, nil)
	descCheckStoreWrites = prometheus.NewDesc("discoverd_check_store_writes_total",
		"Store writes and removals made for check state changes, by result (ok, error).", []string{"result"}, nil)
	descCheckInFlight = prometheus.NewDesc("discoverd_check_probes_in_flight",
		"Health-check probes running now (capped by -max-check-probes).", nil, nil)
	descCheckLatency = prometheus.NewDesc("discoverd_check_probe_duration_seconds",
		"Duration of health-check probes, by kind (http, tcp, grpc).", []string{"kind"}, nil)
	descCheckDelay = prometheus.NewDesc("discoverd_check_probe_start_delay_seconds",
		"How late probes start after their scheduled time (timer, then a free slot under -max-check-probes).", nil, nil)
)

func (c checksCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descChecks, descCheckProbes, descCheckTransitions, descCheckDamped,
		descCheckStoreWrites, descCheckInFlight, descCheckLatency, descCheckDelay} {
		ch <- d
	}
}

func (c checksCollector) Collect(ch chan<- prometheus.Metric) {
	st := c.c.Stats()
	metric := func(d *prometheus.Desc, t prometheus.ValueType, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, t, v, labels...)
	}
	metric(descChecks, prometheus.GaugeValue, float64(st.Online), string(api.CheckOnline))
	metric(descChecks, prometheus.GaugeValue, float64(st.Offline), string(api.CheckOffline))
	metric(descChecks, prometheus.GaugeValue, float64(st.Flapping), string(api.CheckFlapping))
	metric(descCheckProbes, prometheus.CounterValue, float64(st.Probes-st.ProbeFailures), "pass")
	metric(descCheckProbes, prometheus.CounterValue, float64(st.ProbeFailures), "fail")
	metric(descCheckTransitions, prometheus.CounterValue, float64(st.Transitions))
	metric(descCheckDamped, prometheus.CounterValue, float64(st.Damped))
	metric(descCheckStoreWrites, prometheus.CounterValue, float64(st.StoreWrites-st.StoreErrors), "ok")
	metric(descCheckStoreWrites, prometheus.CounterValue, float64(st.StoreErrors), "error")
	metric(descCheckInFlight, prometheus.GaugeValue, float64(st.InFlight))
	for _, kind := range []string{"http", "tcp", "grpc"} {
		ch <- constHistogram(descCheckLatency, st.Latency[kind], kind)
	}
	ch <- constHistogram(descCheckDelay, st.StartDelay)
}

// constHistogram turns a checks.Histogram into a Prometheus histogram.
func constHistogram(d *prometheus.Desc, h checks.Histogram, labels ...string) prometheus.Metric {
	buckets := make(map[float64]uint64, len(checks.Bounds))
	var n uint64
	for i, b := range checks.Bounds {
		if i < len(h.Counts) {
			n += h.Counts[i]
		}
		buckets[b] = n
	}
	return prometheus.MustNewConstHistogram(d, h.Count, h.Sum.Seconds(), buckets, labels...)
}

// registerChecked is Agent.Register with a check: the registration is
// handed to the agent's checker, not held by the connection.
func (r *rpcAgent) registerChecked(ctx context.Context, args *api.Args, reply *string) error {
	if err := r.s.allowRPC(ctx, rightRegister, args.Name, args.ValidateRegister)(); err != nil {
		return r.s.wireError("register", err)
	}
	if r.s.opts.Checks == nil {
		return errNoChecks
	}
	ctx, cancel := context.WithTimeout(ctx, r.s.opts.CallTimeout)
	defer cancel()
	addr, err := r.s.opts.Checks.Add(ctx, *args)
	if err != nil {
		return r.s.wireError("register", err)
	}
	*reply = addr
	return nil
}

// unregisterChecked is Agent.Unregister of a checked registration, from
// any connection whose token may register the service.
func (r *rpcAgent) unregisterChecked(ctx context.Context, args *api.Args) error {
	if err := r.s.checkRPC(ctx, rightRegister, args.Name); err != nil {
		return r.s.wireError("unregister", err)
	}
	ctx, cancel := context.WithTimeout(ctx, r.s.opts.CallTimeout)
	defer cancel()
	if err := r.s.opts.Checks.Remove(ctx, args.Name, args.Addr); err != nil {
		return r.s.wireError("unregister", err)
	}
	return nil
}
