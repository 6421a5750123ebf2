package discoverd

import (
	"sync"
	"time"
)

// DefaultClient is the client of the package-level functions. It is
// connected lazily by the first of them (with NewClient), or explicitly by
// Connect. Assign it only before using the package-level functions.
var DefaultClient *Client

var defaultMu sync.Mutex

// Connect connects DefaultClient to addr ("" means NewClient's default:
// DISCOVERD or api.DefaultAgentAddr). It blocks until connected and fails
// if that first attempt does.
//
// As in go-discoverd, Connect does nothing and returns nil once
// DefaultClient is set (by an earlier Connect, by a package-level
// function, or by assignment): addr is then ignored, and the client and
// its registrations are left alone. To move to another agent, Close
// DefaultClient and set it to nil first (while no package-level function
// runs).
func Connect(addr string) error {
	defaultMu.Lock()
	defer defaultMu.Unlock()
	if DefaultClient != nil {
		return nil
	}
	var c *Client
	var err error
	if addr == "" {
		c, err = NewClient()
	} else {
		c, err = NewClientWithAddr(addr)
	}
	if err != nil {
		return err
	}
	DefaultClient = c
	return nil
}

func defaultClient() (*Client, error) {
	defaultMu.Lock()
	defer defaultMu.Unlock()
	if DefaultClient == nil {
		c, err := NewClient()
		if err != nil {
			return nil, err
		}
		DefaultClient = c
	}
	return DefaultClient, nil
}

// NewServiceSet calls DefaultClient.NewServiceSet, connecting it first if needed.
func NewServiceSet(name string) (ServiceSet, error) {
	c, err := defaultClient()
	if err != nil {
		return nil, err
	}
	return c.NewServiceSet(name)
}

// Services calls DefaultClient.Services, connecting it first if needed.
func Services(name string, timeout time.Duration) ([]*Service, error) {
	c, err := defaultClient()
	if err != nil {
		return nil, err
	}
	return c.Services(name, timeout)
}

// Register calls DefaultClient.Register, connecting it first if needed.
func Register(name, addr string) error {
	c, err := defaultClient()
	if err != nil {
		return err
	}
	return c.Register(name, addr)
}

// RegisterWithAttributes calls DefaultClient.RegisterWithAttributes,
// connecting it first if needed.
func RegisterWithAttributes(name, addr string, attributes map[string]string) error {
	c, err := defaultClient()
	if err != nil {
		return err
	}
	return c.RegisterWithAttributes(name, addr, attributes)
}

// RegisterWithSet calls DefaultClient.RegisterWithSet, connecting it first
// if needed.
func RegisterWithSet(name, addr string, attributes map[string]string) (ServiceSet, error) {
	c, err := defaultClient()
	if err != nil {
		return nil, err
	}
	return c.RegisterWithSet(name, addr, attributes)
}

// RegisterAndStandby calls DefaultClient.RegisterAndStandby, connecting it
// first if needed.
func RegisterAndStandby(name, addr string, attributes map[string]string) (chan *Service, error) {
	c, err := defaultClient()
	if err != nil {
		return nil, err
	}
	return c.RegisterAndStandby(name, addr, attributes)
}

// Unregister calls DefaultClient.Unregister, connecting it first if needed.
func Unregister(name, addr string) error {
	c, err := defaultClient()
	if err != nil {
		return err
	}
	return c.Unregister(name, addr)
}

// UnregisterAll calls DefaultClient.UnregisterAll, connecting it first if
// needed.
func UnregisterAll() error {
	c, err := defaultClient()
	if err != nil {
		return err
	}
	return c.UnregisterAll()
}
