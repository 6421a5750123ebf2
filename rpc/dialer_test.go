package rpc_test

import (
	"context"
	"crypto/tls"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/flynn/discoverd/rpc"
)

type authKey struct{}

// TestDialerTLSAndHeader dials a TLS listener with a header on the
// CONNECT request, and sees the header in every call's context through
// Server.ConnContext.
func TestDialerTLSAndHeader(t *testing.T) {
	srv := rpc.NewServer()
	srv.ConnContext = func(ctx context.Context, r *http.Request) context.Context {
		return context.WithValue(ctx, authKey{}, r.Header.Get("Authorization"))
	}
	err := rpc.RegisterUnary(srv, "Auth.Who", func(ctx context.Context, _ *Args, reply *string) error {
		*reply, _ = ctx.Value(authKey{}).(string)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.Handle(rpc.DefaultPath, srv)
	ts := httptest.NewUnstartedServer(mux)
	ts.StartTLS()
	t.Cleanup(func() {
		ts.Close()
		srv.Close(context.Background())
	})
	addr := strings.TrimPrefix(ts.URL, "https://")
	tlsConf := ts.Client().Transport.(*http.Transport).TLSClientConfig

	forCodecs(t, func(t *testing.T, codec rpc.Codec) {
		d := &rpc.Dialer{TLS: tlsConf, Header: http.Header{"Authorization": {"Bearer s3cret"}, "Accept": {"text/plain"}}}
		c, err := d.Dial(testCtx(t), addr, codec)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		var who string
		if err := c.Call(testCtx(t), "Auth.Who", &Args{}, &who); err != nil {
			t.Fatal(err)
		}
		if who != "Bearer s3cret" {
			t.Fatalf("the call saw Authorization %q", who)
		}
	})

	t.Run("plain TCP to a TLS port fails", func(t *testing.T) {
		if c, err := rpc.Dial(testCtx(t), addr, rpc.Gob); err == nil {
			c.Close()
			t.Fatal("a plain dial of a TLS listener succeeded")
		}
	})
	t.Run("unknown CA fails", func(t *testing.T) {
		d := &rpc.Dialer{TLS: &tls.Config{}}
		if c, err := d.Dial(testCtx(t), addr, rpc.Gob); err == nil {
			c.Close()
			t.Fatal("a dial that does not trust the server's CA succeeded")
		}
	})
}
