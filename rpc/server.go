package rpc

import (
	"context"
	"errors"
	"fmt"
	"go/token"
	"io"
	"log/slog"
	"net"
	"net/http"
	"reflect"
	"strings"
	"sync"
	"time"
)

// Server serves the methods of registered receivers to rpcplus clients.
//
// Configure the exported fields before the first connection is served and
// do not change them afterwards. All methods are safe for concurrent use.
type Server struct {
	// MaxMessageSize caps, in bytes, one decoded message (a gob message or
	// a JSON object). A connection that sends a larger one is closed before
	// the message is read into memory. Default DefaultMaxMessageSize.
	MaxMessageSize int
	// StreamBuffer is how many replies may wait per stream to be written;
	// Stream.Send blocks while that many wait. Default
	// DefaultStreamBuffer.
	StreamBuffer int
	// MaxCallsPerConn caps the unary calls of one connection that are
	// executing or whose reply waits to be written (error replies to bad
	// requests count too); the server stops reading that connection while
	// the cap is reached. Calls of Express methods have as many slots
	// again, of their own. Default DefaultMaxCallsPerConn.
	MaxCallsPerConn int
	// MaxStreamsPerConn caps the streams of one connection that are
	// running or whose final reply waits to be written. A stream request
	// beyond it is not started: it gets TooManyStreams's text as its
	// final reply, and the connection goes on. Default
	// DefaultMaxStreamsPerConn.
	MaxStreamsPerConn int
	// TooManyStreams returns the error a stream refused by
	// MaxStreamsPerConn ends with, given the cap; its text is sent as is.
	// Default: ErrTooManyStreams with the cap.
	TooManyStreams func(limit int) error
	// IdleTimeout closes a connection that has been idle this long: no
	// call executing, no stream open, no reply waiting to be written, no
	// request read, and KeepIdle (if set) does not claim it. Zero or
	// negative means never (net/rpc's behaviour). The connection's
	// writer checks it, so an idle connection costs no extra goroutine.
	IdleTimeout time.Duration
	// KeepIdle, if set, is asked about a connection that IdleTimeout would
	// close; true keeps it for another IdleTimeout. It runs on the
	// connection's writer goroutine and must not block (a lookup in a
	// map is the intended use: "does this connection hold state that its
	// close would end?").
	KeepIdle func(Conn) bool
	// ConnContext, if set, returns the context of a connection upgraded
	// by ServeHTTP from the CONNECT request r, derived from ctx. Its
	// values are visible in the context of every call on the connection
	// (an authenticated identity is the intended use); cancelling it
	// ends the connection. Connections served by ServeConn use ctx as is.
	ConnContext func(ctx context.Context, r *http.Request) context.Context
	// Logger receives the reasons connections are closed and handler
	// panics. Default slog.Default().
	Logger *slog.Logger

	svcMu    sync.RWMutex
	services map[string]*service

	mu      sync.Mutex
	conns   map[*serverConn]struct{}
	closed  bool
	nextID  uint64
	connsWG sync.WaitGroup
}

// NewServer returns a Server with default settings and no receivers. The
// zero Server is equally usable.
func NewServer() *Server { return &Server{} }

// service is the methods published under one service name, by one
// RegisterName receiver and any number of typed functions.
type service struct {
	methods map[string]*method
	hasRcvr bool // a receiver was registered under this name
}

// method is one published method. Its argument is decoded into a new
// argType value, and the handler is given a pointer to it (an any holding
// *A); a unary handler also gets a pointer to a new replyType value.
type method struct {
	argType   reflect.Type
	replyType reflect.Type // nil for streams
	// Exactly one is set. Both return the method's error; a panic is
	// recovered by the caller.
	call   func(ctx context.Context, args, reply any) error
	stream func(ctx context.Context, args any, st Stream) error
	source func(ctx context.Context, args any, ready func()) (Source, error) // RegisterSource
	shared bool                                                              // SharedValues
	// express: calls take slots from the connection's express pool (see
	// Express).
	express bool
}

// A UnaryOption changes how RegisterUnary serves a method.
type UnaryOption func(*method)

// Express makes the method's calls take their slots from a pool of their
// own on each connection (MaxCallsPerConn slots, apart from those every
// other unary call shares), so that a call is started as soon as the
// reader reaches it even while the connection's other calls hold every
// shared slot, for example while they wait for a store that does not
// answer. It suits short calls that must get through when others are
// stuck, such as heartbeats. Requests are still read in order: the reader
// starts an express call only once it has started every request before
// it, and it waits for a shared slot when the request before needs one.
func Express() UnaryOption { return func(m *method) { m.express = true } }

var (
	ctxType    = reflect.TypeFor[context.Context]()
	errType    = reflect.TypeFor[error]()
	streamType = reflect.TypeFor[Stream]()
)

// Register publishes the methods of rcvr under the name of its concrete
// type. See RegisterName.
func (s *Server) Register(rcvr any) error {
	t := reflect.TypeOf(rcvr)
	if t == nil {
		return errors.New("rpc: Register of nil")
	}
	return s.RegisterName(reflect.Indirect(reflect.ValueOf(rcvr)).Type().Name(), rcvr)
}

// RegisterName publishes, as "name.Method", every exported method of rcvr
// with one of these shapes (A exported or builtin, R likewise):
//
//	func (t *T) M(ctx context.Context, args *A, reply *R) error        // unary
//	func (t *T) M(args *A, reply *R) error                             // unary
//	func (t *T) M(ctx context.Context, args *A, stream rpc.Stream) error // stream
//	func (t *T) M(args *A, stream rpc.Stream) error                    // stream
//
// args may also be passed by value. Methods of other shapes are ignored.
// Methods are called through reflection; RegisterUnary and RegisterStream
// publish functions without it. It returns an error if name is empty or
// already has a receiver, if one of the methods is already published
// under name (by RegisterUnary or RegisterStream), if rcvr has no method of
// a suitable shape, or if an argument type holds a map that gob would size
// from the peer's count (a map inside a slice, a map or behind a pointer;
// maps in struct fields are fine).
func (s *Server) RegisterName(name string, rcvr any) error {
	if name == "" {
		return errors.New("rpc: Register: empty service name")
	}
	methods := make(map[string]*method)
	rv := reflect.ValueOf(rcvr)
	t := reflect.TypeOf(rcvr)
	for i := range t.NumMethod() {
		m := t.Method(i)
		mt, ok := reflectMethod(rv, m)
		if !ok {
			continue
		}
		if err := checkArgType(mt.argType); err != nil {
			return fmt.Errorf("rpc: Register %s.%s: argument %w", name, m.Name, err)
		}
		methods[m.Name] = mt
	}
	if len(methods) == 0 {
		return fmt.Errorf("rpc: Register %s: type %v has no exported methods of a suitable shape", name, t)
	}
	s.svcMu.Lock()
	defer s.svcMu.Unlock()
	svc := s.services[name]
	if svc != nil && svc.hasRcvr {
		return fmt.Errorf("rpc: Register: service %q already defined", name)
	}
	if svc != nil {
		for m := range methods {
			if svc.methods[m] != nil {
				return fmt.Errorf("rpc: Register: method %q already defined", name+"."+m)
			}
		}
	}
	svc = s.serviceLocked(name)
	svc.hasRcvr = true
	for m, mt := range methods {
		svc.methods[m] = mt
	}
	return nil
}

// RegisterUnary publishes f as the unary method serviceMethod
// ("Service.Method"), served as opts say (see Express). The server calls
// f directly, without reflection, with a new *A decoded from the request
// and a new *R whose value is sent as the reply when f returns nil (maps
// and slices in R start empty, not nil, as with RegisterName). On the wire the method is indistinguishable
// from a receiver's method of the same shape, and it may share its service
// name with a receiver and other functions.
//
// It returns an error if serviceMethod is not of the form "Service.Method",
// is already published, if f is nil, or if A is an interface type or holds
// a map that gob would size from the peer's count (see RegisterName). It
// is safe for concurrent use, also with calls being served.
func RegisterUnary[A, R any](s *Server, serviceMethod string, f func(ctx context.Context, args *A, reply *R) error, opts ...UnaryOption) error {
	if f == nil {
		return fmt.Errorf("rpc: RegisterUnary %s: nil function", serviceMethod)
	}
	m := &method{
		argType:   reflect.TypeFor[A](),
		replyType: reflect.TypeFor[R](),
		call: func(ctx context.Context, args, reply any) error {
			return f(ctx, args.(*A), reply.(*R))
		},
	}
	for _, o := range opts {
		o(m)
	}
	return s.registerFunc("RegisterUnary", serviceMethod, m)
}

// RegisterStream publishes f as the streaming method serviceMethod
// ("Service.Method"). The server calls f directly, without reflection, in
// the stream's own goroutine, with the stream's context, a new *A decoded
// from the request and the Stream; f runs until the stream should end, and
// its result ends the stream as for a receiver's streaming method (EOS for
// nil, else the error's text). Calling f without reflection keeps the
// stack of a long-lived stream small.
//
// Errors and concurrency are as for RegisterUnary.
func RegisterStream[A any](s *Server, serviceMethod string, f func(ctx context.Context, args *A, st Stream) error) error {
	if f == nil {
		return fmt.Errorf("rpc: RegisterStream %s: nil function", serviceMethod)
	}
	return s.registerFunc("RegisterStream", serviceMethod, &method{
		argType: reflect.TypeFor[A](),
		stream: func(ctx context.Context, args any, st Stream) error {
			return f(ctx, args.(*A), st)
		},
	})
}

// registerFunc publishes a method built by RegisterUnary or RegisterStream.
func (s *Server) registerFunc(op, serviceMethod string, m *method) error {
	dot := strings.LastIndex(serviceMethod, ".")
	if dot <= 0 || dot == len(serviceMethod)-1 {
		return fmt.Errorf("rpc: %s: %q is not of the form \"Service.Method\"", op, serviceMethod)
	}
	if m.argType.Kind() == reflect.Interface {
		return fmt.Errorf("rpc: %s %s: argument type %v is an interface", op, serviceMethod, m.argType)
	}
	if err := checkArgType(m.argType); err != nil {
		return fmt.Errorf("rpc: %s %s: argument %w", op, serviceMethod, err)
	}
	name, mname := serviceMethod[:dot], serviceMethod[dot+1:]
	s.svcMu.Lock()
	defer s.svcMu.Unlock()
	if svc := s.services[name]; svc != nil && svc.methods[mname] != nil {
		return fmt.Errorf("rpc: %s: method %q already defined", op, serviceMethod)
	}
	s.serviceLocked(name).methods[mname] = m
	return nil
}

// serviceLocked returns the service called name, creating it. s.svcMu must
// be held for writing.
func (s *Server) serviceLocked(name string) *service {
	if s.services == nil {
		s.services = make(map[string]*service)
	}
	svc := s.services[name]
	if svc == nil {
		svc = &service{methods: make(map[string]*method)}
		s.services[name] = svc
	}
	return svc
}

// reflectMethod recognises the accepted method signatures and returns a
// method that calls m on rcvr through reflection.
func reflectMethod(rcvr reflect.Value, m reflect.Method) (*method, bool) {
	if !m.IsExported() {
		return nil, false
	}
	t := m.Type // receiver is In(0)
	if t.NumOut() != 1 || t.Out(0) != errType {
		return nil, false
	}
	in := make([]reflect.Type, 0, 3)
	for i := 1; i < t.NumIn(); i++ {
		in = append(in, t.In(i))
	}
	withCtx := false
	if len(in) == 3 {
		if in[0] != ctxType {
			return nil, false
		}
		withCtx = true
		in = in[1:]
	}
	if len(in) != 2 {
		return nil, false
	}
	arg, last := in[0], in[1]
	if arg.Kind() == reflect.Interface || !exportedOrBuiltin(arg) {
		return nil, false
	}
	mt := &method{argType: arg}
	argIsPtr := arg.Kind() == reflect.Pointer
	if argIsPtr {
		mt.argType = arg.Elem()
	}
	fn := m.Func
	invoke := func(ctx context.Context, args, last any) error {
		in := make([]reflect.Value, 0, 4)
		in = append(in, rcvr)
		if withCtx {
			in = append(in, reflect.ValueOf(ctx))
		}
		argv := reflect.ValueOf(args)
		if !argIsPtr {
			argv = argv.Elem()
		}
		in = append(in, argv, reflect.ValueOf(last))
		if e := fn.Call(in)[0].Interface(); e != nil {
			return e.(error)
		}
		return nil
	}
	switch {
	case last == streamType:
		mt.stream = func(ctx context.Context, args any, st Stream) error { return invoke(ctx, args, st) }
	case last.Kind() == reflect.Pointer && exportedOrBuiltin(last):
		mt.replyType = last.Elem()
		mt.call = invoke
	default:
		return nil, false
	}
	return mt, true
}

func exportedOrBuiltin(t reflect.Type) bool {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	return token.IsExported(t.Name()) || t.PkgPath() == ""
}

func (s *Server) lookup(serviceMethod string) (*method, error) {
	dot := strings.LastIndex(serviceMethod, ".")
	if dot < 0 {
		return nil, fmt.Errorf("rpc: service/method request ill-formed: %q", serviceMethod)
	}
	s.svcMu.RLock()
	defer s.svcMu.RUnlock()
	svc := s.services[serviceMethod[:dot]]
	if svc == nil {
		return nil, fmt.Errorf("rpc: can't find service %q", serviceMethod)
	}
	m := svc.methods[serviceMethod[dot+1:]]
	if m == nil {
		return nil, fmt.Errorf("rpc: can't find method %q", serviceMethod)
	}
	return m, nil
}

func (s *Server) maxMessageSize() int { return positiveOr(s.MaxMessageSize, DefaultMaxMessageSize) }
func (s *Server) streamBuffer() int   { return positiveOr(s.StreamBuffer, DefaultStreamBuffer) }
func (s *Server) maxCalls() int       { return positiveOr(s.MaxCallsPerConn, DefaultMaxCallsPerConn) }
func (s *Server) maxStreams() int     { return positiveOr(s.MaxStreamsPerConn, DefaultMaxStreamsPerConn) }

// positiveOr returns v, or def when v is not positive (a zero-value field).
func positiveOr(v, def int) int {
	if v > 0 {
		return v
	}
	return def
}

func (s *Server) tooManyStreams() error {
	if s.TooManyStreams != nil {
		if err := s.TooManyStreams(s.maxStreams()); err != nil {
			return err
		}
	}
	return fmt.Errorf("%w (the limit is %d)", ErrTooManyStreams, s.maxStreams())
}

func (s *Server) logger() *slog.Logger {
	if s.Logger != nil {
		return s.Logger
	}
	return slog.Default()
}

// ServeHTTP performs the rpcplus CONNECT upgrade and then serves the
// hijacked connection until it ends (it blocks like ServeConn). Mount it at
// DefaultPath on any mux; other paths of the same listener keep serving
// plain HTTP. Any method other than CONNECT gets 405, and a CONNECT after
// Close gets 503. The Accept header
// "application/vnd.flynn.rpc-hijack+json" selects JSON, anything else gob.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodConnect {
		w.Header().Set("Allow", http.MethodConnect)
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.WriteHeader(http.StatusMethodNotAllowed)
		io.WriteString(w, "405 must CONNECT\n")
		return
	}
	s.mu.Lock()
	closed := s.closed
	s.mu.Unlock()
	if closed {
		http.Error(w, "rpc: server closed", http.StatusServiceUnavailable)
		return
	}
	codec := Gob
	if r.Header.Get("Accept") == jsonAccept {
		codec = JSON
	}
	conn, brw, err := http.NewResponseController(w).Hijack()
	if err != nil {
		s.logger().Error("rpc: cannot hijack connection", "remote", r.RemoteAddr, "err", err)
		http.Error(w, "rpc: cannot hijack connection", http.StatusInternalServerError)
		return
	}
	// Clear deadlines the HTTP server may have set for the request.
	_ = conn.SetDeadline(time.Time{})
	if _, err := io.WriteString(conn, connectedReply); err != nil {
		conn.Close()
		return
	}
	var rwc io.ReadWriteCloser = conn
	if brw.Reader.Buffered() > 0 {
		// The client pipelined bytes after the CONNECT request.
		rwc = &bufferedConn{Conn: conn, r: brw.Reader}
	}
	base := context.Background()
	if s.ConnContext != nil {
		base = s.ConnContext(base, r)
	}
	s.serveConn(base, rwc, codec)
}

// bufferedConn reads through the bufio.Reader that holds bytes the HTTP
// server read ahead.
type bufferedConn struct {
	net.Conn
	r io.Reader
}

func (c *bufferedConn) Read(p []byte) (int, error) { return c.r.Read(p) }

// ServeConn serves one already-upgraded connection with the given codec. It
// blocks until the connection ends (the peer closes it, it sends a
// malformed or oversized message, or the server is closed), then cancels
// the context of every call on it, waits for their methods to return, and
// closes conn. Methods must therefore return once their ctx is done.
// Calling ServeConn after Close closes conn at once.
func (s *Server) ServeConn(conn io.ReadWriteCloser, codec Codec) {
	s.serveConn(context.Background(), conn, codec)
}

func (s *Server) serveConn(base context.Context, conn io.ReadWriteCloser, codec Codec) {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		conn.Close()
		return
	}
	s.nextID++
	c := newServerConn(base, s, s.nextID, conn, codec)
	if s.conns == nil {
		s.conns = make(map[*serverConn]struct{})
	}
	s.conns[c] = struct{}{}
	s.connsWG.Add(1)
	s.mu.Unlock()

	defer func() {
		s.mu.Lock()
		delete(s.conns, c)
		s.mu.Unlock()
		s.connsWG.Done()
	}()
	c.serve()
}

// Close closes every connection, which cancels the context of every call,
// and makes later ServeConn calls close their connection at once; then it
// waits for all methods to return and for every ServeConn to finish, or
// for ctx to be done, whichever comes first. It does not close listeners
// or HTTP servers (their owner does). It returns nil, or ctx's error when
// methods were still running (they go on returning in their own time, and
// a later Close waits for them again).
func (s *Server) Close(ctx context.Context) error {
	s.mu.Lock()
	s.closed = true
	conns := make([]*serverConn, 0, len(s.conns))
	for c := range s.conns {
		conns = append(conns, c)
	}
	s.mu.Unlock()
	for _, c := range conns {
		c.shutdown(errServerClosed)
	}
	done := make(chan struct{})
	go func() { // ends when the last connection does, bounded by the methods' return
		s.connsWG.Wait()
		close(done)
	}()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("rpc: close: %w", context.Cause(ctx))
	}
}

var errServerClosed = errors.New("rpc: server closed")
