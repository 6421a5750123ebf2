package rpc_test

// These tests speak the protocol by hand, from the documented structs and
// JSON shapes (docs/API.md, "Protocol"), without the rpc client, so the
// server is checked against the protocol rather than against our client.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/gob"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/flynn/discoverd/rpc"
)

// The gob headers as rpcplus declares them (gob matches fields by name).
type wireRequest struct {
	ServiceMethod string
	Seq           uint64
}

type wireResponse struct {
	ServiceMethod string
	Seq           uint64
	Error         string
}

type wireArgs struct {
	A, B int
	S    string
}

type wireReply struct {
	C int
	S string
}

const connected = "HTTP/1.0 200 Connected to Go RPC\n\n"

// rawUpgrade opens a TCP connection and performs the CONNECT upgrade with
// the given Accept header.
func rawUpgrade(t *testing.T, addr, accept string) net.Conn {
	t.Helper()
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	// A deadline so that a broken server fails the test instead of hanging it.
	conn.SetDeadline(time.Now().Add(waitTimeout))
	if _, err := io.WriteString(conn, "CONNECT /_goRPC_ HTTP/1.0\r\nAccept: "+accept+"\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	status := make([]byte, len(connected))
	if _, err := io.ReadFull(conn, status); err != nil {
		t.Fatal(err)
	}
	if string(status) != connected {
		t.Fatalf("upgrade answer %q, want %q", status, connected)
	}
	return conn
}

type gobPeer struct {
	t   *testing.T
	enc *gob.Encoder
	dec *gob.Decoder
}

func newGobPeer(t *testing.T, rw io.ReadWriter) *gobPeer {
	return &gobPeer{t: t, enc: gob.NewEncoder(rw), dec: gob.NewDecoder(rw)}
}

func (p *gobPeer) send(method string, seq uint64, body any) {
	p.t.Helper()
	if err := p.enc.Encode(wireRequest{ServiceMethod: method, Seq: seq}); err != nil {
		p.t.Fatal(err)
	}
	if err := p.enc.Encode(body); err != nil {
		p.t.Fatal(err)
	}
}

// recv reads one reply; the body is decoded into a wireReply when the
// header carries no error, and must be an empty struct otherwise.
func (p *gobPeer) recv() (wireResponse, wireReply) {
	p.t.Helper()
	var h wireResponse
	if err := p.dec.Decode(&h); err != nil {
		p.t.Fatalf("reading response header: %v", err)
	}
	var r wireReply
	if h.Error != "" {
		var empty struct{}
		if err := p.dec.Decode(&empty); err != nil {
			p.t.Fatalf("reading empty body after error %q: %v", h.Error, err)
		}
		return h, r
	}
	if err := p.dec.Decode(&r); err != nil {
		p.t.Fatalf("reading body: %v", err)
	}
	return h, r
}

func TestWireGob(t *testing.T) {
	ts := startServer(t, nil)
	p := newGobPeer(t, rawUpgrade(t, ts.addr, "application/vnd.flynn.rpc-hijack+gob"))

	p.send("Arith.Add", 1, wireArgs{A: 2, B: 3})
	if h, r := p.recv(); h != (wireResponse{"Arith.Add", 1, ""}) || r.C != 5 {
		t.Fatalf("Add: %+v %+v", h, r)
	}

	p.send("Arith.Nope", 2, wireArgs{})
	if h, _ := p.recv(); h.Seq != 2 || !strings.Contains(h.Error, "Arith.Nope") {
		t.Fatalf("unknown method: %+v", h)
	}

	// A stream: replies carry the call's Seq, then CloseStream ends it with EOS.
	p.send("Arith.Forever", 3, wireArgs{A: 2})
	for i := range 2 {
		if h, r := p.recv(); h != (wireResponse{"Arith.Forever", 3, ""}) || r.C != i {
			t.Fatalf("stream reply %d: %+v %+v", i, h, r)
		}
	}
	p.send("CloseStream", 3, struct{}{})
	if h, _ := p.recv(); h.Seq != 3 || h.Error != "EOS" {
		t.Fatalf("after CloseStream: %+v, want EOS for seq 3", h)
	}
	if err := recv(t, ts.arith.streamEnd, "handler to see CloseStream"); err == nil {
		t.Fatal("handler's ctx not cancelled")
	}

	// A stream that ends by itself; a CloseStream for it afterwards is ignored.
	p.send("Arith.Count", 4, wireArgs{A: 2, S: "s"})
	for i := range 2 {
		if h, r := p.recv(); h.Seq != 4 || h.Error != "" || r.C != i || r.S != "s" {
			t.Fatalf("Count reply %d: %+v %+v", i, h, r)
		}
	}
	if h, _ := p.recv(); h.Seq != 4 || h.Error != "EOS" {
		t.Fatalf("Count end: %+v", h)
	}
	p.send("CloseStream", 4, struct{}{})
	p.send("Arith.Add", 5, wireArgs{A: 1})
	if h, r := p.recv(); h.Seq != 5 || r.C != 1 {
		t.Fatalf("Add after late CloseStream: %+v %+v", h, r)
	}
}

func TestWireJSON(t *testing.T) {
	ts := startServer(t, nil)
	conn := rawUpgrade(t, ts.addr, "application/vnd.flynn.rpc-hijack+json")
	lines := bufio.NewReader(conn)
	send := func(line string) {
		t.Helper()
		if _, err := io.WriteString(conn, line+"\n"); err != nil {
			t.Fatal(err)
		}
	}
	type reply struct {
		ID     json.RawMessage `json:"id"`
		Result json.RawMessage `json:"result"`
		Error  *string         `json:"error"`
	}
	read := func() (reply, string) {
		t.Helper()
		line, err := lines.ReadString('\n')
		if err != nil {
			t.Fatalf("reading reply line: %v", err)
		}
		var r reply
		if err := json.Unmarshal([]byte(line), &r); err != nil {
			t.Fatalf("reply %q: %v", line, err)
		}
		return r, line
	}
	result := func(r reply) wireReply {
		t.Helper()
		var w wireReply
		if err := json.Unmarshal(r.Result, &w); err != nil {
			t.Fatalf("result %s: %v", r.Result, err)
		}
		return w
	}

	send(`{"method":"Arith.Add","params":[{"A":2,"B":3}],"id":1}`)
	r, line := read()
	if string(r.ID) != "1" || r.Error != nil || result(r).C != 5 || !strings.Contains(line, `"error":null`) {
		t.Fatalf("Add: %s", line)
	}

	send(`{"method":"Arith.Nope","params":[{}],"id":2}`)
	if r, line := read(); string(r.ID) != "2" || r.Error == nil || string(r.Result) != "null" {
		t.Fatalf("unknown method: %s", line)
	}

	// Params that do not fit the argument type: an error reply, and the
	// connection goes on.
	send(`{"method":"Arith.Add","params":[{"A":"two"}],"id":3}`)
	if r, line := read(); string(r.ID) != "3" || r.Error == nil {
		t.Fatalf("bad params: %s", line)
	}

	// A stream with a string id, cancelled by CloseStream with the same id.
	send(`{"method":"Arith.Forever","params":[{"A":2}],"id":"s1"}`)
	for i := range 2 {
		if r, line := read(); string(r.ID) != `"s1"` || r.Error != nil || result(r).C != i {
			t.Fatalf("stream reply %d: %s", i, line)
		}
	}
	send(`{"method":"CloseStream","params":[],"id":"s1"}`)
	if r, line := read(); string(r.ID) != `"s1"` || r.Error == nil || *r.Error != "EOS" {
		t.Fatalf("after CloseStream: %s", line)
	}
	if err := recv(t, ts.arith.streamEnd, "handler to see CloseStream"); err == nil {
		t.Fatal("handler's ctx not cancelled")
	}

	// The longest id accepted (rpc.MaxJSONIDLen bytes, compacted) is
	// echoed.
	longID := `{"k":"` + strings.Repeat("x", rpc.MaxJSONIDLen-8) + `"}`
	send(`{"method":"Arith.Add","params":[{"A":1}],"id": ` + strings.Replace(longID, ":", " : ", 1) + `}`)
	if r, line := read(); string(r.ID) != longID || r.Error != nil {
		t.Fatalf("Add with a %d-byte id: %s", len(longID), line)
	}

	send(`{"method":"Arith.Count","params":[{"A":1}],"id":7}`)
	if r, line := read(); string(r.ID) != "7" || r.Error != nil || result(r).C != 0 {
		t.Fatalf("Count reply: %s", line)
	}
	if r, line := read(); string(r.ID) != "7" || r.Error == nil || *r.Error != "EOS" {
		t.Fatalf("Count end: %s", line)
	}
}

// syncBuffer is a log sink safe for concurrent writes.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

// expectClosed reads conn until the server closes it.
func expectClosed(t *testing.T, conn net.Conn) {
	t.Helper()
	_, err := io.Copy(io.Discard, conn)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatal("server did not close the connection")
	}
}

// Oversized and malformed input closes that connection only, with a logged
// reason; the server goes on serving others.
func TestBadFramesCloseConnection(t *testing.T) {
	bigGob := func(p *gobPeer) {
		p.send("Arith.Add", 1, wireArgs{S: strings.Repeat("x", 2048)})
	}
	cases := []struct {
		name, accept string
		write        func(t *testing.T, conn net.Conn)
		reason       string
	}{
		{"gob oversized body", "gob", func(t *testing.T, conn net.Conn) { bigGob(newGobPeer(t, conn)) }, "too large"},
		{"gob oversized count", "gob", func(t *testing.T, conn net.Conn) {
			conn.Write([]byte{0xfc, 0x7f, 0xff, 0xff, 0xff}) // a 2 GiB message is announced
		}, "too large"},
		{"gob garbage", "gob", func(t *testing.T, conn net.Conn) {
			conn.Write([]byte("\x07garbage and more garbage"))
		}, "closing connection"},
		{"gob header of the wrong type", "gob", func(t *testing.T, conn net.Conn) {
			gob.NewEncoder(conn).Encode(42)
		}, "closing connection"},
		{"json oversized", "json", func(t *testing.T, conn net.Conn) {
			io.WriteString(conn, `{"method":"Arith.Add","params":[{"S":"`+strings.Repeat("x", 4096)+`"}],"id":1}`+"\n")
		}, "too large"},
		{"json garbage", "json", func(t *testing.T, conn net.Conn) {
			io.WriteString(conn, "{{{{ not json\n")
		}, "closing connection"},
		{"json id too long", "json", func(t *testing.T, conn net.Conn) {
			io.WriteString(conn, `{"method":"Arith.Add","params":[{}],"id":"`+strings.Repeat("x", rpc.MaxJSONIDLen-1)+`"}`+"\n")
		}, "id of 257 bytes"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var logs syncBuffer
			ts := startServer(t, func(s *rpc.Server) {
				s.MaxMessageSize = 1024
				s.Logger = slog.New(slog.NewTextHandler(&logs, nil))
			})
			good := mustDial(t, ts.addr, rpc.Gob)
			conn := rawUpgrade(t, ts.addr, "application/vnd.flynn.rpc-hijack+"+tc.accept)
			tc.write(t, conn)
			expectClosed(t, conn)
			var r Reply
			if err := good.Call(testCtx(t), "Arith.Add", &Args{A: 1, B: 1}, &r); err != nil || r.C != 2 {
				t.Errorf("other connection after the bad one: %+v, %v", r, err)
			}
			if !strings.Contains(logs.String(), tc.reason) {
				t.Errorf("log does not say %q:\n%s", tc.reason, logs.String())
			}
		})
	}
}

// A client that goes away, even by resetting its connection, is an
// ordinary event: the server logs it at debug level, not as a warning.
func TestDisconnectIsNotAWarning(t *testing.T) {
	var logs syncBuffer
	ts := startServer(t, func(s *rpc.Server) {
		s.Logger = slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	})
	conn := rawUpgrade(t, ts.addr, "application/vnd.flynn.rpc-hijack+gob")
	newGobPeer(t, conn).send("Arith.Forever", 1, wireArgs{})
	recv(t, ts.arith.connIDs, "the stream to start")
	if err := conn.(*net.TCPConn).SetLinger(0); err != nil { // Close sends a reset
		t.Fatal(err)
	}
	conn.Close()
	recv(t, ts.arith.streamEnd, "the stream to end with its connection")
	if got := logs.String(); strings.Contains(got, "level=WARN") || !strings.Contains(got, "connection ended") {
		t.Errorf("log after a reset by the client:\n%s", got)
	}
}

// recordWriter keeps each Write separately: gob writes one message per Write.
type recordWriter struct{ chunks [][]byte }

func (w *recordWriter) Write(p []byte) (int, error) {
	w.chunks = append(w.chunks, bytes.Clone(p))
	return len(p), nil
}

// gobUint encodes x as gob encodes unsigned integers.
func gobUint(x uint64) []byte {
	if x < 0x80 {
		return []byte{byte(x)}
	}
	var be []byte
	for ; x > 0; x >>= 8 {
		be = append([]byte{byte(x)}, be...)
	}
	return append([]byte{byte(-len(be))}, be...)
}

// A message may announce a huge map while carrying one entry. encoding/gob
// would allocate the announced size up front; the server must not.
func TestGobMapCountDoesNotAllocate(t *testing.T) {
	type mapArgs struct{ Attrs map[string]string }
	var w recordWriter
	enc := gob.NewEncoder(&w)
	if err := enc.Encode(wireRequest{ServiceMethod: "Arith.Add", Seq: 1}); err != nil {
		t.Fatal(err)
	}
	if err := enc.Encode(mapArgs{Attrs: map[string]string{"k": "v"}}); err != nil {
		t.Fatal(err)
	}
	last := w.chunks[len(w.chunks)-1]
	if last[0] >= 0x80 {
		t.Fatal("test assumes a short value message")
	}
	payload := last[1:]
	entry := []byte("\x01\x01k\x01v") // count 1, "k", "v"
	i := bytes.Index(payload, entry)
	if i < 0 {
		t.Fatalf("map entry not found in %q", payload)
	}
	patched := append(bytes.Clone(payload[:i]), gobUint(8<<20)...) // 8M entries announced
	patched = append(patched, payload[i+1:]...)
	w.chunks[len(w.chunks)-1] = append(gobUint(uint64(len(patched))), patched...)

	ts := startServer(t, nil)
	conn := rawUpgrade(t, ts.addr, "application/vnd.flynn.rpc-hijack+gob")
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	for _, c := range w.chunks {
		if _, err := conn.Write(c); err != nil {
			t.Fatal(err)
		}
	}
	expectClosed(t, conn)
	runtime.ReadMemStats(&after)
	if d := after.TotalAlloc - before.TotalAlloc; d > 64<<20 {
		t.Errorf("decoding one small message allocated %d MiB", d>>20)
	}
}

// servePipe serves one end of a synchronous in-memory connection (every
// write blocks until the other end reads it) and returns a gob peer on the
// other end. The returned func closes the peer's end and waits for
// ServeConn to return.
func servePipe(t *testing.T, srv *rpc.Server) (*gobPeer, func()) {
	t.Helper()
	serverSide, clientSide := net.Pipe()
	served := make(chan struct{})
	go func() {
		defer close(served)
		srv.ServeConn(serverSide, rpc.Gob)
	}()
	clientSide.SetDeadline(time.Now().Add(waitTimeout))
	return newGobPeer(t, clientSide), func() {
		clientSide.Close()
		recv(t, served, "ServeConn to return")
	}
}

// serveSmallQueue serves an Arith with a 4-reply stream queue over a pipe
// whose peer p the test drives by hand; everything stops at test end.
func serveSmallQueue(t *testing.T) (*rpc.Server, *Arith, *gobPeer) {
	t.Helper()
	srv := rpc.NewServer()
	srv.StreamBuffer = 4
	arith := newArith()
	if err := srv.Register(arith); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close(context.Background()) })
	p, closePipe := servePipe(t, srv)
	t.Cleanup(closePipe)
	return srv, arith, p
}

// A stream whose reader falls behind waits for it: once its queue is full
// the method's Send blocks, and when the reader reads again every reply
// arrives, in order, then EOS.
func TestSlowReaderGetsEveryReply(t *testing.T) {
	srv, arith, p := serveSmallQueue(t)

	// Replies of 8 KiB overflow the writer's buffer, so the writer blocks
	// on the first one until we read; then 4 wait in the queue, and the
	// method announces the 6th only after the 5th Send returned.
	const n = 100
	p.send("Arith.Flood", 1, wireArgs{A: n, S: "x", B: 8 << 10})
	for i := -1; i < srv.StreamBuffer+1; i = recv(t, arith.sending, "Flood to send") {
	}
	for i := range n {
		h, r := p.recv()
		if h.Seq != 1 || h.Error != "" || r.C != i {
			t.Fatalf("reply %d: %+v %+v", i, h, r.C)
		}
	}
	if h, _ := p.recv(); h.Seq != 1 || h.Error != "EOS" {
		t.Fatalf("after %d replies: %+v, want EOS", n, h)
	}
	if err := recv(t, arith.streamEnd, "Flood to end"); err != nil {
		t.Errorf("Flood's Send failed: %v", err)
	}
}

// A stream whose reader is behind holds back replies to other calls on the
// connection by at most its backlog, never by more: the single writer
// takes one reply per call in turn. A CloseStream then ends the stream
// (its backlog dropped) with EOS, and its waiting Send returns.
func TestSlowStreamDoesNotStallOtherCalls(t *testing.T) {
	srv, arith, p := serveSmallQueue(t)

	p.send("Arith.Flood", 1, wireArgs{S: "x", B: 8 << 10}) // without end
	for i := -1; i < srv.StreamBuffer+1; i = recv(t, arith.sending, "Flood to send") {
	}
	// The server still reads: an unknown method's error reply is queued by
	// the reader before it reads the next request, so once the second
	// write below returns, that reply is queued behind the stream's
	// backlog of at most 4 replies (plus 1 in the writer).
	p.send("Arith.Nope", 2, wireArgs{})
	p.send("CloseStream", 99, struct{}{})
	items := 0
	for {
		h, _ := p.recv()
		if h.Seq == 2 {
			break
		}
		if h.Seq != 1 || h.Error != "" {
			t.Fatalf("unexpected reply %+v", h)
		}
		items++
	}
	if items > srv.StreamBuffer+1 {
		t.Errorf("%d stream replies came before the reply to another call, more than the backlog (%d)", items, srv.StreamBuffer+1)
	}

	p.send("CloseStream", 1, struct{}{})
	for {
		h, _ := p.recv()
		if h.Seq != 1 {
			t.Fatalf("unexpected reply %+v", h)
		}
		if h.Error != "" {
			if h.Error != "EOS" {
				t.Errorf("cancelled stream ended with %q, want EOS", h.Error)
			}
			break
		}
	}
	if err := recv(t, arith.streamEnd, "Flood to end"); !errors.Is(err, rpc.ErrStreamClosed) {
		t.Errorf("Flood's Send returned %v, want ErrStreamClosed", err)
	}
}
