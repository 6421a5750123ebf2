package discoverd

import (
	"errors"
	"fmt"

	"github.com/flynn/discoverd/api"
	"github.com/flynn/discoverd/rpc"
)

var (
	// ErrDisconnected is returned by calls made while the client has no
	// connection to the agent (it is reconnecting in the background), and by
	// calls whose connection was lost before the agent answered. It matches
	// errors.Is(err, &api.Error{Code: api.CodeUnavailable}).
	ErrDisconnected error = &api.Error{Code: api.CodeUnavailable, Message: "discoverd: not connected to the agent"}

	// ErrUnknownRegistration is returned by Unregister for a name and
	// address that this client has not registered. It matches
	// errors.Is(err, &api.Error{Code: api.CodeNotFound}).
	ErrUnknownRegistration error = &api.Error{Code: api.CodeNotFound, Message: "discoverd: unknown registration"}

	// ErrClosed is returned by calls made after Close.
	ErrClosed error = &api.Error{Code: api.CodeUnavailable, Message: "discoverd: client is closed"}

	// ErrTimeout is returned by Services when no instance appeared in time.
	ErrTimeout = errors.New("discoverd: timeout exceeded")
)

// wireError turns an error from the rpc layer into one of ours: the agent's
// error text becomes a typed *api.Error (so errors.Is and api.ErrorCode
// work on it), and a lost connection becomes ErrDisconnected.
func wireError(op string, err error) error {
	if err == nil {
		return nil
	}
	var se rpc.ServerError
	switch {
	case errors.As(err, &se):
		err = api.ParseError(string(se))
	case errors.Is(err, rpc.ErrShutdown):
		err = ErrDisconnected
	}
	return fmt.Errorf("discoverd: %s: %w", op, err)
}
