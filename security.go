package main

import (
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"

	"github.com/flynn/discoverd/acl"
	"github.com/flynn/discoverd/server"
)

// EnvEtcdPassword holds the password of -etcd-user. It has no flag, so
// that the password never shows in the process list.
const EnvEtcdPassword = "DISCOVERD_ETCD_PASSWORD"

// securityMain is the security settings of Main (docs/OPERATIONS.md,
// Security) and what they run: the agent port's TLS, the ACL, the
// credentials to the store, and the SIGHUP reloader. Main embeds it.
type securityMain struct {
	// TLSCert, TLSKey and TLSClientCA are PEM files: the agent port's
	// certificate and key ("-tls-cert", "-tls-key"; both or neither), and
	// the CAs of the client certificates it then requires
	// ("-tls-client-ca").
	TLSCert, TLSKey, TLSClientCA string
	// ACLFile is the JSON access rules ("-acl-file"); empty allows
	// everything.
	ACLFile string
	// EtcdCACert, EtcdCert and EtcdKey are PEM files for TLS to an etcd
	// cluster ("-etcd-cacert", "-etcd-cert", "-etcd-key").
	EtcdCACert, EtcdCert, EtcdKey string
	// EtcdUser is the etcd RBAC user ("-etcd-user"); its password comes
	// from EnvEtcdPassword.
	EtcdUser, EtcdPassword string
	// EtcdPrefix is the key prefix of the registrations in etcd
	// ("-etcd-prefix").
	EtcdPrefix string
	// ZooKeeperAuth is "user:password" for ZooKeeper digest auth
	// ("-zookeeper-auth"); the znodes the agent creates are then writable
	// by that user only.
	ZooKeeperAuth string

	tls      *server.TLS
	acl      atomic.Pointer[acl.ACL]
	hupStop  context.CancelFunc
	hupDone  chan struct{}
	hupMu    sync.Mutex // serialises reloads
	reloaded chan struct{}
}

func (s *securityMain) securityFlags(fs *flag.FlagSet, getenv func(string) string) {
	s.EtcdPassword = getenv(EnvEtcdPassword)
	fs.StringVar(&s.TLSCert, "tls-cert", s.TLSCert, "PEM `file` of the certificate (chain) of the agent's port: RPC and HTTP over TLS (with -tls-key)")
	fs.StringVar(&s.TLSKey, "tls-key", s.TLSKey, "PEM `file` of the key of -tls-cert")
	fs.StringVar(&s.TLSClientCA, "tls-client-ca", s.TLSClientCA, "PEM `file` of the CAs whose client certificates the agent's port requires (mutual TLS)")
	fs.StringVar(&s.ACLFile, "acl-file", s.ACLFile, "JSON `file` of tokens and rules: who may register and read which services (reloaded on SIGHUP); empty allows everything")
	fs.StringVar(&s.EtcdCACert, "etcd-cacert", s.EtcdCACert, "PEM `file` of the CAs of the etcd servers (https -etcd URLs)")
	fs.StringVar(&s.EtcdCert, "etcd-cert", s.EtcdCert, "PEM `file` of the client certificate presented to etcd (with -etcd-key)")
	fs.StringVar(&s.EtcdKey, "etcd-key", s.EtcdKey, "PEM `file` of the key of -etcd-cert")
	fs.StringVar(&s.EtcdUser, "etcd-user", s.EtcdUser, "etcd RBAC `user` (password from $"+EnvEtcdPassword+")")
	fs.StringVar(&s.EtcdPrefix, "etcd-prefix", s.EtcdPrefix, "etcd key `prefix` of the registrations, ending in / (default /discoverd/services/); agents share registrations only within one prefix")
	fs.StringVar(&s.ZooKeeperAuth, "zookeeper-auth", s.ZooKeeperAuth, "ZooKeeper digest `user:password`; the agent's znodes get an ACL that lets only that user change them (prefer the environment variable)")
}

// validateSecurity checks the combination of security settings; the files
// themselves are read by startSecurity.
func (s *securityMain) validateSecurity(etcd, zookeeper bool) error {
	switch {
	case (s.TLSCert == "") != (s.TLSKey == ""):
		return errors.New("-tls-cert and -tls-key go together")
	case s.TLSClientCA != "" && s.TLSCert == "":
		return errors.New("-tls-client-ca needs -tls-cert and -tls-key")
	case (s.EtcdCert == "") != (s.EtcdKey == ""):
		return errors.New("-etcd-cert and -etcd-key go together")
	case (s.EtcdCACert != "" || s.EtcdCert != "" || s.EtcdUser != "") && !etcd:
		return errors.New("-etcd-cacert, -etcd-cert and -etcd-user apply to an external etcd (-etcd)")
	case s.EtcdUser == "" && s.EtcdPassword != "":
		return fmt.Errorf("%s is set without -etcd-user", EnvEtcdPassword)
	case s.EtcdUser != "" && s.EtcdPassword == "":
		return fmt.Errorf("-etcd-user %q needs its password in %s", s.EtcdUser, EnvEtcdPassword)
	case s.EtcdPrefix != "" && (!strings.HasPrefix(s.EtcdPrefix, "/") || !strings.HasSuffix(s.EtcdPrefix, "/")):
		return fmt.Errorf("-etcd-prefix %q: must start and end with /", s.EtcdPrefix)
	case s.ZooKeeperAuth != "" && !zookeeper:
		return errors.New("-zookeeper-auth applies to -zookeeper")
	}
	if s.ZooKeeperAuth != "" {
		if user, pass, ok := strings.Cut(s.ZooKeeperAuth, ":"); !ok || user == "" || pass == "" {
			return errors.New("-zookeeper-auth: want user:password")
		}
	}
	return nil
}

// etcdTLS is the TLS configuration to the etcd cluster, nil when no TLS
// flag is set (an https URL then verifies with the system's CAs).
func (s *securityMain) etcdTLS() (*tls.Config, error) {
	if s.EtcdCACert == "" && s.EtcdCert == "" {
		return nil, nil
	}
	c := &tls.Config{MinVersion: tls.VersionTLS12}
	if s.EtcdCACert != "" {
		pool, err := server.LoadCertPool(s.EtcdCACert)
		if err != nil {
			return nil, fmt.Errorf("-etcd-cacert: %w", err)
		}
		c.RootCAs = pool
	}
	if s.EtcdCert != "" {
		cert, err := tls.LoadX509KeyPair(s.EtcdCert, s.EtcdKey)
		if err != nil {
			return nil, fmt.Errorf("-etcd-cert/-etcd-key: %w", err)
		}
		c.Certificates = []tls.Certificate{cert}
	}
	return c, nil
}

// loadSecurity reads the agent port's TLS files and the ACL file; before
// the listener is bound, so that a bad file stops the start.
func (s *securityMain) loadSecurity() error {
	if s.TLSCert != "" {
		t, err := server.NewTLS(server.TLSFiles{Cert: s.TLSCert, Key: s.TLSKey, ClientCA: s.TLSClientCA})
		if err != nil {
			return err
		}
		s.tls = t
	}
	if s.ACLFile != "" {
		a, err := acl.Load(s.ACLFile)
		if err != nil {
			return err
		}
		s.acl.Store(a)
	}
	return nil
}

// wrapListener serves ln over TLS when configured.
func (s *securityMain) wrapListener(ln net.Listener) net.Listener {
	if s.tls == nil {
		return ln
	}
	return tls.NewListener(ln, s.tls.Config())
}

// warnOpen logs, when the agent runs without an ACL on an address other
// hosts or containers can reach, that anyone there may write.
func (s *securityMain) warnOpen(log *slog.Logger, addr net.Addr) {
	if s.ACLFile != "" {
		return
	}
	if ta, ok := addr.(*net.TCPAddr); ok && ta.IP.IsLoopback() {
		return
	}
	log.Warn("no -acl-file: anyone who reaches this address may register, take over and remove any service", "addr", addr.String())
}

// startReloader reloads the ACL file and the TLS certificate on SIGHUP
// until closeReloader. A file that does not load leaves the rules and
// certificate in force, with an error in the log.
func (s *securityMain) startReloader(log *slog.Logger) {
	if s.ACLFile == "" && s.tls == nil {
		return
	}
	ctx, stop := context.WithCancel(context.Background())
	s.hupStop, s.hupDone = stop, make(chan struct{})
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	go func() { // stopped by closeReloader
		defer close(s.hupDone)
		defer signal.Stop(hup)
		for {
			select {
			case <-ctx.Done():
				return
			case <-hup:
				s.reload(log)
			}
		}
	}()
}

// reload reads the ACL file and TLS files again (SIGHUP).
func (s *securityMain) reload(log *slog.Logger) {
	s.hupMu.Lock()
	defer s.hupMu.Unlock()
	if s.ACLFile != "" {
		if a, err := acl.Load(s.ACLFile); err != nil {
			log.Error("ACL not reloaded; the previous rules stay in force", "err", err)
		} else {
			s.acl.Store(a)
			log.Info("ACL reloaded", "file", s.ACLFile, "tokens", a.Tokens())
		}
	}
	if s.tls != nil {
		if err := s.tls.Reload(); err != nil {
			log.Error("TLS certificate not reloaded; the previous one stays in use", "err", err)
		} else {
			log.Info("TLS certificate reloaded", "cert", s.TLSCert)
		}
	}
	if s.reloaded != nil {
		select {
		case s.reloaded <- struct{}{}:
		default:
		}
	}
}

func (s *securityMain) closeReloader() {
	if s.hupStop != nil {
		s.hupStop()
		<-s.hupDone
	}
}

// aclPointer is the ACL in force, for server.Options.ACL; nil without
// -acl-file.
func (s *securityMain) aclPointer() *atomic.Pointer[acl.ACL] {
	if s.ACLFile == "" {
		return nil
	}
	return &s.acl
}
