package dnsserver

import (
	"sync/atomic"
	"time"

	"github.com/miekg/dns"
	"github.com/prometheus/client_golang/prometheus"
)

// metrics are the server's Prometheus collectors; Collectors returns them
// for the caller to register (the agent exports them on /metrics).
type metrics struct {
	queries   *prometheus.CounterVec
	duration  prometheus.Histogram
	truncated prometheus.Counter
	stale     prometheus.Counter
	names     prometheus.GaugeFunc
	evictions prometheus.CounterFunc

	byType [len(countedTypes) + 1][24]atomic.Pointer[prometheus.Counter] // of queries
}

func newMetrics(c Cache) *metrics {
	return &metrics{
		queries: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "discoverd_dns_queries_total",
			Help: "DNS queries answered, by question type (A, AAAA, SRV, TXT, SOA, ANY or other) and response code.",
		}, []string{"type", "rcode"}),
		duration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "discoverd_dns_query_duration_seconds",
			Help:    "Time from a DNS query's arrival to its answer being sent.",
			Buckets: prometheus.ExponentialBuckets(0.00001, 2.5, 14), // 10 µs to 1.5 s
		}),
		truncated: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "discoverd_dns_truncated_total",
			Help: "DNS answers sent with the TC bit: answer records were left out to fit the client's buffer.",
		}),
		stale: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "discoverd_dns_stale_answers_total",
			Help: "DNS answers served from the cache while the store was unreachable (possibly stale).",
		}),
		names: prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "discoverd_dns_cached_names",
			Help: "Service names the DNS server keeps watched (bounded; least recently asked dropped first).",
		}, func() float64 { return float64(c.Len()) }),
		evictions: prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "discoverd_dns_cache_evictions_total",
			Help: "Service names dropped from the DNS server's cache to stay within its size.",
		}, func() float64 { return float64(c.Evictions()) }),
	}
}

// Collectors returns the server's metrics, to register on a Prometheus
// registry.
func (s *Server) Collectors() []prometheus.Collector {
	m := s.metrics
	return []prometheus.Collector{m.queries, m.duration, m.truncated, m.stale, m.names, m.evictions}
}

// counter returns the queries counter of (typ, rcode), caching the common
// ones: WithLabelValues hashes its labels on each call.
func (m *metrics) counter(qtype, rcode int) prometheus.Counter {
	t := len(countedTypes) // other
	for i, ct := range countedTypes {
		if int(ct) == qtype {
			t = i
			break
		}
	}
	if rcode < 0 || rcode >= len(m.byType[t]) {
		return m.queries.WithLabelValues(typeLabel(t), rcodeLabel(rcode))
	}
	if c := m.byType[t][rcode].Load(); c != nil {
		return *c
	}
	c := m.queries.WithLabelValues(typeLabel(t), rcodeLabel(rcode))
	m.byType[t][rcode].Store(&c)
	return c
}

// countedTypes are the question types counted by name; others count as
// "other".
var countedTypes = [...]uint16{dns.TypeA, dns.TypeAAAA, dns.TypeSRV, dns.TypeTXT, dns.TypeSOA, dns.TypeANY}

func typeLabel(t int) string {
	if t < len(countedTypes) {
		return dns.TypeToString[countedTypes[t]]
	}
	return "other"
}

func rcodeLabel(rcode int) string {
	if s, ok := dns.RcodeToString[rcode]; ok {
		return s
	}
	return "other"
}

// observe counts one reply to a question of type qtype (-1: no single
// question) that took d.
func (m *metrics) observe(qtype int, oc outcome, d time.Duration) {
	m.counter(qtype, oc.rcode).Inc()
	m.duration.Observe(d.Seconds())
	if oc.truncated {
		m.truncated.Inc()
	}
	if oc.stale {
		m.stale.Inc()
	}
}
