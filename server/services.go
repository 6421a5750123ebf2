package server

import (
	"context"
	"net/http"
	"strconv"

	"github.com/flynn/discoverd/api"
	"github.com/flynn/discoverd/backend"
)

// ServiceSummary is the JSON form of one service in GET /services.
type ServiceSummary struct {
	Name string `json:"name"`
	// Instances is the number of registrations in the store.
	Instances int `json:"instances"`
	// Leader and LeaderCreated are the address and Created of the oldest
	// registration (GET /services/{name}/leader has its attributes).
	Leader        string `json:"leader"`
	LeaderCreated uint   `json:"leader_created"`
	// Offline is the number of this agent's checked registrations of the
	// service that are not in the store now (offline, flapping, or not
	// yet written): with Instances, the service's total as this agent
	// sees it. Absent when zero.
	Offline int `json:"offline,omitempty"`
}

// ServiceList is the body of GET /services: one page of services, and
// the cursor of the next page ("" on the last page).
type ServiceList struct {
	Services []ServiceSummary `json:"services"`
	Next     string           `json:"next,omitempty"`
}

// opsRoutes mounts the operator endpoints: the service listing and the
// liveness and readiness probes.
func (s *Server) opsRoutes() {
	s.handle("GET /services", "/services", s.listServices)
	s.handle("GET /health/live", "/health/live", s.live)
	s.handle("GET /health/ready", "/health/ready", s.health)
}

// listServices answers GET /services?after=NAME&limit=N: up to limit
// (default and maximum backend.DefaultListLimit) services after the
// cursor, read from the store within CallTimeout. 501 when the store
// cannot list (Options.Services is nil).
func (s *Server) listServices(w http.ResponseWriter, r *http.Request) {
	if s.opts.Services == nil {
		writeJSON(w, http.StatusNotImplemented, ErrorBody{Error: "this agent's store cannot list services", Code: api.CodeInternal})
		return
	}
	q := r.URL.Query()
	limit := backend.DefaultListLimit
	if v := q.Get("limit"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > backend.DefaultListLimit {
			s.writeError(w, "list services", api.Errorf(api.CodeInvalidArgument,
				"limit %q: want a number from 1 to %d", v, backend.DefaultListLimit))
			return
		}
		limit = n
	}
	after := q.Get("after")
	if len(after) > api.MaxNameLen {
		s.writeError(w, "list services", api.Errorf(api.CodeInvalidArgument, "after: longer than a service name may be"))
		return
	}
	canRead, err := s.readable(r)
	if err != nil {
		s.writeError(w, "list services", err)
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), s.opts.CallTimeout)
	defer cancel()
	page, next, err := s.opts.Services.ListServices(ctx, after, limit)
	if err != nil {
		s.writeError(w, "list services", err)
		return
	}
	offline := s.offlineChecked()
	out := ServiceList{Services: make([]ServiceSummary, 0, len(page)), Next: next}
	for _, p := range page {
		if !canRead(p.Name) {
			continue
		}
		out.Services = append(out.Services, ServiceSummary{
			Name: p.Name, Instances: p.Instances, Leader: p.Leader.Addr, LeaderCreated: uint(p.Leader.Created),
			Offline: offline[p.Name],
		})
	}
	writeJSON(w, http.StatusOK, out)
}

// live answers GET /health/live: 200 while the agent serves, 503 once it
// is stopping. It does not look at the store: a store outage must not
// make an orchestrator restart every agent.
func (s *Server) live(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	closed := s.closed
	s.mu.Unlock()
	if closed {
		writeJSON(w, http.StatusServiceUnavailable, struct {
			Status string `json:"status"`
		}{"stopping"})
		return
	}
	writeJSON(w, http.StatusOK, struct {
		Status string `json:"status"`
	}{"ok"})
}

// InstanceOf is the JSON form of an instance, as every front end and the
// command-line client write it.
func InstanceOf(u api.ServiceUpdate) Instance { return instanceOf(u) }
