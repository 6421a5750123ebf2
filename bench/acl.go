package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net/http"
	"sync/atomic"

	"github.com/flynn/discoverd/acl"
	"github.com/flynn/discoverd/rpc"
)

// ACLRun is one shape of the ACL scenario: registrations/s through an
// agent without an ACL and through one with an ACL file, alternating.
type ACLRun struct {
	Conns      int     `json:"conns"`
	PerConn    int     `json:"per_conn"`
	Tokens     int     `json:"tokens"` // entries in the ACL file
	OpenPerSec float64 `json:"open_per_sec"`
	ACLPerSec  float64 `json:"acl_per_sec"`
}

// ACLResult is the acl scenario (issue 15): the cost of token checks.
type ACLResult struct {
	Runs []ACLRun `json:"runs"`
}

// aclTokens is the number of tokens in the benchmark's ACL file; the
// benchmark's own token is the last entry, and every check compares
// against all of them (constant time).
const aclTokens = 100

// benchACL measures registrations/s through a fresh agent without an ACL
// and through a fresh agent with an ACL file of aclTokens tokens, whose
// connections carry a token that may register the names used, in
// alternating slices (same machine load for both).
func benchACL(ctx context.Context, env *env, cfg *config) (*ACLResult, error) {
	rules := acl.File{Anonymous: acl.Rules{Read: []string{"*"}}}
	for i := range aclTokens {
		sum := sha256.Sum256(fmt.Appendf(nil, "bench-token-%d", i))
		rules.Tokens = append(rules.Tokens, acl.Token{
			Name: fmt.Sprintf("bench-%d", i), SHA256: hex.EncodeToString(sum[:]),
			Rules: acl.Rules{Register: []string{fmt.Sprintf("other-%d", i), "bench-acl-*"}, Read: []string{"*"}},
		})
	}
	a, err := acl.Compile(rules)
	if err != nil {
		return nil, err
	}
	guard := new(atomic.Pointer[acl.ACL])
	guard.Store(a)
	token := fmt.Sprintf("bench-token-%d", aclTokens-1)

	res := &ACLResult{}
	for _, sh := range []shape{{conns: 1, perConn: 1}, {conns: 1, perConn: 64}} {
		run, err := aclShape(ctx, env, sh, cfg, guard, token)
		if err != nil {
			return res, err
		}
		res.Runs = append(res.Runs, run)
		env.row(Row{
			Scenario: "acl",
			Figure:   fmt.Sprintf("registrations/s with a %d-token ACL, %d conn × %d in flight", aclTokens, sh.conns, sh.perConn),
			Value:    fmt.Sprintf("%.0f/s", run.ACLPerSec),
			Etcd:     fmt.Sprintf("no ACL: %.0f/s", run.OpenPerSec),
			Ratio:    ratio(run.ACLPerSec, run.OpenPerSec),
		})
	}
	return res, nil
}

func aclShape(ctx context.Context, env *env, sh shape, cfg *config, guard *atomic.Pointer[acl.ACL], token string) (ACLRun, error) {
	run := ACLRun{Conns: sh.conns, PerConn: sh.perConn, Tokens: aclTokens}
	workers := sh.conns * sh.perConn
	var ops [2]int64
	var secs [2]float64
	var perOp [2]func(context.Context, int) error
	for i, opts := range []agentOptions{
		{MaxRegistrationsPerConn: 1 << 30},
		{MaxRegistrationsPerConn: 1 << 30, ACL: guard},
	} {
		la, err := startAgent(ctx, env.endpoints, opts, env.log)
		if err != nil {
			return run, err
		}
		d := &rpc.Dialer{}
		if opts.ACL != nil {
			d.Header = http.Header{"Authorization": {"Bearer " + token}}
		}
		dctx, cancel := context.WithTimeout(ctx, opTimeout)
		c, err := d.Dial(dctx, la.Addr(), rpc.Gob)
		cancel()
		if err != nil {
			la.Close()
			return run, fmt.Errorf("dial agent: %w", err)
		}
		defer closeAgentFirst(la, c)
		name := fmt.Sprintf("bench-acl-%d-%d-%d", sh.conns, sh.perConn, i)
		var seq atomic.Int64
		perOp[i] = func(ctx context.Context, _ int) error {
			return register(ctx, c, name, instanceAddr(int(seq.Add(1))), map[string]string{"v": "1"})
		}
	}
	for range throughputSlices {
		for i := range perOp {
			n, s, err := hammer(ctx, workers, cfg.Duration/throughputSlices, perOp[i])
			if err != nil {
				return run, err
			}
			ops[i] += n
			secs[i] += s
		}
	}
	run.OpenPerSec = float64(ops[0]) / secs[0]
	run.ACLPerSec = float64(ops[1]) / secs[1]
	return run, nil
}
