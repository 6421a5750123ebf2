package server

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"sync/atomic"
)

// TLSFiles names the PEM files of the agent's TLS: its certificate chain
// and key, and optionally the CAs whose client certificates it requires
// (mutual TLS).
type TLSFiles struct {
	Cert, Key string
	// ClientCA, if set, makes a client certificate signed by one of its
	// CAs a condition of the handshake.
	ClientCA string
}

// TLS serves the agent's listener over TLS, with a certificate that
// Reload replaces (SIGHUP), so a renewed certificate needs no restart.
// Its methods are safe for concurrent use.
type TLS struct {
	files TLSFiles
	cert  atomic.Pointer[tls.Certificate]
	pool  atomic.Pointer[x509.CertPool]
}

// NewTLS loads the files; the error names the file that is wrong.
func NewTLS(files TLSFiles) (*TLS, error) {
	if files.Cert == "" || files.Key == "" {
		return nil, errors.New("tls: both a certificate and a key are needed")
	}
	t := &TLS{files: files}
	if err := t.Reload(); err != nil {
		return nil, err
	}
	return t, nil
}

// Reload reads the files again. On error the previous certificate and
// CAs stay in use.
func (t *TLS) Reload() error {
	cert, err := tls.LoadX509KeyPair(t.files.Cert, t.files.Key)
	if err != nil {
		return fmt.Errorf("tls: certificate %s, key %s: %w", t.files.Cert, t.files.Key, err)
	}
	var pool *x509.CertPool
	if t.files.ClientCA != "" {
		if pool, err = LoadCertPool(t.files.ClientCA); err != nil {
			return err
		}
	}
	t.cert.Store(&cert)
	t.pool.Store(pool)
	return nil
}

// Config returns the server configuration: TLS 1.2 or later, HTTP/1.1 (the
// RPC upgrade is an HTTP/1 CONNECT), and with a client CA, a verified
// client certificate required. Each handshake uses what the last
// successful Reload read.
func (t *TLS) Config() *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS12,
		NextProtos: []string{"http/1.1"},
		GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) {
			c := &tls.Config{
				MinVersion:   tls.VersionTLS12,
				NextProtos:   []string{"http/1.1"},
				Certificates: []tls.Certificate{*t.cert.Load()},
			}
			if pool := t.pool.Load(); pool != nil {
				c.ClientAuth = tls.RequireAndVerifyClientCert
				c.ClientCAs = pool
			}
			return c, nil
		},
	}
}

// LoadCertPool reads a PEM file of CA certificates.
func LoadCertPool(path string) (*x509.CertPool, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("tls: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(data) {
		return nil, fmt.Errorf("tls: %s holds no PEM certificate", path)
	}
	return pool, nil
}
