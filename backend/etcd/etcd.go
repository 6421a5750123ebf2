// Package etcd is discoverd's etcd v3 backend, and a helper to run etcd
// inside the process (the agent's zero-setup mode and every test's store).
//
//	srv, err := etcd.StartEmbedded(ctx, etcd.EmbedConfig{Dir: dir})
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
// "/discoverd/services/" by default) holding the attributes as a JSON
// object. Every key a Backend writes is attached to its one lease, kept
// alive by one goroutine, so a dead agent's registrations vanish after the
// TTL and heartbeats cost the store one keepalive per TTL/3, whatever the
// number of registrations. An instance's Created is the key's
// CreateRevision: attribute updates (puts on an existing key) keep it, and
// a later registration has a larger one.
package etcd

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"math"
	"slices"
	"strings"
	"sync"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap/zapcore"

	"github.com/flynn/discoverd/api"
	"github.com/flynn/discoverd/backend"
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
	// Prefix is the key prefix of registrations; it must end in "/".
	// Default DefaultPrefix. Backends share registrations only if they
	// share the prefix.
	Prefix string
	// Logger receives lease losses and recoveries, stream resyncs and the
	// etcd client's errors. Default slog.Default().
	Logger *slog.Logger
}

// Backend is a backend.Backend on etcd v3. Its methods are safe for
// concurrent use.
type Backend struct {
	client *clientv3.Client
	prefix string
	ttl    int64 // lease TTL in seconds
	dial   time.Duration
	log    *slog.Logger

	ctx    context.Context // cancelled by Close and Abandon
	cancel context.CancelFunc
	wg     sync.WaitGroup // the lease keeper

	lost chan struct{} // a writer saw the lease missing; capacity 1

	mu       sync.Mutex
	closed   bool
	lease    clientv3.LeaseID // 0 while the lease is being renewed
	ready    chan struct{}    // closed when lease != 0
	inflight int              // writers admitted on the current lease
	drained  chan struct{}    // closed when inflight drops to 0 (renewal waits)
	regs     map[string]*reg  // remembered registrations, by key
	streams  map[*stream]struct{}
	leases   uint64 // leases granted since Open (Open's, then each renewal)
}

var (
	_ backend.Backend         = (*Backend)(nil)
	_ backend.SessionReporter = (*Backend)(nil)
)

// reg is a remembered registration. It is replaced, never mutated, except
// for stored (guarded by Backend.mu).
type reg struct {
	val    string // attrs as JSON
	stored bool   // the store holds val for this key on the current lease
}

// Timeouts of internal operations.
const (
	defaultDialTimeout = 5 * time.Second
	revokeTimeout      = 2 * time.Second // Close's bound on revoking the lease
	maxBackoff         = 2 * time.Second // between retries of lease renewal and stream resync
	restoreBatch       = 64              // puts per transaction when restoring registrations (etcd allows 128)
	streamBuffer       = 16              // events queued per stream
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
	client, err := clientv3.New(clientv3.Config{
		Endpoints:            cfg.Endpoints,
		DialTimeout:          cfg.DialTimeout,
		DialKeepAliveTime:    10 * time.Second,
		DialKeepAliveTimeout: 5 * time.Second,
		Logger:               zapLogger(log, zapcore.ErrorLevel, nil),
	})
	if err != nil {
		return nil, fmt.Errorf("etcd: connecting to %v: %w", cfg.Endpoints, err)
	}
	b := &Backend{
		client:  client,
		prefix:  cfg.Prefix,
		ttl:     max(1, int64(math.Ceil(cfg.TTL.Seconds()))),
		dial:    cfg.DialTimeout,
		log:     log,
		lost:    make(chan struct{}, 1),
		ready:   make(chan struct{}),
		regs:    make(map[string]*reg),
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
	b.leases = 1
	close(b.ready)
	b.ctx, b.cancel = context.WithCancel(context.Background())
	b.wg.Add(1)
	go b.keep(lease.ID)
	return b, nil
}

// Register stores name/addr with attrs on the backend's lease, and
// remembers it so that it is stored again if the lease is lost and
// renewed. When the backend already stored the same attributes for
// name/addr, it writes nothing (a heartbeat). It blocks until etcd
// acknowledges the write or ctx is done; while the lease is being renewed
// it waits for the renewal. On error the backend keeps what it held
// before (a new registration is forgotten, but the write may have reached
// the store: it then lives until the lease ends). It returns
// backend.ErrClosed after Close.
func (b *Backend) Register(ctx context.Context, name, addr string, attrs map[string]string) error {
	key, err := b.key(name, addr)
	if err != nil {
		return err
	}
	val, err := encodeAttrs(attrs)
	if err != nil {
		return fmt.Errorf("etcd: register %s %s: %w", name, addr, err)
	}
	ctx, cancel := b.opContext(ctx)
	defer cancel()
	for {
		lease, err := b.acquire(ctx)
		if err != nil {
			return b.opError("register", name, addr, err)
		}
		b.mu.Lock()
		prev := b.regs[key]
		if prev != nil && prev.stored && prev.val == val {
			b.mu.Unlock()
			b.release()
			return nil
		}
		next := &reg{val: val}
		b.regs[key] = next
		b.mu.Unlock()

		_, err = b.client.Put(ctx, key, val, clientv3.WithLease(lease))

		b.mu.Lock()
		switch {
		case err == nil:
			next.stored = b.regs[key] == next
		case b.regs[key] == next && prev == nil:
			delete(b.regs, key)
		case b.regs[key] == next:
			b.regs[key] = &reg{val: prev.val} // not known to be stored any more
		}
		b.mu.Unlock()
		b.release()
		if errors.Is(err, rpctypes.ErrLeaseNotFound) {
			b.leaseLost(lease)
			continue // wait for the new lease, then write again
		}
		if err != nil {
			return b.opError("register", name, addr, err)
		}
		return nil
	}
}

// Unregister forgets name/addr and deletes it from the store. Removing a
// registration that does not exist is not an error. It blocks until etcd
// acknowledges the delete or ctx is done; on error the key may remain in
// the store until the backend's lease ends. It returns backend.ErrClosed
// after Close.
func (b *Backend) Unregister(ctx context.Context, name, addr string) error {
	key, err := b.key(name, addr)
	if err != nil {
		return err
	}
	ctx, cancel := b.opContext(ctx)
	defer cancel()
	b.mu.Lock()
	delete(b.regs, key)
	b.mu.Unlock()
	// Deleting as a writer on the lease orders the delete after a renewal
	// in progress, which might otherwise put the key back.
	if _, err := b.acquire(ctx); err != nil {
		return b.opError("unregister", name, addr, err)
	}
	defer b.release()
	if _, err := b.client.Delete(ctx, key); err != nil {
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

	var err error
	b.mu.Lock()
	lease := b.lease
	b.mu.Unlock()
	if revoke && lease != 0 {
		ctx, cancel := context.WithTimeout(context.Background(), revokeTimeout)
		if _, rerr := b.client.Revoke(ctx, lease); rerr != nil && !errors.Is(rerr, rpctypes.ErrLeaseNotFound) {
			err = fmt.Errorf("etcd: revoking lease %x (registrations expire after the TTL): %w", int64(lease), rerr)
		}
		cancel()
	}
	if cerr := b.client.Close(); cerr != nil && err == nil && !errors.Is(cerr, context.Canceled) {
		err = fmt.Errorf("etcd: closing client: %w", cerr)
	}
	return err
}

// SessionState reports whether the backend holds a lease now and how many
// leases it has been granted since Open. It does not block.
func (b *Backend) SessionState() backend.SessionState {
	b.mu.Lock()
	defer b.mu.Unlock()
	return backend.SessionState{Live: b.lease != 0 && !b.closed, Established: b.leases}
}

func (b *Backend) isClosed() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.closed
}

// key returns the etcd key of name/addr, refusing what could escape the
// key layout.
func (b *Backend) key(name, addr string) (string, error) {
	if err := api.ValidateName(name); err != nil {
		return "", fmt.Errorf("etcd: %w", err)
	}
	if err := api.ValidateAddr(addr); err != nil {
		return "", fmt.Errorf("etcd: %w", err)
	}
	return b.prefix + name + "/" + addr, nil
}

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

// acquire waits until the backend holds a lease and admits the caller as a
// writer on it; the caller must release. It fails with backend.ErrClosed
// or ctx's error.
func (b *Backend) acquire(ctx context.Context) (clientv3.LeaseID, error) {
	for {
		b.mu.Lock()
		if b.closed {
			b.mu.Unlock()
			return 0, backend.ErrClosed
		}
		if b.lease != 0 {
			b.inflight++
			lease := b.lease
			b.mu.Unlock()
			return lease, nil
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

func (b *Backend) release() {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.inflight--
	if b.inflight == 0 && b.drained != nil {
		close(b.drained)
		b.drained = nil
	}
}

// leaseLost marks lease as lost, if it is still the current one, and wakes
// the keeper. Writers then wait for the renewal.
func (b *Backend) leaseLost(lease clientv3.LeaseID) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.lease != lease || lease == 0 {
		return
	}
	b.lease = 0
	b.ready = make(chan struct{})
	select {
	case b.lost <- struct{}{}:
	default:
	}
}

// keep is the lease keeper, the backend's one goroutine. It keeps the
// current lease alive and, when the lease is lost, renews it and restores
// every remembered registration, until Close.
func (b *Backend) keep(lease clientv3.LeaseID) {
	defer b.wg.Done()
	for {
		b.keepAlive(lease)
		if b.ctx.Err() != nil {
			return
		}
		b.leaseLost(lease)
		b.mu.Lock()
		select { // a writer's signal for this same loss
		case <-b.lost:
		default:
		}
		n := len(b.regs)
		b.mu.Unlock()
		b.log.Warn("etcd lease lost; renewing it and restoring registrations", "lease", fmt.Sprintf("%x", int64(lease)), "registrations", n)
		if lease = b.renew(); lease == 0 {
			return
		}
	}
}

// keepAlive returns when lease is lost (it expired or was revoked, or the
// client stopped hearing from etcd for the TTL) or the backend closes.
func (b *Backend) keepAlive(lease clientv3.LeaseID) {
	ctx, cancel := context.WithCancel(b.ctx)
	defer cancel()
	ch, err := b.client.KeepAlive(ctx, lease)
	if err != nil {
		b.log.Warn("etcd lease keepalive failed", "error", err)
		return
	}
	for {
		select {
		case _, ok := <-ch:
			if !ok {
				return
			}
		case <-b.lost:
			return
		}
	}
}

// renew waits for the writers on the lost lease, then grants a new lease
// and restores the registrations on it, retrying with backoff. It returns
// the new lease, or 0 if the backend closed.
func (b *Backend) renew() clientv3.LeaseID {
	b.mu.Lock()
	var drained chan struct{}
	if b.inflight > 0 {
		b.drained = make(chan struct{})
		drained = b.drained
	}
	b.mu.Unlock()
	if drained != nil {
		select {
		case <-drained:
		case <-b.ctx.Done():
			return 0
		}
	}
	backoff := newBackoff()
	for {
		lease, n, err := b.restore()
		if err == nil {
			b.mu.Lock()
			b.lease = lease
			b.leases++
			close(b.ready)
			b.mu.Unlock()
			b.log.Info("etcd lease renewed; registrations restored", "lease", fmt.Sprintf("%x", int64(lease)), "registrations", n)
			return lease
		}
		if b.ctx.Err() != nil {
			return 0
		}
		b.log.Warn("etcd lease renewal failed; retrying", "error", err)
		if !backoff.wait(b.ctx) {
			return 0
		}
	}
}

// restore grants a new lease and puts every remembered registration on it.
// On error the new lease is revoked (best effort) and nothing is changed.
func (b *Backend) restore() (clientv3.LeaseID, int, error) {
	ctx, cancel := context.WithTimeout(b.ctx, max(b.dial, time.Duration(b.ttl)*time.Second))
	defer cancel()
	grant, err := b.client.Grant(ctx, b.ttl)
	if err != nil {
		return 0, 0, fmt.Errorf("granting a lease: %w", err)
	}
	b.mu.Lock()
	keys := slices.Sorted(maps.Keys(b.regs))
	regs := make([]*reg, len(keys))
	for i, k := range keys {
		regs[i] = b.regs[k]
	}
	b.mu.Unlock()
	for start := 0; start < len(keys); start += restoreBatch {
		end := min(start+restoreBatch, len(keys))
		ops := make([]clientv3.Op, 0, end-start)
		for i := start; i < end; i++ {
			ops = append(ops, clientv3.OpPut(keys[i], regs[i].val, clientv3.WithLease(grant.ID)))
		}
		if _, err := b.client.Txn(ctx).Then(ops...).Commit(); err != nil {
			rctx, rcancel := context.WithTimeout(context.Background(), revokeTimeout)
			b.client.Revoke(rctx, grant.ID) // else it expires with the TTL
			rcancel()
			return 0, 0, fmt.Errorf("restoring registrations: %w", err)
		}
	}
	b.mu.Lock()
	for i, k := range keys {
		if b.regs[k] == regs[i] {
			regs[i].stored = true
		}
	}
	b.mu.Unlock()
	return grant.ID, len(keys), nil
}

// encodeAttrs returns attrs as a JSON object (keys sorted, so equal attrs
// encode equal); no attributes encode as {}.
func encodeAttrs(attrs map[string]string) (string, error) {
	if len(attrs) == 0 {
		return "{}", nil
	}
	buf, err := json.Marshal(attrs)
	if err != nil {
		return "", fmt.Errorf("encoding attributes: %w", err)
	}
	return string(buf), nil
}

// decode turns a key-value under prefix (a service's prefix) into an
// Instance. It fails on keys and values that discoverd did not write.
func decode(prefix, name string, kv *mvccpb.KeyValue) (backend.Instance, error) {
	addr, ok := strings.CutPrefix(string(kv.Key), prefix)
	if !ok || api.ValidateAddr(addr) != nil {
		return backend.Instance{}, fmt.Errorf("key %q is not a registration", kv.Key)
	}
	in := backend.Instance{Name: name, Addr: addr, Created: uint64(kv.CreateRevision)}
	if kv.Value == nil {
		return in, nil
	}
	var attrs map[string]string
	if err := json.Unmarshal(kv.Value, &attrs); err != nil {
		return backend.Instance{}, fmt.Errorf("key %q: value is not a JSON object of strings: %w", kv.Key, err)
	}
	if len(attrs) > 0 {
		in.Attrs = attrs
	}
	return in, nil
}

func byCreated(a, b backend.Instance) int {
	return cmp.Or(cmp.Compare(a.Created, b.Created), strings.Compare(a.Addr, b.Addr))
}

// backoff is an exponential delay from 50 ms up to maxBackoff.
type backoff struct{ d time.Duration }

func newBackoff() *backoff { return &backoff{d: 50 * time.Millisecond} }

// wait sleeps for the current delay and doubles it; it returns false if
// ctx is done first.
func (b *backoff) wait(ctx context.Context) bool {
	t := time.NewTimer(b.d)
	defer t.Stop()
	b.d = min(2*b.d, maxBackoff)
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}
