package balancer_test

import (
	"errors"
	"math/rand"
	"testing"

	discoverd "github.com/flynn/discoverd/client"
	"github.com/flynn/discoverd/client/balancer"
)

// staticSet is a ServiceSet with fixed contents: the balancers read only
// Services, so this seam needs no agent.
type staticSet struct {
	discoverd.ServiceSet // other methods are not called
	services             []*discoverd.Service
}

func (s *staticSet) Services() []*discoverd.Service {
	out := make([]*discoverd.Service, len(s.services))
	copy(out, s.services)
	return out
}

func set(addrs ...string) *staticSet {
	s := &staticSet{}
	for i, a := range addrs {
		s.services = append(s.services, &discoverd.Service{Addr: a, Created: uint(i + 1)})
	}
	return s
}

func TestRoundRobin(t *testing.T) {
	s := set("a", "b", "c")
	lb := balancer.RoundRobin(s)
	var got []string
	for range 7 {
		svc, err := lb.Next()
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, svc.Addr)
	}
	want := []string{"a", "b", "c", "a", "b", "c", "a"}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("sequence = %v, want %v", got, want)
		}
	}
	s.services = nil
	if _, err := lb.Next(); !errors.Is(err, balancer.ErrNoServices) {
		t.Fatalf("Next on an empty set = %v, want ErrNoServices", err)
	}
}

func TestRandom(t *testing.T) {
	for _, rnd := range []*rand.Rand{nil, rand.New(rand.NewSource(1))} {
		s := set("a", "b", "c")
		lb := balancer.Random(s, rnd)
		seen := map[string]int{}
		for range 300 {
			svc, err := lb.Next()
			if err != nil {
				t.Fatal(err)
			}
			seen[svc.Addr]++
		}
		// 300 uniform draws over 3 leave one out with probability ~1e-52.
		if len(seen) != 3 {
			t.Fatalf("picked %v, want all three", seen)
		}
		s.services = nil
		if _, err := lb.Next(); !errors.Is(err, balancer.ErrNoServices) {
			t.Fatalf("Next on an empty set = %v, want ErrNoServices", err)
		}
	}
}

func TestConcurrentNext(t *testing.T) {
	s := set("a", "b")
	for _, lb := range []balancer.LoadBalancer{balancer.RoundRobin(s), balancer.Random(s, rand.New(rand.NewSource(2)))} {
		done := make(chan struct{})
		for range 4 {
			go func() {
				defer func() { done <- struct{}{} }()
				for range 100 {
					if _, err := lb.Next(); err != nil {
						t.Error(err)
						return
					}
				}
			}()
		}
		for range 4 {
			<-done
		}
	}
}
