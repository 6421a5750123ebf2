package agent_test

import (
	"context"
	"testing"

	"github.com/flynn/discoverd/backend/etcd"
)

// newServer starts an embedded single-node etcd for one test.
func newServer(tb testing.TB) *etcd.Embedded {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	srv, err := etcd.StartEmbedded(ctx, etcd.EmbedConfig{Dir: tb.TempDir(), Logger: quiet()})
	if err != nil {
		tb.Fatalf("embedded etcd: %v", err)
	}
	tb.Cleanup(func() { srv.Close() })
	return srv
}
