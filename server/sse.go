package server

import (
	"context"
	"encoding/json"
	"errors"
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
	if !s.track() {
		s.writeError(w, op, api.Errorf(api.CodeUnavailable, "agent is shutting down"))
		return
	}
	defer s.wg.Done()
	if !s.acquireSSE() {
		s.writeError(w, op, api.Errorf(api.CodeResourceExhausted,
			"the agent already serves %d event streams, the limit", s.opts.MaxSSEStreams))
		return
	}
	defer s.releaseSSE()
	if sw, ok := w.(*statusWriter); ok {
		sw.stream = true
	}

	ctx, cancel := context.WithCancel(r.Context())
	defer cancel()
	stop := context.AfterFunc(s.ctx, cancel) // Close ends the stream
	defer stop()

	sub, err := open(ctx, name)
	if err != nil {
		s.writeError(w, op, err)
		return
	}
	defer sub.Close()

	rc := http.NewResponseController(w)
	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache")
	h.Set("X-Accel-Buffering", "no") // tell nginx not to buffer the stream
	w.WriteHeader(http.StatusOK)
	defer rc.SetWriteDeadline(time.Time{}) // do not leave a deadline on a kept-alive conn
	send := func(b []byte) error {
		_ = rc.SetWriteDeadline(time.Now().Add(s.opts.WriteTimeout)) // unsupported: rely on ctx
		if _, err := w.Write(b); err != nil {
			return err
		}
		return rc.Flush()
	}
	if err := rc.Flush(); err != nil {
		s.log.Warn("sse: response cannot be flushed; ending stream", "err", err)
		return
	}
	s.metrics.sseStreams.Inc()
	defer s.metrics.sseStreams.Dec()

	var id uint64
	var buf []byte
	for {
		nctx, ncancel := context.WithTimeout(ctx, s.opts.SSEKeepAlive)
		u, err := sub.Next(nctx)
		ncancel()
		if err != nil {
			switch {
			case ctx.Err() != nil:
				return // the client left or the server closes
			case errors.Is(err, context.DeadlineExceeded):
				if send([]byte(": keep-alive\n\n")) != nil {
					return
				}
				continue
			}
			e := s.wireError(op, err)
			data, _ := json.Marshal(ErrorBody{Error: e.Message, Code: e.Code})
			_ = send(append(append([]byte("event: error\ndata: "), data...), "\n\n"...))
			return
		}
		id++
		ev, v := event(u)
		data, err := json.Marshal(v)
		if err != nil { // cannot happen for these types
			s.log.Error("sse: encode event", "err", err)
			return
		}
		buf = append(buf[:0], "id: "...)
		buf = strconv.AppendUint(buf, id, 10)
		buf = append(buf, "\nevent: "...)
		buf = append(buf, ev...)
		buf = append(buf, "\ndata: "...)
		buf = append(buf, data...)
		buf = append(buf, "\n\n"...)
		if send(buf) != nil {
			return
		}
	}
}
