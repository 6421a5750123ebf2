package server

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/flynn/discoverd/api"
)

// ConnLimiter caps the client connections of the agent's listener, so that
// no client behaviour can use up the process's file descriptors (which the
// store, in embedded mode, needs too). Wrap the listener with Listen before
// serving it; the cap then covers every accepted connection, plain HTTP,
// SSE and upgraded RPC alike, from accept until it is closed.
//
// A connection accepted beyond Max is refused with a reason: the limiter
// reads its request head (at most RefuseTimeout, 8 KiB) and answers 503. An
// RPC CONNECT gets the status line "HTTP/1.0 503 unavailable: ..." (an
// rpcplus client shows that status text in its error); any other request
// gets a JSON ErrorBody with code "unavailable". At most MaxRefusing
// connections are being refused at once; beyond that an excess connection
// is closed at once, unanswered. Refusals are counted (Refused, and the
// metric discoverd_client_conns_refused_total) and logged at most once a
// second.
//
// Set the fields before Listen and do not change them afterwards. Its
// methods are safe for concurrent use.
type ConnLimiter struct {
	// Max caps the connections served at once. It must be positive.
	Max int
	// MaxRefusing caps the connections being answered 503 at once.
	// Default DefaultMaxRefusing.
	MaxRefusing int
	// RefuseTimeout bounds how long a refused connection is kept to read
	// its request and be answered. Default 1 s.
	RefuseTimeout time.Duration
	// Logger receives the (rate-limited) refusals. Default slog.Default().
	Logger *slog.Logger

	open    atomic.Int64
	refused atomic.Uint64
	lastLog atomic.Int64 // unix nanos of the last refusal logged
	logged  atomic.Uint64

	mu       sync.Mutex
	refusing map[net.Conn]struct{}
	closed   bool
	wg       sync.WaitGroup // refusing goroutines
}

// DefaultMaxRefusing is the default cap on connections being refused at
// once (ConnLimiter.MaxRefusing). Descriptors for that many must be left
// outside the cap.
const DefaultMaxRefusing = 16

// Open returns the number of connections served now.
func (l *ConnLimiter) Open() int { return int(l.open.Load()) }

// Refused returns the number of connections refused since the start.
func (l *ConnLimiter) Refused() uint64 { return l.refused.Load() }

// Listen returns ln with the cap applied: its Accept hands out at most Max
// connections at once (each counts until its Close), and answers the
// excess itself. Closing the returned listener closes ln, ends the
// refusals in progress and waits for their goroutines.
func (l *ConnLimiter) Listen(ln net.Listener) net.Listener {
	if l.Max <= 0 {
		panic("server: ConnLimiter.Max must be positive")
	}
	return &limitListener{Listener: ln, l: l}
}

type limitListener struct {
	net.Listener
	l         *ConnLimiter
	closeOnce sync.Once
	closeErr  error
}

func (ln *limitListener) Accept() (net.Conn, error) {
	l := ln.l
	for {
		c, err := ln.Listener.Accept()
		if err != nil {
			return nil, err
		}
		if l.open.Add(1) <= int64(l.Max) {
			return &limitConn{Conn: c, l: l}, nil
		}
		l.open.Add(-1)
		l.refuse(c)
	}
}

func (ln *limitListener) Close() error {
	ln.closeOnce.Do(func() {
		ln.closeErr = ln.Listener.Close()
		l := ln.l
		l.mu.Lock()
		l.closed = true
		for c := range l.refusing {
			c.Close()
		}
		l.mu.Unlock()
		l.wg.Wait()
	})
	return ln.closeErr
}

// limitConn gives its slot back on its first Close.
type limitConn struct {
	net.Conn
	l    *ConnLimiter
	once sync.Once
}

func (c *limitConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(func() { c.l.open.Add(-1) })
	return err
}

// refuse answers c 503 in a goroutine of its own, or closes it at once
// when MaxRefusing are being answered.
func (l *ConnLimiter) refuse(c net.Conn) {
	n := l.refused.Add(1)
	l.logRefusal(n, c.RemoteAddr())
	maxRefusing := l.MaxRefusing
	if maxRefusing <= 0 {
		maxRefusing = DefaultMaxRefusing
	}
	l.mu.Lock()
	if l.closed || len(l.refusing) >= maxRefusing {
		l.mu.Unlock()
		c.Close()
		return
	}
	if l.refusing == nil {
		l.refusing = make(map[net.Conn]struct{})
	}
	l.refusing[c] = struct{}{}
	l.wg.Add(1)
	l.mu.Unlock()
	go func() { // owned by the listener: its Close closes c and waits
		defer l.wg.Done()
		l.answer(c)
		l.mu.Lock()
		delete(l.refusing, c)
		l.mu.Unlock()
		c.Close()
	}()
}

// answer reads the request head of a refused connection and writes the
// 503 that says why.
func (l *ConnLimiter) answer(c net.Conn) {
	timeout := l.RefuseTimeout
	if timeout <= 0 {
		timeout = time.Second
	}
	_ = c.SetDeadline(time.Now().Add(timeout))
	req, err := http.ReadRequest(bufio.NewReaderSize(io.LimitReader(c, 8<<10), 4<<10))
	if err != nil {
		return // not HTTP, too slow or too large: closed unanswered
	}
	msg := fmt.Sprintf("the agent is at its limit of %d client connections; retry later", l.Max)
	body, _ := json.Marshal(ErrorBody{Error: msg, Code: api.CodeUnavailable})
	body = append(body, '\n')
	status := "HTTP/1.1 503 Service Unavailable"
	if req.Method == http.MethodConnect {
		// rpcplus clients report the status text, not the body.
		status = "HTTP/1.0 503 " + string(api.CodeUnavailable) + ": " + msg
	}
	var b strings.Builder
	fmt.Fprintf(&b, "%s\r\nContent-Type: application/json\r\nContent-Length: %d\r\nRetry-After: 1\r\nConnection: close\r\n\r\n", status, len(body))
	b.Write(body)
	_, _ = io.WriteString(c, b.String())
	if tc, ok := c.(interface{ CloseWrite() error }); ok {
		_ = tc.CloseWrite()
	}
}

// logRefusal logs refusals, at most once a second, with how many there
// were since the last line.
func (l *ConnLimiter) logRefusal(total uint64, remote net.Addr) {
	now := time.Now().UnixNano()
	last := l.lastLog.Load()
	if now-last < int64(time.Second) || !l.lastLog.CompareAndSwap(last, now) {
		return
	}
	since := total - l.logged.Swap(total)
	log := l.Logger
	if log == nil {
		log = slog.Default()
	}
	log.Warn("refusing client connections: at the connection limit",
		"limit", l.Max, "refused", since, "refused_total", total, "remote", remote.String())
}
