package etcd

import (
	"context"
	"errors"
	"fmt"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/flynn/discoverd/backend"
)

// Ownership. A registration key belongs to the session that wrote it
// last: this backend while the key is on one of its leases. Every write
// is conditional, so that a backend never overwrites or deletes what
// another session wrote meanwhile:
//   - a put of a key the backend believes it holds compares the key's
//     lease with the backend's;
//   - a put of a key it does not hold yet compares the key's
//     CreateRevision with 0 (the key does not exist);
//   - a delete compares the key's ModRevision with that of the backend's
//     own last write.
// When the condition fails, the slow path reads the key and decides: a
// Register takes the key over (keeping its token), a restore or a repair
// leaves another session's key alone, a delete leaves it alone.

// maxWriteAttempts bounds the slow path's read-then-write rounds that
// race with other writers of the same key.
const maxWriteAttempts = 8

// errTakenOver: the key belongs to another session now.
var errTakenOver = errors.New("registration taken over by another session")

// written is what a successful put tells: the registration's token and the
// key's ModRevision.
type written struct {
	token  uint64
	modRev int64
}

// put writes key with attrs val on lease, as one operation of a batched
// transaction and, when its condition fails, through the slow path. tok is
// the registration's token if known (0: a new registration gets one from
// its creating put). owned says the backend believes the key is on lease
// now.
//
// mode says what to do with another session's key and a missing one (see
// putMode). The caller holds key's lock.
func (b *Backend) put(ctx context.Context, key, val string, tok uint64, lease clientv3.LeaseID, owned bool, mode putMode) (written, error) {
	if mode == putTakeover && !owned {
		tok = 0
	}
	cmp := clientv3.Compare(clientv3.CreateRevision(key), "=", 0)
	if owned && tok != 0 {
		cmp = clientv3.Compare(clientv3.LeaseValue(key), "=", int64(lease))
	}
	out, err := b.writes.do(ctx, key, lease, len(key)+len(val)+32, func(seq int) clientv3.Op {
		return clientv3.OpTxn([]clientv3.Cmp{cmp}, []clientv3.Op{clientv3.OpPut(key, encodeValue(val, tok, seq), clientv3.WithLease(lease))}, nil)
	})
	if err != nil {
		return written{}, err
	}
	if out.ok {
		if tok == 0 {
			tok = token(out.rev, out.seq)
		}
		return written{tok, out.rev}, nil
	}
	return b.putSlow(key, val, tok, lease, mode, 0)
}

// putMode is what a put does with a key of another session and with a
// missing key.
type putMode int

const (
	// putTakeover: a client's Register. Another session's key is taken
	// over with the store's token; a missing key is created with a fresh
	// token, never the one the backend knew: it was deleted, subscribers
	// saw it go, and an old token coming back could make a leader's token
	// go down.
	putTakeover putMode = iota
	// putRetake: the same Register writing again after its lease was
	// replaced during its first write. As putTakeover, but a missing key
	// (deleted with the old lease) keeps the token of that first write.
	putRetake
	// putRestore: the backend's own registration (a restore, a repair).
	// A missing key is created with the known token; another session's
	// key is left alone (errTakenOver).
	putRestore
)

// putSlow is put after its condition failed: it reads the key and writes
// it conditionally on what it read, until the write applies. The store's
// token of an existing key wins over tok; a missing key gets tok or a
// fresh token, as in put. In putRestore mode, modRev is the revision of
// b's own last write of the key, and a missing key is written again only
// if no other session put it since (changedByOther): the key may have
// been taken over and removed since the caller last looked. It is bounded
// by the backend's own timeouts, not by the caller's ctx: a request sent
// may be applied after its caller gave up.
func (b *Backend) putSlow(key, val string, tok uint64, lease clientv3.LeaseID, mode putMode, modRev int64) (written, error) {
	for range maxWriteAttempts {
		ctx, cancel := context.WithTimeout(b.ctx, b.attempt)
		resp, err := b.client.Get(ctx, key)
		cancel()
		if err != nil {
			return written{}, err
		}
		t := tok
		if mode == putTakeover {
			t = 0 // see putMode
		}
		cmp := clientv3.Compare(clientv3.CreateRevision(key), "=", 0)
		if len(resp.Kvs) > 0 {
			kv := resp.Kvs[0]
			if mode == putRestore && !b.ours(clientv3.LeaseID(kv.Lease)) {
				return written{}, errTakenOver
			}
			if _, stored, err := decodeValue(kv); err == nil {
				t = stored
			}
			cmp = clientv3.Compare(clientv3.ModRevision(key), "=", kv.ModRevision)
		} else if mode == putRestore {
			taken, _, err := b.changedByOther(key, modRev)
			if err != nil {
				return written{}, err
			}
			if taken {
				return written{}, errTakenOver
			}
		}
		ctx, cancel = context.WithTimeout(b.ctx, b.attempt)
		tr, err := b.client.Txn(ctx).If(cmp).Then(clientv3.OpPut(key, encodeValue(val, t, 0), clientv3.WithLease(lease))).Commit()
		cancel()
		if err != nil {
			return written{}, err
		}
		if tr.Succeeded {
			if t == 0 {
				t = token(tr.Header.Revision, 0) // alone in its transaction: seq 0
			}
			return written{t, tr.Header.Revision}, nil
		}
	}
	return written{}, fmt.Errorf("key %s: changed by other writers %d times in a row", key, maxWriteAttempts)
}

// remove deletes key if it is still this backend's: prev is what the
// backend held for it (nil if nothing). It returns backend.ErrNotOwner,
// deleting nothing, when the key is another session's. The delete is batched when the
// backend knows the ModRevision of its own last write; otherwise, or when
// that condition fails, the key is read and deleted only if it is on one
// of the backend's leases. The caller holds key's lock.
func (b *Backend) remove(ctx context.Context, key string, prev *reg) error {
	if prev != nil && prev.modRev != 0 {
		modRev := prev.modRev
		out, err := b.writes.do(ctx, key, 0, len(key), func(int) clientv3.Op {
			return clientv3.OpTxn([]clientv3.Cmp{clientv3.Compare(clientv3.ModRevision(key), "=", modRev)}, []clientv3.Op{clientv3.OpDelete(key)}, nil)
		})
		if err != nil || out.ok {
			return err
		}
	} else if err := ctx.Err(); err != nil {
		return err // nothing sent yet
	}
	for range maxWriteAttempts {
		ctx, cancel := context.WithTimeout(b.ctx, b.attempt)
		resp, err := b.client.Get(ctx, key)
		cancel()
		if err != nil {
			return err
		}
		if len(resp.Kvs) == 0 {
			return nil
		}
		if !b.ours(clientv3.LeaseID(resp.Kvs[0].Lease)) {
			return backend.ErrNotOwner
		}
		ctx, cancel = context.WithTimeout(b.ctx, b.attempt)
		tr, err := b.client.Txn(ctx).If(clientv3.Compare(clientv3.ModRevision(key), "=", resp.Kvs[0].ModRevision)).Then(clientv3.OpDelete(key)).Commit()
		cancel()
		if err != nil || tr.Succeeded {
			return err
		}
	}
	return fmt.Errorf("key %s: changed by other writers %d times in a row", key, maxWriteAttempts)
}

// changedByOther reports whether another session put key after revision
// modRev (b's own last write of it); known is false when the history
// cannot tell (modRev 0, or compacted away). Callers ask about a key that
// changed since (it is missing, or on another lease), so the watch from
// modRev+1 delivers at least one event; the check reads the first response
// that has events, and every event in it. A watch that starts in the past
// gets, in that first response, every change up to the store's revision
// when it caught up (etcd sends a watcher's backlog at once), which covers
// what the caller read before. The whole backlog counts, not only its
// first change: during a store stall b's lease can expire (a delete),
// another agent take the key over afresh (a put) and that agent's lease
// expire too (a delete), leaving the key missing as if only b's lease had
// run out; writing it back then would bring an older token after a newer
// one.
//
// (Not a progress notification to learn that the backlog was all sent:
// etcd 3.4.23, the fault suite's, was seen to send it ahead of the
// watch's events.)
func (b *Backend) changedByOther(key string, modRev int64) (taken, known bool, err error) {
	if modRev == 0 {
		return false, false, nil
	}
	ctx, cancel := context.WithTimeout(b.ctx, b.attempt)
	defer cancel()
	for resp := range b.client.Watch(ctx, key, clientv3.WithRev(modRev+1)) {
		if resp.CompactRevision != 0 {
			return false, false, nil
		}
		if err := resp.Err(); err != nil {
			return false, false, err
		}
		if len(resp.Events) == 0 {
			continue
		}
		for _, ev := range resp.Events {
			if ev.Type == clientv3.EventTypePut && !b.ours(clientv3.LeaseID(ev.Kv.Lease)) {
				return true, true, nil
			}
		}
		return false, true, nil
	}
	if err := ctx.Err(); err != nil {
		return false, false, err
	}
	return false, false, errors.New("watch of the key's history ended")
}

// ours reports whether lease was granted to this backend.
func (b *Backend) ours(lease clientv3.LeaseID) bool {
	if lease == 0 {
		return false
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	_, ok := b.own[lease]
	return ok
}

// The anti-entropy. Once per TTL the backend compares the keys attached
// to its lease with the registrations it holds, and repairs the drift
// that a write of unknown outcome (a timeout, a crash mid-write) or an
// outside hand can leave:
//   - a key on its lease that it does not hold is deleted (if it is still
//     on the lease);
//   - a registration it holds as stored that is not on its lease is read:
//     written again (keeping its token) when it is missing, dropped from
//     what the backend holds when another session now owns it.
// A key whose lock is busy is left for the next pass.

// antiEntropy runs the passes until Close.
func (b *Backend) antiEntropy() {
	defer b.wg.Done()
	t := time.NewTicker(time.Duration(b.ttl) * time.Second)
	defer t.Stop()
	for {
		select {
		case <-b.ctx.Done():
			return
		case <-t.C:
			if err := b.reconcile(); err != nil && b.ctx.Err() == nil {
				b.log.Debug("etcd anti-entropy pass failed; retrying at the next", "error", err)
			}
		}
	}
}

// reconcile is one anti-entropy pass.
func (b *Backend) reconcile() error {
	lease := b.currentLease()
	if lease == 0 {
		return nil // a renewal is restoring everything
	}
	ctx, cancel := context.WithTimeout(b.ctx, b.attempt)
	resp, err := b.client.TimeToLive(ctx, lease, clientv3.WithAttachedKeys())
	cancel()
	if err != nil {
		return err
	}
	attached := make(map[string]bool, len(resp.Keys))
	for _, k := range resp.Keys {
		attached[string(k)] = true
	}
	var extra, missing []string
	b.mu.Lock()
	for k := range attached {
		if b.regs[k] == nil {
			extra = append(extra, k)
		}
	}
	for k, r := range b.regs {
		if r.stored && !attached[k] {
			missing = append(missing, k)
		}
	}
	b.mu.Unlock()
	var errs []error
	for _, k := range extra {
		errs = append(errs, b.repair(k, lease, b.repairExtra))
	}
	for _, k := range missing {
		errs = append(errs, b.repair(k, lease, b.repairMissing))
	}
	return errors.Join(errs...)
}

// repair runs fix on key under its lock, if the lock is free soon and the
// lease is still current.
func (b *Backend) repair(key string, lease clientv3.LeaseID, fix func(key string, lease clientv3.LeaseID) error) error {
	ctx, cancel := context.WithTimeout(b.ctx, 10*time.Millisecond)
	unlock, err := b.locks.Lock(ctx, key)
	cancel()
	if err != nil {
		return nil // busy: its writer decides; the next pass looks again
	}
	defer unlock()
	if b.currentLease() != lease {
		return nil
	}
	return fix(key, lease)
}

// repairExtra deletes key, found on lease without being held, if it is
// still not held and still on lease.
func (b *Backend) repairExtra(key string, lease clientv3.LeaseID) error {
	b.mu.Lock()
	held := b.regs[key] != nil
	b.mu.Unlock()
	if held {
		return nil
	}
	ctx, cancel := context.WithTimeout(b.ctx, b.attempt)
	defer cancel()
	tr, err := b.client.Txn(ctx).If(clientv3.Compare(clientv3.LeaseValue(key), "=", int64(lease))).Then(clientv3.OpDelete(key)).Commit()
	if err != nil || !tr.Succeeded {
		return err
	}
	b.log.Warn("etcd anti-entropy: deleted a key on this agent's lease that no session holds", "key", key)
	b.mu.Lock()
	b.repairs++
	b.mu.Unlock()
	return nil
}

// repairMissing writes key again, held as stored but not on lease, unless
// another session owns it now (then it is dropped).
func (b *Backend) repairMissing(key string, lease clientv3.LeaseID) error {
	b.mu.Lock()
	r := b.regs[key]
	var (
		stored bool
		val    string
		tok    uint64
		modRev int64
	)
	if r != nil {
		stored, val, tok, modRev = r.stored, r.val, r.token, r.modRev
	}
	b.mu.Unlock()
	if !stored {
		return nil
	}
	// Attached to the lease since the pass listed it: nothing to do.
	// Another session's, or missing with another session's put in its
	// history since b's own last write (taken over through another agent,
	// perhaps removed there: its owner is gone, it must not come back):
	// dropped. Missing with a history that cannot tell: dropped all the
	// same; its client, whose heartbeats fail from then on, registers it
	// again afresh. Otherwise (erased, or on an old lease of b's) it is
	// written again.
	h, err := b.keyHistory(key, modRev)
	switch {
	case err != nil:
		return err
	case h.exists && h.lease == lease:
		return nil
	case h.foreign || !h.known:
		b.dropLost(key, r)
		return nil
	}
	w, err := b.putSlow(key, val, tok, lease, putRestore, modRev)
	switch {
	case errors.Is(err, errTakenOver):
		b.dropLost(key, r)
		return nil
	case err != nil:
		return err
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.regs[key] == r {
		r.token, r.modRev = w.token, w.modRev
	}
	b.repairs++
	b.log.Warn("etcd anti-entropy: wrote again a held registration missing from the store", "key", key)
	return nil
}

// reclaim waits d, then revokes every lease of the store that b was not
// granted (Config.ReclaimAfter). It runs once, until done or Close.
func (b *Backend) reclaim(d time.Duration) {
	defer b.wg.Done()
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-b.ctx.Done():
		return
	case <-t.C:
	}
	ctx, cancel := context.WithTimeout(b.ctx, b.attempt)
	resp, err := b.client.Leases(ctx)
	cancel()
	if err != nil {
		b.log.Warn("could not list the leases of a previous run; its registrations expire with their TTL", "error", err)
		return
	}
	revoked := 0
	for _, l := range resp.Leases {
		if b.ours(l.ID) {
			continue
		}
		ctx, cancel := context.WithTimeout(b.ctx, b.attempt)
		_, err := b.client.Revoke(ctx, l.ID)
		cancel()
		if err == nil {
			revoked++
		}
	}
	if revoked > 0 {
		b.log.Info("revoked the leases of a previous run: registrations no client claimed back are gone", "leases", revoked, "after", d)
	}
}
