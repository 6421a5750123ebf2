// Package retry is the one backoff of discoverd: the delays between the
// attempts of a retry loop, used alike by the agent, the client and the
// backends, so that none of them drifts from the others.
//
// A loop keeps a Backoff, waits Next() after each failure and calls Reset
// after a success:
//
//	b := retry.Backoff{Min: 100 * time.Millisecond, Max: 5 * time.Second}
//	for try(ctx) != nil {
//		t := time.NewTimer(retry.Jitter(b.Next()))
//		select {
//		case <-ctx.Done():
//			t.Stop()
//			return ctx.Err()
//		case <-t.C:
//		}
//	}
//
// The package imports nothing of ours and lives in the api module, which
// the client already requires, so the client shares it without a new
// module requirement (docs/DECISIONS.md).
package retry

import (
	"math/rand/v2"
	"time"
)

// Delay is the rule: the delay before retry n (from 0) is lo·2ⁿ, capped
// at hi. A lo not below hi gives hi at once. It does not overflow for any
// n.
func Delay(lo, hi time.Duration, n int) time.Duration {
	d := lo
	for ; n > 0 && d < hi; n-- {
		if d > hi/2 {
			return hi
		}
		d *= 2
	}
	return min(d, hi)
}

// Jitter returns a random duration in [d/2, d], so that clients that
// failed together do not retry together.
func Jitter(d time.Duration) time.Duration {
	return d/2 + rand.N(d/2+1)
}

// Backoff counts the consecutive failures of one retry loop. Min must be
// positive. The zero count is the state after Reset. A Backoff is not safe
// for concurrent use; each loop owns its own.
type Backoff struct {
	Min, Max time.Duration
	n        int
}

// Next returns the delay before the next attempt, Delay(Min, Max, n) for
// the n-th failure since the last Reset, and counts one failure more.
func (b *Backoff) Next() time.Duration {
	d := Delay(b.Min, b.Max, b.n)
	if d < b.Max {
		b.n++
	}
	return d
}

// Reset starts again from Min, after a success.
func (b *Backoff) Reset() { b.n = 0 }
