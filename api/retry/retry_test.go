package retry_test

import (
	"math"
	"testing"
	"time"

	"github.com/flynn/discoverd/api/retry"
)

func TestDelay(t *testing.T) {
	const ms = time.Millisecond
	for _, tc := range []struct {
		name   string
		lo, hi time.Duration
		n      int
		want   time.Duration
	}{
		{"first is lo", 50 * ms, 2 * time.Second, 0, 50 * ms},
		{"doubles", 50 * ms, 2 * time.Second, 3, 400 * ms},
		{"capped", 50 * ms, 2 * time.Second, 6, 2 * time.Second},
		{"cap not a power of two apart", 100 * ms, 250 * ms, 2, 250 * ms},
		{"lo above hi gives hi", 50 * ms, 10 * ms, 0, 10 * ms},
		{"huge n", time.Hour, math.MaxInt64, 1000, math.MaxInt64},
		{"no overflow near the top", math.MaxInt64/2 + 1, math.MaxInt64, 1, math.MaxInt64},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := retry.Delay(tc.lo, tc.hi, tc.n); got != tc.want {
				t.Fatalf("Delay(%v, %v, %d) = %v, want %v", tc.lo, tc.hi, tc.n, got, tc.want)
			}
		})
	}
}

func TestBackoff(t *testing.T) {
	b := retry.Backoff{Min: 100 * time.Millisecond, Max: time.Second}
	var got []time.Duration
	for range 6 {
		got = append(got, b.Next())
	}
	want := []time.Duration{100, 200, 400, 800, 1000, 1000}
	for i := range want {
		if got[i] != want[i]*time.Millisecond {
			t.Fatalf("delays %v, want %v ms", got, want)
		}
	}
	b.Reset()
	if d := b.Next(); d != b.Min {
		t.Fatalf("after Reset: %v, want Min %v", d, b.Min)
	}
}

func TestJitter(t *testing.T) {
	const d = 10 * time.Millisecond
	for range 1000 {
		if j := retry.Jitter(d); j < d/2 || j > d {
			t.Fatalf("Jitter(%v) = %v, outside [d/2, d]", d, j)
		}
	}
	if j := retry.Jitter(0); j != 0 {
		t.Fatalf("Jitter(0) = %v", j)
	}
}
