package discoverd

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net/http"
	"os"
	"strings"

	"github.com/flynn/discoverd/rpc"
)

// The environment variables of an agent that serves TLS or checks tokens
// (docs/API.md, Security). DISCOVERD=https://host:port selects TLS.
const (
	// EnvToken holds the bearer token sent to the agent.
	EnvToken = "DISCOVERD_TOKEN"
	// EnvCACert names a PEM file of the CAs that signed the agent's
	// certificate; without it the system's CAs are trusted.
	EnvCACert = "DISCOVERD_CA_CERT"
	// EnvClientCert and EnvClientKey name the PEM files of the client
	// certificate, for an agent that requires one (-tls-client-ca).
	EnvClientCert = "DISCOVERD_CLIENT_CERT"
	EnvClientKey  = "DISCOVERD_CLIENT_KEY"
)

// ParseAgentAddr reads an agent address as DISCOVERD and Config.Addr
// accept it: "host:port" or "tcp://host:port" (plain TCP), or
// "https://host:port" (TLS). It returns host:port and whether to use TLS.
func ParseAgentAddr(s string) (addr string, useTLS bool, err error) {
	switch {
	case strings.HasPrefix(s, "https://"):
		addr, useTLS = strings.TrimPrefix(s, "https://"), true
	case strings.HasPrefix(s, "tcp://"):
		addr = strings.TrimPrefix(s, "tcp://")
	case strings.HasPrefix(s, "http://"):
		addr = strings.TrimPrefix(s, "http://")
	default:
		addr = s
	}
	addr = strings.TrimSuffix(addr, "/")
	if addr == "" || strings.ContainsAny(addr, "/?#") || strings.Contains(addr, "://") {
		return "", false, fmt.Errorf("agent address %q: want host:port, tcp://host:port or https://host:port", s)
	}
	return addr, useTLS, nil
}

// TLSConfigFromEnv returns the TLS configuration to reach an agent, read
// through getenv (os.Getenv when nil): the CAs of EnvCACert (else the
// system's) and the client certificate of EnvClientCert and EnvClientKey
// (both or neither). Errors name the variable and file at fault.
func TLSConfigFromEnv(getenv func(string) string) (*tls.Config, error) {
	if getenv == nil {
		getenv = os.Getenv
	}
	c := &tls.Config{MinVersion: tls.VersionTLS12}
	if path := getenv(EnvCACert); path != "" {
		data, err := os.ReadFile(path)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", EnvCACert, err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(data) {
			return nil, fmt.Errorf("%s: %s holds no PEM certificate", EnvCACert, path)
		}
		c.RootCAs = pool
	}
	certFile, keyFile := getenv(EnvClientCert), getenv(EnvClientKey)
	if (certFile == "") != (keyFile == "") {
		return nil, fmt.Errorf("%s and %s go together", EnvClientCert, EnvClientKey)
	}
	if certFile != "" {
		cert, err := tls.LoadX509KeyPair(certFile, keyFile)
		if err != nil {
			return nil, fmt.Errorf("%s/%s: %w", EnvClientCert, EnvClientKey, err)
		}
		c.Certificates = []tls.Certificate{cert}
	}
	return c, nil
}

// setSecurity resolves Addr's scheme, the TLS configuration and the
// token (after setDefaults).
func (c *Config) setSecurity() error {
	addr, useTLS, err := ParseAgentAddr(c.Addr)
	if err != nil {
		return err
	}
	c.Addr = addr
	if useTLS && c.TLS == nil {
		if c.TLS, err = TLSConfigFromEnv(os.Getenv); err != nil {
			return err
		}
	}
	if c.Token == "" {
		c.Token = os.Getenv(EnvToken)
	}
	if strings.ContainsAny(c.Token, "\r\n") {
		return errors.New("the token holds a line break")
	}
	return nil
}

// rpcDialer is the rpc dialer of the configuration: TLS, and the token in
// the CONNECT request.
func (c *Config) rpcDialer() *rpc.Dialer {
	d := &rpc.Dialer{TLS: c.TLS}
	if c.Token != "" {
		d.Header = http.Header{"Authorization": {"Bearer " + c.Token}}
	}
	return d
}
