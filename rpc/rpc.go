package rpc

import (
	"errors"
	"fmt"
)

// DefaultPath is the HTTP path at which rpcplus clients perform the CONNECT
// upgrade. Mount Server.ServeHTTP there.
const DefaultPath = "/_goRPC_"

// DefaultMaxMessageSize is the default cap, in bytes, on one decoded message
// (Server.MaxMessageSize). Clients always use it for the replies they read.
const DefaultMaxMessageSize = 1 << 20

// DefaultStreamBuffer is the default number of replies queued per stream
// before Stream.Send waits for the connection's writer
// (Server.StreamBuffer).
const DefaultStreamBuffer = 256

// DefaultMaxStreamsPerConn is the default cap on the streams of one
// connection that are running or whose final reply is waiting to be
// written (Server.MaxStreamsPerConn). A stream request beyond it is
// refused with an error reply.
const DefaultMaxStreamsPerConn = 256

// DefaultMaxCallsPerConn is the default cap on the unary calls of one
// connection that are executing or whose reply is waiting to be written
// (Server.MaxCallsPerConn). When it is reached the server stops reading that
// connection until a reply has been written, which pushes back on the peer.
const DefaultMaxCallsPerConn = 64

// Protocol constants shared by the server and the client.
const (
	// connectedStatus is the exact upgrade answer rpcplus clients compare.
	connectedStatus = "200 Connected to Go RPC"
	connectedReply  = "HTTP/1.0 " + connectedStatus + "\n\n"
	// jsonAccept in the Accept header of the CONNECT request selects JSON.
	jsonAccept = "application/vnd.flynn.rpc-hijack+json"
	// gobAccept is what our client sends for gob; any other value means gob.
	gobAccept = "application/vnd.flynn.rpc-hijack+gob"
	// eos is the Error text of the header that ends a stream cleanly.
	eos = "EOS"
	// closeStream is the ServiceMethod (JSON "method") that cancels a stream.
	closeStream = "CloseStream"
)

// Codec selects the wire encoding of a connection. The zero value is Gob.
type Codec int

const (
	// Gob is rpcplus's default encoding: encoding/gob, one encoder and one
	// decoder per direction for the life of the connection.
	Gob Codec = iota
	// JSON is rpcplus's JSON flavour: one JSON object per message.
	JSON
)

func (c Codec) String() string {
	switch c {
	case Gob:
		return "gob"
	case JSON:
		return "json"
	}
	return fmt.Sprintf("Codec(%d)", int(c))
}

// Errors returned by this package.
var (
	// ErrShutdown is returned by client calls and streams when the
	// connection is lost or the client is closed.
	ErrShutdown = errors.New("rpc: connection is shut down")
	// ErrStreamClosed is returned by Stream.Send after the stream has ended:
	// the client cancelled it, the connection closed, or the method returned.
	ErrStreamClosed = errors.New("rpc: stream closed")
	// ErrTooManyStreams is the default answer to a stream request beyond
	// Server.MaxStreamsPerConn (see Server.TooManyStreams).
	ErrTooManyStreams = errors.New("rpc: too many streams open on this connection")
	// ErrMessageTooLarge is the reason a connection is closed when a peer
	// sends a message larger than the configured cap.
	ErrMessageTooLarge = errors.New("rpc: message too large")
	// ErrIdle is the reason a connection is closed after
	// Server.IdleTimeout without activity.
	ErrIdle = errors.New("rpc: connection idle")
)

// ServerError is an error returned by the remote method, carried over the
// wire as text. Its Error method returns the text unchanged, so callers can
// rebuild a typed error from it (for example with api.ParseError).
type ServerError string

func (e ServerError) Error() string { return string(e) }
