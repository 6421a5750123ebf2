package api

import (
	"errors"
	"fmt"
	"strings"
)

// Code classifies an error. It crosses the wire as the prefix of the error
// text ("not_found: ...") so that any client, typed or not, can branch on it.
type Code string

// The error codes. They are stable: clients match on them.
const (
	CodeInvalidArgument   Code = "invalid_argument"   // bad name, addr or attrs
	CodeNotFound          Code = "not_found"          // unknown registration (heartbeat, unregister)
	CodeResourceExhausted Code = "resource_exhausted" // a per-connection cap or a buffer was exceeded
	CodeUnavailable       Code = "unavailable"        // the store cannot be reached, or the agent is shutting down
	CodeInternal          Code = "internal"           // anything else; details are in the agent's log
	// CodePermissionDenied: the registration belongs to another session
	// (Heartbeat, Unregister). HTTP 403.
	CodePermissionDenied Code = "permission_denied"
	// CodeConflict: an HTTP PUT or DELETE of a registration owned by an RPC
	// connection (the HTTP class never takes one over). HTTP 409.
	CodeConflict Code = "conflict"
)

var codes = []Code{CodeInvalidArgument, CodeNotFound, CodeResourceExhausted, CodeUnavailable, CodeInternal, CodePermissionDenied, CodeConflict}

// Error is an error with a code and a message that is safe to show a caller.
// Its text is "code: message".
type Error struct {
	Code    Code
	Message string
}

func (e *Error) Error() string { return string(e.Code) + ": " + e.Message }

// Is makes errors.Is(err, &Error{Code: c}) match any *Error with code c.
func (e *Error) Is(target error) bool {
	var t *Error
	if !errors.As(target, &t) {
		return false
	}
	return t.Code == e.Code && (t.Message == "" || t.Message == e.Message)
}

// Errorf returns an *Error with the given code and a formatted message.
func Errorf(code Code, format string, args ...any) *Error {
	return &Error{Code: code, Message: fmt.Sprintf(format, args...)}
}

// ErrorCode returns the code of err: the code of the first *Error in its
// chain, "" for nil, and CodeInternal for any other error.
func ErrorCode(err error) Code {
	if err == nil {
		return ""
	}
	var e *Error
	if errors.As(err, &e) {
		return e.Code
	}
	return CodeInternal
}

// ParseError rebuilds a typed error from the text of an error received over
// the wire. Text that starts with a known code becomes an *Error with that
// code; other text becomes an *Error with CodeInternal and the whole text as
// its message. It returns nil for the empty string.
func ParseError(text string) error {
	if text == "" {
		return nil
	}
	for _, c := range codes {
		if rest, ok := strings.CutPrefix(text, string(c)+": "); ok {
			return &Error{Code: c, Message: rest}
		}
	}
	return &Error{Code: CodeInternal, Message: text}
}
