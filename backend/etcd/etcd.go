// Package etcd is discoverd's etcd v3 backend. It links only etcd's
// client; an etcd server run inside the process (the agent's zero-setup
// mode and every test's store) is package embedded.
//
//	srv, err := embedded.Start(ctx, embedded.Config{Dir: dir})
//	if err != nil {
//		return err
//	}
//	defer srv.Close()
//	b, err := etcd.Open(ctx, etcd.Config{Endpoints: srv.Endpoints(), TTL: 10 * time.Second})
//	if err != nil {
//		return err
//	}
//	defer b.Close() // revokes the lease: every registration is gone at once
//	err = b.Register(ctx, "web", "10.0.0.1:80", map[string]string{"v": "1"})
//
// Layout: each registration is the key <Prefix><name>/<addr> (Prefix is
// "/discoverd/services/" by default) holding the attributes and the
// fencing token as a JSON object (value.go). Every key a Backend writes is
// attached to its one lease, kept alive by one goroutine, so a dead
// agent's registrations vanish after the TTL and heartbeats cost the store
// one keepalive per TTL/3, whatever the number of registrations. An
// instance's Created is its fencing token: CreateRevision × 128 + the
// place of its creating put in its transaction (concurrent writes share
// etcd transactions), kept in the value when the key is written again
// (value.go). Every write is conditional on ownership (write.go), and the
// backend repairs drift on its lease once per TTL (anti-entropy).
package etcd

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"math"
	"slices"
	"strings"
	"sync"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap/zapcore"
	"google.golang.org/grpc"
	grpcbackoff "google.golang.org/grpc/backoff"

	"github.com/flynn/discoverd/api"
	"github.com/flynn/discoverd/api/retry"
	"github.com/flynn/discoverd/backend"
	"github.com/flynn/discoverd/backend/etcd/internal/zapslog"
	"github.com/flynn/discoverd/internal/keylock"
)

// DefaultPrefix is the key prefix under which registrations are stored.
const DefaultPrefix = "/discoverd/services/"

// Config configures a Backend.
type Config struct {
	// Endpoints are the client URLs of the etcd cluster. Required.
	Endpoints []string
	// TTL is how long the store keeps this backend's registrations after it
	// stops renewing its lease (it died or lost the store). It is rounded up
	// to whole seconds, at least 1 s; etcd may raise it to its minimum lease
	// TTL. Default api.DefaultTTL.
	TTL time.Duration
	// DialTimeout bounds Open's wait for the store and each Ping. Default 5 s.
	DialTimeout time.Duration
	// TLS, if set, is the client's TLS configuration (CAs of the servers,
	// client certificate) for https endpoints.
	TLS *tls.Config
	// Username and Password authenticate to etcd's RBAC. Without them,
	// and with a client certificate in TLS, etcd takes the certificate's
	// common name as the user. The user needs read and write on Prefix
	// only (etcd checks a lease revoke against the keys on the lease).
	Username, Password string
	// Prefix is the key prefix of registrations; it must end in "/".
	// Default DefaultPrefix. Backends share registrations only if they
	// share the prefix.
	Prefix string
	// Logger receives lease losses and recoveries, stream resyncs and the
	// etcd client's errors. Default slog.Default().
	Logger *slog.Logger
	// ReclaimAfter, when positive, says the backend is the store's only
	// user (an agent's embedded etcd): that long after Open, it revokes
	// every lease it was not granted, which removes what a previous run
	// of the agent left behind and no client registered again meanwhile
	// (a Register of such a key moves it onto the backend's lease).
	// etcd renews every lease to a full TTL when it restarts, so without
	// this those registrations would linger a TTL after the restart.
	// Never set it on a shared cluster.
	ReclaimAfter time.Duration
}

// Backend is a backend.Backend on etcd v3. Its methods are safe for
// concurrent use.
type Backend struct {
	client  *clientv3.Client
	prefix  string
	ttl     int64         // lease TTL in seconds
	dial    time.Duration // Config.DialTimeout
	attempt time.Duration // bound on each store call of the lease keeper
	log     *slog.Logger

	ctx    context.Context // cancelled by Close and Abandon
	cancel context.CancelFunc
	wg     sync.WaitGroup // the lease keeper
	writes *batcher       // Register's puts and Unregister's deletes

	lost chan struct{} // a writer found the lease missing; capacity 1

	mu       sync.Mutex
	closed   bool
	lease    clientv3.LeaseID              // 0 while a lost lease is being replaced
	ready    chan struct{}                 // closed when lease != 0
	pending  clientv3.LeaseID              // granted by the keeper, not yet published as lease
	regs     map[string]*reg               // remembered registrations, by key
	own      map[clientv3.LeaseID]struct{} // every lease granted to b: keys on them are b's
	streams  map[*stream]struct{}
	leases   uint64 // leases granted since Open (Open's, then each renewal)
	repairs  uint64 // anti-entropy fixes
	lostRegs uint64 // registrations dropped because another session took them over

	// The lease's trouble, for the streams' stall hold (stream.release):
	// its keepalives stopped being answered, and since when it is fine.
	stalled   bool
	recovered time.Time

	onLost func(name, addr string) // backend.LossNotifier

	// locks serialises the writers (Register, Unregister, the restore and
	// the anti-entropy) of one key, so that each starts from the outcome
	// of the one before and a retried write never overtakes a later call.
	locks keylock.Set[string]
}

var (
	_ backend.Backend         = (*Backend)(nil)
	_ backend.SessionReporter = (*Backend)(nil)
	_ backend.LossNotifier    = (*Backend)(nil)
	_ backend.Forgetter       = (*Backend)(nil)
	_ backend.Claimer         = (*Backend)(nil)
)

// Forget drops name/addr from what b holds, without a store call
// (backend.Forgetter): b's restores and anti-entropy no longer write it,
// and the anti-entropy deletes its key if it is still on b's lease.
func (b *Backend) Forget(name, addr string) {
	key := b.key(name, addr)
	b.mu.Lock()
	defer b.mu.Unlock()
	delete(b.regs, key)
}

// OnLost sets the function told of registrations b stops holding because
// another session took them over (backend.LossNotifier).
func (b *Backend) OnLost(f func(name, addr string)) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.onLost = f
}

// reg is a remembered registration. A change of attributes replaces it;
// its other fields are updated in place, under Backend.mu.
type reg struct {
	val    string // attrs as JSON (encodeAttrs)
	stored bool   // the store holds val for this key on the current lease
	token  uint64 // its fencing token (Created); 0 until the first write tells it
	modRev int64  // the key's ModRevision after b's last write of it; 0 if unknown
	// writing: a Register's write of it is in flight. A renewal leaves it
	// to that writer, which writes it again on the new lease (with the
	// token its first write got; a restore meanwhile would not know the
	// token and create the key with a fresh one).
	writing bool
}

// Timeouts of internal operations.
const (
	defaultDialTimeout   = 5 * time.Second
	revokeTimeout        = 2 * time.Second        // Close's bound on revoking the lease
	maxResyncBackoff     = time.Second            // between retries of a stream's resync
	maxRenewBackoff      = 250 * time.Millisecond // between the keeper's retries (each call waits for a connection)
	maxReconnectDelay    = time.Second            // cap of gRPC's reconnect backoff (also ≤ TTL/4)
	minAttempt           = 500 * time.Millisecond // floor of the keeper's per-call bound (else TTL/2, ≤ DialTimeout)
	restoreBatch         = 64                     // puts per transaction when restoring registrations (etcd allows 128)
	restoreChecks        = 32                     // key histories read at once before a restore (takenMeanwhile)
	restoreCheckAttempts = 3                      // tries of one such read before restoring regardless
	writeTimeout         = 5 * time.Second        // floor of the bound on one batched transaction (else DialTimeout)
	stallGrace           = 2 * time.Second        // streams hold deletions this long after a lease trouble ends
	holdCheck            = 100 * time.Millisecond // how often a quiet stream looks whether its hold ended
	streamBuffer         = 16                     // events queued per stream
)

// Open connects to etcd, grants the backend's lease and starts keeping it
// alive. It blocks until the lease is granted, ctx is done, or
// cfg.DialTimeout passes; it fails if the store cannot be reached by then.
// The caller must Close the backend.
func Open(ctx context.Context, cfg Config) (*Backend, error) {
	if len(cfg.Endpoints) == 0 {
		return nil, errors.New("etcd: no endpoints configured")
	}
	if cfg.TTL <= 0 {
		cfg.TTL = api.DefaultTTL
	}
	if cfg.DialTimeout <= 0 {
		cfg.DialTimeout = defaultDialTimeout
	}
	if cfg.Prefix == "" {
		cfg.Prefix = DefaultPrefix
	}
	if !strings.HasSuffix(cfg.Prefix, "/") {
		return nil, fmt.Errorf("etcd: key prefix %q must end in /", cfg.Prefix)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	log := cfg.Logger.With("component", "etcd")
	ttl := max(1, int64(math.Ceil(cfg.TTL.Seconds())))
	// gRPC's default reconnect backoff grows to 2 minutes: after an
	// outage of a few TTLs the client would reach etcd seconds after it is
	// back, and the old lease, which etcd extends by a TTL when it elects
	// a leader, would expire before the registrations are moved off it.
	// Retrying at least every TTL/4 (at most 1 s) costs a refused
	// connection per endpoint and retry while etcd is down.
	reconnect := min(maxReconnectDelay, time.Duration(ttl)*time.Second/4)
	client, err := clientv3.New(clientv3.Config{
		Endpoints:            cfg.Endpoints,
		DialTimeout:          cfg.DialTimeout,
		DialKeepAliveTime:    10 * time.Second,
		DialKeepAliveTimeout: 5 * time.Second,
		DialOptions: []grpc.DialOption{grpc.WithConnectParams(grpc.ConnectParams{
			Backoff: grpcbackoff.Config{
				BaseDelay:  min(100*time.Millisecond, reconnect),
				Multiplier: 1.6,
				Jitter:     0.2,
				MaxDelay:   reconnect,
			},
			MinConnectTimeout: cfg.DialTimeout,
		})},
		Logger:   zapslog.Logger(log, zapcore.ErrorLevel, nil),
		TLS:      cfg.TLS,
		Username: cfg.Username,
		Password: cfg.Password,
	})
	if err != nil {
		return nil, fmt.Errorf("etcd: connecting to %v: %w", cfg.Endpoints, err)
	}
	b := &Backend{
		client:  client,
		prefix:  cfg.Prefix,
		ttl:     ttl,
		dial:    cfg.DialTimeout,
		attempt: min(cfg.DialTimeout, max(minAttempt, time.Duration(ttl)*time.Second/2)),
		log:     log,
		lost:    make(chan struct{}, 1),
		ready:   make(chan struct{}),
		regs:    make(map[string]*reg),
		own:     make(map[clientv3.LeaseID]struct{}),
		streams: make(map[*stream]struct{}),
	}
	gctx, cancel := context.WithTimeout(ctx, cfg.DialTimeout)
	lease, err := client.Grant(gctx, b.ttl)
	cancel()
	if err != nil {
		client.Close()
		return nil, fmt.Errorf("etcd: granting a lease on %v: %w", cfg.Endpoints, err)
	}
	b.lease = lease.ID
	b.own[lease.ID] = struct{}{}
	b.leases = 1
	close(b.ready)
	b.ctx, b.cancel = context.WithCancel(context.Background())
	b.wg.Add(1)
	go b.keep(lease.ID)
	b.writes = newBatcher(b.ctx, b.commit, max(b.dial, writeTimeout), batchWriters, batchOps, batchBytes, batchQueue)
	b.wg.Add(1)
	go b.antiEntropy()
	if cfg.ReclaimAfter > 0 {
		b.wg.Add(1)
		go b.reclaim(cfg.ReclaimAfter)
	}
	return b, nil
}

// Register stores name/addr with attrs on the backend's lease, and
// remembers it so that it is stored again if the lease is lost and
// renewed. When the backend already stored the same attributes for
// name/addr, it writes nothing (a heartbeat). A key that another session
// holds (another agent's lease, or an old lease of this backend) is taken
// over: moved onto this backend's lease, keeping its fencing token.
//
// It blocks until etcd acknowledges the write on the backend's current
// lease, or ctx is done: while a lost lease is being replaced it waits for
// the new one, and if the lease is replaced while its write is in flight
// it writes again on the new lease (the first write may have landed on the
// old one). Calls for the same name/addr are serialised; concurrent calls
// for different ones share transactions. If ctx ends before its write is
// sent, nothing is written; once sent, Register waits for the write's
// outcome (bounded by an internal timeout), whatever ctx does, and returns
// it: nil means stored, even if ctx has ended. On error the backend keeps
// what it held before (a new registration is forgotten; if the write's
// outcome is unknown, the anti-entropy deletes the key within a TTL). It
// returns backend.ErrClosed after Close.
func (b *Backend) Register(ctx context.Context, name, addr string, attrs map[string]string) error {
	return b.register(ctx, name, addr, attrs, false)
}

// Claim is Register that writes even when b already stored these
// attributes, so that a key another session took over meanwhile is taken
// back (backend.Claimer). When the key is still on b's lease, the write
// changes nothing but its ModRevision.
func (b *Backend) Claim(ctx context.Context, name, addr string, attrs map[string]string) error {
	return b.register(ctx, name, addr, attrs, true)
}

func (b *Backend) register(ctx context.Context, name, addr string, attrs map[string]string, claim bool) error {
	key := b.key(name, addr)
	val, err := encodeAttrs(attrs)
	if err != nil {
		return fmt.Errorf("etcd: register %s %s: %w", name, addr, err)
	}
	ctx, cancel := b.opContext(ctx)
	defer cancel()
	unlock, err := b.locks.Lock(ctx, key)
	if err != nil {
		return b.opError("register", name, addr, err)
	}
	defer unlock()

	lease, err := b.lockLease(ctx)
	if err != nil {
		return b.opError("register", name, addr, err)
	}
	prev := b.regs[key]
	if prev != nil && prev.stored && prev.val == val && !claim {
		b.mu.Unlock()
		return nil
	}
	// Remembered before the write: a renewal that starts meanwhile
	// restores this value, and a renewal in progress sees the change
	// before it publishes its lease.
	next := &reg{val: val}
	if prev != nil {
		next.token, next.modRev = prev.token, prev.modRev
	}
	b.regs[key] = next
	owned := prev != nil && prev.stored
	mode := putTakeover
	replacedOnce := false
	for {
		tok := next.token
		next.writing = true
		b.mu.Unlock()
		var w written
		w, err = b.put(ctx, key, val, tok, lease, owned, mode)
		b.mu.Lock()
		next.writing = false
		if err == nil && b.lease == lease {
			// The lease was current from before the write to after it: a
			// renewal, if one follows, restores next after this write. A
			// restore that ran meanwhile may have dropped next (it took
			// this very write for another session's): this Register is a
			// takeover, so the backend holds it again.
			next.stored, next.token, next.modRev = true, w.token, w.modRev
			b.regs[key] = next
			b.mu.Unlock()
			return nil
		}
		if err == nil {
			// Written, on a lease since replaced: the key's history after
			// this write is what a restore looks at (takenMeanwhile).
			next.token, next.modRev = w.token, w.modRev
		}
		replaced := b.lease != lease
		next.stored = false
		b.mu.Unlock()
		if errors.Is(err, rpctypes.ErrLeaseNotFound) {
			b.leaseLost(lease)
			replaced = true
		}
		if !replaced {
			break
		}
		replacedOnce = true
		// The lease was declared lost during the write, and the renewal
		// left next to this writer (reg.writing): the write landed on the
		// old lease, or failed on it. Write again on the new lease: with
		// the token the first write got if it told one (putRetake).
		// Otherwise next.token is still the previous registration's,
		// kept only if the key's history shows no other session's put
		// since b's last write of it (keepsToken); else as a takeover,
		// which gives a missing key a fresh token: another agent may have
		// taken the key over and removed it, and an older token written
		// back would come after a newer one (soak 7).
		writeTold := err == nil
		if lease, err = b.lockLease(ctx); err != nil {
			break
		}
		owned, mode = false, putTakeover
		if writeTold {
			mode = putRetake
		} else if prev != nil {
			modRev := next.modRev
			b.mu.Unlock()
			keep := b.keepsToken(key, modRev)
			b.mu.Lock()
			if keep {
				mode = putRetake
			}
		}
	}
	b.mu.Lock()
	if b.regs[key] == next { // always, under the key lock; for clarity
		if prev == nil {
			delete(b.regs, key)
		} else {
			// Not known to be stored any more. prev's last write stays
			// the point from which the key's history tells a takeover
			// (a restore reads it): this write, if it was applied, is
			// b's own; with 0 a restore could not tell, and would write
			// back a registration another agent took over meanwhile.
			// After a renewal that left this key to this writer, the
			// store may not hold prev: marked stored, the anti-entropy
			// writes it back if it is missing (after the history check).
			b.regs[key] = &reg{val: prev.val, token: next.token, modRev: prev.modRev, stored: replacedOnce}
		}
	}
	b.mu.Unlock()
	return b.opError("register", name, addr, err)
}

// Unregister forgets name/addr and deletes it from the store if it is
// still this backend's: written by it last (its ModRevision is that of
// b's last write), or on one of b's leases. A registration that another
// session took over is left in place (backend.ErrNotOwner). Removing a
// registration that does not exist is not an error. It blocks until etcd acknowledges the delete
// (bounded by an internal timeout once sent, as Register) or ctx is done
// before it is sent; it does not wait for a lost lease to be replaced
// (the renewal does not restore what was forgotten). On error the key may
// remain in the store; the anti-entropy deletes it within a TTL. Calls
// for the same name/addr are serialised; concurrent calls share
// transactions, as Register's do. It returns backend.ErrClosed after
// Close.
func (b *Backend) Unregister(ctx context.Context, name, addr string) error {
	key := b.key(name, addr)
	ctx, cancel := b.opContext(ctx)
	defer cancel()
	unlock, err := b.locks.Lock(ctx, key)
	if err != nil {
		return b.opError("unregister", name, addr, err)
	}
	defer unlock()
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return backend.ErrClosed
	}
	prev := b.regs[key]
	delete(b.regs, key)
	b.mu.Unlock()
	if err := b.remove(ctx, key, prev); err != nil {
		if errors.Is(err, backend.ErrNotOwner) {
			return err
		}
		return b.opError("unregister", name, addr, err)
	}
	return nil
}

// Ping reads from the store with a linearizable (quorum) read. It blocks
// until the read succeeds, ctx is done, or Config.DialTimeout passes. It
// returns backend.ErrClosed after Close.
func (b *Backend) Ping(ctx context.Context) error {
	ctx, cancel := b.opContext(ctx)
	defer cancel()
	ctx, cancelT := context.WithTimeout(ctx, b.dial)
	defer cancelT()
	if b.isClosed() {
		return backend.ErrClosed
	}
	if _, err := b.client.Get(ctx, b.prefix, clientv3.WithCountOnly()); err != nil {
		if b.isClosed() {
			return backend.ErrClosed
		}
		return fmt.Errorf("etcd: ping: %w", err)
	}
	return nil
}

// Close stops every stream and the lease keeper, revokes the lease (which
// removes every registration made through b at once; bounded by 2 s, after
// which they expire with the TTL) and closes the client. It is idempotent;
// it returns the revoke error, if any, on the first call.
func (b *Backend) Close() error { return b.shutdown(true) }

// Abandon stops b like a killed process would: streams and goroutines
// stop and the client is closed, but the lease is not revoked, so b's
// registrations stay in the store until the TTL passes. It is a fault
// injection hook for tests. Close after Abandon does nothing.
func (b *Backend) Abandon() { b.shutdown(false) }

func (b *Backend) shutdown(revoke bool) error {
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return nil
	}
	b.closed = true
	streams := slices.Collect(maps.Keys(b.streams))
	b.mu.Unlock()

	for _, s := range streams {
		s.stop(backend.ErrClosed)
	}
	b.cancel()
	b.wg.Wait()
	b.writes.wait()

	var errs []error
	b.mu.Lock()
	leases := []clientv3.LeaseID{b.lease, b.pending} // the keeper has stopped
	b.mu.Unlock()
	for _, lease := range leases {
		if !revoke || lease == 0 {
			continue
		}
		ctx, cancel := context.WithTimeout(context.Background(), revokeTimeout)
		if _, err := b.client.Revoke(ctx, lease); err != nil && !errors.Is(err, rpctypes.ErrLeaseNotFound) {
			errs = append(errs, fmt.Errorf("etcd: revoking lease %x (registrations expire after the TTL): %w", int64(lease), err))
		}
		cancel()
	}
	if err := b.client.Close(); err != nil && !errors.Is(err, context.Canceled) {
		errs = append(errs, fmt.Errorf("etcd: closing client: %w", err))
	}
	return errors.Join(errs...)
}

// commit sends ops as one transaction: the batcher's commitFunc.
func (b *Backend) commit(ctx context.Context, ops []clientv3.Op) (*clientv3.TxnResponse, error) {
	return b.client.Txn(ctx).Then(ops...).Commit()
}

// SessionState reports whether the backend holds a lease now and how many
// leases it has been granted since Open. It does not block.
func (b *Backend) SessionState() backend.SessionState {
	b.mu.Lock()
	defer b.mu.Unlock()
	return backend.SessionState{Live: b.lease != 0 && !b.closed, Established: b.leases, Repairs: b.repairs, Lost: b.lostRegs}
}

func (b *Backend) isClosed() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.closed
}

// key returns the etcd key of name/addr. Both are valid (the backend
// contract): neither holds a '/' that could escape the key layout.
func (b *Backend) key(name, addr string) string { return b.prefix + name + "/" + addr }

// opContext returns ctx, also cancelled when the backend closes.
func (b *Backend) opContext(ctx context.Context) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithCancel(ctx)
	stop := context.AfterFunc(b.ctx, cancel)
	return ctx, func() { stop(); cancel() }
}

func (b *Backend) opError(op, name, addr string, err error) error {
	if errors.Is(err, backend.ErrClosed) || b.isClosed() {
		return backend.ErrClosed
	}
	return fmt.Errorf("etcd: %s %s %s: %w", op, name, addr, err)
}

// lockLease waits until the backend holds a lease and returns it with b.mu
// held. It fails, without b.mu, with backend.ErrClosed or ctx's error.
func (b *Backend) lockLease(ctx context.Context) (clientv3.LeaseID, error) {
	for {
		b.mu.Lock()
		if b.closed {
			b.mu.Unlock()
			return 0, backend.ErrClosed
		}
		if b.lease != 0 {
			return b.lease, nil
		}
		ready := b.ready
		b.mu.Unlock()
		select {
		case <-ready:
		case <-ctx.Done():
			if b.isClosed() {
				return 0, backend.ErrClosed
			}
			return 0, fmt.Errorf("waiting for a new lease: %w", ctx.Err())
		}
	}
}

func byCreated(a, b backend.Instance) int { return a.Age().Compare(b.Age()) }

// backoff is the retry delay of the one rule (retry.Backoff) from 50 ms up
// to a maximum, without jitter.
type backoff struct{ retry.Backoff }

func newBackoff(limit time.Duration) *backoff {
	return &backoff{retry.Backoff{Min: 50 * time.Millisecond, Max: limit}}
}

// wait sleeps for the next delay; it returns false if ctx is done first.
func (b *backoff) wait(ctx context.Context) bool {
	t := time.NewTimer(b.Next())
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}
