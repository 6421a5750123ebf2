package discoverd_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	discoverd "github.com/flynn/discoverd/client"
)

func TestParseAgentAddr(t *testing.T) {
	for _, tt := range []struct {
		in      string
		addr    string
		tls     bool
		wantErr bool
	}{
		{"127.0.0.1:1111", "127.0.0.1:1111", false, false},
		{"tcp://h:1111", "h:1111", false, false},
		{"http://h:1111/", "h:1111", false, false},
		{"https://h:1111", "h:1111", true, false},
		{"https://", "", false, true},
		{"https://h:1111/path", "", false, true},
		{"ftp://h:1111", "", false, true},
	} {
		addr, useTLS, err := discoverd.ParseAgentAddr(tt.in)
		if (err != nil) != tt.wantErr || addr != tt.addr || useTLS != tt.tls {
			t.Errorf("ParseAgentAddr(%q) = %q, %v, %v; want %q, %v, error %v", tt.in, addr, useTLS, err, tt.addr, tt.tls, tt.wantErr)
		}
	}
}

func TestTLSConfigFromEnvErrors(t *testing.T) {
	dir := t.TempDir()
	notPEM := filepath.Join(dir, "not.pem")
	if err := os.WriteFile(notPEM, []byte("hello"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		env  map[string]string
		want string
	}{
		{map[string]string{discoverd.EnvCACert: filepath.Join(dir, "missing.pem")}, discoverd.EnvCACert},
		{map[string]string{discoverd.EnvCACert: notPEM}, "no PEM certificate"},
		{map[string]string{discoverd.EnvClientCert: notPEM}, "go together"},
		{map[string]string{discoverd.EnvClientCert: notPEM, discoverd.EnvClientKey: notPEM}, discoverd.EnvClientCert},
	} {
		_, err := discoverd.TLSConfigFromEnv(func(k string) string { return tt.env[k] })
		if err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("env %v: %v, want an error containing %q", tt.env, err, tt.want)
		}
	}
	c, err := discoverd.TLSConfigFromEnv(func(string) string { return "" })
	if err != nil || c.RootCAs != nil || len(c.Certificates) != 0 {
		t.Errorf("empty environment: %+v, %v; want the system's CAs and no certificate", c, err)
	}
}
