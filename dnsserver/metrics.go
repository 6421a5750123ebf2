package dnsserver

import (
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

func (m *metrics) observe(req, resp *dns.Msg, stale bool, d time.Duration) {
	typ := "other"
	if len(req.Question) == 1 {
		switch t := req.Question[0].Qtype; t {
		case dns.TypeA, dns.TypeAAAA, dns.TypeSRV, dns.TypeTXT, dns.TypeSOA, dns.TypeANY:
			typ = dns.TypeToString[t]
		}
	}
	rcode, ok := dns.RcodeToString[resp.Rcode]
	if !ok {
		rcode = "other"
	}
	m.queries.WithLabelValues(typ, rcode).Inc()
	m.duration.Observe(d.Seconds())
	if resp.Truncated {
		m.truncated.Inc()
	}
	if stale {
		m.stale.Inc()
	}
}
