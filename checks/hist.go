package checks

import (
	"sync/atomic"
	"time"
)

// Bounds are the upper bounds, in seconds, of the histograms' buckets.
var Bounds = []float64{0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10}

// Histogram is a snapshot of a histogram of durations: Counts[i] is the
// number of observations at most Bounds[i] seconds and above the previous
// bound (the last element counts those above every bound).
type Histogram struct {
	Counts []uint64
	Count  uint64
	Sum    time.Duration
	Max    time.Duration
}

// hist is a lock-free histogram over Bounds.
type hist struct {
	counts [15]atomic.Uint64 // len(Bounds)+1
	count  atomic.Uint64
	sum    atomic.Int64
	max    atomic.Int64
}

func (h *hist) observe(d time.Duration) {
	s := d.Seconds()
	i := 0
	for i < len(Bounds) && s > Bounds[i] {
		i++
	}
	h.counts[i].Add(1)
	h.count.Add(1)
	h.sum.Add(int64(d))
	for {
		m := h.max.Load()
		if int64(d) <= m || h.max.CompareAndSwap(m, int64(d)) {
			break
		}
	}
}

func (h *hist) snapshot() Histogram {
	out := Histogram{Counts: make([]uint64, len(h.counts))}
	for i := range h.counts {
		out.Counts[i] = h.counts[i].Load()
	}
	out.Count = h.count.Load()
	out.Sum = time.Duration(h.sum.Load())
	out.Max = time.Duration(h.max.Load())
	return out
}

// Quantile estimates the q quantile (0 < q <= 1) as the upper bound of the
// bucket that holds it (Max for the last bucket); 0 when empty.
func (h Histogram) Quantile(q float64) time.Duration {
	if h.Count == 0 {
		return 0
	}
	rank := uint64(q*float64(h.Count) + 0.5)
	rank = max(rank, 1)
	var n uint64
	for i, c := range h.Counts {
		n += c
		if n >= rank {
			if i < len(Bounds) {
				return min(time.Duration(Bounds[i]*float64(time.Second)), h.Max)
			}
			return h.Max
		}
	}
	return h.Max
}
