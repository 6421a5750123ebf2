package server

import (
	"context"
	"net/http"

	"github.com/flynn/discoverd/api"
	"github.com/flynn/discoverd/internal/buildinfo"
	"github.com/flynn/discoverd/ui"
)

// AgentInfo is the body of GET /agent: what the web console's agent panel
// shows, one consistent read of the agent's counters plus a store ping.
type AgentInfo struct {
	Version   string `json:"version"`
	Revision  string `json:"revision"` // 12 hex digits, "+dirty" if modified, "unknown" if not recorded
	GoVersion string `json:"go_version"`
	// Store names the store (Options.Store), "" when not set.
	Store string `json:"store"`
	// StoreHealth is "ok" when the store answered a ping within
	// HealthTimeout, "unavailable" when not (StoreError says why), the
	// same check as GET /health/ready.
	StoreHealth string `json:"store_health"`
	StoreError  string `json:"store_error,omitempty"`
	// Session is the agent's store session (etcd lease, ZooKeeper
	// session); null when the backend does not report it.
	Session    *SessionInfo `json:"session"`
	TTLSeconds float64      `json:"ttl_seconds"`
	// Registrations the agent holds, its sessions (RPC connections that
	// registered or subscribed, plus the HTTP one), open subscriptions
	// (RPC and SSE), SSE streams and backend watches, now.
	Registrations int `json:"registrations"`
	Sessions      int `json:"sessions"`
	Subscribers   int `json:"subscribers"`
	SSEStreams    int `json:"sse_streams"`
	Watches       int `json:"watches"`
	// Connections and ConnectionsLimit are the client connections served
	// now and their cap; both 0 when the server has no ConnLimiter.
	Connections      int `json:"connections"`
	ConnectionsLimit int `json:"connections_limit"`
}

// SessionInfo is the agent's store session in AgentInfo.
type SessionInfo struct {
	Live        bool   `json:"live"`
	Established uint64 `json:"established"`
	Repairs     uint64 `json:"repairs"`
	Lost        uint64 `json:"lost"`
}

// consoleRoutes mounts the web console at /ui/ and the agent summary it
// reads at /agent.
func (s *Server) consoleRoutes() {
	s.handle("GET /ui/", "/ui/", ui.Handler().ServeHTTP)
	s.handle("GET /agent", "/agent", s.getAgent)
}

// getAgent answers GET /agent with an AgentInfo. It is 200 even while the
// store is unreachable (that is in the body): the console shows an
// outage, it does not fail on one.
func (s *Server) getAgent(w http.ResponseWriter, r *http.Request) {
	build := buildinfo.Read()
	st := s.agent.Stats()
	info := AgentInfo{
		Version:       build.Version,
		Revision:      build.ShortRevision(),
		GoVersion:     build.GoVersion,
		Store:         s.opts.Store,
		StoreHealth:   "ok",
		TTLSeconds:    s.opts.TTL.Seconds(),
		Registrations: st.Registrations,
		Sessions:      st.Sessions,
		Subscribers:   st.Subscribers,
		Watches:       st.Watches,
	}
	if st.Store != nil {
		info.Session = &SessionInfo{Live: st.Store.Live, Established: st.Store.Established,
			Repairs: st.Store.Repairs, Lost: st.Store.Lost}
	}
	s.mu.Lock()
	info.SSEStreams = s.sseStreams
	s.mu.Unlock()
	if c := s.opts.Conns; c != nil {
		info.Connections, info.ConnectionsLimit = c.Open(), c.Max
	}
	ctx, cancel := context.WithTimeout(r.Context(), s.opts.HealthTimeout)
	defer cancel()
	if err := s.agent.Ping(ctx); err != nil {
		e := s.wireError("agent", err)
		if e.Code == api.CodeInternal {
			e = api.Errorf(api.CodeUnavailable, "store unreachable: %s", e.Message)
		}
		info.StoreHealth, info.StoreError = "unavailable", e.Message
	}
	writeJSON(w, http.StatusOK, info)
}
