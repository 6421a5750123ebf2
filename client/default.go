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
// DISCOVERD or api.DefaultAgentAddr), closing the client it replaces. It
// blocks until connected.
func Connect(addr string) error {
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
	defaultMu.Lock()
	old := DefaultClient
	DefaultClient = c
	defaultMu.Unlock()
	if old != nil {
		old.Close()
	}
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
func RegisterAndStandby(name, addr string, attributes map[string]string) (<-chan *Service, error) {
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
