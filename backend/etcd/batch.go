package etcd

import (
	"context"
	"sync"
	"sync/atomic"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/flynn/discoverd/backend"
)

// The write batcher. etcd pays a fixed cost per request (gRPC, a raft
// entry, a WAL write, the apply), so one client sending one Put per
// registration reaches the store's request rate, not its write rate.
// Writes made concurrently are gathered into one transaction instead:
// a writer goroutine takes the oldest queued write, adds whatever else is
// queued at that moment, and sends them at once. Nothing waits for
// company (no timer): a lone write is sent as soon as a writer is free,
// and batches form only while writers are busy, which is when they help.
//
// Rules of a transaction: at most batchOps writes and about batchBytes
// of keys and values (etcd refuses more than 128 operations or 1.5 MiB
// by default); every put in it is on the same lease, so that etcd's
// "lease not found" is true of every write in it (a writer that reads it
// declares its lease lost); and no key twice (etcd refuses that). A
// write that breaks a rule waits, in its writer, for a later transaction.
// Writes of one key are serialised by the callers (Backend's key locks),
// so transactions are never racing each other on a key.
//
// Each write is a conditional operation of its own (a nested transaction
// with its own compare), so one write's failed condition fails only that
// write, and each write learns its place in the transaction (the seq of
// a fencing token) and the revision the transaction committed at.
//
// A write that was sent is never abandoned because its caller gave up:
// etcd may apply a request whose client stopped waiting, so a caller that
// went on (and, say, deleted the key) could see the write land after it.
// The caller waits for the transaction's outcome instead, which is
// bounded by the batcher's own timeout.

// Batching limits.
const (
	batchWriters = 4             // transactions in flight at once
	batchOps     = maxTxnOps / 2 // writes per transaction: each is a nested transaction, whose operations etcd counts against the --max-txn-ops budget (128) left by the outer one
	batchBytes   = 1 << 19       // bytes of keys and values per transaction (etcd's limit is 1.5 MiB); a larger write goes alone
	batchQueue   = 1024          // writes queued for the writers; callers block while it is full
)

// commitFunc sends ops as one transaction. ctx ends when the batcher
// closes or the batcher's timeout passes.
type commitFunc func(ctx context.Context, ops []clientv3.Op) (*clientv3.TxnResponse, error)

// outcome is what a sent write learns from its transaction.
type outcome struct {
	rev int64 // the revision the transaction committed at
	seq int   // the write's place in the transaction
	ok  bool  // the write's condition held (it was applied)
}

// batcher gathers concurrent writes into transactions. Its goroutines run
// from newBatcher until its context is done; wait waits for them. Its
// methods are safe for concurrent use.
type batcher struct {
	ctx      context.Context // the owner's: ends the writers
	commit   commitFunc
	timeout  time.Duration // bound on one transaction
	maxOps   int
	maxBytes int
	queue    chan *write
	wg       sync.WaitGroup
}

// write is one caller's operation, from its call to its result.
type write struct {
	ctx   context.Context           // the caller's
	op    func(seq int) clientv3.Op // builds the operation, given its place in the transaction
	key   string
	lease clientv3.LeaseID // 0 for a delete; puts share a transaction only with puts on the same lease
	size  int
	state atomic.Int32 // writeQueued, then writeSent by a writer or writeAbandoned by the caller
	seq   int          // set by the writer that sends it
	done  chan result  // capacity 1; receives the transaction's result once sent
}

type result struct {
	out outcome
	err error
}

const (
	writeQueued int32 = iota
	writeSent
	writeAbandoned
)

// newBatcher starts writers goroutines that send the queued writes with
// commit until ctx is done. A transaction holds at most maxOps writes and
// maxBytes of keys and values (a single larger write goes alone); at most
// queued writes wait for a writer; a transaction is abandoned after
// timeout.
func newBatcher(ctx context.Context, commit commitFunc, timeout time.Duration, writers, maxOps, maxBytes, queued int) *batcher {
	q := &batcher{
		ctx:      ctx,
		commit:   commit,
		timeout:  timeout,
		maxOps:   maxOps,
		maxBytes: maxBytes,
		queue:    make(chan *write, queued),
	}
	q.wg.Add(writers)
	for range writers {
		go q.run()
	}
	return q
}

// wait blocks until every writer has returned (after the batcher's
// context is done).
func (q *batcher) wait() { q.wg.Wait() }

// do queues a write of key, built by op, and blocks until its
// transaction's outcome. lease is the lease of a put (0 for a delete):
// puts share a transaction only with puts on the same lease. The caller
// must not have another write of the same key queued or in flight. If
// ctx ends, or the batcher closes, before a writer sends the write, it is
// never sent and do returns ctx.Err() (backend.ErrClosed when the batcher
// closed). Once sent, do waits for the transaction's outcome whatever
// happens to ctx: the transaction ends with its result, or is abandoned
// when the batcher closes (backend.ErrClosed) or its timeout passes (the
// commit's error); the write may then have been applied or not.
func (q *batcher) do(ctx context.Context, key string, lease clientv3.LeaseID, size int, op func(seq int) clientv3.Op) (outcome, error) {
	w := &write{ctx: ctx, op: op, key: key, lease: lease, size: size, done: make(chan result, 1)}
	select {
	case q.queue <- w:
	case <-ctx.Done():
		return outcome{}, ctx.Err()
	case <-q.ctx.Done():
		return outcome{}, backend.ErrClosed
	}
	var gaveUp error
	select {
	case r := <-w.done:
		return r.out, q.result(r.err)
	case <-ctx.Done():
		gaveUp = ctx.Err()
	case <-q.ctx.Done():
		gaveUp = backend.ErrClosed
	}
	if w.state.CompareAndSwap(writeQueued, writeAbandoned) {
		return outcome{}, gaveUp
	}
	r := <-w.done // sent: wait for its outcome
	return r.out, q.result(r.err)
}

// result is what the caller of a sent write gets for its transaction's
// err: a transaction cut by the batcher's close is backend.ErrClosed.
func (q *batcher) result(err error) error {
	if err != nil && q.ctx.Err() != nil {
		return backend.ErrClosed
	}
	return err
}

// run is one writer: it sends a transaction of queued writes at a time
// until the batcher's context is done.
func (q *batcher) run() {
	defer q.wg.Done()
	var (
		held  []*write // taken from the queue but left for a later transaction
		batch []*write
		keys  = make(map[string]struct{})
		ops   []clientv3.Op
	)
	for q.ctx.Err() == nil {
		if len(held) == 0 {
			select {
			case w := <-q.queue:
				held = append(held, w)
			case <-q.ctx.Done():
				return
			}
		}
		batch, held = q.fill(batch[:0], held, keys)
		clear(keys)
		if len(batch) == 0 {
			continue // all abandoned
		}
		ops = ops[:0]
		for i, w := range batch {
			w.seq = i
			ops = append(ops, w.op(i))
		}
		resp, err := q.send(ops)
		for i, w := range batch {
			r := result{err: err}
			if err == nil {
				r.out = outcome{rev: resp.Header.Revision, seq: i, ok: succeeded(resp, i)}
			}
			w.done <- r
			batch[i] = nil
		}
		clear(ops)
	}
	// Callers of held writes see the batcher closed.
}

// fill builds the next transaction: the held writes first (oldest), then
// what is queued now, without waiting. Each write it takes is marked sent,
// unless its caller abandoned it (then it is dropped). It returns the
// transaction and the writes held for a later one (at most maxOps).
func (q *batcher) fill(batch, held []*write, keys map[string]struct{}) ([]*write, []*write) {
	var (
		lease clientv3.LeaseID
		bytes int
		later = held[:0]
	)
	take := func(w *write) {
		if w.state.Load() != writeQueued {
			return // abandoned
		}
		_, dup := keys[w.key]
		fits := len(batch) == 0 ||
			(w.lease == lease && !dup && len(batch) < q.maxOps && bytes+w.size <= q.maxBytes)
		if !fits {
			later = append(later, w)
			return
		}
		if !w.state.CompareAndSwap(writeQueued, writeSent) {
			return // abandoned just now
		}
		if len(batch) == 0 {
			lease = w.lease
		}
		batch = append(batch, w)
		keys[w.key] = struct{}{}
		bytes += w.size
	}
	for _, w := range held {
		take(w)
	}
	clear(held[len(later):])
	for len(batch) < q.maxOps && len(later) < q.maxOps {
		select {
		case w := <-q.queue:
			take(w)
		default:
			return batch, later // nothing more queued now
		}
	}
	return batch, later
}

// send commits ops, bounded by the batcher's timeout and its close.
func (q *batcher) send(ops []clientv3.Op) (*clientv3.TxnResponse, error) {
	ctx, cancel := context.WithTimeout(q.ctx, q.timeout)
	defer cancel()
	return q.commit(ctx, ops)
}

// succeeded reports whether the i-th operation of a transaction applied:
// its nested transaction's condition held (an unconditional operation
// always applies).
func succeeded(resp *clientv3.TxnResponse, i int) bool {
	if i >= len(resp.Responses) {
		return false
	}
	if t := resp.Responses[i].GetResponseTxn(); t != nil {
		return t.Succeeded
	}
	return true
}
