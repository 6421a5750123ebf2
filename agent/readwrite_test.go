package agent_test

import (
	"fmt"
	"maps"
	"testing"
	"time"

	"github.com/flynn/discoverd/agent"
	"github.com/flynn/discoverd/api"
	"github.com/flynn/discoverd/backend/etcd/etcdtest"
)

// TestReadYourWrites: on one agent, a lookup that follows a Register or an
// Unregister sees it, although lookups are served from the watch cache,
// which follows the store a moment after the store acknowledges a write.
func TestReadYourWrites(t *testing.T) {
	srv := etcdtest.NewServer(t)
	a := mustAgent(t, mustBackend(t, srv, 10*time.Second), agent.Config{})
	s := a.NewSession(-1)
	defer s.Close()
	// Keep the name watched, so lookups are answered from its cache.
	sub := mustSubscribe(t, a, "web")
	defer sub.Close()

	find := func(addr string) (api.ServiceUpdate, bool) {
		t.Helper()
		list, err := a.Instances(ctxT(t), "web")
		if err != nil {
			t.Fatalf("Instances: %v", err)
		}
		for _, u := range list {
			if u.Addr == addr {
				return u, true
			}
		}
		return api.ServiceUpdate{}, false
	}
	for i := range 100 {
		addr := fmt.Sprintf("10.0.0.%d:80", i+1)
		attrs := map[string]string{"v": "1"}
		mustRegister(t, s, "web", addr, attrs)
		if u, ok := find(addr); !ok || !maps.Equal(u.Attrs, attrs) {
			t.Fatalf("round %d: Instances right after Register: %+v, present %v", i, u, ok)
		}
		attrs = map[string]string{"v": "2"}
		mustRegister(t, s, "web", addr, attrs)
		if u, ok := find(addr); !ok || !maps.Equal(u.Attrs, attrs) {
			t.Fatalf("round %d: Instances right after an attribute update: %+v, present %v", i, u, ok)
		}
		if err := s.Unregister(ctxT(t), agent.Args{Name: "web", Addr: addr}); err != nil {
			t.Fatalf("Unregister: %v", err)
		}
		if u, ok := find(addr); ok {
			t.Fatalf("round %d: Instances right after Unregister still has %+v", i, u)
		}
	}
}
