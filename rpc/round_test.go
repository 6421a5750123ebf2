package rpc

import "testing"

// TestRound: the writer's FIFO gives queues back in the order they were
// pushed, through interleaved pushes and pops that wrap its array, and
// stops allocating once its array is large enough.
func TestRound(t *testing.T) {
	var r round
	qs := make([]*outQueue, 64)
	for i := range qs {
		qs[i] = &outQueue{}
	}
	var want []*outQueue // the reference FIFO
	next := 0
	for step := range 10_000 {
		// Pushes outnumber pops in the first half, then pops do.
		if (step%3 != 0) == (step < 5_000) || r.empty() {
			q := qs[next%len(qs)]
			next++
			r.push(q)
			want = append(want, q)
			continue
		}
		got := r.pop()
		if got != want[0] {
			t.Fatalf("step %d: popped queue %p, want %p", step, got, want[0])
		}
		want = want[1:]
		if r.empty() != (len(want) == 0) {
			t.Fatalf("step %d: empty %v with %d waiting", step, r.empty(), len(want))
		}
	}
	for !r.empty() {
		r.pop()
	}
	allocs := testing.AllocsPerRun(100, func() {
		for i := range 32 {
			r.push(qs[i])
			if i%2 == 1 {
				r.pop()
			}
		}
		for !r.empty() {
			r.pop()
		}
	})
	if allocs != 0 {
		t.Errorf("%v allocations per burst of 32 pushes, want 0 once the array has grown", allocs)
	}
}
