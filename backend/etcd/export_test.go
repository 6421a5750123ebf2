package etcd

import (
	"context"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// Unexported functions under test in package etcd_test.
var (
	Decode      = decode
	EncodeAttrs = encodeAttrs
)

// Batcher is the write batcher, for tests that drive it with their own
// commit function (the seam between it and the etcd client).
type Batcher = batcher

// NewBatcher starts a batcher; see newBatcher.
func NewBatcher(ctx context.Context, commit func(context.Context, []clientv3.Op) error, writers, maxOps, maxBytes, queued int) *Batcher {
	return newBatcher(ctx, commit, writers, maxOps, maxBytes, queued)
}

func (q *Batcher) Put(ctx context.Context, key, val string, lease clientv3.LeaseID) error {
	return q.put(ctx, key, val, lease)
}

func (q *Batcher) Delete(ctx context.Context, key string) error { return q.delete(ctx, key) }

// Queued is the number of writes waiting in the queue (not yet taken by
// a writer).
func (q *Batcher) Queued() int { return len(q.queue) }

func (q *Batcher) Wait() { q.wait() }

// LeaseOf returns b's current lease (0 while a lost one is being
// replaced).
func LeaseOf(b *Backend) clientv3.LeaseID { return b.currentLease() }

// StopServer stops e's etcd server as a fatal error of its own would, not
// through Close.
func (e *Embedded) StopServer() { e.etcd.Server.Stop() }
