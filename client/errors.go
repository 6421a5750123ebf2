package discoverd

import (
	"context"
	"errors"
	"fmt"

	"github.com/flynn/discoverd/api"
	"github.com/flynn/discoverd/rpc"
)

var (
	// ErrDisconnected is returned by calls made while the client has no
	// connection to the agent (it is reconnecting in the background), and by
	// calls whose connection was lost before the agent answered. It is
	// returned as is (err == ErrDisconnected holds, as with go-discoverd),
	// and it matches errors.Is(err, &api.Error{Code: api.CodeUnavailable}).
	ErrDisconnected error = &api.Error{Code: api.CodeUnavailable, Message: "discoverd: not connected to the agent"}

	// ErrUnknownRegistration is returned by Unregister for a name and
	// address that this client has not registered. It matches
	// errors.Is(err, &api.Error{Code: api.CodeNotFound}).
	ErrUnknownRegistration error = &api.Error{Code: api.CodeNotFound, Message: "discoverd: unknown registration"}

	// ErrClosed is returned, as is, by calls made after Close, and by
	// calls that Close interrupted. It matches
	// errors.Is(err, &api.Error{Code: api.CodeUnavailable}).
	ErrClosed error = &api.Error{Code: api.CodeUnavailable, Message: "discoverd: client is closed"}

	// ErrTimeout is returned by Services when no instance appeared in time.
	ErrTimeout = errors.New("discoverd: timeout exceeded")
)

// errStreamEnded is why a stream ended when the agent ended it without
// an error (an agent shutting down).
var errStreamEnded error = &api.Error{Code: api.CodeUnavailable, Message: "the agent ended the stream"}

// wireError turns an error from the rpc layer into one of ours. A lost
// connection becomes ErrDisconnected, and ErrDisconnected and ErrClosed
// are returned unwrapped, so that err == ErrDisconnected works as it did
// with go-discoverd. The agent's error text becomes a typed *api.Error
// (so that errors.Is and api.ErrorCode work on it), wrapped with op.
func wireError(op string, err error) error {
	if err == nil {
		return nil
	}
	var se rpc.ServerError
	switch {
	case errors.Is(err, ErrClosed):
		return ErrClosed
	case errors.Is(err, ErrDisconnected), errors.Is(err, rpc.ErrShutdown):
		return ErrDisconnected
	case errors.As(err, &se):
		err = api.ParseError(string(se))
	}
	return fmt.Errorf("discoverd: %s: %w", op, err)
}

// timeoutError is the error of a call the agent did not answer in time:
// CodeUnavailable, as the agent itself reports a deadline, and
// errors.Is(err, context.DeadlineExceeded) holds.
func timeoutError(op string) error {
	return fmt.Errorf("discoverd: %s: %w (%w)", op, errNoAnswer, context.DeadlineExceeded)
}

var errNoAnswer error = &api.Error{Code: api.CodeUnavailable, Message: "the agent did not answer in time"}
