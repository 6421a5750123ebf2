package server

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/flynn/discoverd/api"
)

// jsonErrors rewrites the plain-text errors of http.ServeMux (404 for an
// unknown path, 405 for a known path with another method) into an
// ErrorBody, keeping their status and headers (Allow).
type jsonErrors struct {
	http.ResponseWriter
	method, path string
	done         bool // the JSON body is written; the text body is dropped
}

func (w *jsonErrors) WriteHeader(code int) {
	if w.done {
		return
	}
	if code < 400 {
		w.ResponseWriter.WriteHeader(code)
		return
	}
	w.done = true
	body := ErrorBody{Error: fmt.Sprintf("no route for %s %s", w.method, w.path), Code: api.CodeNotFound}
	if code == http.StatusMethodNotAllowed {
		body = ErrorBody{
			Error: fmt.Sprintf("method %s is not allowed on %s (allowed: %s)", w.method, w.path, w.Header().Get("Allow")),
			Code:  api.CodeInvalidArgument,
		}
	}
	h := w.Header()
	h.Del("Content-Length")
	h.Del("X-Content-Type-Options")
	writeJSON(w.ResponseWriter, code, body)
}

func (w *jsonErrors) Write(p []byte) (int, error) {
	if !w.done {
		w.WriteHeader(http.StatusOK)
		if !w.done {
			return w.ResponseWriter.Write(p)
		}
	}
	return len(p), nil
}

// limitBody bounds the time the request's body may take to arrive to
// BodyTimeout from now: a read after that fails, and so does the server's
// discarding of an unread body, so a client that stalls its body holds its
// connection no longer than that. Requests without a body (SSE streams
// among them) and RPC upgrades are left alone.
func (s *Server) limitBody(w http.ResponseWriter, r *http.Request) {
	if r.ContentLength == 0 || r.Method == http.MethodConnect {
		return
	}
	_ = http.NewResponseController(w).SetReadDeadline(time.Now().Add(s.opts.BodyTimeout))
}

// bodyTimedOut is a request body that did not arrive within BodyTimeout;
// it is answered 408 with CodeInvalidArgument.
type bodyTimedOut struct{ limit time.Duration }

func (e *bodyTimedOut) Error() string { return string(api.CodeInvalidArgument) + ": " + e.message() }

func (e *bodyTimedOut) message() string {
	return fmt.Sprintf("request body not received within %v", e.limit)
}

// readBody decodes the JSON request body into v. An empty body is "{}".
// The body is capped at MaxBodySize and must arrive within BodyTimeout;
// unknown fields, duplicate keys in any object and trailing data are
// errors. Content-Type is not checked: the body must be JSON whatever it
// says (curl -d sends application/x-www-form-urlencoded).
func (s *Server) readBody(w http.ResponseWriter, r *http.Request, v any) error {
	data, err := io.ReadAll(http.MaxBytesReader(w, r.Body, s.opts.MaxBodySize))
	if err != nil {
		var tooBig *http.MaxBytesError
		var ne net.Error
		switch {
		case errors.As(err, &tooBig):
			return &bodyTooLarge{limit: tooBig.Limit}
		case errors.As(err, &ne) && ne.Timeout():
			return &bodyTimedOut{limit: s.opts.BodyTimeout}
		}
		return api.Errorf(api.CodeInvalidArgument, "request body: %v", err)
	}
	if len(bytes.TrimSpace(data)) == 0 {
		return nil
	}
	if err := checkDuplicateKeys(data); err != nil {
		return api.Errorf(api.CodeInvalidArgument, "request body: %v", err)
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return api.Errorf(api.CodeInvalidArgument, "request body: %v", err)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return api.Errorf(api.CodeInvalidArgument, "request body: trailing data after the JSON object")
	}
	return nil
}

// checkDuplicateKeys returns an error naming the first key that appears
// twice in one JSON object of data (encoding/json would keep the last one
// silently). Syntax errors are left to the decoder that follows.
func checkDuplicateKeys(data []byte) error {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber()
	// One frame per open object or array: the keys seen, nil for an array.
	var stack []map[string]struct{}
	expectKey := false // the next string token of the top object is a key
	for {
		tok, err := dec.Token()
		if err != nil {
			return nil // EOF, or a syntax error the decoder will report
		}
		switch t := tok.(type) {
		case json.Delim:
			switch t {
			case '{':
				stack = append(stack, map[string]struct{}{})
				expectKey = true
			case '[':
				stack = append(stack, nil)
				expectKey = false
			default: // '}' or ']'
				stack = stack[:len(stack)-1]
				expectKey = len(stack) > 0 && stack[len(stack)-1] != nil
			}
			continue
		case string:
			if expectKey {
				keys := stack[len(stack)-1]
				if _, dup := keys[t]; dup {
					return fmt.Errorf("duplicate key %q in a JSON object", t)
				}
				keys[t] = struct{}{}
				expectKey = false
				continue
			}
		}
		// A value: in an object, a key comes next.
		expectKey = len(stack) > 0 && stack[len(stack)-1] != nil
	}
}

// httpQuota caps the HTTP registrations of each client address (IP). An
// HTTP registration lives for the TTL after its last PUT, so the address
// holds the distinct registrations it PUT within the last TTL: those are
// what count. The shared HTTP session still caps them all together
// (MaxHTTPRegistrations).
type httpQuota struct {
	max int
	ttl time.Duration
	now func() time.Time

	mu      sync.Mutex
	byAddr  map[string]map[httpKey]time.Time // client address → key → last PUT
	owner   map[httpKey]string               // key → the address of its last PUT
	sweepAt int                              // sweep all when owner grows to this
}

type httpKey struct{ name, addr string }

func newHTTPQuota(max int, ttl time.Duration) *httpQuota {
	return &httpQuota{max: max, ttl: ttl, now: time.Now, sweepAt: 1024,
		byAddr: make(map[string]map[httpKey]time.Time), owner: make(map[httpKey]string)}
}

// clientAddr is the IP of the request's client ("" if unknown).
func clientAddr(r *http.Request) string {
	host, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		return r.RemoteAddr
	}
	return host
}

// admit counts a PUT of k from client against its cap. It returns a
// function that undoes the count when the registration then fails (nil
// when there is nothing to undo), or an error with CodeResourceExhausted
// when client already holds max other registrations.
func (q *httpQuota) admit(client string, k httpKey) (undo func(), err error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	now := q.now()
	if len(q.owner) >= q.sweepAt {
		q.sweepLocked(now)
		q.sweepAt = max(1024, 2*len(q.owner))
	}
	keys := q.byAddr[client]
	if _, ok := keys[k]; ok {
		keys[k] = now
		return nil, nil
	}
	live := 0
	for key, t := range keys {
		if now.Sub(t) > q.ttl {
			q.dropLocked(client, key)
		} else {
			live++
		}
	}
	if live >= q.max {
		return nil, api.Errorf(api.CodeResourceExhausted,
			"client %s already holds %d HTTP registrations, the limit per client address", client, q.max)
	}
	if prev, ok := q.owner[k]; ok {
		q.dropLocked(prev, k)
	}
	if q.byAddr[client] == nil {
		q.byAddr[client] = make(map[httpKey]time.Time)
	}
	q.byAddr[client][k] = now
	q.owner[k] = client
	return func() { q.forget(k) }, nil
}

// forget drops k (unregistered, or its registration failed).
func (q *httpQuota) forget(k httpKey) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if client, ok := q.owner[k]; ok {
		q.dropLocked(client, k)
	}
}

func (q *httpQuota) dropLocked(client string, k httpKey) {
	delete(q.byAddr[client], k)
	if len(q.byAddr[client]) == 0 {
		delete(q.byAddr, client)
	}
	if q.owner[k] == client {
		delete(q.owner, k)
	}
}

// sweepLocked forgets the keys not PUT within the TTL, so that the quota's
// memory follows the live registrations. admit calls it whenever the keys
// tracked have doubled since the last sweep (amortised O(1) per PUT).
func (q *httpQuota) sweepLocked(now time.Time) {
	for client, keys := range q.byAddr {
		for k, t := range keys {
			if now.Sub(t) > q.ttl {
				q.dropLocked(client, k)
			}
		}
	}
}
