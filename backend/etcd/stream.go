package etcd

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/flynn/discoverd/api"
	"github.com/flynn/discoverd/backend"
)

// Subscribe reads the registrations of name with one consistent read at
// revision R, then watches from R+1, so that nothing is lost or reordered
// between the snapshot and the live part. The stream delivers the snapshot
// (oldest registration first), one Current event, then every change. When
// the watch breaks or falls behind a compaction, the stream reads the
// registrations again and delivers the difference from its last view as
// Put and Delete events; meanwhile it delivers nothing (a reader keeps its
// last view). The stream retries until it is closed.
//
// Subscribe blocks until the first read completes or ctx is done. The
// stream ends (Err = backend.ErrClosed) when the backend closes. It
// returns backend.ErrClosed after Close.
func (b *Backend) Subscribe(ctx context.Context, name string) (backend.Stream, error) {
	ctx, cancel := b.opContext(ctx)
	defer cancel()
	if b.isClosed() {
		return nil, backend.ErrClosed
	}
	s := &stream{
		b:      b,
		name:   name,
		prefix: b.prefix + name + "/",
		events: make(chan backend.Event, streamBuffer),
		done:   make(chan struct{}),
		view:   make(map[string]backend.Instance),
		held:   make(map[string]bool),
	}
	resp, err := b.client.Get(ctx, s.prefix, clientv3.WithPrefix())
	if err != nil {
		if b.isClosed() {
			return nil, backend.ErrClosed
		}
		return nil, fmt.Errorf("etcd: subscribe %s: %w", name, err)
	}
	snapshot := s.decodeAll(resp.Kvs)
	for _, in := range snapshot {
		s.view[in.Addr] = in
	}
	s.rev = resp.Header.Revision

	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return nil, backend.ErrClosed
	}
	s.ctx, s.cancel = context.WithCancel(b.ctx)
	b.streams[s] = struct{}{}
	b.mu.Unlock()
	go s.run(snapshot)
	return s, nil
}

// stream is one Subscribe. Its goroutine (run) owns view and rev and is
// the only sender on events.
type stream struct {
	b      *Backend
	name   string
	prefix string // of the service's keys
	events chan backend.Event
	ctx    context.Context
	cancel context.CancelFunc
	done   chan struct{} // closed when run returns

	view map[string]backend.Instance // by addr: what the reader was told
	rev  int64                       // the view is the store at this revision
	held map[string]bool             // addrs in view whose deletion is held back (a store stall)

	mu      sync.Mutex
	endErr  error // why the stream was stopped; nil for Close
	stopped bool
}

var errWatchClosed = errors.New("watch channel closed")

func (s *stream) Events() <-chan backend.Event { return s.events }

func (s *stream) Err() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.endErr
}

// Close ends the stream and waits for its goroutine. It is idempotent and
// returns nil.
func (s *stream) Close() error {
	s.stop(nil)
	return nil
}

func (s *stream) stop(err error) {
	s.mu.Lock()
	if !s.stopped {
		s.stopped = true
		s.endErr = err
	}
	s.mu.Unlock()
	s.cancel()
	<-s.done
	s.b.mu.Lock()
	delete(s.b.streams, s)
	s.b.mu.Unlock()
}

func (s *stream) run(snapshot []backend.Instance) {
	defer close(s.done)
	defer close(s.events)
	for _, in := range snapshot {
		if !s.send(backend.Event{Type: backend.Put, Instance: in}) {
			return
		}
	}
	if !s.send(backend.Event{Type: backend.Current}) {
		return
	}
	backoff := newBackoff(maxResyncBackoff)
	for {
		err := s.watch()
		if s.ctx.Err() != nil {
			return
		}
		s.b.log.Warn("etcd watch broke; resyncing", "service", s.name, "revision", s.rev, "error", err)
		for {
			if !backoff.wait(s.ctx) {
				return
			}
			err := s.resync()
			if err == nil {
				break
			}
			if s.ctx.Err() != nil {
				return
			}
			s.b.log.Warn("etcd resync failed; retrying", "service", s.name, "error", err)
		}
		backoff = newBackoff(maxResyncBackoff)
	}
}

// watch delivers changes after s.rev until the watch breaks or the stream
// is stopped. It returns why it stopped.
func (s *stream) watch() error {
	// WithRequireLeader: a member cut off from its cluster ends the watch
	// (and we resync through another) instead of silently going quiet.
	ctx, cancel := context.WithCancel(clientv3.WithRequireLeader(s.ctx))
	defer cancel()
	wch := s.b.client.Watch(ctx, s.prefix, clientv3.WithPrefix(), clientv3.WithRev(s.rev+1))
	// A quiet stream looks whether its hold ended every holdCheck, and
	// only while it holds deletions: no timer runs for the others.
	var tick *time.Ticker
	defer func() {
		if tick != nil {
			tick.Stop()
		}
	}()
	for {
		var tickC <-chan time.Time
		switch {
		case len(s.held) > 0 && tick == nil:
			tick = time.NewTicker(holdCheck)
		case len(s.held) == 0 && tick != nil:
			tick.Stop()
			tick = nil
		}
		if tick != nil {
			tickC = tick.C
		}
		select {
		case resp, ok := <-wch:
			if !ok {
				return errWatchClosed
			}
			if resp.CompactRevision != 0 {
				return fmt.Errorf("history compacted to revision %d", resp.CompactRevision)
			}
			if err := resp.Err(); err != nil {
				return err
			}
			for _, ev := range resp.Events {
				if !s.apply(ev) {
					return s.ctx.Err()
				}
				s.rev = max(s.rev, ev.Kv.ModRevision)
			}
		case <-tickC:
		}
		if !s.release() {
			return s.ctx.Err()
		}
	}
}

// Store stalls. When the store stalls (a paused VM, a stuck disk) for
// longer than the TTL, it expires every agent's lease as soon as it runs
// again, although the agents and their clients are alive; each agent then
// writes its registrations again, with their fencing tokens, within a
// moment. A stream holds back the deletions it reads while its backend's
// own lease is in trouble (its keepalives stopped being answered) and
// for stallGrace after the lease is kept or renewed: a registration
// written again with the same token within that time was never offline
// for the reader, and the deletion of one that does not come back is
// delivered when the hold ends. Outside such a window a deletion is
// delivered at once, so crash detection is not delayed.

// release delivers the held deletions once the hold is over; false if
// the stream was stopped while sending.
func (s *stream) release() bool {
	if len(s.held) == 0 || time.Now().Before(s.b.holdUntil()) {
		return true
	}
	for _, addr := range slices.Sorted(maps.Keys(s.held)) {
		delete(s.held, addr)
		if !s.remove(addr) {
			return false
		}
	}
	return true
}

// apply turns one etcd event into stream events; false if the stream was
// stopped while sending.
func (s *stream) apply(ev *clientv3.Event) bool {
	addr, _ := strings.CutPrefix(string(ev.Kv.Key), s.prefix)
	if ev.Type == clientv3.EventTypeDelete {
		return s.remove(addr)
	}
	in, err := decode(s.prefix, s.name, ev.Kv)
	if err != nil {
		s.b.log.Warn("etcd: ignoring a key discoverd did not write", "error", err)
		return s.remove(addr)
	}
	return s.put(in)
}

// put updates the view with in and tells the reader: nothing when in is
// what the reader has, a Delete first when in is a new registration under
// a known address.
func (s *stream) put(in backend.Instance) bool {
	delete(s.held, in.Addr) // back: with the same token, nothing was lost
	switch _, c := api.Classify(s.view, in.Addr, in); {
	case c == api.Unchanged:
		return true
	case c == api.Replaced && !s.drop(in.Addr):
		return false
	}
	s.view[in.Addr] = in
	return s.send(backend.Event{Type: backend.Put, Instance: in})
}

// remove handles the deletion of addr from the store: held back during a
// store stall, delivered otherwise.
func (s *stream) remove(addr string) bool {
	if _, ok := s.view[addr]; ok && time.Now().Before(s.b.holdUntil()) {
		s.held[addr] = true
		return true
	}
	return s.drop(addr)
}

// drop deletes addr from the view and tells the reader.
func (s *stream) drop(addr string) bool {
	delete(s.held, addr)
	if _, ok := s.view[addr]; !ok {
		return true
	}
	delete(s.view, addr)
	return s.send(backend.Event{Type: backend.Delete, Instance: backend.Instance{Name: s.name, Addr: addr}})
}

// resync reads the service again and delivers the difference from the
// view (api.Diff): deletions first, then puts, each oldest first.
func (s *stream) resync() error {
	ctx, cancel := context.WithTimeout(s.ctx, s.b.dial)
	defer cancel()
	resp, err := s.b.client.Get(ctx, s.prefix, clientv3.WithPrefix())
	if err != nil {
		return err
	}
	now := make(map[string]backend.Instance, len(resp.Kvs))
	for _, in := range s.decodeAll(resp.Kvs) {
		now[in.Addr] = in
		delete(s.held, in.Addr) // back, as put says, even when unchanged
	}
	gone, put := api.Diff(s.view, now)
	for _, addr := range gone {
		if !s.remove(addr) {
			return s.ctx.Err()
		}
	}
	for _, addr := range put {
		if !s.put(now[addr]) {
			return s.ctx.Err()
		}
	}
	s.rev = resp.Header.Revision
	return nil
}

// decodeAll decodes kvs, skipping (with a warning) keys discoverd did not
// write, oldest registration first.
func (s *stream) decodeAll(kvs []*mvccpb.KeyValue) []backend.Instance {
	out := make([]backend.Instance, 0, len(kvs))
	for _, kv := range kvs {
		in, err := decode(s.prefix, s.name, kv)
		if err != nil {
			s.b.log.Warn("etcd: ignoring a key discoverd did not write", "error", err)
			continue
		}
		out = append(out, in)
	}
	slices.SortFunc(out, byCreated)
	return out
}

func (s *stream) send(ev backend.Event) bool {
	select {
	case s.events <- ev:
		return true
	case <-s.ctx.Done():
		return false
	}
}
