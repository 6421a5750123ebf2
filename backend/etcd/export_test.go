package etcd

import (
	"context"
	"sync"
	"time"

	"go.etcd.io/etcd/api/v3/etcdserverpb"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// Unexported functions under test in package etcd_test.
var (
	EncodeAttrs = encodeAttrs
	EncodeValue = encodeValue
)

// Batcher is the write batcher, for tests that drive it with their own
// commit function (the seam between it and the etcd client).
type Batcher = batcher

// NewBatcher starts a batcher whose transactions are abandoned after a
// minute; see newBatcher. commit answers a transaction with an error
// only; a nil answer applies every write of it.
func NewBatcher(ctx context.Context, commit func(context.Context, []clientv3.Op) error, writers, maxOps, maxBytes, queued int) *Batcher {
	var rev int64
	var mu sync.Mutex
	full := func(ctx context.Context, ops []clientv3.Op) (*clientv3.TxnResponse, error) {
		if err := commit(ctx, ops); err != nil {
			return nil, err
		}
		mu.Lock()
		rev++
		r := rev
		mu.Unlock()
		return &clientv3.TxnResponse{Header: &etcdserverpb.ResponseHeader{Revision: r}, Succeeded: true}, nil
	}
	return newBatcher(ctx, full, time.Minute, writers, maxOps, maxBytes, queued)
}

// Put writes key=val on lease, unconditionally.
func (q *Batcher) Put(ctx context.Context, key, val string, lease clientv3.LeaseID) error {
	_, err := q.do(ctx, key, lease, len(key)+len(val), func(int) clientv3.Op {
		return clientv3.OpPut(key, val, clientv3.WithLease(lease))
	})
	return err
}

// Delete deletes key, unconditionally.
func (q *Batcher) Delete(ctx context.Context, key string) error {
	_, err := q.do(ctx, key, 0, len(key), func(int) clientv3.Op { return clientv3.OpDelete(key) })
	return err
}

// Queued is the number of writes waiting in the queue (not yet taken by
// a writer).
func (q *Batcher) Queued() int { return len(q.queue) }

func (q *Batcher) Wait() { q.wait() }

// LeaseOf returns b's current lease (0 while a lost one is being
// replaced).
func LeaseOf(b *Backend) clientv3.LeaseID { return b.currentLease() }
