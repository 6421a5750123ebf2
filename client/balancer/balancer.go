// Package balancer picks an instance of a service for each request, from a
// discoverd ServiceSet that keeps the instances current.
//
//	set, _ := client.NewServiceSet("api")
//	lb := balancer.RoundRobin(set)
//	svc, err := lb.Next() // balancer.ErrNoServices when none is online
package balancer

import (
	"errors"
	"math/rand"
	"sync"
	"sync/atomic"

	discoverd "github.com/flynn/discoverd/client"
)

// ErrNoServices is returned by Next when the set is empty.
var ErrNoServices = errors.New("balancer: no services")

// A LoadBalancer picks one instance per call. Implementations here are safe
// for concurrent use and never block.
type LoadBalancer interface {
	// Next returns an instance of the set, or ErrNoServices.
	Next() (*discoverd.Service, error)
}

// Random picks instances uniformly at random from s, using rnd (which it
// locks, so it may be shared), or the global source when rnd is nil.
func Random(s discoverd.ServiceSet, rnd *rand.Rand) LoadBalancer {
	return &random{s: s, rnd: rnd}
}

type random struct {
	s   discoverd.ServiceSet
	mu  sync.Mutex
	rnd *rand.Rand
}

func (r *random) Next() (*discoverd.Service, error) {
	services := r.s.Services()
	if len(services) == 0 {
		return nil, ErrNoServices
	}
	if r.rnd == nil {
		return services[rand.Intn(len(services))], nil
	}
	r.mu.Lock()
	i := r.rnd.Intn(len(services))
	r.mu.Unlock()
	return services[i], nil
}

// RoundRobin cycles through the instances of s, oldest first. When the set
// changes, the cycle continues from the same position in the new list.
func RoundRobin(s discoverd.ServiceSet) LoadBalancer {
	return &roundRobin{s: s}
}

type roundRobin struct {
	s    discoverd.ServiceSet
	next atomic.Uint64
}

func (r *roundRobin) Next() (*discoverd.Service, error) {
	services := r.s.Services()
	if len(services) == 0 {
		return nil, ErrNoServices
	}
	i := r.next.Add(1) - 1
	return services[i%uint64(len(services))], nil
}
