package etcd_test

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/flynn/discoverd/backend"
	"github.com/flynn/discoverd/backend/etcd"
	"github.com/flynn/discoverd/backend/etcd/etcdtest"
)

// These tests drive the write batcher through its one seam, the function
// that commits a transaction, so that the test decides when each
// transaction ends and can hold writes in the queue. TestConcurrentWrites
// and TestCloseWithWritesInFlight run it against a real store.

// gate is a commit function that hands each transaction to the test and
// returns what the test answers (or the transaction's ctx error).
type gate struct{ txns chan *txn }

type txn struct {
	ctx    context.Context
	ops    []string // "key=val" for a put, "-key" for a delete
	answer chan error
}

func newGate() *gate { return &gate{txns: make(chan *txn)} }

func (g *gate) commit(ctx context.Context, ops []clientv3.Op) error {
	t := &txn{ctx: ctx, answer: make(chan error, 1)}
	for _, op := range ops {
		if op.IsDelete() {
			t.ops = append(t.ops, "-"+string(op.KeyBytes()))
		} else {
			t.ops = append(t.ops, string(op.KeyBytes())+"="+string(op.ValueBytes()))
		}
	}
	select {
	case g.txns <- t:
	case <-ctx.Done():
		return ctx.Err()
	}
	select {
	case err := <-t.answer:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// next returns the next transaction sent, failing tb if none comes.
func (g *gate) next(tb testing.TB) *txn {
	tb.Helper()
	timer := time.NewTimer(waitTimeout)
	defer timer.Stop()
	select {
	case t := <-g.txns:
		return t
	case <-timer.C:
		tb.Fatalf("no transaction within %v", waitTimeout)
	}
	return nil
}

// none fails tb if a transaction is waiting to be sent now. Writers hand
// over a transaction without blocking on anything else, so after their
// callers' results are in, one that was due would already be waiting.
func (g *gate) none(tb testing.TB) {
	tb.Helper()
	select {
	case t := <-g.txns:
		tb.Fatalf("unexpected transaction %v", t.ops)
	default:
	}
}

// call is a write running in its own goroutine.
type call struct {
	cancel context.CancelFunc
	done   chan error
}

func startPut(q *etcd.Batcher, key, val string, lease clientv3.LeaseID) *call {
	return start(func(ctx context.Context) error { return q.Put(ctx, key, val, lease) })
}

func start(f func(ctx context.Context) error) *call {
	ctx, cancel := context.WithCancel(context.Background())
	c := &call{cancel: cancel, done: make(chan error, 1)}
	go func() { c.done <- f(ctx) }()
	return c
}

func (c *call) result(tb testing.TB) error {
	tb.Helper()
	defer c.cancel()
	timer := time.NewTimer(waitTimeout)
	defer timer.Stop()
	select {
	case err := <-c.done:
		return err
	case <-timer.C:
		tb.Fatalf("write did not return within %v", waitTimeout)
	}
	return nil
}

// waitQueued waits until n writes wait in q's queue.
func waitQueued(tb testing.TB, q *etcd.Batcher, n int) {
	tb.Helper()
	deadline := time.NewTimer(waitTimeout)
	defer deadline.Stop()
	tick := time.NewTicker(time.Millisecond)
	defer tick.Stop()
	for q.Queued() != n {
		select {
		case <-tick.C:
		case <-deadline.C:
			tb.Fatalf("%d writes queued after %v, want %d", q.Queued(), waitTimeout, n)
		}
	}
}

// mustBatcher starts a batcher with one writer on g, stopped and waited
// for by tb.Cleanup.
func mustBatcher(tb testing.TB, g *gate, maxOps, maxBytes, queued int) (*etcd.Batcher, context.CancelFunc) {
	ctx, cancel := context.WithCancel(context.Background())
	q := etcd.NewBatcher(ctx, g.commit, 1, maxOps, maxBytes, queued)
	tb.Cleanup(func() { cancel(); q.Wait() })
	return q, cancel
}

// TestBatcherTransactions: writes queued while the writer is busy go out
// together in the next transaction, within its rules; each caller gets
// its own transaction's result.
func TestBatcherTransactions(t *testing.T) {
	t.Parallel()
	type w struct {
		key, val string // val "" is a delete
		lease    clientv3.LeaseID
	}
	for _, tc := range []struct {
		name   string
		queued []w
		want   [][]string // the transactions after the first, in order
	}{
		{
			name:   "gathered",
			queued: []w{{"b", "1", 1}, {"c", "2", 1}, {"d", "3", 1}},
			want:   [][]string{{"b=1", "c=2", "d=3"}},
		},
		{
			name:   "one lease per transaction",
			queued: []w{{"b", "1", 1}, {"c", "2", 2}, {"d", "3", 1}, {"e", "4", 2}},
			want:   [][]string{{"b=1", "d=3"}, {"c=2", "e=4"}},
		},
		{
			name:   "deletes apart from puts",
			queued: []w{{"b", "", 0}, {"c", "2", 1}, {"d", "", 0}},
			want:   [][]string{{"-b", "-d"}, {"c=2"}},
		},
		{
			name:   "no key twice",
			queued: []w{{"b", "1", 1}, {"b", "2", 1}, {"c", "3", 1}},
			want:   [][]string{{"b=1", "c=3"}, {"b=2"}},
		},
		{
			name:   "at most maxOps",
			queued: []w{{"b", "1", 1}, {"c", "2", 1}, {"d", "3", 1}, {"e", "4", 1}},
			want:   [][]string{{"b=1", "c=2", "d=3"}, {"e=4"}},
		},
		{
			name:   "at most maxBytes, a larger write alone",
			queued: []w{{"b", "12345678", 1}, {"c", "1234567890123", 1}, {"d", "1", 1}, {"e", "12", 1}},
			want:   [][]string{{"b=12345678", "d=1"}, {"c=1234567890123"}, {"e=12"}},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			g := newGate()
			q, _ := mustBatcher(t, g, 3, 12, 16)
			first := startPut(q, "a", "0", 1)
			busy := g.next(t)
			var calls []*call
			for i, w := range tc.queued {
				if w.val == "" {
					calls = append(calls, start(func(ctx context.Context) error { return q.Delete(ctx, w.key) }))
				} else {
					calls = append(calls, startPut(q, w.key, w.val, w.lease))
				}
				waitQueued(t, q, i+1)
			}
			busy.answer <- nil
			if err := first.result(t); err != nil {
				t.Fatalf("first write: %v", err)
			}
			// Each transaction fails with its own error, so that each
			// caller can be checked to get its own.
			errOf := map[string]error{}
			for i, want := range tc.want {
				tx := g.next(t)
				if !slices.Equal(tx.ops, want) {
					t.Fatalf("transaction %d: %v, want %v", i+1, tx.ops, want)
				}
				err := errors.New(strings.Join(want, " "))
				for _, op := range want {
					errOf[op] = err
				}
				tx.answer <- err
			}
			for i, c := range calls {
				w := tc.queued[i]
				op := "-" + w.key
				if w.val != "" {
					op = w.key + "=" + w.val
				}
				if err := c.result(t); err != errOf[op] {
					t.Errorf("write %s: %v, want %v", op, err, errOf[op])
				}
			}
			g.none(t)
		})
	}
}

// TestBatcherLoneWrite: a write made while the writer is idle is sent at
// once, alone, and its caller gets the result.
func TestBatcherLoneWrite(t *testing.T) {
	t.Parallel()
	g := newGate()
	q, _ := mustBatcher(t, g, 128, 1<<20, 16)
	for i := range 3 {
		c := startPut(q, "k", "v", 1)
		tx := g.next(t)
		if !slices.Equal(tx.ops, []string{"k=v"}) {
			t.Fatalf("write %d: transaction %v", i, tx.ops)
		}
		tx.answer <- nil
		if err := c.result(t); err != nil {
			t.Fatalf("write %d: %v", i, err)
		}
	}
}

// TestBatcherCancelQueued: a caller that gives up while its write waits
// in the queue (or to get into a full queue) gets its ctx error, and the
// write is never sent.
func TestBatcherCancelQueued(t *testing.T) {
	t.Parallel()
	g := newGate()
	q, _ := mustBatcher(t, g, 128, 1<<20, 2)
	first := startPut(q, "a", "1", 1)
	busy := g.next(t)
	queued := startPut(q, "b", "1", 1)
	waitQueued(t, q, 1)
	kept := startPut(q, "c", "1", 1)
	waitQueued(t, q, 2)
	blocked := startPut(q, "d", "1", 1) // the queue is full

	queued.cancel()
	if err := queued.result(t); !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled while queued: %v, want context.Canceled", err)
	}
	blocked.cancel()
	if err := blocked.result(t); !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled while the queue was full: %v, want context.Canceled", err)
	}
	busy.answer <- nil
	if err := first.result(t); err != nil {
		t.Fatal(err)
	}
	tx := g.next(t)
	if !slices.Equal(tx.ops, []string{"c=1"}) {
		t.Errorf("next transaction %v, want only the write still wanted, [c=1]", tx.ops)
	}
	tx.answer <- nil
	if err := kept.result(t); err != nil {
		t.Error(err)
	}
	g.none(t)
}

// TestBatcherCancelSent: a caller that gives up after its write was sent
// gets the transaction's result; the transaction is abandoned only when
// every caller in it has given up.
func TestBatcherCancelSent(t *testing.T) {
	t.Parallel()
	g := newGate()
	q, _ := mustBatcher(t, g, 128, 1<<20, 16)
	first := startPut(q, "a", "1", 1)
	busy := g.next(t)
	b := startPut(q, "b", "1", 1)
	waitQueued(t, q, 1)
	c := startPut(q, "c", "1", 1)
	waitQueued(t, q, 2)
	busy.answer <- nil
	if err := first.result(t); err != nil {
		t.Fatal(err)
	}
	tx := g.next(t)
	if !slices.Equal(tx.ops, []string{"b=1", "c=1"}) {
		t.Fatalf("transaction %v", tx.ops)
	}
	b.cancel()
	tx.answer <- nil // c still waits: the transaction goes on
	if err := b.result(t); err != nil {
		t.Errorf("cancelled after it was sent: %v, want the transaction's result (nil)", err)
	}
	if err := c.result(t); err != nil {
		t.Error(err)
	}

	// Both callers of a transaction give up: it is not abandoned (etcd
	// may apply a request whose client stopped waiting), and both learn
	// its outcome.
	first = startPut(q, "a", "2", 1)
	busy = g.next(t)
	d := startPut(q, "d", "1", 1)
	waitQueued(t, q, 1)
	e := startPut(q, "e", "1", 1)
	waitQueued(t, q, 2)
	busy.answer <- nil
	if err := first.result(t); err != nil {
		t.Fatal(err)
	}
	tx = g.next(t)
	if !slices.Equal(tx.ops, []string{"d=1", "e=1"}) {
		t.Fatalf("transaction %v", tx.ops)
	}
	d.cancel()
	e.cancel()
	select {
	case <-tx.ctx.Done():
		t.Fatal("transaction abandoned when its callers gave up")
	case err := <-d.done:
		t.Fatalf("a caller returned (%v) before its sent transaction ended", err)
	default:
	}
	tx.answer <- nil
	for _, c := range []*call{d, e} {
		if err := c.result(t); err != nil {
			t.Errorf("sent transaction applied, callers gone: %v, want nil (the write is done)", err)
		}
	}
	g.none(t)
}

// TestBatcherClose: when the batcher's context ends, queued writes are
// not sent and their callers get backend.ErrClosed, the transaction in
// flight is abandoned, and the writers return.
func TestBatcherClose(t *testing.T) {
	t.Parallel()
	g := newGate()
	ctx, stop := context.WithCancel(context.Background())
	q := etcd.NewBatcher(ctx, g.commit, 1, 128, 1<<20, 4)
	sent := startPut(q, "a", "1", 1)
	tx := g.next(t)
	var queued []*call
	for i, k := range []string{"b", "c", "d", "e", "f"} { // f waits for room in the queue
		queued = append(queued, startPut(q, k, "1", 1))
		if i < 4 {
			waitQueued(t, q, i+1)
		}
	}
	stop()
	if err := sent.result(t); !errors.Is(err, backend.ErrClosed) {
		t.Errorf("write in flight at close: %v, want backend.ErrClosed", err)
	}
	if tx.ctx.Err() == nil {
		t.Error("transaction in flight not abandoned")
	}
	for i, c := range queued {
		if err := c.result(t); !errors.Is(err, backend.ErrClosed) {
			t.Errorf("queued write %d at close: %v, want backend.ErrClosed", i, err)
		}
	}
	q.Wait()
	if err := q.Put(context.Background(), "g", "1", 1); !errors.Is(err, backend.ErrClosed) {
		t.Errorf("write after close: %v, want backend.ErrClosed", err)
	}
	g.none(t)
}

// op is one acknowledged write of TestConcurrentWrites.
type op struct {
	key        string
	val        string // the stored JSON; "" for an Unregister
	start, ack int64  // positions in the order of all calls' starts and returns
}

// TestConcurrentWrites: many goroutines register, update and unregister
// distinct and shared keys at once, through one backend, so that their
// writes share transactions. The store's history must be linearizable
// per key: every acknowledged write applied exactly once, a write that
// returned before another started applied before it, attribute updates
// keeping Created; so the store ends as the last acknowledged write of
// each key.
func TestConcurrentWrites(t *testing.T) {
	t.Parallel()
	srv := etcdtest.NewServer(t)
	b := mustOpen(t, srv.Endpoints(), 30*time.Second)
	cli := mustClient(t, srv.Endpoints())
	ctx := ctxT(t)
	const (
		name    = "concurrent"
		workers = 16
		rounds  = 40
		shared  = 4 // keys every worker writes
		own     = 3 // keys of each worker
	)
	prefix := etcd.DefaultPrefix + name + "/"
	start, err := cli.Get(ctx, "rev")
	if err != nil {
		t.Fatal(err)
	}

	var (
		clock atomic.Int64
		mu    sync.Mutex
		acked []op
		wg    sync.WaitGroup
		errs  = make(chan error, workers)
	)
	write := func(addr string, attrs map[string]string) error {
		o := op{key: prefix + addr, start: clock.Add(1)}
		var err error
		if attrs == nil {
			err = b.Unregister(ctx, name, addr)
		} else {
			o.val, _ = etcd.EncodeAttrs(attrs)
			err = b.Register(ctx, name, addr, attrs)
		}
		o.ack = clock.Add(1)
		if err != nil {
			return fmt.Errorf("%s: %w", addr, err)
		}
		mu.Lock()
		acked = append(acked, o)
		mu.Unlock()
		return nil
	}
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range rounds {
				// Own keys cycle through register, update, unregister.
				k := addr(1000 + w*own + i%own)
				var attrs map[string]string
				if step := (i / own) % 3; step < 2 {
					attrs = map[string]string{"w": strconv.Itoa(w), "i": strconv.Itoa(i)}
				}
				if err := write(k, attrs); err != nil {
					errs <- err
					return
				}
				s := addr((w + i) % shared)
				if err := write(s, map[string]string{"w": strconv.Itoa(w), "i": strconv.Itoa(i)}); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}

	final, err := cli.Get(ctx, prefix, clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	history := replay(t, cli, prefix, start.Header.Revision+1, final.Header.Revision)

	// Per key: the acknowledged writes, and the store's events.
	byKey := map[string][]op{}
	for _, o := range acked {
		byKey[o.key] = append(byKey[o.key], o)
	}
	events := map[string][]*clientv3.Event{}
	txns := map[int64]int{} // events per revision: writes per transaction
	for _, ev := range history {
		k := string(ev.Kv.Key)
		events[k] = append(events[k], ev)
		txns[ev.Kv.ModRevision]++
	}
	for k, ops := range byKey {
		evs := events[k]
		if len(evs) != len(ops) {
			t.Errorf("%s: %d acknowledged writes, %d in the store's history", k, len(ops), len(evs))
			continue
		}
		pos := map[string]int{} // put value (unique per key) or "-<n>" for the n-th delete -> position
		var created int64
		deletes := 0
		for i, ev := range evs {
			if ev.Type == clientv3.EventTypeDelete {
				pos["-"+strconv.Itoa(deletes)] = i
				deletes++
				created = 0
				continue
			}
			in, err := etcd.Decode(prefix, name, ev.Kv)
			if err != nil {
				t.Fatalf("%s: %v", k, err)
			}
			val, _ := etcd.EncodeAttrs(in.Attrs)
			pos[val] = i
			switch {
			case created == 0 && ev.Kv.CreateRevision != ev.Kv.ModRevision:
				t.Errorf("%s: created at revision %d, with CreateRevision %d", k, ev.Kv.ModRevision, ev.Kv.CreateRevision)
			case created != 0 && ev.Kv.CreateRevision != created:
				t.Errorf("%s: update changed CreateRevision %d -> %d", k, created, ev.Kv.CreateRevision)
			}
			created = ev.Kv.CreateRevision
		}
		at := func(o op, nthDelete int) int {
			if o.val == "" {
				return pos["-"+strconv.Itoa(nthDelete)]
			}
			p, ok := pos[o.val]
			if !ok {
				t.Fatalf("%s: acknowledged write %s not in the store's history", k, o.val)
			}
			return p
		}
		slices.SortFunc(ops, func(a, b op) int { return cmp.Compare(a.start, b.start) })
		places := make([]int, len(ops))
		nth := 0
		for i, o := range ops {
			places[i] = at(o, nth)
			if o.val == "" {
				nth++
			}
		}
		for i, a := range ops {
			for j, b := range ops {
				if a.ack < b.start && places[i] > places[j] {
					t.Errorf("%s: write %q returned before write %q started, but was applied after it", k, a.val, b.val)
				}
			}
		}
		// The store ends as the last write applied.
		last := evs[len(evs)-1]
		idx := slices.IndexFunc(final.Kvs, func(kv *mvccpb.KeyValue) bool { return string(kv.Key) == k })
		switch {
		case last.Type == clientv3.EventTypeDelete && idx >= 0:
			t.Errorf("%s: in the store after its last write, a delete", k)
		case last.Type == clientv3.EventTypePut && (idx < 0 || string(final.Kvs[idx].Value) != string(last.Kv.Value) || final.Kvs[idx].CreateRevision != last.Kv.CreateRevision):
			t.Errorf("%s: store holds %v, want its last write %s (created %d)", k, idx >= 0, last.Kv.Value, last.Kv.CreateRevision)
		}
	}
	if len(events) != len(byKey) {
		t.Errorf("%d keys in the store's history, %d written", len(events), len(byKey))
	}
	most := 0
	for _, n := range txns {
		most = max(most, n)
	}
	t.Logf("%d writes in %d transactions, at most %d in one", len(history), len(txns), most)
}

// replay returns the events under prefix from revision from to to.
func replay(tb testing.TB, cli *clientv3.Client, prefix string, from, to int64) []*clientv3.Event {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	if from > to {
		return nil
	}
	var evs []*clientv3.Event
	for resp := range cli.Watch(ctx, prefix, clientv3.WithPrefix(), clientv3.WithRev(from)) {
		if err := resp.Err(); err != nil {
			tb.Fatalf("watch: %v", err)
		}
		evs = append(evs, resp.Events...)
		if len(evs) > 0 && evs[len(evs)-1].Kv.ModRevision >= to {
			return evs
		}
	}
	tb.Fatalf("history up to revision %d not read within %v (%d events)", to, waitTimeout, len(evs))
	return nil
}

// TestCloseWithWritesInFlight: Close while many writes are queued or in
// flight. Every caller gets its result or backend.ErrClosed, nothing
// stays in the store (the lease is revoked after the writers stop), and
// no goroutine is left (goleak in TestMain).
func TestCloseWithWritesInFlight(t *testing.T) {
	t.Parallel()
	srv := etcdtest.NewServer(t)
	b := mustOpen(t, srv.Endpoints(), 30*time.Second)
	cli := mustClient(t, srv.Endpoints())
	ctx := ctxT(t)
	const (
		name    = "closing"
		workers = 256
	)
	var (
		wg      sync.WaitGroup
		ok      atomic.Int64
		enough  = make(chan struct{})
		once    sync.Once
		results = make(chan error, workers)
	)
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ; i++ {
				err := b.Register(ctx, name, fmt.Sprintf("10.%d.%d.%d:80", w/250, w%250, i%250+1), nil)
				if err != nil {
					results <- err
					return
				}
				if ok.Add(1) == workers {
					once.Do(func() { close(enough) })
				}
			}
		}()
	}
	timer := time.NewTimer(waitTimeout)
	defer timer.Stop()
	select {
	case <-enough:
	case <-timer.C:
		t.Fatalf("only %d registrations within %v", ok.Load(), waitTimeout)
	}
	if err := b.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
	wg.Wait() // each Register returns once b is closed
	close(results)
	for err := range results {
		if !errors.Is(err, backend.ErrClosed) {
			t.Errorf("Register during Close: %v, want backend.ErrClosed", err)
		}
	}
	resp, err := cli.Get(ctx, etcd.DefaultPrefix+name+"/", clientv3.WithPrefix(), clientv3.WithCountOnly())
	if err != nil {
		t.Fatal(err)
	}
	if resp.Count != 0 {
		t.Errorf("%d registrations left in the store after Close (%d acknowledged)", resp.Count, ok.Load())
	}
}

// BenchmarkBatcherLoneWrite: one caller's writes in a row, one at a time,
// through a commit that answers at once: the batcher's own cost per write
// when nothing else is queued (a quiet agent, one call in flight per
// connection), which is the hand-off to a writer goroutine and back. A
// store write costs about a millisecond; docs/BENCHMARKS.md §12 has the
// figures, and why sending a lone write from its caller was tried and
// left out.
func BenchmarkBatcherLoneWrite(b *testing.B) {
	ctx, cancel := context.WithCancel(context.Background())
	q := etcd.NewBatcher(ctx, func(context.Context, []clientv3.Op) error { return nil }, 4, 64, 1<<19, 1024)
	b.Cleanup(func() { cancel(); q.Wait() })
	for b.Loop() {
		if err := q.Put(context.Background(), "k", "v", 1); err != nil {
			b.Fatal(err)
		}
	}
}
