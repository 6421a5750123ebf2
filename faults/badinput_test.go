package faults_test

import (
	"bytes"
	"encoding/gob"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/flynn/discoverd/api"
	"github.com/flynn/discoverd/backend/etcd/etcdtest"
	"github.com/flynn/discoverd/rpc"
)

// badInputNode is one agent on a single-member etcd, shared by the
// bad-input tests of one top-level test, with a control connection that
// must keep working whatever the other connections send.
type badInputNode struct {
	*node
	control *rpc.Client
	n       int
}

func newBadInputNode(t *testing.T) *badInputNode {
	srv := etcdtest.NewServer(t)
	n := startNode(t, srv.Endpoints(), ttl)
	return &badInputNode{node: n, control: mustDial(t, n.Addr, rpc.Gob)}
}

// stillServing checks that the agent serves a client that did nothing
// wrong: a registration and an unregistration on the control connection.
func (b *badInputNode) stillServing(t *testing.T) {
	t.Helper()
	b.n++
	args := &api.Args{Name: "control", Addr: fmt.Sprintf("10.200.0.1:%d", b.n)}
	var addr string
	mustCall(t, b.control, api.MethodRegister, args, &addr)
	mustCall(t, b.control, api.MethodUnregister, args, &struct{}{})
}

// wantCode checks that err is an error reply whose text starts with code.
func wantCode(t *testing.T, err error, code api.Code, what string) {
	t.Helper()
	var se rpc.ServerError
	if !errors.As(err, &se) {
		t.Fatalf("%s: got %v (%T), want a %s error reply", what, err, err, code)
	}
	if !strings.HasPrefix(string(se), string(code)+": ") {
		t.Fatalf("%s: error %q does not start with %q", what, se, code+": ")
	}
}

// TestBadInputArgs: invalid names, addresses and attributes are refused
// with invalid_argument by every method, over gob and JSON, and the
// connection that sent them goes on working.
func TestBadInputArgs(t *testing.T) {
	b := newBadInputNode(t)
	long := strings.Repeat("a", api.MaxNameLen+1)
	manyAttrs := make(map[string]string)
	for i := range api.MaxAttrs + 1 {
		manyAttrs[fmt.Sprint("k", i)] = "v"
	}
	atLimits := make(map[string]string)
	for i := range api.MaxAttrs {
		k := fmt.Sprintf("%03d", i) + strings.Repeat("k", api.MaxAttrKeyLen-3)
		atLimits[k] = strings.Repeat("v", api.MaxAttrValueLen)
	}
	const addr = "10.0.0.1:80"
	for _, tc := range []struct {
		what  string
		args  api.Args
		inMsg string // the message names the culprit
	}{
		{"name with invalid UTF-8", api.Args{Name: "web\xff\xfe", Addr: addr}, "name"},
		{"name with a NUL", api.Args{Name: "web\x00", Addr: addr}, "name"},
		{"name with a newline", api.Args{Name: "we\nb", Addr: addr}, "name"},
		{"name with an escape sequence", api.Args{Name: "web\x1b[2J", Addr: addr}, "name"},
		{"name with a non-ASCII letter", api.Args{Name: "wéb", Addr: addr}, "name"},
		{"name with a slash", api.Args{Name: "web/../x", Addr: addr}, "name"},
		{"empty name", api.Args{Name: "", Addr: addr}, "name"},
		{"name too long", api.Args{Name: long, Addr: addr}, "limit"},
		{"addr with invalid UTF-8", api.Args{Name: "web", Addr: "h\xffst:80"}, "address"},
		{"addr with a control character", api.Args{Name: "web", Addr: "ho\x07st:80"}, "address"},
		{"addr without port", api.Args{Name: "web", Addr: "10.0.0.1"}, "address"},
		{"addr port 0", api.Args{Name: "web", Addr: "10.0.0.1:0"}, "port"},
		{"addr port too large", api.Args{Name: "web", Addr: "10.0.0.1:65536"}, "port"},
		{"addr too long", api.Args{Name: "web", Addr: strings.Repeat("a", 300) + ":80"}, "limit"},
		{":port without EXTERNAL_IP", api.Args{Name: "web", Addr: ":8080"}, "EXTERNAL_IP"},
		{"too many attrs", api.Args{Name: "web", Addr: addr, Attrs: manyAttrs}, "limit of 64"},
		{"attr key too long", api.Args{Name: "web", Addr: addr, Attrs: map[string]string{long: "v"}}, "limit of 128"},
		{"attr value too long", api.Args{Name: "web", Addr: addr, Attrs: map[string]string{"k": strings.Repeat("v", api.MaxAttrValueLen+1)}}, "limit of 1024"},
		{"empty attr key", api.Args{Name: "web", Addr: addr, Attrs: map[string]string{"": "v"}}, "empty"},
		{"attr key with a control character", api.Args{Name: "web", Addr: addr, Attrs: map[string]string{"a\tb": "v"}}, "printable"},
		{"attr key with invalid UTF-8", api.Args{Name: "web", Addr: addr, Attrs: map[string]string{"\xc3\x28": "v"}}, "printable"},
		{"attr value with invalid UTF-8", api.Args{Name: "web", Addr: addr, Attrs: map[string]string{"k": "\xed\xa0\x80"}}, "UTF-8"},
	} {
		t.Run(tc.what, func(t *testing.T) {
			for _, codec := range []rpc.Codec{rpc.Gob, rpc.JSON} {
				if codec == rpc.JSON && !jsonRoundTrips(tc.args) {
					// encoding/json cannot carry invalid UTF-8: the client
					// sends U+FFFD instead, which may well be valid.
					continue
				}
				c := mustDial(t, b.Addr, codec)
				var got string
				err := call(c, api.MethodRegister, &tc.args, &got)
				wantCode(t, err, api.CodeInvalidArgument, codec.String()+" Register")
				if !strings.Contains(err.Error(), tc.inMsg) {
					t.Errorf("%s Register: error %q does not mention %q", codec, err, tc.inMsg)
				}
				if len(tc.args.Attrs) == 0 {
					// Heartbeat and Unregister check name and addr the same way.
					wantCode(t, call(c, api.MethodHeartbeat, &tc.args, &struct{}{}), api.CodeInvalidArgument, codec.String()+" Heartbeat")
					wantCode(t, call(c, api.MethodUnregister, &tc.args, &struct{}{}), api.CodeInvalidArgument, codec.String()+" Unregister")
				}
				// The same connection still works.
				ok := api.Args{Name: "web", Addr: "10.0.0.9:80"}
				mustCall(t, c, api.MethodRegister, &ok, &got)
				mustCall(t, c, api.MethodUnregister, &ok, &struct{}{})
			}
			b.stillServing(t)
		})
	}

	t.Run("attrs at every limit are accepted", func(t *testing.T) {
		c := mustDial(t, b.Addr, rpc.Gob)
		args := api.Args{Name: strings.Repeat("n", api.MaxNameLen), Addr: "10.0.0.1:65535", Attrs: atLimits}
		var got string
		mustCall(t, c, api.MethodRegister, &args, &got)
		mustCall(t, c, api.MethodUnregister, &args, &struct{}{})
	})

	t.Run("subscribe to an invalid name", func(t *testing.T) {
		c := mustDial(t, b.Addr, rpc.Gob)
		for _, method := range []string{api.MethodSubscribe, api.MethodLeader} {
			ch := make(chan *api.ServiceUpdate, 1)
			sc, err := c.Stream(t.Context(), method, &api.Args{Name: "bad\x00name"}, ch)
			if err != nil {
				t.Fatal(err)
			}
			for range ch {
				t.Errorf("%s of an invalid name delivered an update", method)
			}
			wantCode(t, sc.Err(), api.CodeInvalidArgument, method)
		}
		b.stillServing(t)
	})

	t.Run("heartbeat of an unknown registration", func(t *testing.T) {
		c := mustDial(t, b.Addr, rpc.Gob)
		wantCode(t, call(c, api.MethodHeartbeat, &api.Args{Name: "web", Addr: "10.0.0.7:80"}, &struct{}{}), api.CodeNotFound, "Heartbeat")
		wantCode(t, call(c, api.MethodUnregister, &api.Args{Name: "web", Addr: "10.0.0.7:80"}, &struct{}{}), api.CodeNotFound, "Unregister")
	})
}

// jsonRoundTrips reports whether a survives a JSON round trip unchanged.
func jsonRoundTrips(a api.Args) bool {
	b, err := json.Marshal(a)
	if err != nil {
		return false
	}
	var back api.Args
	if err := json.Unmarshal(b, &back); err != nil {
		return false
	}
	return back.Name == a.Name && back.Addr == a.Addr && maps.Equal(back.Attrs, a.Attrs)
}

// TestBadInputUnknownMethods: calls of methods that do not exist get the
// error rpcplus servers send (clients detect old agents by its text); the
// connection goes on.
func TestBadInputUnknownMethods(t *testing.T) {
	b := newBadInputNode(t)
	c := mustDial(t, b.Addr, rpc.Gob)
	for _, method := range []string{"Agent.Nope", "Nope.Register", "NoDot", "", "Agent.", ".Register", "Agent.register", "Agent.Register.Extra"} {
		var got string
		err := call(c, method, &api.Args{Name: "web", Addr: "10.0.0.1:80"}, &got)
		var se rpc.ServerError
		if !errors.As(err, &se) {
			t.Fatalf("%q: got %v, want an error reply", method, err)
		}
		// rpcplus's text, without a code: api.ParseError makes it internal.
		if !strings.HasPrefix(string(se), "rpc: ") || !strings.Contains(string(se), "method") && !strings.Contains(string(se), "service") {
			t.Errorf("%q: error %q is not rpcplus's unknown-method error", method, se)
		}
		if code := api.ErrorCode(api.ParseError(string(se))); code != api.CodeInternal {
			t.Errorf("%q: error %q parses to code %q", method, se, code)
		}
	}
	// An unknown streaming method over the JSON flavour, too.
	j := mustDial(t, b.Addr, rpc.JSON)
	ch := make(chan *api.ServiceUpdate, 1)
	sc, err := j.Stream(t.Context(), "Agent.Watch", &api.Args{Name: "web"}, ch)
	if err != nil {
		t.Fatal(err)
	}
	for range ch {
		t.Error("an unknown stream delivered an update")
	}
	if err := sc.Err(); err == nil || !strings.Contains(err.Error(), "Agent.Watch") {
		t.Errorf("unknown stream ended with %v", err)
	}
	var got string
	mustCall(t, c, api.MethodRegister, &api.Args{Name: "web", Addr: "10.0.0.1:80"}, &got)
	b.stillServing(t)
}

// TestBadInputStreamCancelledTwice: a second CloseStream for the same
// stream (and one for a stream that never existed) is ignored: the stream
// ends once, with EOS, and the connection goes on.
func TestBadInputStreamCancelledTwice(t *testing.T) {
	b := newBadInputNode(t)

	t.Run("raw", func(t *testing.T) {
		c := dialRaw(t, b.Addr)
		if err := c.send(api.MethodSubscribe, 1, api.Args{Name: "twice"}); err != nil {
			t.Fatal(err)
		}
		var u api.ServiceUpdate
		h, err := c.recv(&u)
		if err != nil || h.Seq != 1 || h.Error != "" || !u.IsSentinel() {
			t.Fatalf("first reply %+v %+v %v, want the sentinel", h, u, err)
		}
		for range 2 {
			if err := c.send("CloseStream", 1, struct{}{}); err != nil {
				t.Fatal(err)
			}
		}
		if err := c.send("CloseStream", 99, struct{}{}); err != nil {
			t.Fatal(err)
		}
		if err := c.send(api.MethodRegister, 2, api.Args{Name: "twice", Addr: "10.0.0.1:80"}); err != nil {
			t.Fatal(err)
		}
		// Exactly: the EOS of stream 1, then the reply of call 2. A second
		// EOS (or anything for seq 99) would come before the reply.
		h, err = c.recv(nil)
		if err != nil || h.Seq != 1 || h.Error != "EOS" {
			t.Fatalf("after CloseStream: %+v %v, want EOS of seq 1", h, err)
		}
		var addr string
		h, err = c.recv(&addr)
		if err != nil || h.Seq != 2 || h.Error != "" || addr != "10.0.0.1:80" {
			t.Fatalf("then: %+v %q %v, want the Register reply", h, addr, err)
		}
	})

	t.Run("client", func(t *testing.T) {
		c := mustDial(t, b.Addr, rpc.Gob)
		ch := make(chan *api.ServiceUpdate, 4)
		sc, err := c.Stream(t.Context(), api.MethodSubscribe, &api.Args{Name: "twice"}, ch)
		if err != nil {
			t.Fatal(err)
		}
		<-ch // the snapshot or the sentinel: the stream is running
		if err := sc.Close(); err != nil {
			t.Fatalf("first Close: %v", err)
		}
		if err := sc.Close(); err != nil {
			t.Fatalf("second Close: %v", err)
		}
		for range ch {
		}
		if err := sc.Err(); err != nil {
			t.Fatalf("stream ended with %v, want a clean end", err)
		}
		var addr string
		mustCall(t, c, api.MethodRegister, &api.Args{Name: "twice", Addr: "10.0.0.2:80"}, &addr)
	})
	b.stillServing(t)
}

// TestBadInputOversized: a message over 1 MiB closes the connection that
// sent it, before the agent reads it into memory; a large message under
// the limit is decoded and refused by validation, and that connection
// goes on. Other connections are unaffected.
func TestBadInputOversized(t *testing.T) {
	b := newBadInputNode(t)
	huge := strings.Repeat("x", api.MaxMessageSize+1)

	t.Run("gob", func(t *testing.T) {
		c := dialRaw(t, b.Addr)
		err := c.send(api.MethodRegister, 1, api.Args{Name: "web", Addr: "10.0.0.1:80", Attrs: map[string]string{"k": huge}})
		if err != nil && !isConnReset(err) {
			t.Fatal(err)
		}
		waitClosed(t, c)
		b.stillServing(t)
	})

	t.Run("gob, header only", func(t *testing.T) {
		c := dialRaw(t, b.Addr)
		if err := c.enc.Encode(reqHeader{ServiceMethod: huge, Seq: 1}); err != nil && !isConnReset(err) {
			t.Fatal(err)
		}
		waitClosed(t, c)
		b.stillServing(t)
	})

	t.Run("gob, a length prefix claiming 1 GiB", func(t *testing.T) {
		c := dialRaw(t, b.Addr)
		// A gob message starts with its length as an unsigned integer:
		// 0xFC then 4 big-endian bytes is 2^30. Nothing follows.
		if _, err := c.Write([]byte{0xFC, 0x40, 0x00, 0x00, 0x00}); err != nil {
			t.Fatal(err)
		}
		waitClosed(t, c)
		b.stillServing(t)
	})

	t.Run("json", func(t *testing.T) {
		conn, err := net.DialTimeout("tcp", b.Addr, wait)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		if _, err := upgrade(conn, "application/vnd.flynn.rpc-hijack+json"); err != nil {
			t.Fatal(err)
		}
		msg := fmt.Sprintf(`{"method":%q,"params":[{"Name":"web","Addr":"10.0.0.1:80","Attrs":{"k":%q}}],"id":1}`, api.MethodRegister, huge)
		if _, err := io.WriteString(conn, msg); err != nil && !isConnReset(err) {
			t.Fatal(err)
		}
		waitClosed(t, conn)
		b.stillServing(t)
	})

	// What the operator sees: one warning per connection closed.
	if n := b.Log.count("rpc: closing connection"); n < 4 {
		t.Errorf("%d warnings of closed connections in the log, want one per oversized message (4):\n%s", n, b.Log)
	}
	t.Logf("log: %s", lastLine(b.Log.String(), "rpc: closing connection"))

	t.Run("under the limit", func(t *testing.T) {
		c := dialRaw(t, b.Addr)
		big := strings.Repeat("x", api.MaxMessageSize-64<<10)
		if err := c.send(api.MethodRegister, 1, api.Args{Name: "web", Addr: "10.0.0.1:80", Attrs: map[string]string{"k": big}}); err != nil {
			t.Fatal(err)
		}
		h, err := c.recv(nil)
		if err != nil || h.Seq != 1 || !strings.HasPrefix(h.Error, "invalid_argument: ") {
			t.Fatalf("reply %+v %v, want invalid_argument", h, err)
		}
		var addr string
		if err := c.send(api.MethodRegister, 2, api.Args{Name: "web", Addr: "10.0.0.1:80"}); err != nil {
			t.Fatal(err)
		}
		if h, err := c.recv(&addr); err != nil || h.Error != "" {
			t.Fatalf("the connection does not go on: %+v %v", h, err)
		}
	})
}

// TestBadInputMalformed: bytes that are not the protocol close that
// connection only.
func TestBadInputMalformed(t *testing.T) {
	b := newBadInputNode(t)
	var valid bytes.Buffer
	enc := gob.NewEncoder(&valid)
	enc.Encode(reqHeader{ServiceMethod: api.MethodRegister, Seq: 1})
	enc.Encode(api.Args{Name: "web", Addr: "10.0.0.1:80"})
	for _, tc := range []struct {
		what string
		data []byte
	}{
		// A gob message is its length then its bytes; these claim 4 bytes
		// that decode to nothing a gob stream may hold.
		{"garbage", []byte("\x04\xff\xfe\xfd\xfcGET / HTTP/1.1\r\n\r\n")},
		{"a header of the wrong type", func() []byte {
			var buf bytes.Buffer
			gob.NewEncoder(&buf).Encode(struct{ ServiceMethod int }{7})
			return buf.Bytes()
		}()},
		{"a body of the wrong type", func() []byte {
			var buf bytes.Buffer
			e := gob.NewEncoder(&buf)
			e.Encode(reqHeader{ServiceMethod: api.MethodRegister, Seq: 1})
			e.Encode(struct{ Name []int }{[]int{1}})
			return append(buf.Bytes(), valid.Bytes()...)
		}()},
		{"a valid request with its last byte flipped", func() []byte {
			d := bytes.Clone(valid.Bytes())
			d[len(d)-1] ^= 0xff
			return append(d, 0x01, 0xff, 0xff)
		}()},
	} {
		t.Run(tc.what, func(t *testing.T) {
			conn, err := net.DialTimeout("tcp", b.Addr, wait)
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			c := upgradeRaw(t, conn)
			if _, err := c.Write(tc.data); err != nil {
				t.Fatal(err)
			}
			// The agent may answer what it could decode, then it closes.
			c.SetReadDeadline(time.Now().Add(wait))
			for {
				var h respHeader
				if err := c.dec.Decode(&h); err != nil {
					if ne, ok := err.(net.Error); ok && ne.Timeout() {
						t.Fatalf("the connection is still open after %v", wait)
					}
					break
				}
				if h.Error == "" {
					t.Fatalf("a malformed request was served: %+v", h)
				}
				if err := c.dec.DecodeValue(reflect.Value{}); err != nil {
					break
				}
			}
			b.stillServing(t)
		})
	}
}

func isConnReset(err error) bool {
	var ne *net.OpError
	return errors.As(err, &ne) || errors.Is(err, io.ErrClosedPipe)
}

// lastLine returns the last line of log that contains substr.
func lastLine(log, substr string) string {
	var last string
	for line := range strings.Lines(log) {
		if strings.Contains(line, substr) {
			last = strings.TrimSpace(line)
		}
	}
	return last
}
