package main

import (
	"slices"
	"time"
)

// Dist summarises a latency sample, in milliseconds.
type Dist struct {
	N   int     `json:"n"`
	P50 float64 `json:"p50_ms"`
	P90 float64 `json:"p90_ms"`
	P99 float64 `json:"p99_ms"`
	Max float64 `json:"max_ms"`
	Min float64 `json:"min_ms"`
}

// summarize returns the distribution of d (nearest-rank percentiles). It
// sorts d.
func summarize(d []time.Duration) Dist {
	if len(d) == 0 {
		return Dist{}
	}
	slices.Sort(d)
	return Dist{
		N:   len(d),
		P50: ms(rank(d, 0.50)),
		P90: ms(rank(d, 0.90)),
		P99: ms(rank(d, 0.99)),
		Max: ms(d[len(d)-1]),
		Min: ms(d[0]),
	}
}

// rank is the nearest-rank q-quantile of sorted d.
func rank(d []time.Duration, q float64) time.Duration {
	i := int(q*float64(len(d))+0.999999) - 1
	return d[max(0, min(i, len(d)-1))]
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
