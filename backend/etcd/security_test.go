package etcd_test

import (
	"context"
	"crypto/tls"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/flynn/discoverd/backend/etcd"
	"github.com/flynn/discoverd/backend/etcd/embedded"
	"github.com/flynn/discoverd/backend/etcd/etcdtest"
	"github.com/flynn/discoverd/internal/testcert"
)

// TestTLSAndRBAC runs the backend against an etcd that requires client
// certificates and has auth enabled, with a role that may use one prefix
// only: a user named by its certificate's common name, and a user with a
// password. It checks that each works within the prefix and is refused
// outside it, and that bad credentials are refused.
func TestTLSAndRBAC(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	ca := testcert.NewCA(t, "etcd CA")
	cert, key := ca.Issue(t, testcert.Options{CommonName: "etcd", Hosts: []string{"127.0.0.1"}}).Write(t, dir, "etcd")
	srv := etcdtest.NewTLSServer(t, embedded.TLS{CertFile: cert, KeyFile: key, TrustedCAFile: ca.Write(t, dir), ClientCertAuth: true})
	endpoints := srv.Endpoints()
	clientTLS := func(cn string, o testcert.Options) *tls.Config {
		o.CommonName = cn
		return &tls.Config{RootCAs: ca.Pool(), Certificates: []tls.Certificate{ca.Issue(t, o).TLS}}
	}

	// The root user (by its certificate) sets up RBAC: role tenant1 may
	// read and write /tenant1/ only; "agent-cert" authenticates by its
	// certificate, "agent-pw" by password.
	admin, err := clientv3.New(clientv3.Config{Endpoints: endpoints, TLS: clientTLS("root", testcert.Options{}), DialTimeout: waitTimeout, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close()
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	steps := []func() error{
		func() error { _, err := admin.UserAdd(ctx, "root", "root-pw"); return err },
		func() error { _, err := admin.UserGrantRole(ctx, "root", "root"); return err },
		func() error { _, err := admin.RoleAdd(ctx, "tenant1"); return err },
		func() error {
			_, err := admin.RoleGrantPermission(ctx, "tenant1", "/tenant1/", clientv3.GetPrefixRangeEnd("/tenant1/"), clientv3.PermissionType(clientv3.PermReadWrite))
			return err
		},
		func() error {
			_, err := admin.UserAddWithOptions(ctx, "agent-cert", "", &clientv3.UserAddOptions{NoPassword: true})
			return err
		},
		func() error { _, err := admin.UserGrantRole(ctx, "agent-cert", "tenant1"); return err },
		func() error { _, err := admin.UserAdd(ctx, "agent-pw", "agent-secret"); return err },
		func() error { _, err := admin.UserGrantRole(ctx, "agent-pw", "tenant1"); return err },
		func() error { _, err := admin.AuthEnable(ctx); return err },
	}
	for i, step := range steps {
		if err := step(); err != nil {
			t.Fatalf("RBAC setup step %d: %v", i, err)
		}
	}

	// open gives Open the whole wait unless the dial timeout is set (the
	// refusals below, which wait for it, set a shorter one): an etcd
	// under -race on a loaded machine may take seconds to check a
	// password.
	open := func(cfg etcd.Config) (*etcd.Backend, error) {
		cfg.Endpoints, cfg.TTL = endpoints, 2*time.Second
		if cfg.DialTimeout == 0 {
			cfg.DialTimeout = waitTimeout
		}
		ctx, cancel := context.WithTimeout(context.Background(), cfg.DialTimeout)
		defer cancel()
		return etcd.Open(ctx, cfg)
	}
	registerAndSee := func(t *testing.T, b *etcd.Backend) {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
		defer cancel()
		if err := b.Register(ctx, "web", "10.0.0.1:80", map[string]string{"v": "1"}); err != nil {
			t.Fatalf("Register: %v", err)
		}
		st, err := b.Subscribe(ctx, "web")
		if err != nil {
			t.Fatalf("Subscribe: %v", err)
		}
		defer st.Close()
		select {
		case ev, ok := <-st.Events():
			if !ok || ev.Instance.Addr != "10.0.0.1:80" {
				t.Fatalf("first event %+v (open %v, err %v); want the registration", ev, ok, st.Err())
			}
		case <-ctx.Done():
			t.Fatal("no event")
		}
		if err := b.Unregister(ctx, "web", "10.0.0.1:80"); err != nil {
			t.Fatalf("Unregister: %v", err)
		}
	}

	for _, tt := range []struct {
		name string
		cfg  etcd.Config
	}{
		{"certificate common name", etcd.Config{TLS: clientTLS("agent-cert", testcert.Options{}), Prefix: "/tenant1/"}},
		{"user and password", etcd.Config{TLS: clientTLS("whoever", testcert.Options{}), Username: "agent-pw", Password: "agent-secret", Prefix: "/tenant1/"}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			b, err := open(tt.cfg)
			if err != nil {
				t.Fatalf("Open: %v", err)
			}
			defer b.Close()
			registerAndSee(t, b)

			// The same user outside its prefix.
			outside := tt.cfg
			outside.Prefix = "/discoverd/services/"
			if b, err := open(outside); err == nil {
				ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
				err = b.Register(ctx, "web", "10.0.0.1:80", nil)
				cancel()
				b.Close()
				if err == nil {
					t.Fatal("registered outside the role's prefix")
				}
			}
		})
	}

	other := testcert.NewCA(t, "other CA")
	for _, tt := range []struct {
		name string
		cfg  etcd.Config
	}{
		{"wrong password", etcd.Config{TLS: clientTLS("x", testcert.Options{}), Username: "agent-pw", Password: "wrong", Prefix: "/tenant1/"}},
		{"no client certificate", etcd.Config{TLS: &tls.Config{RootCAs: ca.Pool()}, Prefix: "/tenant1/"}},
		{"expired client certificate", etcd.Config{TLS: clientTLS("agent-cert", testcert.Options{Expired: true}), Prefix: "/tenant1/"}},
		{"server from an untrusted CA", etcd.Config{TLS: &tls.Config{RootCAs: other.Pool(), Certificates: clientTLS("agent-cert", testcert.Options{}).Certificates}, Prefix: "/tenant1/"}},
		{"plain http to the TLS port", etcd.Config{Prefix: "/tenant1/"}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			tt.cfg.DialTimeout = 3 * time.Second
			b, err := open(tt.cfg)
			if err == nil {
				b.Close()
				t.Fatal("Open succeeded")
			}
		})
	}
}
