package server

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"net/http"
	"strconv"
	"time"

	"github.com/flynn/discoverd/agent"
	"github.com/flynn/discoverd/api"
)

// An eventFunc names the SSE event for an update and gives its JSON data.
type eventFunc func(u api.ServiceUpdate) (event string, data any)

// subscribeEvent: "online" and "offline" for instances, "current" for the
// sentinel that ends the snapshot.
func subscribeEvent(u api.ServiceUpdate) (string, any) {
	switch {
	case u.IsSentinel():
		return "current", struct{}{}
	case u.Online:
		return "online", instanceOf(u)
	default:
		return "offline", instanceOf(u)
	}
}

// leaderEvent: "leader" with the instance, or with null when there is no
// leader.
func leaderEvent(u api.ServiceUpdate) (string, any) {
	if u.IsSentinel() {
		return "leader", nil
	}
	return "leader", instanceOf(u)
}

// acquireSSE reserves one of the server's MaxSSEStreams slots, reporting
// false when they are all taken; releaseSSE gives it back.
func (s *Server) acquireSSE() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.sseStreams >= s.opts.MaxSSEStreams {
		return false
	}
	s.sseStreams++
	return true
}

func (s *Server) releaseSSE() {
	s.mu.Lock()
	s.sseStreams--
	s.mu.Unlock()
}

// serveSSE streams an agent subscription as Server-Sent Events. Each event
// has an id, counting from 1 in each stream. Last-Event-ID is not honoured:
// the agent keeps no history to resume from, so every (re)connection
// starts over with the full snapshot, which is correct, just not minimal.
// At most MaxSSEStreams run at once; one more is answered 429. The stream
// ends when the client goes away, when the server closes, when
// a write blocks longer than WriteTimeout, or when the agent ends the
// subscription (a slow client is cut off by the agent's bounded queue);
// in the last case an "error" event carries the reason.
func (s *Server) serveSSE(w http.ResponseWriter, r *http.Request, op, name string,
	open func(context.Context, string) (*agent.Subscription, error), event eventFunc) {
	release, ok := s.admitSSE(w, op)
	if !ok {
		return
	}
	defer release()

	ctx, cancel := context.WithCancel(r.Context())
	defer cancel()
	defer context.AfterFunc(s.ctx, cancel)() // Close ends the stream
	sub, err := open(ctx, name)
	if err != nil {
		s.writeError(w, op, err)
		return
	}
	defer sub.Close()

	out, err := s.startEvents(w)
	defer out.end()
	if err != nil {
		s.log.Warn("sse: response cannot be flushed; ending stream", "err", err)
		return
	}
	s.metrics.sseStreams.Inc()
	defer s.metrics.sseStreams.Dec()
	s.pumpSSE(ctx, op, sub, out, event)
}

// admitSSE counts the stream among the server's goroutines and takes one
// of its MaxSSEStreams slots, or answers why not (503 while closing, 429
// at the limit). The caller calls release when the stream ends.
func (s *Server) admitSSE(w http.ResponseWriter, op string) (release func(), ok bool) {
	if !s.track() {
		s.writeError(w, op, api.Errorf(api.CodeUnavailable, "agent is shutting down"))
		return nil, false
	}
	if !s.acquireSSE() {
		s.writeError(w, op, api.Errorf(api.CodeResourceExhausted,
			"the agent already serves %d event streams, the limit", s.opts.MaxSSEStreams))
		s.wg.Done()
		return nil, false
	}
	if sw, ok := w.(*statusWriter); ok {
		sw.stream = true
	}
	return func() { s.releaseSSE(); s.wg.Done() }, true
}

// startEvents answers 200 with the event-stream headers and flushes them.
// The caller calls end on the writer, whatever the error.
func (s *Server) startEvents(w http.ResponseWriter) (*sseWriter, error) {
	out := &sseWriter{w: w, rc: http.NewResponseController(w), timeout: s.opts.WriteTimeout, log: s.log}
	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache")
	h.Set("X-Accel-Buffering", "no") // tell nginx not to buffer the stream
	w.WriteHeader(http.StatusOK)
	return out, out.rc.Flush()
}

// pumpSSE writes each update of sub as an event until the client leaves,
// the server closes, a write fails, or the agent ends the subscription (an
// "error" event then says why). A quiet stream gets a keep-alive comment
// every SSEKeepAlive.
func (s *Server) pumpSSE(ctx context.Context, op string, sub *agent.Subscription, out *sseWriter, event eventFunc) {
	for {
		nctx, ncancel := context.WithTimeout(ctx, s.opts.SSEKeepAlive)
		u, err := sub.Next(nctx)
		ncancel()
		switch {
		case err == nil:
			err = out.event(event(u))
		case ctx.Err() != nil:
			return // the client left or the server closes
		case errors.Is(err, context.DeadlineExceeded):
			err = out.send([]byte(": keep-alive\n\n"))
		default:
			e := s.wireError(op, err)
			_ = out.write("error", ErrorBody{Error: e.Message, Code: e.Code}, false)
			return
		}
		if err != nil {
			return
		}
	}
}

// sseWriter writes the events of one stream, each flushed and each write
// bounded by timeout.
type sseWriter struct {
	w       http.ResponseWriter
	rc      *http.ResponseController
	timeout time.Duration
	log     *slog.Logger
	id      uint64 // of the last event
	buf     []byte
}

// event writes the next event, with the next id.
func (o *sseWriter) event(name string, v any) error { return o.write(name, v, true) }

// write writes one event of the given name with v as JSON data, and an id
// when withID.
func (o *sseWriter) write(name string, v any, withID bool) error {
	data, err := json.Marshal(v)
	if err != nil { // cannot happen for these types
		o.log.Error("sse: encode event", "err", err)
		return err
	}
	o.buf = o.buf[:0]
	if withID {
		o.id++
		o.buf = append(o.buf, "id: "...)
		o.buf = strconv.AppendUint(o.buf, o.id, 10)
		o.buf = append(o.buf, '\n')
	}
	o.buf = append(o.buf, "event: "...)
	o.buf = append(o.buf, name...)
	o.buf = append(o.buf, "\ndata: "...)
	o.buf = append(o.buf, data...)
	o.buf = append(o.buf, "\n\n"...)
	return o.send(o.buf)
}

// send writes b and flushes it within the write timeout (where the
// connection supports deadlines; the request's context bounds it anyway).
func (o *sseWriter) send(b []byte) error {
	_ = o.rc.SetWriteDeadline(time.Now().Add(o.timeout))
	if _, err := o.w.Write(b); err != nil {
		return err
	}
	return o.rc.Flush()
}

// end clears the write deadline: a kept-alive connection must not keep it.
func (o *sseWriter) end() { _ = o.rc.SetWriteDeadline(time.Time{}) }
