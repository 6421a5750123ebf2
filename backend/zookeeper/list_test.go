package zookeeper_test

import (
	"testing"
	"time"

	"github.com/flynn/discoverd/backend"
	"github.com/flynn/discoverd/backend/backendtest"
)

func TestLister(t *testing.T) {
	backendtest.RunLister(t, backendtest.Harness{
		New: func(tb testing.TB, ttl time.Duration) backend.Backend { return open(tb, ttl) },
		TTL: 2 * time.Second,
	})
}
