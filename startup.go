package main

import (
	"fmt"
	"log/slog"
	"net/http"
	"sync/atomic"
	"syscall"

	"github.com/flynn/discoverd/server"
)

// Descriptor budget. The agent raises its soft RLIMIT_NOFILE to the hard
// limit, then leaves client connections (-max-conns, by default) what is
// left after a reserve for everything else: the embedded etcd (WAL
// segments, database, snapshots, its listeners and the agent's own client
// connections to it), an external store's clients, the listener, logs,
// and the refused connections being answered.
const (
	// reserveFixed is the part of the reserve that does not grow with the
	// limit. A fresh embedded etcd with its client uses about 40.
	reserveFixed = 96
	// reserveShare is the part that does: 1/reserveShare of the limit.
	reserveShare = 8
	// minConns is the smallest cap the agent sets by itself.
	minConns = 16
	// maxDefaultConns is the largest: each idle upgraded connection costs
	// about 26 KiB (docs/BENCHMARKS.md, scenario 7), so a cap derived from
	// a hard limit of a million descriptors would let one client take
	// gigabytes and get the agent OOM-killed. 16,384 connections are at
	// most about 430 MiB. -max-conns sets more.
	maxDefaultConns = 16384
)

// raiseFileLimit raises the soft RLIMIT_NOFILE to the hard limit and
// returns the soft limit in force.
func raiseFileLimit() (uint64, error) {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return 0, fmt.Errorf("getrlimit: %w", err)
	}
	if lim.Cur < lim.Max {
		raised := lim
		raised.Cur = lim.Max
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &raised); err != nil {
			return lim.Cur, fmt.Errorf("raising the soft descriptor limit from %d to %d: %w", lim.Cur, lim.Max, err)
		}
		lim = raised
	}
	return lim.Cur, nil
}

// connBudget is the default cap on client connections for a descriptor
// limit: the limit less the reserve, at least minConns and at most
// maxDefaultConns.
func connBudget(limit uint64) int {
	reserve := reserveFixed + limit/reserveShare + server.DefaultMaxRefusing
	if limit <= reserve+minConns {
		return minConns
	}
	return int(min(limit-reserve, maxDefaultConns))
}

// connLimit raises the descriptor limit and returns the cap on client
// connections: m.MaxConns if set, else connBudget of the limit.
func (m *Main) connLimit() int {
	limit, err := raiseFileLimit()
	if err != nil {
		m.Logger.Warn("cannot raise the descriptor limit", "err", err)
	}
	budget := minConns
	if limit > 0 {
		budget = connBudget(limit)
	}
	max := m.MaxConns
	switch {
	case max <= 0:
		max = budget
		if limit > 0 && limit <= reserveFixed+limit/reserveShare+server.DefaultMaxRefusing+minConns {
			m.Logger.Warn("descriptor limit too low for the store and clients; raise ulimit -n", "limit", limit, "max_conns", max)
		}
	case max > budget:
		m.Logger.Warn("-max-conns leaves too few descriptors for the store; client connections may starve it",
			"max_conns", max, "descriptor_limit", limit, "suggested_max", budget)
	}
	m.Logger.Debug("descriptor budget", "limit", limit, "max_conns", max)
	return max
}

// swapHandler serves the handler last stored: the start-up handler, then
// the agent's.
type swapHandler struct{ h atomic.Pointer[http.Handler] }

func (s *swapHandler) set(h http.Handler) { s.h.Store(&h) }

func (s *swapHandler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	(*s.h.Load()).ServeHTTP(w, r)
}

// fatalExit returns the embedded.Config.OnFatal of run: one line
// "discoverd: <reason>" on stderr, then exit status 1.
func fatalExit(log *slog.Logger, stderr interface{ Write([]byte) (int, error) }, exit func(int)) func(error) {
	return func(err error) {
		log.Error("discoverd stopping: the embedded etcd failed", "err", err)
		fmt.Fprintf(stderr, "discoverd: %v\n", oneLine(err))
		exit(1)
	}
}
