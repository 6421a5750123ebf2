package api

import (
	"fmt"
	"net/url"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"
)

// Check is a health check the agent runs for a registration (docs/API.md,
// "Health checks"). Exactly one target is set: HTTP (a GET of the URL,
// where a 2xx or 3xx status passes), TCP (a connection to a host:port),
// or GRPC (the standard gRPC health service, grpc.health.v1.Health/Check,
// of "host:port" as a whole or of "host:port/service": SERVING passes).
// A zero Interval, Timeout, Rise or Fall selects its default
// (WithDefaults); a zero DeregisterAfter means never.
//
// A registration with a check belongs to the agent: it needs no
// heartbeat, it is online while its check passes, and it lasts until it is
// unregistered (or DeregisterAfter of failures).
type Check struct {
	HTTP string `json:"http,omitempty"`
	TCP  string `json:"tcp,omitempty"`
	GRPC string `json:"grpc,omitempty"`
	// Interval is the period between probes. Default DefaultCheckInterval.
	Interval Duration `json:"interval,omitempty"`
	// Timeout bounds one probe. Default min(Interval/2, MaxDefaultCheckTimeout).
	Timeout Duration `json:"timeout,omitempty"`
	// Rise is how many passes in a row put the registration online.
	// Default DefaultCheckRise.
	Rise int `json:"rise,omitempty"`
	// Fall is how many failures in a row take it offline. Default
	// DefaultCheckFall.
	Fall int `json:"fall,omitempty"`
	// DeregisterAfter drops the registration altogether once its check has
	// failed without a pass for that long. Zero: never.
	DeregisterAfter Duration `json:"deregister_after,omitempty"`
}

// Defaults and limits of Check.
const (
	DefaultCheckInterval   = 10 * time.Second
	MaxDefaultCheckTimeout = 5 * time.Second
	DefaultCheckRise       = 2
	DefaultCheckFall       = 3

	MinCheckInterval        = time.Second
	MaxCheckInterval        = time.Hour
	MinCheckTimeout         = 10 * time.Millisecond
	MaxCheckCount           = 100 // the largest Rise or Fall
	MinCheckDeregisterAfter = time.Minute
	MaxCheckURLLen          = 2048
	MaxCheckGRPCServiceLen  = 256 // bytes in the service of a GRPC target
)

// Kind returns "http", "tcp" or "grpc", the kind of probe c runs ("" if
// it has no target).
func (c *Check) Kind() string {
	switch {
	case c.HTTP != "":
		return "http"
	case c.TCP != "":
		return "tcp"
	case c.GRPC != "":
		return "grpc"
	}
	return ""
}

// Target returns the URL or address c probes.
func (c *Check) Target() string {
	switch {
	case c.HTTP != "":
		return c.HTTP
	case c.TCP != "":
		return c.TCP
	}
	return c.GRPC
}

// SplitGRPCTarget splits a GRPC target "host:port[/service]" into the
// server's address and the service ("" for the server as a whole).
func SplitGRPCTarget(target string) (addr, service string) {
	addr, service, _ = strings.Cut(target, "/")
	return addr, service
}

// WithDefaults returns c with its zero fields set to their defaults.
func (c Check) WithDefaults() Check {
	if c.Interval == 0 {
		c.Interval = Duration(DefaultCheckInterval)
	}
	if c.Timeout == 0 {
		c.Timeout = Duration(min(time.Duration(c.Interval)/2, MaxDefaultCheckTimeout))
	}
	if c.Rise == 0 {
		c.Rise = DefaultCheckRise
	}
	if c.Fall == 0 {
		c.Fall = DefaultCheckFall
	}
	return c
}

// Validate checks c as given, before defaults: exactly one target (an
// http or https URL with a host, or a host:port); Interval 0 or from
// MinCheckInterval to MaxCheckInterval; Timeout 0 or from
// MinCheckTimeout to the interval; Rise and Fall from 0 to MaxCheckCount;
// DeregisterAfter 0 or at least MinCheckDeregisterAfter. Errors are
// *Error with CodeInvalidArgument.
func (c *Check) Validate() error {
	targets := 0
	for _, t := range []string{c.HTTP, c.TCP, c.GRPC} {
		if t != "" {
			targets++
		}
	}
	switch {
	case targets > 1:
		return Errorf(CodeInvalidArgument, "check: give one of http, tcp and grpc, not several")
	case targets == 0:
		return Errorf(CodeInvalidArgument, "check: no target: give http (a URL), tcp (a host:port) or grpc (a host:port[/service])")
	case c.HTTP != "":
		if err := validateCheckURL(c.HTTP); err != nil {
			return err
		}
	case c.TCP != "":
		if err := ValidateAddr(c.TCP); err != nil {
			return Errorf(CodeInvalidArgument, "check: tcp: %s", err.(*Error).Message)
		}
	default:
		addr, service := SplitGRPCTarget(c.GRPC)
		if err := ValidateAddr(addr); err != nil {
			return Errorf(CodeInvalidArgument, "check: grpc: %s", err.(*Error).Message)
		}
		if len(service) > MaxCheckGRPCServiceLen || !utf8.ValidString(service) || strings.IndexFunc(service, unicode.IsControl) >= 0 {
			return Errorf(CodeInvalidArgument, "check: grpc: service %.40q: want at most %d bytes of printable UTF-8", service, MaxCheckGRPCServiceLen)
		}
	}
	d := c.WithDefaults()
	interval, timeout := time.Duration(d.Interval), time.Duration(d.Timeout)
	switch {
	case interval < MinCheckInterval || interval > MaxCheckInterval:
		return Errorf(CodeInvalidArgument, "check: interval %v: want %v to %v", interval, MinCheckInterval, MaxCheckInterval)
	case timeout < MinCheckTimeout || timeout > interval:
		return Errorf(CodeInvalidArgument, "check: timeout %v: want %v to the interval (%v)", timeout, MinCheckTimeout, interval)
	case c.Rise < 0 || c.Rise > MaxCheckCount:
		return Errorf(CodeInvalidArgument, "check: rise %d: want 1 to %d (0: the default, %d)", c.Rise, MaxCheckCount, DefaultCheckRise)
	case c.Fall < 0 || c.Fall > MaxCheckCount:
		return Errorf(CodeInvalidArgument, "check: fall %d: want 1 to %d (0: the default, %d)", c.Fall, MaxCheckCount, DefaultCheckFall)
	case c.DeregisterAfter < 0 || (c.DeregisterAfter > 0 && time.Duration(c.DeregisterAfter) < MinCheckDeregisterAfter):
		return Errorf(CodeInvalidArgument, "check: deregister_after %v: want 0 (never) or at least %v", time.Duration(c.DeregisterAfter), MinCheckDeregisterAfter)
	}
	return nil
}

func validateCheckURL(s string) error {
	if len(s) > MaxCheckURLLen {
		return Errorf(CodeInvalidArgument, "check: http: URL is %d bytes, more than the limit of %d", len(s), MaxCheckURLLen)
	}
	if !utf8.ValidString(s) {
		return Errorf(CodeInvalidArgument, "check: http: URL is not valid UTF-8")
	}
	u, err := url.Parse(s)
	if err != nil {
		return Errorf(CodeInvalidArgument, "check: http: %q is not a URL", s)
	}
	if u.Scheme != "http" && u.Scheme != "https" {
		return Errorf(CodeInvalidArgument, "check: http: %q: the scheme must be http or https", s)
	}
	if u.Host == "" || u.Hostname() == "" {
		return Errorf(CodeInvalidArgument, "check: http: %q has no host", s)
	}
	if u.User != nil {
		return Errorf(CodeInvalidArgument, "check: http: %q: credentials in the URL are not supported (they would be shown in the check's status)", s)
	}
	return nil
}

// Duration is a time.Duration written as a Go duration string ("10s",
// "1m30s") in JSON and gob.
type Duration time.Duration

// MarshalText writes d as a Go duration string.
func (d Duration) MarshalText() ([]byte, error) { return []byte(time.Duration(d).String()), nil }

// UnmarshalText parses a Go duration string.
func (d *Duration) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(string(b))
	if err != nil {
		return fmt.Errorf("duration %.40q: want a Go duration such as \"10s\" or \"1m30s\"", b)
	}
	*d = Duration(v)
	return nil
}

func (d Duration) String() string { return time.Duration(d).String() }

// CheckState is the state of a checked registration.
type CheckState string

// The states of a checked registration. Only an online one is in the
// store.
const (
	// CheckOffline: not in the store; waiting for Rise passes in a row
	// (the state of every checked registration when it is made, or when
	// the agent starts).
	CheckOffline CheckState = "offline"
	// CheckOnline: in the store; Fall failures in a row take it offline.
	CheckOnline CheckState = "online"
	// CheckFlapping: held offline after changing state too often, until
	// HeldUntil.
	CheckFlapping CheckState = "flapping"
)

// CheckTransition is one change of a checked registration's state.
type CheckTransition struct {
	At     time.Time  `json:"at"`
	From   CheckState `json:"from"`
	To     CheckState `json:"to"`
	Reason string     `json:"reason"`
}

// CheckStatus is what the agent reports of a checked registration
// (GET /services/{name}/instances/{addr}).
type CheckStatus struct {
	Name  string            `json:"name"`
	Addr  string            `json:"addr"`
	Attrs map[string]string `json:"attrs"`
	// Check is the check, with its defaults applied.
	Check Check      `json:"check"`
	State CheckState `json:"state"`
	// Stored reports whether the registration is in the store now (it may
	// lag State while a store write is retried).
	Stored bool `json:"stored"`
	// LastResult is "pass", "fail", or "" before the first probe.
	LastResult  string    `json:"last_result"`
	LastError   string    `json:"last_error,omitempty"`
	LastProbe   time.Time `json:"last_probe,omitzero"`
	LastLatency Duration  `json:"last_latency"`
	// Passes and Fails count the probes in a row with the last result.
	Passes int `json:"passes"`
	Fails  int `json:"fails"`
	// HeldUntil is when a flapping registration may come back.
	HeldUntil time.Time `json:"held_until,omitzero"`
	// Transitions are the last state changes, oldest first.
	Transitions []CheckTransition `json:"transitions"`
	// StoreError is the last failure to write the store, if the last
	// write failed.
	StoreError string `json:"store_error,omitempty"`
}
