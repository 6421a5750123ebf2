package zookeeper_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/go-zookeeper/zk"

	"github.com/flynn/discoverd/backend/zookeeper"
)

// TestDigestAuth: with Config.Auth the backend authenticates with the
// digest scheme and its znodes can be read by anyone but changed only by
// that user: another client, authenticated as another user or not at all,
// cannot delete or overwrite a registration or add one under the
// service, and a backend with a wrong password cannot register there.
func TestDigestAuth(t *testing.T) {
	s := server(t)
	prefix := "/discoverd-auth-" + uniqueName(t) + "/services"
	openAuth := func(auth string) *zookeeper.Backend {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		defer cancel()
		b, err := zookeeper.Open(ctx, zookeeper.Config{Servers: s.Servers(), TTL: 5 * time.Second, Prefix: prefix, Logger: testLogger(), Auth: auth})
		if err != nil {
			t.Fatalf("Open: %v", err)
		}
		t.Cleanup(func() { b.Close() })
		return b
	}
	b := openAuth("agent:s3cret")
	if err := b.Register(ctxT(t), "web", "10.0.0.1:80", map[string]string{"v": "1"}); err != nil {
		t.Fatal(err)
	}
	node := prefix + "/web/10.0.0.1:80"

	anon := rawConn(t)
	if _, _, err := anon.Get(node); err != nil {
		t.Errorf("anonymous read: %v", err)
	}
	acl, _, err := anon.GetACL(node)
	if err != nil {
		t.Fatal(err)
	}
	// ZooKeeper hides the digest from those who may not administer
	// the znode: compare the user only.
	if len(acl) != 2 || acl[0].Perms != zk.PermAll || acl[0].Scheme != "digest" || !strings.HasPrefix(acl[0].ID, "agent:") ||
		acl[1] != zk.WorldACL(zk.PermRead)[0] {
		t.Errorf("ACL of %s: %v, want all for digest user agent, read for anyone", node, acl)
	}
	intruder := rawConn(t)
	if err := intruder.AddAuth("digest", []byte("intruder:pw")); err != nil {
		t.Fatal(err)
	}
	for who, c := range map[string]*zk.Conn{"anonymous": anon, "another user": intruder} {
		if err := c.Delete(node, -1); !errors.Is(err, zk.ErrNoAuth) {
			t.Errorf("%s deletes the registration: %v, want ErrNoAuth", who, err)
		}
		if _, err := c.Set(node, []byte(`{}`), -1); !errors.Is(err, zk.ErrNoAuth) {
			t.Errorf("%s overwrites the registration: %v, want ErrNoAuth", who, err)
		}
		if _, err := c.Create(prefix+"/web/10.6.6.6:80", nil, zk.FlagEphemeral, zk.WorldACL(zk.PermAll)); !errors.Is(err, zk.ErrNoAuth) {
			t.Errorf("%s adds an instance: %v, want ErrNoAuth", who, err)
		}
	}

	wrong := openAuth("agent:wrong")
	if err := wrong.Register(ctxT(t), "web", "10.0.0.2:80", nil); err == nil {
		t.Error("a backend with a wrong password registered under the service")
	}

	// Another agent of the fleet (same user) takes the registration over
	// and removes it.
	peer := openAuth("agent:s3cret")
	if err := peer.Register(ctxT(t), "web", "10.0.0.1:80", map[string]string{"v": "2"}); err != nil {
		t.Fatalf("takeover by the same user: %v", err)
	}
	if err := peer.Unregister(ctxT(t), "web", "10.0.0.1:80"); err != nil {
		t.Fatalf("unregister by the same user: %v", err)
	}
}

func TestDigestAuthMalformed(t *testing.T) {
	_, err := zookeeper.Open(context.Background(), zookeeper.Config{Servers: []string{"127.0.0.1:1"}, Auth: "no-colon"})
	if err == nil {
		t.Fatal("Open accepted auth without a colon")
	}
}
