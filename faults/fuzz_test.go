package faults_test

import (
	"bytes"
	"context"
	"encoding/gob"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/url"
	"testing"

	"github.com/flynn/discoverd/agent"
	"github.com/flynn/discoverd/api"
	"github.com/flynn/discoverd/backend/etcd"
	"github.com/flynn/discoverd/backend/etcd/etcdtest"
	"github.com/flynn/discoverd/rpc"
	"github.com/flynn/discoverd/server"
)

// The decoders with fuzz targets in their own packages: the rpc server
// codecs (rpc: FuzzGobServerCodec, FuzzJSONServerCodec), Args validation,
// address expansion and error parsing (api: FuzzValidateArgs,
// FuzzExpandAddr, FuzzParseError). The two below cover what was left:
// the HTTP API's request decoding, through the public handler, and the
// rpc client's decoding of replies (what a client reads from an agent, or
// from anything listening where it thinks an agent is).

// FuzzHTTPPutBody sends PUT /services/{name}/instances/{addr} with
// arbitrary path values and body to the real HTTP handler of an agent on
// a real etcd. Whatever the input, the answer is JSON; a 2xx only for a
// request that validation accepts, and every error carries a known code.
// Seeds: testdata/fuzz/FuzzHTTPPutBody.
func FuzzHTTPPutBody(f *testing.F) {
	srv := etcdtest.NewServer(f)
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	b, err := etcd.Open(ctx, etcd.Config{Endpoints: srv.Endpoints(), TTL: ttl, Logger: quiet})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { b.Close() })
	a, err := agent.New(agent.Config{Backend: b, TTL: ttl, Logger: quiet})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { a.Close() })
	s, err := server.New(a, server.Options{Logger: quiet})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { s.Close() })

	f.Add("web", "10.0.0.1:80", []byte(`{"attrs":{"proto":"http"}}`))
	f.Fuzz(func(t *testing.T, name, addr string, body []byte) {
		path := "/services/" + url.PathEscape(name) + "/instances/" + url.PathEscape(addr)
		req, err := http.NewRequest(http.MethodPut, "http://agent"+path, bytes.NewReader(body))
		if err != nil {
			return // no client can send it
		}
		rec := httptest.NewRecorder()
		s.ServeHTTP(rec, req)
		switch {
		case rec.Code == http.StatusOK:
			var put struct{ Attrs map[string]string }
			if err := json.Unmarshal(body, &put); len(bytes.TrimSpace(body)) > 0 && err != nil {
				t.Fatalf("accepted a body that is not JSON: %q", body)
			}
			args := api.Args{Name: name, Addr: addr, Attrs: put.Attrs}
			if err := args.Validate(); err != nil {
				t.Fatalf("accepted %+v, which validation refuses: %v", args, err)
			}
			del := httptest.NewRecorder()
			s.ServeHTTP(del, httptest.NewRequest(http.MethodDelete, path, nil))
			if del.Code != http.StatusNoContent {
				t.Fatalf("DELETE after PUT: %d %s", del.Code, del.Body)
			}
		case rec.Code >= 300 && rec.Code < 400, rec.Code == http.StatusNotFound, rec.Code == http.StatusMethodNotAllowed:
			// The mux's own answers: a path it cleans (redirect) or does
			// not route ("." and ".." segments, for example).
		case rec.Code == http.StatusBadRequest, rec.Code == http.StatusRequestEntityTooLarge:
			var e server.ErrorBody
			if err := json.Unmarshal(rec.Body.Bytes(), &e); err != nil || e.Code != api.CodeInvalidArgument || e.Error == "" {
				t.Fatalf("%d with body %q, want an invalid_argument ErrorBody", rec.Code, rec.Body)
			}
		default:
			t.Fatalf("PUT %s with body %q: %d %s", path, body, rec.Code, rec.Body)
		}
	})
}

// FuzzRPCClientReplies feeds arbitrary bytes, as the replies of an agent,
// to an rpc client with a unary call and a stream in flight. Whatever the
// bytes, the client must not panic, must end the call and the stream, and
// must stop its reader once the bytes run out.
func FuzzRPCClientReplies(f *testing.F) {
	// Well-formed replies to both calls, in each codec.
	var g bytes.Buffer
	enc := gob.NewEncoder(&g)
	enc.Encode(respHeader{ServiceMethod: api.MethodRegister, Seq: 1})
	enc.Encode("10.0.0.1:80")
	enc.Encode(respHeader{ServiceMethod: api.MethodSubscribe, Seq: 2})
	enc.Encode(api.ServiceUpdate{Name: "web", Addr: "10.0.0.1:80", Online: true, Attrs: map[string]string{"k": "v"}, Created: 7})
	enc.Encode(respHeader{ServiceMethod: api.MethodSubscribe, Seq: 2})
	enc.Encode(api.ServiceUpdate{})
	enc.Encode(respHeader{ServiceMethod: api.MethodSubscribe, Seq: 2, Error: "EOS"})
	enc.Encode(struct{}{})
	f.Add(false, g.Bytes())
	f.Add(true, []byte(`{"id":1,"result":"10.0.0.1:80","error":null}
{"id":2,"result":{"Name":"web","Addr":"10.0.0.1:80","Online":true,"Attrs":{"k":"v"},"Created":7},"error":null}
{"id":2,"result":{},"error":null}
{"id":2,"result":null,"error":"resource_exhausted: too slow"}
`))
	f.Fuzz(func(t *testing.T, useJSON bool, data []byte) {
		codec := rpc.Gob
		if useJSON {
			codec = rpc.JSON
		}
		pr, pw := io.Pipe()
		c := rpc.NewClient(pipeConn{pr}, codec)
		var reply string
		call := c.Go(api.MethodRegister, &api.Args{Name: "web", Addr: "10.0.0.1:80"}, &reply, make(chan *rpc.Call, 1))
		ch := make(chan *api.ServiceUpdate, 4)
		sc, err := c.Stream(context.Background(), api.MethodSubscribe, &api.Args{Name: "web"}, ch)
		if err != nil {
			t.Fatal(err)
		}
		drained := make(chan struct{})
		go func() { // ends when the client closes ch
			defer close(drained)
			for range ch {
			}
		}()
		pw.Write(data)
		pw.Close()
		<-c.Done() // the reader saw the end of the bytes
		<-call.Done
		<-drained
		_ = sc.Err()
		if err := c.Close(); err != nil && !errors.Is(err, rpc.ErrShutdown) {
			t.Fatalf("Close: %v", err)
		}
	})
}

// pipeConn is the client's side of a connection whose replies come from
// a pipe; what the client writes is discarded.
type pipeConn struct{ r *io.PipeReader }

func (p pipeConn) Read(b []byte) (int, error)  { return p.r.Read(b) }
func (p pipeConn) Write(b []byte) (int, error) { return len(b), nil }
func (p pipeConn) Close() error                { return p.r.Close() }
