package server_test

import (
	"bufio"
	"encoding/gob"
	"net"
	"testing"
	"time"

	"github.com/flynn/discoverd/api"
)

// gobRequest and gobResponse are rpcplus's headers, written here by hand
// as an old client encodes them.
type gobRequest struct {
	ServiceMethod string
	Seq           uint64
}

type gobResponse struct {
	ServiceMethod string
	Seq           uint64
	Error         string
}

// rawClient speaks the rpcplus gob protocol byte for byte, without our rpc
// package.
type rawClient struct {
	t    *testing.T
	conn net.Conn
	enc  *gob.Encoder
	dec  *gob.Decoder
}

func dialRaw(t *testing.T, addr string) *rawClient {
	t.Helper()
	conn, err := net.DialTimeout("tcp", addr, waitTimeout)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	conn.SetDeadline(time.Now().Add(3 * waitTimeout)) // a hung exchange fails the test instead of hanging it
	if _, err := conn.Write([]byte("CONNECT /_goRPC_ HTTP/1.0\r\nAccept: application/vnd.flynn.rpc-hijack+gob\r\n\r\n")); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(conn)
	status, err := br.ReadString('\n')
	if err != nil || status != "HTTP/1.0 200 Connected to Go RPC\n" {
		t.Fatalf("upgrade answer %q, %v", status, err)
	}
	if blank, err := br.ReadString('\n'); err != nil || blank != "\n" {
		t.Fatalf("upgrade answer ends with %q, %v", blank, err)
	}
	return &rawClient{t: t, conn: conn, enc: gob.NewEncoder(conn), dec: gob.NewDecoder(br)}
}

func (c *rawClient) send(method string, seq uint64, body any) {
	c.t.Helper()
	if err := c.enc.Encode(gobRequest{ServiceMethod: method, Seq: seq}); err != nil {
		c.t.Fatalf("encode header: %v", err)
	}
	if err := c.enc.Encode(body); err != nil {
		c.t.Fatalf("encode body: %v", err)
	}
}

// frame is one decoded reply.
type frame struct {
	hdr    gobResponse
	addr   string            // Register replies
	update api.ServiceUpdate // stream replies
}

// read decodes the next reply; streams holds the Seqs of stream calls, so
// that it knows which body type follows.
func (c *rawClient) read(streams map[uint64]bool) frame {
	c.t.Helper()
	var f frame
	if err := c.dec.Decode(&f.hdr); err != nil {
		c.t.Fatalf("decode header: %v", err)
	}
	var err error
	switch {
	case f.hdr.Error != "":
		var empty struct{}
		err = c.dec.Decode(&empty)
	case streams[f.hdr.Seq]:
		err = c.dec.Decode(&f.update)
	default:
		err = c.dec.Decode(&f.addr)
	}
	if err != nil {
		c.t.Fatalf("decode body of %+v: %v", f.hdr, err)
	}
	return f
}

func TestRawGobClient(t *testing.T) {
	e := newEnv(t, envConfig{})
	c := dialRaw(t, e.addr)
	streams := map[uint64]bool{2: true}

	c.send(api.MethodRegister, 1, api.Args{Name: "web", Addr: "10.0.0.1:80", Attrs: map[string]string{"a": "b"}})
	if f := c.read(streams); f.hdr.Seq != 1 || f.hdr.Error != "" || f.addr != "10.0.0.1:80" {
		t.Fatalf("Register reply %+v", f)
	}

	c.send(api.MethodSubscribe, 2, api.Args{Name: "web"})
	if f := c.read(streams); f.hdr.Seq != 2 || f.update.Addr != "10.0.0.1:80" || !f.update.Online || f.update.Attrs["a"] != "b" {
		t.Fatalf("snapshot frame %+v", f)
	}
	if f := c.read(streams); f.hdr.Seq != 2 || !f.update.IsSentinel() {
		t.Fatalf("sentinel frame %+v", f)
	}

	// A call on the same connection while the stream runs: its reply and
	// the live update may come in either order.
	c.send(api.MethodRegister, 3, api.Args{Name: "web", Addr: "10.0.0.2:80"})
	var gotReply, gotLive bool
	for !gotReply || !gotLive {
		f := c.read(streams)
		switch {
		case f.hdr.Seq == 3 && f.hdr.Error == "" && f.addr == "10.0.0.2:80":
			gotReply = true
		case f.hdr.Seq == 2 && f.update.Addr == "10.0.0.2:80" && f.update.Online:
			gotLive = true
		default:
			t.Fatalf("unexpected frame %+v", f)
		}
	}

	// An error reply carries the code in its text.
	c.send(api.MethodRegister, 4, api.Args{Name: "web", Addr: "no-port"})
	if f := c.read(streams); f.hdr.Seq != 4 || api.ErrorCode(api.ParseError(f.hdr.Error)) != api.CodeInvalidArgument {
		t.Fatalf("bad Register reply %+v", f)
	}

	// CloseStream ends the stream with EOS.
	c.send("CloseStream", 2, struct{}{})
	for {
		f := c.read(streams)
		if f.hdr.Seq != 2 {
			t.Fatalf("unexpected frame %+v", f)
		}
		if f.hdr.Error == "EOS" {
			break
		}
		if f.hdr.Error != "" {
			t.Fatalf("stream ended with %q, want EOS", f.hdr.Error)
		}
	}
}

// TestHeartbeatsKeepRegistrationsAlive: with a 2 s TTL, a go-discoverd
// style client that only re-registers (every 1 s here, for 5 s with the
// default TTL) and an HTTP client that re-PUTs stay registered across
// several TTLs, while registrations whose heartbeats stop expire even
// though their connection stays open.
func TestHeartbeatsKeepRegistrationsAlive(t *testing.T) {
	const ttl = 2 * time.Second
	e := newEnv(t, envConfig{ttl: ttl})
	sub := mustStream(t, mustDial(t, e.addr), api.MethodSubscribe, "svc")
	if u := sub.next(); !u.IsSentinel() {
		t.Fatalf("snapshot of an empty service: %+v", u)
	}

	const (
		rpcKept   = "10.0.0.1:1"
		rpcStale  = "10.0.0.2:1"
		httpKept  = "10.0.0.3:1"
		httpStale = "10.0.0.4:1"
	)
	old := mustDial(t, e.addr)
	stale := mustDial(t, e.addr) // stays open, never heartbeats
	beat := func() {
		mustRegister(t, old, "svc", rpcKept, nil)
		mustPut(t, e.url, "svc", httpKept, `{}`)
	}
	beat()
	mustRegister(t, stale, "svc", rpcStale, nil)
	mustPut(t, e.url, "svc", httpStale, `{}`)

	online := map[string]bool{}
	for len(online) < 4 {
		u := sub.next()
		if !u.Online {
			t.Fatalf("unexpected %+v", u)
		}
		online[u.Addr] = true
	}

	ticker := time.NewTicker(ttl / 2)
	defer ticker.Stop()
	observe := time.NewTimer(3 * ttl) // how long the kept ones must survive
	defer observe.Stop()
	offline := map[string]bool{}
	for done := false; !done; {
		select {
		case <-ticker.C:
			beat()
		case u, ok := <-sub.ch:
			if !ok {
				t.Fatalf("stream ended: %v", sub.call.Err())
			}
			if u.Online {
				t.Fatalf("unexpected %+v", u)
			}
			if u.Addr == rpcKept || u.Addr == httpKept {
				t.Fatalf("%s expired although it was re-registered every %v", u.Addr, ttl/2)
			}
			offline[u.Addr] = true
		case <-observe.C:
			done = true
		}
	}
	if !offline[rpcStale] || !offline[httpStale] {
		t.Fatalf("expired: %v, want %s and %s after %v without heartbeats", offline, rpcStale, httpStale, 3*ttl)
	}
	got := mustList(t, e.url, "svc")
	if len(got) != 2 {
		t.Fatalf("instances after %v: %+v, want the two kept ones", 3*ttl, got)
	}
}
