package etcd

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"

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

// Batching limits.
const (
	batchWriters = 4       // transactions in flight at once
	batchOps     = 128     // writes per transaction: etcd's default --max-txn-ops
	batchBytes   = 1 << 19 // bytes of keys and values per transaction (etcd's limit is 1.5 MiB); a larger write goes alone
	batchQueue   = 1024    // writes queued for the writers; callers block while it is full
)

// commitFunc sends ops as one transaction. ctx ends when the batcher
// closes or every caller of the transaction has given up.
type commitFunc func(ctx context.Context, ops []clientv3.Op) error

// batcher gathers concurrent writes into transactions. Its goroutines run
// from newBatcher until its context is done; wait waits for them. Its
// methods are safe for concurrent use.
type batcher struct {
	ctx      context.Context // the owner's: ends the writers
	commit   commitFunc
	maxOps   int
	maxBytes int
	queue    chan *write
	wg       sync.WaitGroup
}

// write is one caller's operation, from its call to its result.
type write struct {
	ctx   context.Context // the caller's
	op    clientv3.Op
	key   string
	lease clientv3.LeaseID // 0 for a delete; puts share a transaction only with puts on the same lease
	size  int
	state atomic.Int32 // writeQueued, then writeSent by a writer or writeAbandoned by the caller
	done  chan error   // capacity 1; receives the transaction's result once sent
}

const (
	writeQueued int32 = iota
	writeSent
	writeAbandoned
)

// newBatcher starts writers goroutines that send the queued writes with
// commit until ctx is done. A transaction holds at most maxOps writes and
// maxBytes of keys and values (a single larger write goes alone); at most
// queued writes wait for a writer.
func newBatcher(ctx context.Context, commit commitFunc, writers, maxOps, maxBytes, queued int) *batcher {
	q := &batcher{
		ctx:      ctx,
		commit:   commit,
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

// put writes key=val on lease as part of a transaction. See do.
func (q *batcher) put(ctx context.Context, key, val string, lease clientv3.LeaseID) error {
	return q.do(ctx, &write{
		op:    clientv3.OpPut(key, val, clientv3.WithLease(lease)),
		key:   key,
		lease: lease,
		size:  len(key) + len(val),
	})
}

// delete deletes key as part of a transaction. See do.
func (q *batcher) delete(ctx context.Context, key string) error {
	return q.do(ctx, &write{op: clientv3.OpDelete(key), key: key, size: len(key)})
}

// do queues w and blocks until its transaction's result. The caller must
// not have another write of the same key queued or in flight. If ctx
// ends, or the batcher closes, before a writer sends w, w is never sent
// and do returns ctx.Err() (backend.ErrClosed when the batcher closed).
// Once sent, do returns the transaction's result, which is the same for
// every write in it. A transaction is abandoned when the batcher closes
// (its callers then get backend.ErrClosed) or the ctx of every write in
// it has ended (ctx.Err()), so a caller whose ctx ends after its write
// was sent waits at most for the callers sharing its transaction.
func (q *batcher) do(ctx context.Context, w *write) error {
	w.ctx, w.done = ctx, make(chan error, 1)
	select {
	case q.queue <- w:
	case <-ctx.Done():
		return ctx.Err()
	case <-q.ctx.Done():
		return backend.ErrClosed
	}
	var gaveUp error
	select {
	case err := <-w.done:
		return q.result(ctx, err)
	case <-ctx.Done():
		gaveUp = ctx.Err()
	case <-q.ctx.Done():
		gaveUp = backend.ErrClosed
	}
	if w.state.CompareAndSwap(writeQueued, writeAbandoned) {
		return gaveUp
	}
	return q.result(ctx, <-w.done) // sent: its transaction ends soon after every caller of it gave up
}

// result is what the caller of a sent write with ctx gets for its
// transaction's err: an abandoned transaction's context error becomes why
// it was abandoned.
func (q *batcher) result(ctx context.Context, err error) error {
	if err == nil || !errors.Is(err, context.Canceled) {
		return err
	}
	if q.ctx.Err() != nil {
		return backend.ErrClosed
	}
	if ctx.Err() != nil {
		return ctx.Err()
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
		for _, w := range batch {
			ops = append(ops, w.op)
		}
		err := q.send(batch, ops)
		for i, w := range batch {
			w.done <- err
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

// send commits ops, the writes of batch, with a context that ends when
// the batcher closes or every caller in batch has given up.
func (q *batcher) send(batch []*write, ops []clientv3.Op) error {
	ctx, cancel := context.WithCancel(q.ctx)
	defer cancel()
	var waiting atomic.Int64
	waiting.Store(int64(len(batch)))
	stops := make([]func() bool, len(batch))
	for i, w := range batch {
		stops[i] = context.AfterFunc(w.ctx, func() {
			if waiting.Add(-1) == 0 {
				cancel()
			}
		})
	}
	err := q.commit(ctx, ops)
	for _, stop := range stops {
		stop()
	}
	return err
}
