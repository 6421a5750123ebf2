package discoverd

import (
	"github.com/flynn/discoverd/api"
)

// Check is a health check that the agent runs for a registration handed
// to it with RegisterChecked: exactly one of HTTP (a URL; 2xx and 3xx
// pass) and TCP (a host:port), and optional Interval, Timeout, Rise, Fall
// and DeregisterAfter (docs/API.md, "Health checks").
type Check = api.Check

// RegisterChecked hands the instance addr of service name, with its
// attributes, to the agent together with check, and returns the address
// the agent stored (":port" expanded). From then on the agent owns it:
// it is online while check passes (after Rise passes in a row), offline
// after Fall failures in a row, needs no heartbeat from this client, and
// outlives the client's Close and the agent's restarts, until
// UnregisterChecked (from any client of that agent) or the CLI's
// "discoverd unregister". Registering it again replaces its attributes
// and check.
//
// An agent older than health checks ignores the check and treats the call
// as an ordinary registration, which expires after its TTL since this
// client does not heartbeat it.
//
// It blocks until the agent answers (the agent saves the registration to
// its data dir first). Errors: ErrDisconnected, ErrClosed, or an
// *api.Error: CodeInvalidArgument (bad name, addr, attrs or check),
// CodeResourceExhausted (the agent's cap on checked registrations),
// CodeUnavailable (the agent runs no checks, or cannot save).
func (c *Client) RegisterChecked(name, addr string, attributes map[string]string, check Check) (expandedAddr string, err error) {
	var expanded string
	args := &api.Args{Name: name, Addr: addr, Attrs: attributes, Check: &check}
	if err := c.call(nil, "register "+name+" "+addr, api.MethodRegister, args, &expanded); err != nil {
		return "", err
	}
	if expanded == "" {
		expanded = addr
	}
	return expanded, nil
}

// UnregisterChecked removes a registration handed to the agent with
// RegisterChecked (by any client): its check stops and it leaves the
// store. It blocks until the agent answers. Errors: ErrDisconnected,
// ErrClosed, or an *api.Error: CodeNotFound when the agent holds no such
// registration.
func (c *Client) UnregisterChecked(name, addr string) error {
	return c.call(nil, "unregister "+name+" "+addr, api.MethodUnregister, &api.Args{Name: name, Addr: addr}, &struct{}{})
}
