package zookeeper

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/go-zookeeper/zk"

	"github.com/flynn/discoverd/api"
	"github.com/flynn/discoverd/backend"
)

// streamBuffer is how many events a stream queues before its goroutine
// waits for the reader.
const streamBuffer = 64

// Subscribe starts a stream of the registrations of name. It reads the
// service's znodes (with a child watch on the service directory, or an
// exists watch while it does not exist yet, and a data watch on each
// instance) and delivers them as Put events sorted by Created, then one
// Current event, then live changes.
//
// Live changes come from re-reading after every watch fire and diffing
// against the stream's last view, so nothing is lost and each instance's
// changes arrive in order; changes that happen between two reads collapse
// into their net effect: a znode deleted and created again for a new
// registration shows as a Delete then a Put with the new Created; one
// re-created for the same registration (a takeover, a restore: same
// Created) shows as a Put if its attributes changed, else as nothing.
// While the connection to
// ZooKeeper is down the stream keeps its last view and emits nothing; once
// the client reconnects it emits the difference.
//
// It blocks until the first read succeeded or ctx ends (then it returns
// ctx's error). Errors: backend.ErrClosed, ctx's error.
func (b *Backend) Subscribe(ctx context.Context, name string) (backend.Stream, error) {
	sctx, cancel := context.WithCancelCause(context.Background())
	s := &stream{
		b:         b,
		name:      name,
		dir:       b.serviceDir(name),
		ctx:       sctx,
		cancel:    cancel,
		events:    make(chan backend.Event, streamBuffer),
		done:      make(chan struct{}),
		ready:     make(chan struct{}),
		wake:      make(chan struct{}, 1),
		dataDirty: make(map[string]bool),
		view:      make(map[string]entry),
	}
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		cancel(nil)
		return nil, backend.ErrClosed
	}
	set := b.streams[s.dir]
	if set == nil {
		set = make(map[*stream]struct{})
		b.streams[s.dir] = set
	}
	set[s] = struct{}{}
	b.mu.Unlock()

	go s.run()

	select {
	case <-s.ready:
		return s, nil
	case <-s.done:
		return nil, backend.ErrClosed
	case <-ctx.Done():
		s.Close()
		return nil, fmt.Errorf("zookeeper: subscribe %s: %w", name, context.Cause(ctx))
	}
}

// stream is one subscription. Its goroutine (run) owns the fields below
// "owned by run"; the backend's event callback marks what changed under mu
// and wakes it.
type stream struct {
	b      *Backend
	name   string
	dir    string // the service's znode
	ctx    context.Context
	cancel context.CancelCauseFunc
	events chan backend.Event
	done   chan struct{} // closed when run has returned
	ready  chan struct{} // closed after the first successful read
	err    error         // why the stream ended; written by run before done

	wake chan struct{} // capacity 1: a pending wake-up for run

	mu        sync.Mutex
	dirDirty  bool            // a watch on dir fired or was dropped
	dataDirty map[string]bool // by child: a data watch fired or was dropped
	full      bool            // re-read every child (after a reconnect)

	view map[string]entry // by child (addr): the last state emitted; owned by run

	closeOnce sync.Once
}

// entry is one instance as the stream last saw it.
type entry struct {
	created  uint64 // the registration's Created (kept across re-creations of its znode)
	modified int64  // mzxid: a re-created znode has a new one
	attrs    map[string]string
}

// Version implements api.Versioned.
func (e entry) Version() api.Version { return api.Version{Created: e.created, Attrs: e.attrs} }

// Events implements backend.Stream.
func (s *stream) Events() <-chan backend.Event { return s.events }

// Err implements backend.Stream: nil after Close, backend.ErrClosed when
// the backend was closed.
func (s *stream) Err() error {
	select {
	case <-s.done:
		return s.err
	default:
		return nil
	}
}

// Close ends the stream and waits for its goroutine. The goroutine may be
// inside a ZooKeeper request, which the client library cannot cancel; it
// returns when the server answers or the connection is declared lost
// (within about the session timeout). Close is idempotent.
func (s *stream) Close() error {
	s.closeOnce.Do(func() {
		s.cancel(nil)
		<-s.done
		s.b.mu.Lock()
		if set := s.b.streams[s.dir]; set != nil {
			delete(set, s)
			if len(set) == 0 {
				delete(s.b.streams, s.dir)
			}
		}
		s.b.mu.Unlock()
	})
	return nil
}

func (s *stream) notifyDir() {
	s.mu.Lock()
	s.dirDirty = true
	s.mu.Unlock()
	s.signal()
}

func (s *stream) notifyChild(child string) {
	s.mu.Lock()
	s.dataDirty[child] = true
	s.mu.Unlock()
	s.signal()
}

func (s *stream) notifyAll() {
	s.mu.Lock()
	s.full = true
	s.mu.Unlock()
	s.signal()
}

func (s *stream) signal() {
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// dirty is a snapshot of what the callback marked since the last read.
type dirty struct {
	dir  bool
	data map[string]bool
	full bool
}

func (s *stream) takeDirty() dirty {
	s.mu.Lock()
	defer s.mu.Unlock()
	d := dirty{dir: s.dirDirty, data: s.dataDirty, full: s.full}
	s.dirDirty, s.full = false, false
	s.dataDirty = make(map[string]bool)
	return d
}

// putBack returns marks taken by a read that failed, so that the next read
// handles them.
func (s *stream) putBack(d dirty) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.dirDirty = s.dirDirty || d.dir
	s.full = s.full || d.full
	for c := range d.data {
		s.dataDirty[c] = true
	}
}

func (s *stream) run() {
	defer close(s.done)
	defer close(s.events)
	defer func() {
		if cause := context.Cause(s.ctx); !errors.Is(cause, context.Canceled) {
			s.err = cause
		}
	}()
	first := true
	bo := newBackoff()
	for {
		next, err := s.read()
		if err != nil {
			if s.ctx.Err() != nil {
				return
			}
			d := bo.Next()
			s.b.log.Debug("zookeeper: stream read failed; retrying", "service", s.name, "err", err, "in", d)
			timer := time.NewTimer(d)
			select {
			case <-s.ctx.Done():
				timer.Stop()
				return
			case <-timer.C:
			case <-s.wake:
				timer.Stop()
			}
			continue
		}
		bo.Reset()
		var ok bool
		if first {
			close(s.ready)
			ok = s.emitSnapshot(next)
			first = false
		} else {
			ok = s.emitDiff(next)
		}
		if !ok {
			return
		}
		s.view = next
		select {
		case <-s.ctx.Done():
			return
		case <-s.wake:
		}
	}
}

// read lists the service's children and reads those whose data may have
// changed, setting the watches that are not set. On error the stream's
// view is untouched and the marks are kept for the next read.
func (s *stream) read() (map[string]entry, error) {
	d := s.takeDirty()
	next, err := s.readMarked(d)
	if err != nil {
		s.putBack(d)
		return nil, err
	}
	return next, nil
}

func (s *stream) readMarked(d dirty) (map[string]entry, error) {
	b, conn := s.b, s.b.conn
	var kids []string
	for {
		if err := s.ctx.Err(); err != nil {
			return nil, err
		}
		if b.watchArmed(s.dir) {
			var err error
			kids, _, err = conn.Children(s.dir)
			if err != nil && !errors.Is(err, zk.ErrNoNode) {
				return nil, err
			}
			break
		}
		var err error
		b.beginArm(s.dir)
		kids, _, _, err = conn.ChildrenW(s.dir)
		b.endArm(s.dir, err == nil)
		if err == nil {
			break
		}
		if !errors.Is(err, zk.ErrNoNode) {
			return nil, err
		}
		// The service does not exist (yet, or any more): watch for it.
		b.beginArm(s.dir)
		exists, _, _, err := conn.ExistsW(s.dir)
		b.endArm(s.dir, err == nil && !exists)
		if err != nil {
			return nil, err
		}
		if !exists {
			kids = nil
			break
		}
		// Created in between: list it.
	}

	next := make(map[string]entry, len(kids))
	for _, c := range kids {
		p := s.dir + "/" + c
		armed := b.watchArmed(p)
		if old, inView := s.view[c]; inView && armed && !d.full && !d.data[c] {
			next[c] = old // unchanged: a change would have fired the watch
			continue
		}
		var (
			data []byte
			stat *zk.Stat
			err  error
		)
		if armed {
			data, stat, err = conn.Get(p)
		} else {
			b.beginArm(p)
			data, stat, _, err = conn.GetW(p)
			b.endArm(p, err == nil)
		}
		if errors.Is(err, zk.ErrNoNode) {
			continue // gone since the listing; the child watch tells
		}
		if err != nil {
			return nil, err
		}
		attrs, created, err := decodeData(data)
		if err != nil {
			b.log.Warn("zookeeper: instance with unreadable attributes", "znode", p, "err", err)
		}
		if created == 0 {
			created = uint64(stat.Czxid)
		}
		next[c] = entry{created: created, modified: stat.Mzxid, attrs: attrs}
	}
	return next, nil
}

// emitSnapshot sends one Put per instance, oldest first, then Current. It
// returns false when the stream was cancelled.
func (s *stream) emitSnapshot(view map[string]entry) bool {
	_, all := api.Diff(nil, view) // from nothing: every instance, oldest first
	for _, c := range all {
		if !s.send(backend.Put, c, view[c]) {
			return false
		}
	}
	return s.sendEvent(backend.Event{Type: backend.Current})
}

// emitDiff sends the difference between the stream's view and next
// (api.Diff): deletions first, oldest first, then creations and updates
// in the order ZooKeeper made them, each replaced registration's deletion
// just before its new one. It returns false when the stream was
// cancelled.
func (s *stream) emitDiff(next map[string]entry) bool {
	gone, put := api.Diff(s.view, next)
	slices.SortFunc(put, func(a, b string) int {
		return cmp.Or(cmp.Compare(next[a].modified, next[b].modified), cmp.Compare(a, b))
	})
	for _, c := range gone {
		if !s.send(backend.Delete, c, entry{}) {
			return false
		}
	}
	for _, c := range put {
		if _, ch := api.Classify(s.view, c, next[c]); ch == api.Replaced && !s.send(backend.Delete, c, entry{}) {
			return false
		}
		if !s.send(backend.Put, c, next[c]) {
			return false
		}
	}
	return true
}

func (s *stream) send(typ backend.EventType, addr string, e entry) bool {
	ev := backend.Event{Type: typ, Instance: backend.Instance{Name: s.name, Addr: addr}}
	if typ == backend.Put {
		ev.Instance.Attrs = e.attrs
		ev.Instance.Created = e.created
	}
	return s.sendEvent(ev)
}

func (s *stream) sendEvent(ev backend.Event) bool {
	select {
	case s.events <- ev:
		return true
	case <-s.ctx.Done():
		return false
	}
}
