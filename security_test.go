package main

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/go-zookeeper/zk"
	"github.com/miekg/dns"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/flynn/discoverd/api"
	"github.com/flynn/discoverd/backend/etcd/embedded"
	"github.com/flynn/discoverd/backend/etcd/etcdtest"
	"github.com/flynn/discoverd/backend/zookeeper"
	"github.com/flynn/discoverd/backend/zookeeper/zktest"
	discoverd "github.com/flynn/discoverd/client"
	"github.com/flynn/discoverd/internal/testcert"
	"github.com/flynn/discoverd/rpc"
)

func tokenHash(token string) string {
	s := sha256.Sum256([]byte(token))
	return hex.EncodeToString(s[:])
}

// aclV1 is the ACL the secure agent starts with; aclV2 (SIGHUP) lets the
// reader register db too.
var (
	aclV1 = `{"tokens": [
	  {"name": "web-deployer", "sha256": "` + tokenHash("deploy-secret") + `", "register": ["web", "web-*", "pub-*"], "read": ["*"]},
	  {"name": "reader", "sha256": "` + tokenHash("read-secret") + `", "register": [], "read": ["web"]}
	], "anonymous": {"register": ["anon-*"], "read": ["pub-*", "anon-*"]}}`
	aclV2 = strings.Replace(aclV1, `"register": [], "read": ["web"]`, `"register": ["db"], "read": ["web", "db"]`, 1)
)

// secureAgent is an agent with TLS that requires client certificates and
// an ACL file, and what a client needs to reach it.
type secureAgent struct {
	m       *Main
	addr    string
	ca      *testcert.CA
	client  tls.Certificate // signed by ca
	aclFile string
	// Files for the environment of clients: the CA, and client's
	// certificate and key.
	caFile, certFile, keyFile string
}

func startSecureAgent(t *testing.T) *secureAgent {
	t.Helper()
	dir := t.TempDir()
	ca := testcert.NewCA(t, "agent CA")
	srvCert, srvKey := ca.Issue(t, testcert.Options{CommonName: "agent", Hosts: []string{"127.0.0.1"}}).Write(t, dir, "agent")
	pair := ca.Issue(t, testcert.Options{CommonName: "app"})
	sa := &secureAgent{
		ca:      ca,
		client:  pair.TLS,
		aclFile: filepath.Join(dir, "acl.json"),
		caFile:  ca.Write(t, dir),
	}
	sa.certFile, sa.keyFile = pair.Write(t, dir, "app")
	if err := os.WriteFile(sa.aclFile, []byte(aclV1), 0o600); err != nil {
		t.Fatal(err)
	}
	m := testMain(t)
	m.DNS = "127.0.0.1:0"
	m.TLSCert, m.TLSKey, m.TLSClientCA = srvCert, srvKey, sa.caFile
	m.ACLFile = sa.aclFile
	m.reloaded = make(chan struct{}, 1)
	mustStart(t, m)
	sa.m, sa.addr = m, m.Addr().String()
	return sa
}

func (sa *secureAgent) tlsConfig() *tls.Config {
	return &tls.Config{RootCAs: sa.ca.Pool(), Certificates: []tls.Certificate{sa.client}}
}

func (sa *secureAgent) dial(t *testing.T, token string) *rpc.Client {
	t.Helper()
	d := &rpc.Dialer{TLS: sa.tlsConfig()}
	if token != "" {
		d.Header = http.Header{"Authorization": {"Bearer " + token}}
	}
	c, err := d.Dial(testContext(t), sa.addr, rpc.Gob)
	if err != nil {
		t.Fatalf("Dial: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// do sends an HTTP request to the agent; auth is "Bearer ...", "cookie:TOKEN"
// or "".
func (sa *secureAgent) do(t *testing.T, method, path, auth string, header ...string) (int, string) {
	t.Helper()
	return sa.doBody(t, method, path, auth, "{}", header...)
}

// doBody is do with a request body.
func (sa *secureAgent) doBody(t *testing.T, method, path, auth, body string, header ...string) (int, string) {
	t.Helper()
	req, err := http.NewRequestWithContext(testContext(t), method, "https://"+sa.addr+path, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if token, ok := strings.CutPrefix(auth, "cookie:"); ok {
		req.AddCookie(&http.Cookie{Name: "discoverd_token", Value: token})
	} else if auth != "" {
		req.Header.Set("Authorization", auth)
	}
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: sa.tlsConfig()}}
	defer hc.CloseIdleConnections()
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	if resp.Header.Get("Content-Type") == "text/event-stream" {
		return resp.StatusCode, "" // a stream that was allowed; do not wait for it
	}
	got, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(got)
}

func testContext(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	t.Cleanup(cancel)
	return ctx
}

func wantCode(t *testing.T, what string, err error, want api.Code) {
	t.Helper()
	if got := api.ErrorCode(api.ParseError(errText(err))); got != want {
		t.Errorf("%s: error %v, want code %q", what, err, want)
	}
}

func errText(err error) string {
	if err == nil {
		return ""
	}
	return strings.TrimPrefix(err.Error(), "rpc: ")
}

// TestSecureAgentACL drives an agent with TLS and an ACL file through
// every front end and rule kind: register and read, allowed and denied,
// for a token, the anonymous rules and an unknown token, then reloads the
// file with SIGHUP.
func TestSecureAgentACL(t *testing.T) {
	sa := startSecureAgent(t)

	t.Run("rpc register", func(t *testing.T) {
		for _, tt := range []struct {
			token, name string
			want        api.Code
		}{
			{"deploy-secret", "web", ""},
			{"deploy-secret", "web-api", ""},
			{"deploy-secret", "pub-docs", ""},
			{"deploy-secret", "db", api.CodePermissionDenied},
			{"read-secret", "web", api.CodePermissionDenied},
			{"", "anon-1", ""},
			{"", "web", api.CodePermissionDenied},
			{"not-a-token", "anon-1", api.CodePermissionDenied},
		} {
			c := sa.dial(t, tt.token)
			var addr string
			err := c.Call(testContext(t), api.MethodRegister, &api.Args{Name: tt.name, Addr: "10.0.0.1:80"}, &addr)
			wantCode(t, fmt.Sprintf("token %q registers %q", tt.token, tt.name), err, tt.want)
			if err == nil {
				// Unregister is not checked: a connection removes only
				// what it owns.
				if err := c.Call(testContext(t), api.MethodUnregister, &api.Args{Name: tt.name, Addr: "10.0.0.1:80"}, &struct{}{}); err != nil {
					t.Errorf("unregister %q: %v", tt.name, err)
				}
			}
		}
	})

	// Registrations that stay for the reads below.
	holder := sa.dial(t, "deploy-secret")
	for _, name := range []string{"web", "pub-docs"} {
		var addr string
		if err := holder.Call(testContext(t), api.MethodRegister, &api.Args{Name: name, Addr: "10.0.0.2:80"}, &addr); err != nil {
			t.Fatalf("register %s: %v", name, err)
		}
	}

	t.Run("rpc subscribe", func(t *testing.T) {
		for _, tt := range []struct {
			token, name string
			want        api.Code
		}{
			{"read-secret", "web", ""},
			{"read-secret", "pub-docs", api.CodePermissionDenied},
			{"", "pub-docs", ""},
			{"", "web", api.CodePermissionDenied},
		} {
			c := sa.dial(t, tt.token)
			ch := make(chan *api.ServiceUpdate, 16)
			sc, err := c.Stream(testContext(t), api.MethodSubscribe, &api.Args{Name: tt.name}, ch)
			if err != nil {
				t.Fatal(err)
			}
			if tt.want == "" {
				select {
				case u := <-ch:
					if u.Addr != "10.0.0.2:80" {
						t.Errorf("token %q subscribes %q: first update %+v", tt.token, tt.name, u)
					}
				case <-sc.Done():
					t.Errorf("token %q subscribes %q: stream ended: %v", tt.token, tt.name, sc.Err())
				}
				sc.Close()
				continue
			}
			for u := range ch { // closed when the stream ends
				t.Errorf("token %q subscribes %q: got %+v, want a denial", tt.token, tt.name, u)
			}
			wantCode(t, fmt.Sprintf("token %q subscribes %q", tt.token, tt.name), sc.Err(), tt.want)
		}
	})

	t.Run("http", func(t *testing.T) {
		for _, tt := range []struct {
			method, path, auth string
			want               int
		}{
			{"PUT", "/services/web-x/instances/10.0.0.3:80", "Bearer deploy-secret", 200},
			{"PUT", "/services/web-x/instances/10.0.0.4:80", "cookie:deploy-secret", 200},
			{"PUT", "/services/web-x/instances/10.0.0.5:80", "", 403},
			{"PUT", "/services/web-x/instances/10.0.0.5:80", "Basic Zm9vOmJhcg==", 403},
			{"PUT", "/services/anon-h/instances/10.0.0.5:80", "", 200},
			{"DELETE", "/services/web-x/instances/10.0.0.3:80", "", 403},
			{"DELETE", "/services/web-x/instances/10.0.0.3:80", "Bearer deploy-secret", 204},
			{"GET", "/services/web", "Bearer read-secret", 200},
			{"GET", "/services/web", "cookie:read-secret", 200},
			{"GET", "/services/web", "", 403},
			{"GET", "/services/web/leader", "", 403},
			{"GET", "/services/pub-docs/leader", "", 200},
			{"GET", "/services/web", "Bearer wrong", 403},
			{"GET", "/services", "Bearer wrong", 403},
			{"GET", "/health", "", 200},
			// A bad name is a bad request before it is a denied one.
			{"GET", "/services/-web", "", 400},
			{"PUT", "/services/web%2Cx/instances/10.0.0.5:80", "", 400},
		} {
			code, body := sa.do(t, tt.method, tt.path, tt.auth)
			if code != tt.want {
				t.Errorf("%s %s (%s): %d %s, want %d", tt.method, tt.path, tt.auth, code, body, tt.want)
			}
			if code == 403 && !strings.Contains(body, `"code":"permission_denied"`) {
				t.Errorf("%s %s (%s): body %s, want code permission_denied", tt.method, tt.path, tt.auth, body)
			}
		}
		// Watches (SSE), as a browser's EventSource sends them: the
		// token in the cookie.
		if code, body := sa.do(t, "GET", "/services/web", "", "Accept", "text/event-stream"); code != 403 {
			t.Errorf("anonymous watch of web: %d %s, want 403", code, body)
		}
		if code, body := sa.do(t, "GET", "/services/web", "cookie:read-secret", "Accept", "text/event-stream"); code != 200 {
			t.Errorf("watch of web with the reader's cookie: %d %s, want 200", code, body)
		}
		// The listing leaves out what the caller may not read.
		_, body := sa.do(t, "GET", "/services", "")
		if !strings.Contains(body, `"pub-docs"`) || strings.Contains(body, `"web"`) {
			t.Errorf("anonymous listing: %s, want pub-docs and not web", body)
		}
		_, body = sa.do(t, "GET", "/services", "Bearer deploy-secret")
		if !strings.Contains(body, `"pub-docs"`) || !strings.Contains(body, `"web"`) {
			t.Errorf("deployer's listing: %s, want pub-docs and web", body)
		}
	})

	t.Run("checked registrations follow the rules", func(t *testing.T) {
		const path = "/services/web-checked/instances/10.0.0.9:80"
		const body = `{"check": {"tcp": "127.0.0.1:1", "interval": "1m"}}`
		for _, tt := range []struct {
			method, path, auth, body string
			want                     int
		}{
			{"PUT", path, "", body, 403},
			{"PUT", path, "Bearer read-secret", body, 403},
			{"PUT", path, "Bearer deploy-secret", body, 200},
			{"GET", path, "", "", 403},
			{"GET", path, "Bearer deploy-secret", "", 200},
			{"GET", "/checks", "Bearer deploy-secret", "", 403}, // needs ?service= with an ACL
			{"GET", "/checks?service=web-checked", "", "", 403},
			{"GET", "/checks?service=web-checked", "Bearer read-secret", "", 403},
			{"GET", "/checks?service=web-checked", "Bearer deploy-secret", "", 200},
			{"DELETE", path, "", "", 403},
			{"DELETE", path, "Bearer read-secret", "", 403},
			{"DELETE", path, "Bearer deploy-secret", "", 204},
		} {
			code, got := sa.doBody(t, tt.method, tt.path, tt.auth, tt.body)
			if code != tt.want {
				t.Errorf("%s %s (%q): %d %s, want %d", tt.method, tt.path, tt.auth, code, got, tt.want)
			}
			if code == 403 && !strings.Contains(got, `"code":"permission_denied"`) {
				t.Errorf("%s %s (%q): body %s, want code permission_denied", tt.method, tt.path, tt.auth, got)
			}
		}
		// The allowed GET /checks lists it while it was held, and the
		// DELETE removed it from the agent's checks.
		if code, got := sa.do(t, "GET", "/checks?service=web-checked", "Bearer deploy-secret"); code != 200 || got != "[]\n" {
			t.Errorf("checks of web-checked after the DELETE: %d %q, want 200 []", code, got)
		}
	})

	t.Run("dns follows the anonymous rules", func(t *testing.T) {
		for _, tt := range []struct {
			name  string
			rcode int
		}{
			{"pub-docs.discoverd.", dns.RcodeSuccess},
			{"web.discoverd.", dns.RcodeRefused},
			{"leader.web.discoverd.", dns.RcodeRefused},
		} {
			q := new(dns.Msg)
			q.SetQuestion(tt.name, dns.TypeA)
			resp, _, err := (&dns.Client{Timeout: waitTimeout}).Exchange(q, sa.m.DNSAddr())
			if err != nil {
				t.Fatal(err)
			}
			if resp.Rcode != tt.rcode || (tt.rcode == dns.RcodeSuccess && len(resp.Answer) != 1) {
				t.Errorf("%s: rcode %s, %d answers; want %s", tt.name, dns.RcodeToString[resp.Rcode], len(resp.Answer), dns.RcodeToString[tt.rcode])
			}
		}
	})

	t.Run("denials are counted", func(t *testing.T) {
		_, body := sa.do(t, "GET", "/metrics", "")
		for _, want := range []string{
			`discoverd_acl_denied_total{front="rpc",right="register"}`,
			`discoverd_acl_denied_total{front="rpc",right="read"}`,
			`discoverd_acl_denied_total{front="http",right="register"}`,
			`discoverd_acl_denied_total{front="http",right="read"}`,
			`discoverd_acl_denied_total{front="dns",right="read"} 2`,
		} {
			if !strings.Contains(body, want) {
				t.Errorf("/metrics lacks %s", want)
			}
		}
	})

	t.Run("the Go client sends its token", func(t *testing.T) {
		c, err := discoverd.NewClientWithConfig(discoverd.Config{Addr: "https://" + sa.addr, TLS: sa.tlsConfig(), Token: "read-secret"})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if err := c.Register("db", "10.0.0.9:5432"); api.ErrorCode(err) != api.CodePermissionDenied {
			t.Errorf("reader registers db: %v, want permission_denied", err)
		}
		services, err := c.Services("web", waitTimeout)
		if err != nil || len(services) != 1 {
			t.Errorf("reader looks up web: %v, %v", services, err)
		}
	})

	t.Run("the client library and the CLI read the environment", func(t *testing.T) {
		t.Setenv("DISCOVERD", "https://"+sa.addr)
		t.Setenv("DISCOVERD_CA_CERT", sa.caFile)
		t.Setenv("DISCOVERD_CLIENT_CERT", sa.certFile)
		t.Setenv("DISCOVERD_CLIENT_KEY", sa.keyFile)
		t.Setenv("DISCOVERD_TOKEN", "deploy-secret")
		c, err := discoverd.NewClient()
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if err := c.Register("web-env", "10.0.0.8:80"); err != nil {
			t.Errorf("deployer registers web-env: %v", err)
		}
		var stdout, stderr strings.Builder
		if code := run(testContext(t), []string{"services"}, os.Getenv, &stdout, &stderr); code != 0 {
			t.Fatalf("discoverd services: exit %d: %s", code, stderr.String())
		}
		if !strings.Contains(stdout.String(), "web-env") || !strings.Contains(stdout.String(), "pub-docs") {
			t.Errorf("discoverd services with the deployer's token:\n%s", stdout.String())
		}
		t.Setenv("DISCOVERD_TOKEN", "")
		stdout.Reset()
		if code := run(testContext(t), []string{"services"}, os.Getenv, &stdout, &stderr); code != 0 {
			t.Fatalf("anonymous discoverd services: exit %d: %s", code, stderr.String())
		}
		if strings.Contains(stdout.String(), "web") {
			t.Errorf("anonymous discoverd services lists what it may not read:\n%s", stdout.String())
		}
	})

	t.Run("SIGHUP reloads the file", func(t *testing.T) {
		c := sa.dial(t, "read-secret") // connected before the reload
		if err := os.WriteFile(sa.aclFile, []byte(aclV2), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := syscall.Kill(os.Getpid(), syscall.SIGHUP); err != nil {
			t.Fatal(err)
		}
		select {
		case <-sa.m.reloaded:
		case <-testContext(t).Done():
			t.Fatal("no reload after SIGHUP")
		}
		var addr string
		if err := c.Call(testContext(t), api.MethodRegister, &api.Args{Name: "db", Addr: "10.0.0.9:5432"}, &addr); err != nil {
			t.Errorf("reader registers db after the reload: %v", err)
		}
		// A file that does not parse leaves the rules in force.
		if err := os.WriteFile(sa.aclFile, []byte(`{"tokens": [`), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := syscall.Kill(os.Getpid(), syscall.SIGHUP); err != nil {
			t.Fatal(err)
		}
		<-sa.m.reloaded
		if err := c.Call(testContext(t), api.MethodRegister, &api.Args{Name: "db", Addr: "10.0.0.9:5433"}, &addr); err != nil {
			t.Errorf("reader registers db after a bad reload: %v", err)
		}
	})
}

// TestSecureAgentTLS: the agent's port refuses plain TCP, clients without
// a certificate, with an expired one or one from another CA, and clients
// that do not trust its CA.
func TestSecureAgentTLS(t *testing.T) {
	sa := startSecureAgent(t)
	other := testcert.NewCA(t, "other CA")
	expired := sa.ca.Issue(t, testcert.Options{CommonName: "app", Expired: true}).TLS
	foreign := other.Issue(t, testcert.Options{CommonName: "app"}).TLS

	for _, tt := range []struct {
		name string
		conf *tls.Config
	}{
		{"plain TCP", nil},
		{"no client certificate", &tls.Config{RootCAs: sa.ca.Pool()}},
		{"expired client certificate", &tls.Config{RootCAs: sa.ca.Pool(), Certificates: []tls.Certificate{expired}}},
		{"client certificate of another CA", &tls.Config{RootCAs: sa.ca.Pool(), Certificates: []tls.Certificate{foreign}}},
		{"client does not trust the agent's CA", &tls.Config{RootCAs: other.Pool(), Certificates: []tls.Certificate{sa.client}}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			c, err := (&rpc.Dialer{TLS: tt.conf}).Dial(testContext(t), sa.addr, rpc.Gob)
			if err == nil {
				// TLS 1.3 reports a refused client certificate at the
				// first read, after the handshake: the call fails.
				var addr string
				err = c.Call(testContext(t), api.MethodRegister, &api.Args{Name: "anon-x", Addr: "10.0.0.1:80"}, &addr)
				c.Close()
			}
			if err == nil {
				t.Fatal("the agent served the connection")
			}
		})
	}
	t.Run("valid certificate", func(t *testing.T) {
		c := sa.dial(t, "")
		var addr string
		if err := c.Call(testContext(t), api.MethodRegister, &api.Args{Name: "anon-x", Addr: "10.0.0.1:80"}, &addr); err != nil {
			t.Fatal(err)
		}
	})
}

// TestSecurityFlags: the combinations the agent refuses before it starts.
func TestSecurityFlags(t *testing.T) {
	for _, tt := range []struct {
		args []string
		env  map[string]string
		want string
	}{
		{[]string{"-tls-cert", "c.pem"}, nil, "-tls-cert and -tls-key go together"},
		{[]string{"-tls-client-ca", "ca.pem"}, nil, "-tls-client-ca needs"},
		{[]string{"-etcd-cacert", "ca.pem"}, nil, "apply to an external etcd"},
		{[]string{"-etcd", "https://h:2379", "-etcd-user", "u"}, nil, "needs its password in DISCOVERD_ETCD_PASSWORD"},
		{[]string{"-etcd", "https://h:2379"}, map[string]string{"DISCOVERD_ETCD_PASSWORD": "p"}, "without -etcd-user"},
		{[]string{"-etcd-prefix", "tenant/"}, nil, "must start and end with /"},
		{[]string{"-zookeeper", "h:2181", "-zookeeper-auth", "nopassword"}, nil, "want user:password"},
		{[]string{"-zookeeper-auth", "u:p"}, nil, "applies to -zookeeper"},
	} {
		m := NewMain()
		err := m.ParseFlags(tt.args, func(k string) string { return tt.env[k] }, io.Discard)
		if err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%v: %v, want an error containing %q", tt.args, err, tt.want)
		}
	}
	m := NewMain()
	env := map[string]string{"DISCOVERD_ETCD_PASSWORD": "pw", "DISCOVERD_ZOOKEEPER_AUTH": ""}
	if err := m.ParseFlags([]string{"-etcd", "https://h:2379", "-etcd-user", "u", "-etcd-prefix", "/t1/"}, func(k string) string { return env[k] }, io.Discard); err != nil {
		t.Fatal(err)
	}
	if m.EtcdPassword != "pw" || m.EtcdPrefix != "/t1/" {
		t.Fatalf("password %q prefix %q", m.EtcdPassword, m.EtcdPrefix)
	}
}

// TestStartRefusesBadSecurityFiles: a missing certificate or a bad ACL
// file stops the start with an error that names it.
func TestStartRefusesBadSecurityFiles(t *testing.T) {
	dir := t.TempDir()
	bad := filepath.Join(dir, "acl.json")
	if err := os.WriteFile(bad, []byte(`{"anonymous": {"read": ["*x"]}}`), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		set  func(m *Main)
		want string
	}{
		{func(m *Main) { m.ACLFile = bad }, "acl.json"},
		{func(m *Main) {
			m.TLSCert, m.TLSKey = filepath.Join(dir, "none.pem"), filepath.Join(dir, "none-key.pem")
		}, "none.pem"},
	} {
		m := testMain(t)
		tt.set(m)
		err := m.Start(testContext(t))
		if err == nil {
			m.Close()
			t.Fatalf("Start succeeded, want an error naming %s", tt.want)
		}
		if !strings.Contains(err.Error(), tt.want) {
			t.Errorf("Start: %v, want an error naming %s", err, tt.want)
		}
	}
}

// TestOpenAgentWarns: without -acl-file, an agent on a non-loopback
// address logs a warning.
func TestOpenAgentWarns(t *testing.T) {
	var logs strings.Builder
	m := &securityMain{}
	m.warnOpen(slog.New(slog.NewTextHandler(&logs, nil)), &net.TCPAddr{IP: net.IPv4(10, 0, 0, 1), Port: 1111})
	if !strings.Contains(logs.String(), "no -acl-file") {
		t.Errorf("no warning on 10.0.0.1: %q", logs.String())
	}
	logs.Reset()
	m.warnOpen(slog.New(slog.NewTextHandler(&logs, nil)), &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 1111})
	if logs.Len() != 0 {
		t.Errorf("warning on loopback: %q", logs.String())
	}
}

// TestAgentOnTLSEtcd: the agent's etcd flags (-etcd https://,
// -etcd-cacert, -etcd-cert, -etcd-key, -etcd-prefix) reach a store that
// requires client certificates, and registrations land under the prefix.
func TestAgentOnTLSEtcd(t *testing.T) {
	dir := t.TempDir()
	ca := testcert.NewCA(t, "etcd CA")
	cert, key := ca.Issue(t, testcert.Options{CommonName: "etcd", Hosts: []string{"127.0.0.1"}}).Write(t, dir, "etcd")
	caFile := ca.Write(t, dir)
	srv := etcdtest.NewTLSServer(t, embedded.TLS{CertFile: cert, KeyFile: key, TrustedCAFile: caFile, ClientCertAuth: true})
	agentCert, agentKey := ca.Issue(t, testcert.Options{CommonName: "agent"}).Write(t, dir, "agent")

	m := testMain(t)
	args := []string{"-bind", "127.0.0.1:0", "-dns", "", "-etcd", strings.Join(srv.Endpoints(), ","),
		"-etcd-cacert", caFile, "-etcd-cert", agentCert, "-etcd-key", agentKey, "-etcd-prefix", "/fleet1/"}
	if err := m.ParseFlags(args, func(string) string { return "" }, io.Discard); err != nil {
		t.Fatal(err)
	}
	mustStart(t, m)
	c := mustRegister(t, m.Addr().String()) // web 10.0.0.1:80
	defer c.Close()

	etc, err := clientv3.New(clientv3.Config{
		Endpoints: srv.Endpoints(), DialTimeout: waitTimeout, Logger: zap.NewNop(),
		TLS: &tls.Config{RootCAs: ca.Pool(), Certificates: []tls.Certificate{ca.Issue(t, testcert.Options{CommonName: "check"}).TLS}},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer etc.Close()
	resp, err := etc.Get(testContext(t), "/fleet1/web/", clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.Kvs) != 1 || string(resp.Kvs[0].Key) != "/fleet1/web/10.0.0.1:80" {
		t.Fatalf("keys under /fleet1/web/: %v", resp.Kvs)
	}
}

// TestAgentOnZooKeeperWithAuth: -zookeeper-auth (here from its
// environment variable) reaches the backend: the agent's znodes carry the
// digest ACL.
func TestAgentOnZooKeeperWithAuth(t *testing.T) {
	srv := zktest.NewServer(t)
	m := testMain(t)
	env := map[string]string{"DISCOVERD_ZOOKEEPER_AUTH": "fleet:pw"}
	if err := m.ParseFlags([]string{"-bind", "127.0.0.1:0", "-dns", "", "-zookeeper", strings.Join(srv.Servers(), ",")},
		func(k string) string { return env[k] }, io.Discard); err != nil {
		t.Fatal(err)
	}
	mustStart(t, m)
	c := mustRegister(t, m.Addr().String()) // web 10.0.0.1:80
	defer c.Close()

	zc, events, err := zk.Connect(srv.Servers(), 10*time.Second, zk.WithLogInfo(false), zk.WithLogger(zkQuiet{}))
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		zc.Close()
		for range events {
		}
	}()
	acl, _, err := zc.GetACL(zookeeper.DefaultPrefix + "/web/10.0.0.1:80")
	if err != nil {
		t.Fatal(err)
	}
	if len(acl) != 2 || acl[0].Scheme != "digest" || !strings.HasPrefix(acl[0].ID, "fleet:") || acl[1].Perms != zk.PermRead {
		t.Fatalf("ACL of the registration: %v, want digest fleet (all) and world (read)", acl)
	}
	if err := zc.Delete(zookeeper.DefaultPrefix+"/web/10.0.0.1:80", -1); !errors.Is(err, zk.ErrNoAuth) {
		t.Fatalf("anonymous delete: %v, want ErrNoAuth", err)
	}
}

type zkQuiet struct{}

func (zkQuiet) Printf(string, ...any) {}
