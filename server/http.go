package server

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"mime"
	"net/http"
	"strings"

	"github.com/flynn/discoverd/api"
	"github.com/flynn/discoverd/rpc"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Instance is the JSON form of one registration in the HTTP API.
type Instance struct {
	Name    string            `json:"name"`
	Addr    string            `json:"addr"`
	Attrs   map[string]string `json:"attrs"`
	Created uint              `json:"created"`
	// Check is the status of a checked registration (CLI "services
	// -json"); absent otherwise.
	Check *api.CheckStatus `json:"check,omitempty"`
}

func instanceOf(u api.ServiceUpdate) Instance {
	attrs := u.Attrs
	if attrs == nil {
		attrs = map[string]string{}
	}
	return Instance{Name: u.Name, Addr: u.Addr, Attrs: attrs, Created: u.Created}
}

// ErrorBody is the JSON body of every HTTP error.
type ErrorBody struct {
	Error string   `json:"error"`
	Code  api.Code `json:"code"`
}

// putBody is the JSON body of PUT /services/{name}/instances/{addr}.
type putBody struct {
	Attrs map[string]string `json:"attrs"`
	Check *api.Check        `json:"check"` // a checked registration, kept by the agent (checks.go)
}

func (s *Server) routes() {
	s.mux.Handle(http.MethodConnect+" "+rpc.DefaultPath, s.rpc)
	s.handle("GET /services/{name}", "/services/{name}", s.getServices)
	s.handle("GET /services/{name}/leader", "/services/{name}/leader", s.getLeader)
	s.handle("PUT /services/{name}/instances/{addr}", "/services/{name}/instances/{addr}", s.putInstance)
	s.handle("DELETE /services/{name}/instances/{addr}", "/services/{name}/instances/{addr}", s.deleteInstance)
	s.handle("GET /health", "/health", s.health)
	s.checkRoutes()
	s.opsRoutes()
	s.consoleRoutes() // GET /ui/ (web console), GET /agent
	s.handle("GET /metrics", "/metrics", promhttp.HandlerFor(s.metrics.reg, promhttp.HandlerOpts{
		ErrorLog: slogPrinter{s.log},
	}).ServeHTTP)
}

// handle mounts h at pattern, counting its requests under route.
func (s *Server) handle(pattern, route string, h http.HandlerFunc) {
	s.mux.Handle(pattern, s.metrics.instrument(route, s.authorize(pattern, h)))
}

// pathName returns the service name of r's path, or writes the error for
// a bad one: the HTTP edge checks names, the agent trusts them.
func (s *Server) pathName(w http.ResponseWriter, r *http.Request, op string) (string, bool) {
	name := r.PathValue("name")
	if err := api.ValidateName(name); err != nil {
		s.writeError(w, op, err)
		return "", false
	}
	return name, true
}

// getServices answers GET /services/{name}: the online instances, oldest
// first, or an SSE stream of them when the client accepts
// text/event-stream.
func (s *Server) getServices(w http.ResponseWriter, r *http.Request) {
	name, ok := s.pathName(w, r, "list instances")
	if !ok {
		return
	}
	if wantsEventStream(r) {
		s.serveSSE(w, r, "subscribe", name, s.agent.Subscribe, subscribeEvent)
		return
	}
	ups, err := s.agent.Instances(r.Context(), name)
	if err != nil {
		s.writeError(w, "list instances", err)
		return
	}
	list := make([]Instance, 0, len(ups))
	for _, u := range ups {
		list = append(list, instanceOf(u))
	}
	writeJSON(w, http.StatusOK, list)
}

// getLeader answers GET /services/{name}/leader: the leader, 404 when there
// is none, or an SSE stream of leader changes.
func (s *Server) getLeader(w http.ResponseWriter, r *http.Request) {
	name, ok := s.pathName(w, r, "leader")
	if !ok {
		return
	}
	if wantsEventStream(r) {
		s.serveSSE(w, r, "leader", name, s.agent.Leader, leaderEvent)
		return
	}
	u, ok, err := s.agent.LeaderOf(r.Context(), name)
	if err != nil {
		s.writeError(w, "leader", err)
		return
	}
	if !ok {
		s.writeError(w, "leader", api.Errorf(api.CodeNotFound, "service %q has no leader: no instance is online", name))
		return
	}
	writeJSON(w, http.StatusOK, instanceOf(u))
}

// putInstance answers PUT /services/{name}/instances/{addr}: it registers
// the instance on the shared HTTP session, or heartbeats it and replaces
// its attributes. The registration expires one TTL after the last PUT.
func (s *Server) putInstance(w http.ResponseWriter, r *http.Request) {
	var body putBody
	if err := s.readBody(w, r, &body); err != nil {
		s.writeError(w, "register", err)
		return
	}
	args := api.Args{Name: r.PathValue("name"), Addr: r.PathValue("addr"), Attrs: body.Attrs}
	if err := args.ValidateRegister(); err != nil {
		s.writeError(w, "register", err)
		return
	}
	if body.Check != nil {
		args.Check = body.Check
		s.addChecked(w, r, args)
		return
	}
	if s.isChecked(args.Name, args.Addr) {
		s.writeError(w, "register", api.Errorf(api.CodeConflict, "%s/%s is a checked registration: PUT it with its check to update it, or DELETE it", args.Name, args.Addr))
		return
	}
	undo, err := s.httpQuota.admit(clientAddr(r), httpKey{args.Name, args.Addr})
	if err != nil {
		s.writeError(w, "register", err)
		return
	}
	addr, err := s.httpSession.Register(r.Context(), args)
	if err != nil {
		if undo != nil {
			undo()
		}
		s.writeError(w, "register", err)
		return
	}
	writeJSON(w, http.StatusOK, struct {
		Name string `json:"name"`
		Addr string `json:"addr"`
	}{args.Name, addr})
}

// deleteInstance answers DELETE /services/{name}/instances/{addr}.
func (s *Server) deleteInstance(w http.ResponseWriter, r *http.Request) {
	args := api.Args{Name: r.PathValue("name"), Addr: r.PathValue("addr")}
	if err := args.ValidateKey(); err != nil {
		s.writeError(w, "unregister", err)
		return
	}
	if s.isChecked(args.Name, args.Addr) {
		if err := s.opts.Checks.Remove(r.Context(), args.Name, args.Addr); err != nil {
			s.writeError(w, "unregister", err)
			return
		}
		w.WriteHeader(http.StatusNoContent)
		return
	}
	if err := s.httpSession.Unregister(r.Context(), args); err != nil {
		s.writeError(w, "unregister", err)
		return
	}
	s.httpQuota.forget(httpKey{args.Name, args.Addr})
	w.WriteHeader(http.StatusNoContent)
}

// health answers GET /health and GET /health/ready (readiness): 200 when
// the agent reaches its store, 503 with the reason when not.
func (s *Server) health(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := context.WithTimeout(r.Context(), s.opts.HealthTimeout)
	defer cancel()
	if err := s.agent.Ping(ctx); err != nil {
		e := s.wireError("health", err)
		if e.Code == api.CodeInternal {
			e = api.Errorf(api.CodeUnavailable, "store unreachable: %s", e.Message)
		}
		writeJSON(w, http.StatusServiceUnavailable, healthBody{Status: "unavailable", Error: e.Message, Code: e.Code})
		return
	}
	writeJSON(w, http.StatusOK, struct {
		Status string `json:"status"`
	}{"ok"})
}

// bodyTooLarge is a request body over MaxBodySize; it is answered with 413
// and CodeInvalidArgument.
type bodyTooLarge struct{ limit int64 }

func (e *bodyTooLarge) Error() string { return string(api.CodeInvalidArgument) + ": " + e.message() }

func (e *bodyTooLarge) message() string {
	return fmt.Sprintf("request body is larger than the limit of %d bytes", e.limit)
}

// writeError sends err as an ErrorBody with the status of its code.
func (s *Server) writeError(w http.ResponseWriter, op string, err error) {
	var tooBig *bodyTooLarge
	if errors.As(err, &tooBig) {
		writeJSON(w, http.StatusRequestEntityTooLarge, ErrorBody{Error: tooBig.message(), Code: api.CodeInvalidArgument})
		return
	}
	var tooSlow *bodyTimedOut
	if errors.As(err, &tooSlow) {
		writeJSON(w, http.StatusRequestTimeout, ErrorBody{Error: tooSlow.message(), Code: api.CodeInvalidArgument})
		return
	}
	e := s.wireError(op, err)
	writeJSON(w, statusOf(e.Code), ErrorBody{Error: e.Message, Code: e.Code})
}

// statusOf maps an error code to an HTTP status.
func statusOf(c api.Code) int {
	switch c {
	case api.CodeInvalidArgument:
		return http.StatusBadRequest
	case api.CodeNotFound:
		return http.StatusNotFound
	case api.CodeResourceExhausted:
		return http.StatusTooManyRequests
	case api.CodeUnavailable:
		return http.StatusServiceUnavailable
	case api.CodePermissionDenied:
		return http.StatusForbidden
	case api.CodeConflict:
		return http.StatusConflict
	default:
		return http.StatusInternalServerError
	}
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v) // a write error means the client left
}

// wantsEventStream reports whether the Accept header names
// text/event-stream.
func wantsEventStream(r *http.Request) bool {
	for _, v := range r.Header.Values("Accept") {
		for part := range strings.SplitSeq(v, ",") {
			if mt, _, err := mime.ParseMediaType(strings.TrimSpace(part)); err == nil && mt == "text/event-stream" {
				return true
			}
		}
	}
	return false
}

// statusWriter records the status of a response for the metrics. It
// unwraps for http.ResponseController (Flush, write deadlines).
type statusWriter struct {
	http.ResponseWriter
	status int
	stream bool // an SSE stream: its duration is not a latency
}

func (w *statusWriter) WriteHeader(code int) {
	if w.status == 0 {
		w.status = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Write(p []byte) (int, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	return w.ResponseWriter.Write(p)
}

func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// slogPrinter adapts a slog.Logger to promhttp's Println logger.
type slogPrinter struct {
	log interface{ Error(string, ...any) }
}

func (p slogPrinter) Println(v ...any) {
	p.log.Error("metrics", "err", strings.TrimSpace(fmt.Sprint(v...)))
}
