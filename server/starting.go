package server

import (
	"context"
	"errors"
	"log/slog"
	"net/http"

	"github.com/flynn/discoverd/api"
	"github.com/flynn/discoverd/rpc"
)

// Starting is the handler the agent's listener serves while its store is
// not ready yet, so that the port answers at once instead of hanging:
//
//   - GET /health and /health/ready: 503 {"status":"starting","error":...,
//     "code":"unavailable"}; GET /health/live: 200 {"status":"starting"};
//   - RPC (CONNECT /_goRPC_): the upgrade succeeds and every call of the
//     Agent service fails at once with "unavailable: agent is starting ...";
//     Close closes those connections, so that clients reconnect to the
//     agent proper;
//   - anything else: 503 with a JSON ErrorBody, code "unavailable".
//
// Its methods are safe for concurrent use.
type Starting struct {
	rpc *rpc.Server
	mux *http.ServeMux
}

// errStarting is what every call answers while the agent starts.
var errStarting = api.Errorf(api.CodeUnavailable, "agent is starting: its store is not ready yet")

// NewStarting returns the handler for the agent's start-up. Call Close once
// the agent proper serves the listener.
func NewStarting(log *slog.Logger) *Starting {
	if log == nil {
		log = slog.Default()
	}
	rs := rpc.NewServer()
	rs.Logger = log
	fail := func(context.Context, *api.Args, *struct{}) error { return errStarting }
	if err := errors.Join(
		rpc.RegisterUnary(rs, api.MethodRegister, func(context.Context, *api.Args, *string) error { return errStarting }),
		rpc.RegisterUnary(rs, api.MethodHeartbeat, fail),
		rpc.RegisterUnary(rs, api.MethodUnregister, fail),
		rpc.RegisterStream(rs, api.MethodSubscribe, func(context.Context, *api.Args, rpc.Stream) error { return errStarting }),
		rpc.RegisterStream(rs, api.MethodLeader, func(context.Context, *api.Args, rpc.Stream) error { return errStarting }),
	); err != nil {
		panic(err) // fixed method set: cannot fail
	}
	s := &Starting{rpc: rs, mux: http.NewServeMux()}
	s.mux.Handle("CONNECT "+rpc.DefaultPath, rs)
	notReady := func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusServiceUnavailable, healthBody{Status: "starting", Error: errStarting.Message, Code: errStarting.Code})
	}
	s.mux.HandleFunc("GET /health", notReady)
	s.mux.HandleFunc("GET /health/ready", notReady)
	// The process is alive and making progress (it gives up by itself
	// after -store-timeout): a liveness probe must not restart it.
	s.mux.HandleFunc("GET /health/live", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, struct {
			Status string `json:"status"`
		}{"starting"})
	})
	s.mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusServiceUnavailable, ErrorBody{Error: errStarting.Message, Code: errStarting.Code})
	})
	return s
}

// healthBody is the JSON body of GET /health when it is not 200.
type healthBody struct {
	Status string   `json:"status"`
	Error  string   `json:"error"`
	Code   api.Code `json:"code"`
}

// ServeHTTP answers as the type's comment says.
func (s *Starting) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	s.mux.ServeHTTP(w, r)
}

// Close closes the RPC connections upgraded during the start-up, and makes
// later upgrades through s fail. It waits for their goroutines, or for ctx
// to be done (then it returns ctx's error).
func (s *Starting) Close(ctx context.Context) error { return s.rpc.Close(ctx) }
