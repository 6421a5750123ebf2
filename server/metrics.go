package server

import (
	"net/http"
	"strconv"
	"time"

	"github.com/flynn/discoverd/api"
	"github.com/flynn/discoverd/internal/buildinfo"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

// metrics are the front ends' Prometheus collectors, on a registry of
// their own (never the global one, so that several Servers can live in one
// process, as in tests).
type metrics struct {
	reg          *prometheus.Registry
	rpcCalls     *prometheus.CounterVec
	rpcDuration  *prometheus.HistogramVec
	rpcStreams   prometheus.Gauge
	httpRequests *prometheus.CounterVec
	httpDuration *prometheus.HistogramVec
	sseStreams   prometheus.Gauge
}

func newMetrics(a Agent, conns *ConnLimiter) *metrics {
	m := &metrics{
		reg: prometheus.NewRegistry(),
		rpcCalls: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "discoverd_rpc_calls_total",
			Help: "RPC calls handled, by method and result code (ok or an error code); streams are counted when they end.",
		}, []string{"method", "code"}),
		rpcDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "discoverd_rpc_call_duration_seconds",
			Help:    "Latency of unary RPC calls, by method.",
			Buckets: latencyBuckets,
		}, []string{"method"}),
		rpcStreams: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "discoverd_rpc_streams",
			Help: "Subscribe and Leader RPC streams open now.",
		}),
		httpRequests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "discoverd_http_requests_total",
			Help: "HTTP requests handled, by route, method and status code; SSE streams are counted when they end.",
		}, []string{"route", "method", "code"}),
		httpDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "discoverd_http_request_duration_seconds",
			Help:    "Latency of HTTP requests other than SSE streams, by route and method.",
			Buckets: latencyBuckets,
		}, []string{"route", "method"}),
		sseStreams: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "discoverd_sse_streams",
			Help: "HTTP Server-Sent Events streams open now.",
		}),
	}
	build := buildinfo.Read()
	buildInfo := prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "discoverd_build_info",
		Help: "Always 1; its labels say which build runs: module version, VCS revision (\"unknown\" if not recorded, \"+dirty\" if modified) and Go version.",
	}, []string{"version", "revision", "goversion"})
	buildInfo.WithLabelValues(build.Version, build.ShortRevision(), build.GoVersion).Set(1)
	m.reg.MustRegister(
		buildInfo,
		m.rpcCalls, m.rpcDuration, m.rpcStreams,
		m.httpRequests, m.httpDuration, m.sseStreams,
		agentCollector{a},
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	)
	if conns != nil {
		m.reg.MustRegister(
			prometheus.NewGaugeFunc(prometheus.GaugeOpts{
				Name: "discoverd_client_conns",
				Help: "Client connections (HTTP, SSE and RPC) served now.",
			}, func() float64 { return float64(conns.Open()) }),
			prometheus.NewGaugeFunc(prometheus.GaugeOpts{
				Name: "discoverd_client_conns_limit",
				Help: "The cap on client connections (-max-conns).",
			}, func() float64 { return float64(conns.Max) }),
			prometheus.NewCounterFunc(prometheus.CounterOpts{
				Name: "discoverd_client_conns_refused_total",
				Help: "Client connections refused at accept because the agent was at its connection cap.",
			}, func() float64 { return float64(conns.Refused()) }),
		)
	}
	return m
}

// latencyBuckets span 100 µs (a local heartbeat) to 10 s (a store write
// that waits out an election).
var latencyBuckets = prometheus.ExponentialBuckets(0.0001, 2.5, 12)

// observeRPC records one call of method that started at start and ended
// with *err. Streaming methods are counted but not timed.
func (m *metrics) observeRPC(method string, start time.Time, err *error) {
	code := "ok"
	if *err != nil {
		code = string(api.ErrorCode(*err))
	}
	m.rpcCalls.WithLabelValues(method, code).Inc()
	switch method {
	case api.MethodSubscribe, api.MethodLeader:
	default:
		m.rpcDuration.WithLabelValues(method).Observe(time.Since(start).Seconds())
	}
}

// instrument wraps h to count and time its requests under route.
func (m *metrics) instrument(route string, h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		sw := &statusWriter{ResponseWriter: w}
		h(sw, r)
		status := sw.status
		if status == 0 {
			status = http.StatusOK
		}
		m.httpRequests.WithLabelValues(route, r.Method, strconv.Itoa(status)).Inc()
		if !sw.stream {
			m.httpDuration.WithLabelValues(route, r.Method).Observe(time.Since(start).Seconds())
		}
	}
}

// agentCollector exports agent.Stats, read once per scrape so the values
// are one consistent snapshot.
type agentCollector struct{ a Agent }

var (
	descRegistrations = prometheus.NewDesc("discoverd_registrations",
		"Registrations this agent holds now.", nil, nil)
	descSessions = prometheus.NewDesc("discoverd_sessions",
		"Agent sessions open now (one per RPC connection that made a call, plus the shared HTTP session).", nil, nil)
	descSubscribers = prometheus.NewDesc("discoverd_subscribers",
		"Subscribe and Leader subscriptions open now (RPC and SSE).", nil, nil)
	descWatches = prometheus.NewDesc("discoverd_watches",
		"Backend watches open now (one per watched service name).", nil, nil)
	descEvents = prometheus.NewDesc("discoverd_backend_events_total",
		"Store events applied to the agent's watch caches.", nil, nil)
	descFanout = prometheus.NewDesc("discoverd_events_fanned_out_total",
		"Updates queued to subscribers.", nil, nil)
	descExpired = prometheus.NewDesc("discoverd_registrations_expired_total",
		"Registrations expired because their heartbeats stopped.", nil, nil)
	descSlowCut = prometheus.NewDesc("discoverd_slow_subscribers_cut_total",
		"Subscribers cut off because their queue was full.", nil, nil)
	descBackendErrors = prometheus.NewDesc("discoverd_backend_errors_total",
		"Failed store operations.", nil, nil)
	descSessionUp = prometheus.NewDesc("discoverd_store_session_up",
		"1 while the agent holds a valid store session (etcd lease, ZooKeeper session), 0 while it is lost.", nil, nil)
	descSessionsEstablished = prometheus.NewDesc("discoverd_store_sessions_established_total",
		"Store sessions obtained since start: 1, plus one per lost session replaced (registrations re-written).", nil, nil)
	descStoreRepairs = prometheus.NewDesc("discoverd_store_repairs_total",
		"Drift the anti-entropy fixed on the agent's store session: keys no session held (deleted), held registrations missing from the store (written again).", nil, nil)
	descStoreLost = prometheus.NewDesc("discoverd_store_registrations_lost_total",
		"Registrations the agent stopped holding because another agent's session took them over in the store.", nil, nil)
)

func (c agentCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descRegistrations, descSessions, descSubscribers,
		descWatches, descEvents, descFanout, descExpired, descSlowCut, descBackendErrors,
		descSessionUp, descSessionsEstablished, descStoreRepairs, descStoreLost} {
		ch <- d
	}
}

func (c agentCollector) Collect(ch chan<- prometheus.Metric) {
	st := c.a.Stats()
	gauge := func(d *prometheus.Desc, v float64) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v)
	}
	counter := func(d *prometheus.Desc, v float64) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, v)
	}
	gauge(descRegistrations, float64(st.Registrations))
	gauge(descSessions, float64(st.Sessions))
	gauge(descSubscribers, float64(st.Subscribers))
	gauge(descWatches, float64(st.Watches))
	counter(descEvents, float64(st.Events))
	counter(descFanout, float64(st.Fanout))
	counter(descExpired, float64(st.Expired))
	counter(descSlowCut, float64(st.SlowSubscribersCut))
	counter(descBackendErrors, float64(st.BackendErrors))
	if st.Store != nil {
		up := 0.0
		if st.Store.Live {
			up = 1
		}
		gauge(descSessionUp, up)
		counter(descSessionsEstablished, float64(st.Store.Established))
		counter(descStoreRepairs, float64(st.Store.Repairs))
		counter(descStoreLost, float64(st.Store.Lost))
	}
}
