package etcd

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// The lease keeper. Its goroutine (keep) is the only one that declares
// the lease lost after a silence and the only one that replaces it.
//
// A silent keepalive stream is not a lost lease: during a leader election
// etcd answers nothing, for longer than a short TTL, yet the new leader
// extends every lease by a TTL plus the election timeout. So when the
// stream gives up, the keeper asks etcd (a keepalive of its own) and
// carries on with the same lease if etcd still holds it. The lease is lost when etcd says
// so, or when etcd has not answered for one more TTL after the stream
// gave up.
//
// Replacing a lost lease never waits for the writers in flight on it (a
// write blocked by an election can take etcd's request timeout, longer
// than what is left of the old lease). Instead:
//   - A writer remembers its value in regs before it writes. After its
//     write it checks that the lease did not change; if it did, it writes
//     again on the new lease (its first write may have moved the key back
//     onto the old lease after the renewal restored it).
//   - The renewal writes regs on the new lease until the store matches
//     regs, checked under mu, and publishes the lease in that same
//     critical section: a registration forgotten or changed while it ran
//     (Unregister does not wait for the lease) is deleted or written again
//     before anyone can see the new lease. It skips a registration whose
//     writer's write is still in flight (reg.writing): that writer writes
//     again on the new lease with the token its first write got, which
//     the renewal cannot know (it would create the key with a fresh token,
//     and subscribers who saw the first write would see the instance
//     replaced).

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

// setStalled records that the lease's keepalives stopped being answered
// (true) or that the lease was kept or renewed since (false).
func (b *Backend) setStalled(stalled bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if stalled {
		b.stalled = true
		return
	}
	if b.stalled {
		b.stalled, b.recovered = false, time.Now()
	}
}

// holdUntil is until when streams hold back deletions (see release): far
// ahead while the lease is in trouble, stallGrace after it recovered.
func (b *Backend) holdUntil() time.Time {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.stalled {
		return time.Now().Add(time.Hour)
	}
	if b.recovered.IsZero() {
		return time.Time{}
	}
	return b.recovered.Add(stallGrace)
}

func (b *Backend) currentLease() clientv3.LeaseID {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.lease
}

// keep is the lease keeper, the backend's one lease goroutine. It keeps the
// current lease alive and, when the lease is lost, renews it and restores
// every remembered registration, until Close.
func (b *Backend) keep(lease clientv3.LeaseID) {
	defer b.wg.Done()
	ttl := time.Duration(b.ttl) * time.Second
	expiry := time.Now().Add(ttl)
	for {
		expiry = b.keepAlive(lease, expiry)
		if b.ctx.Err() != nil {
			return
		}
		b.setStalled(true)
		held, why := b.check(lease, &expiry)
		if b.ctx.Err() != nil {
			return
		}
		if held {
			b.setStalled(false)
			continue
		}
		b.leaseLost(lease)
		b.mu.Lock()
		select { // a writer's signal for this same loss
		case <-b.lost:
		default:
		}
		n := len(b.regs)
		b.mu.Unlock()
		b.log.Warn("etcd lease lost; renewing it and restoring registrations", "lease", leaseHex(lease), "registrations", n, "reason", why)
		var granted time.Time
		if lease, granted = b.renew(); lease == 0 {
			return
		}
		b.setStalled(false)
		expiry = granted.Add(ttl)
	}
}

// keepAlive keeps lease alive until the client's keepalive stream gives
// up on it (no answer from etcd within the lease's TTL, or etcd answered
// that it does not hold it), a writer finds it missing, or the backend
// closes. It returns when the lease runs out by etcd's last answer
// (expiry if there was none).
//
// The stream sends its first keepalive up to half a second after it opens,
// later still while it reconnects after an outage; a lease just granted
// (its TTL counting since the grant, restore included) can expire before
// that. So whenever the lease is within half a TTL of running out and the
// stream has not answered, the keeper extends it itself, once per call of
// at most b.attempt (the stream answers every third of a TTL when it
// works, so this costs nothing then).
func (b *Backend) keepAlive(lease clientv3.LeaseID, expiry time.Time) time.Time {
	ctx, cancel := context.WithCancel(b.ctx)
	defer cancel()
	ch, err := b.client.KeepAlive(ctx, lease)
	if err != nil {
		b.log.Warn("etcd lease keepalive failed", "lease", leaseHex(lease), "error", err)
		return expiry
	}
	half := time.Duration(b.ttl) * time.Second / 2
	backstop := time.NewTimer(time.Until(expiry) - half)
	defer backstop.Stop()
	for {
		select {
		case resp, ok := <-ch:
			if !ok {
				return expiry
			}
			expiry = time.Now().Add(time.Duration(resp.TTL) * time.Second)
		case <-backstop.C:
			if e, err := b.extend(lease); err == nil {
				expiry = e
			} else if errors.Is(err, rpctypes.ErrLeaseNotFound) {
				return expiry
			}
		case <-b.lost:
			return expiry
		}
		backstop.Reset(max(time.Until(expiry)-half, b.attempt))
	}
}

// extend sends one keepalive for lease, bounded by b.attempt, and returns
// until when etcd then holds it. It fails with rpctypes.ErrLeaseNotFound
// if etcd no longer holds it.
func (b *Backend) extend(lease clientv3.LeaseID) (time.Time, error) {
	ctx, cancel := context.WithTimeout(b.ctx, b.attempt)
	defer cancel()
	sent := time.Now()
	resp, err := b.client.KeepAliveOnce(ctx, lease)
	if err != nil {
		return time.Time{}, err
	}
	return sent.Add(time.Duration(resp.TTL) * time.Second), nil
}

// check asks etcd whether it still holds lease, retrying until etcd
// answers or one TTL after *expiry (or now, if later) has passed. It
// returns whether the lease is held (and then sets *expiry by etcd's
// answer) and, if not, why it is taken for lost.
func (b *Backend) check(lease clientv3.LeaseID, expiry *time.Time) (held bool, why string) {
	if b.currentLease() != lease {
		return false, "etcd refused a write on it: lease not found"
	}
	deadline := time.Now()
	if expiry.After(deadline) {
		deadline = *expiry
	}
	deadline = deadline.Add(time.Duration(b.ttl) * time.Second)
	b.log.Warn("etcd lease keepalive interrupted; asking etcd whether it still holds the lease",
		"lease", leaseHex(lease), "until", deadline.Format(time.RFC3339Nano))
	backoff := newBackoff(maxRenewBackoff)
	for {
		// A keepalive rather than TimeToLive: it extends the lease as it
		// asks, and TimeToLive rounds what is left down to whole seconds,
		// so it reports 0 for a live lease in its last second.
		ctx, cancel := context.WithTimeout(b.ctx, min(time.Until(deadline), b.attempt))
		sent := time.Now()
		resp, err := b.client.KeepAliveOnce(ctx, lease)
		cancel()
		switch {
		case err == nil:
			ttl := time.Duration(resp.TTL) * time.Second
			*expiry = sent.Add(ttl)
			b.log.Info("etcd lease still held; keeping it alive", "lease", leaseHex(lease), "ttl", ttl)
			return true, ""
		case errors.Is(err, rpctypes.ErrLeaseNotFound):
			return false, "etcd no longer holds it"
		case b.ctx.Err() != nil:
			return false, "closing"
		case b.currentLease() != lease:
			return false, "etcd refused a write on it: lease not found"
		case !time.Now().Before(deadline):
			return false, fmt.Sprintf("etcd did not answer for a TTL after the keepalives stopped: %v", err)
		}
		if !backoff.wait(b.ctx) {
			return false, "closing"
		}
	}
}

// renewal is one renewal of the lease, across its attempts.
type renewal struct {
	lease   clientv3.LeaseID // 0 until granted
	until   time.Time        // until when etcd holds lease, by its last answer
	written map[string]*reg  // what the store holds on lease, by key
}

// renew grants a new lease and restores the registrations on it (see
// restore), retrying with a short backoff: each attempt waits for a
// connection, bounded by b.attempt. It returns the new lease, published,
// and until when etcd holds it, or 0 if the backend closed.
func (b *Backend) renew() (clientv3.LeaseID, time.Time) {
	backoff := newBackoff(maxRenewBackoff)
	var r renewal
	for failures := 0; ; failures++ {
		err := b.renewOnce(&r)
		if err == nil {
			b.log.Info("etcd lease renewed; registrations restored", "lease", leaseHex(r.lease), "registrations", len(r.written))
			return r.lease, r.until
		}
		if errors.Is(err, rpctypes.ErrLeaseNotFound) {
			r.lease = 0 // expired before the restore completed: start over
		}
		if b.ctx.Err() != nil {
			return 0, time.Time{}
		}
		level := slog.LevelDebug
		if failures == 0 {
			level = slog.LevelWarn // once per loss: the store is down, retries would flood the log
		}
		b.log.Log(context.Background(), level, "etcd lease renewal failed; retrying", "error", err)
		if !backoff.wait(b.ctx) {
			return 0, time.Time{}
		}
	}
}

// renewOnce is one attempt of renew: it grants a lease if r has none,
// then restores the registrations on it.
func (b *Backend) renewOnce(r *renewal) error {
	if r.lease == 0 {
		ctx, cancel := context.WithTimeout(b.ctx, b.attempt)
		sent := time.Now()
		grant, err := b.client.Grant(ctx, b.ttl)
		cancel()
		if err != nil {
			return fmt.Errorf("granting a lease: %w", err)
		}
		r.lease, r.until, r.written = grant.ID, sent.Add(time.Duration(grant.TTL)*time.Second), make(map[string]*reg)
		b.mu.Lock()
		b.pending = grant.ID // for Close to revoke
		b.own[grant.ID] = struct{}{}
		b.mu.Unlock()
	}
	return b.restore(r)
}

// fresh extends r's lease if less than half its TTL is left: restoring
// many registrations, or retrying, can take longer than a TTL, and
// nothing else keeps a lease alive before it is published.
func (b *Backend) fresh(r *renewal) error {
	if time.Until(r.until) > time.Duration(b.ttl)*time.Second/2 {
		return nil
	}
	until, err := b.extend(r.lease)
	if err != nil {
		return fmt.Errorf("extending the new lease: %w", err)
	}
	r.until = until
	return nil
}

// restore makes the store hold every remembered registration on rn's
// lease, then publishes the lease as the backend's. rn.written is what the
// store holds on the lease already, by key (done); restore updates it, and
// keeps the lease alive meanwhile (fresh). It writes in rounds: each
// round puts what regs holds and written does not, and deletes what it
// put earlier that regs no longer holds (a registration forgotten
// meanwhile), until a check under b.mu finds nothing to do; the lease is
// published in that critical section.
//
// A registration is written again with its fencing token, and only where
// its key no longer exists or is on one of b's own leases: a key that
// another session took over meanwhile is left to it, and the backend
// stops holding it (counted in SessionState.Lost).
func (b *Backend) restore(rn *renewal) error {
	lease, done := rn.lease, rn.written
	type item struct {
		key string
		r   *reg // nil: a delete
		val string
		tok uint64
		rev int64 // b's last write of the key
	}
	for {
		if err := b.fresh(rn); err != nil {
			return err
		}
		var items []item
		b.mu.Lock()
		for _, k := range slices.Sorted(maps.Keys(b.regs)) {
			if r := b.regs[k]; done[k] != r && !r.writing {
				items = append(items, item{k, r, r.val, r.token, r.modRev})
			}
		}
		for _, k := range slices.Sorted(maps.Keys(done)) {
			if b.regs[k] == nil {
				items = append(items, item{key: k})
			}
		}
		if len(items) == 0 {
			for _, r := range b.regs {
				if !r.writing { // its writer says, after its write again
					r.stored = true
				}
			}
			b.lease, b.pending = lease, 0
			b.leases++
			close(b.ready)
			b.mu.Unlock()
			return nil
		}
		b.mu.Unlock()
		taken := make([]bool, len(items))
		var wg sync.WaitGroup
		sem := make(chan struct{}, restoreChecks)
		for i, it := range items {
			if it.r == nil {
				continue
			}
			sem <- struct{}{}
			wg.Go(func() {
				defer func() { <-sem }()
				taken[i] = b.takenMeanwhile(it.key, it.r, it.rev)
			})
		}
		wg.Wait()
		n := 0
		for i, it := range items {
			if !taken[i] {
				items[n] = it
				n++
			}
		}
		items = items[:n]
		for chunk := range slices.Chunk(items, restoreBatch) {
			if err := b.fresh(rn); err != nil {
				return err
			}
			ops := make([]clientv3.Op, len(chunk))
			for i, it := range chunk {
				if it.r == nil {
					ops[i] = clientv3.OpTxn([]clientv3.Cmp{clientv3.Compare(clientv3.LeaseValue(it.key), "=", int64(lease))}, []clientv3.Op{clientv3.OpDelete(it.key)}, nil)
				} else {
					ops[i] = clientv3.OpTxn([]clientv3.Cmp{clientv3.Compare(clientv3.CreateRevision(it.key), "=", 0)}, []clientv3.Op{clientv3.OpPut(it.key, encodeValue(it.val, it.tok, i), clientv3.WithLease(lease))}, nil)
				}
			}
			ctx, cancel := context.WithTimeout(b.ctx, b.attempt)
			resp, err := b.client.Txn(ctx).Then(ops...).Commit()
			cancel()
			if err != nil {
				return fmt.Errorf("restoring registrations: %w", err)
			}
			for i, it := range chunk {
				if it.r == nil {
					delete(done, it.key) // deleted, or not on lease
					continue
				}
				w := written{it.tok, resp.Header.Revision}
				if w.token == 0 {
					w.token = token(resp.Header.Revision, i)
				}
				if !succeeded(resp, i) {
					// The key exists: on an old lease of b's (still alive),
					// or another session's.
					w, err = b.putSlow(it.key, it.val, it.tok, lease, putRestore, it.rev)
					if errors.Is(err, errTakenOver) {
						b.dropLost(it.key, it.r)
						continue
					}
					if err != nil {
						return fmt.Errorf("restoring registrations: %w", err)
					}
				}
				done[it.key] = it.r
				b.mu.Lock()
				it.r.token, it.r.modRev = w.token, w.modRev
				b.mu.Unlock()
			}
		}
	}
}

// takenMeanwhile reports, for a registration about to be restored with
// its token, whether another session wrote its key after modRev, b's own
// last write of it (a takeover through another agent that b had not
// noticed yet); it then drops it (dropLost). Writing it back would
// resurrect a registration whose new owner removed it, with an old token.
// A key that exists tells by its lease; a missing one by its history
// (changedByOther). When the history cannot tell (compacted), the
// registration is restored; when the store does not answer, it is asked
// again (restoreCheckAttempts), then the registration is restored. restore
// runs restoreChecks of these checks at a time.
func (b *Backend) takenMeanwhile(key string, r *reg, modRev int64) bool {
	var err error
	for range restoreCheckAttempts {
		var h keyState
		if h, err = b.keyHistory(key, modRev); err == nil {
			if h.foreign {
				b.dropLost(key, r)
			}
			return h.foreign
		}
		if b.ctx.Err() != nil {
			return false
		}
	}
	b.log.Warn("etcd: could not read a registration's history before restoring it; restoring it", "key", key, "error", err)
	return false
}

// keepsToken reports whether a Register retried after a renewal may
// write key again with the token b knew for it: the key exists (the
// store's token wins then), or it is missing and its history since modRev,
// b's last write of it, holds no other session's put.
func (b *Backend) keepsToken(key string, modRev int64) bool {
	h, err := b.keyHistory(key, modRev)
	return err == nil && (h.exists || h.known && !h.foreign)
}

// keyState is what keyHistory found: whether key exists (and on which
// lease), and whether it is another session's (an existing key, by its
// lease) or was put by another session since b's last write (a missing
// key, by its history; known is false when the history cannot tell).
type keyState struct {
	exists, foreign, known bool
	lease                  clientv3.LeaseID // of an existing key
}

// keyHistory reads key, and the history of a missing key since modRev
// (changedByOther).
func (b *Backend) keyHistory(key string, modRev int64) (keyState, error) {
	ctx, cancel := context.WithTimeout(b.ctx, b.attempt)
	resp, err := b.client.Get(ctx, key)
	cancel()
	if err != nil {
		return keyState{}, err
	}
	if len(resp.Kvs) > 0 {
		l := clientv3.LeaseID(resp.Kvs[0].Lease)
		return keyState{exists: true, foreign: !b.ours(l), known: true, lease: l}, nil
	}
	taken, known, err := b.changedByOther(key, modRev)
	return keyState{foreign: taken, known: known}, err
}

// dropLost stops holding r at key, which another session took over.
func (b *Backend) dropLost(key string, r *reg) {
	b.mu.Lock()
	dropped := b.regs[key] == r
	if dropped {
		delete(b.regs, key)
		b.lostRegs++
	}
	onLost := b.onLost
	b.mu.Unlock()
	if !dropped {
		return
	}
	b.log.Info("registration taken over by another session; no longer held here", "key", key)
	if onLost != nil {
		name, addr, _ := strings.Cut(strings.TrimPrefix(key, b.prefix), "/")
		onLost(name, addr)
	}
}

func leaseHex(lease clientv3.LeaseID) string { return fmt.Sprintf("%x", int64(lease)) }
