package agent

import (
	"container/list"
	"context"
	"sync"
	"sync/atomic"
	"time"

	"github.com/flynn/discoverd/api"
)

// Defaults of ViewConfig.
const (
	DefaultViewSize  = 4096
	DefaultViewProbe = time.Second
)

// ViewConfig configures a View. The zero value selects every default.
type ViewConfig struct {
	// Size bounds the names kept watched; when one more is asked for, the
	// least recently asked is dropped (its watch then stops after
	// Config.WatchLinger unless something else uses it). Default
	// DefaultViewSize.
	Size int
	// Probe is how often the view pings the store, while it is asked, to
	// tell whether its answers are current (Get's stale result): a period
	// without a Get has no probe. Each probe is a store read, never a
	// write. Default DefaultViewProbe.
	Probe time.Duration
}

// View answers many one-shot lookups of service names from memory, for a
// front end such as the DNS server: it keeps the watch of each name it
// was asked for (up to ViewConfig.Size names, least recently asked
// dropped first) and, for each, a value of type T compiled by compile from
// the name's online instances. compile runs once per change of a name,
// never per lookup, and its result is shared by every caller of Get until
// the next change: it must be treated as read-only.
//
//	v := agent.NewView(a, agent.ViewConfig{}, func(name string, us []agent.ServiceUpdate, leader agent.ServiceUpdate) int {
//		return len(us)
//	})
//	defer v.Close()
//	n, stale, err := v.Get(ctx, "web")
//
// Its methods are safe for concurrent use. NewView starts one goroutine
// (the store probe); Close stops it.
type View[T any] struct {
	a       *Agent
	size    int
	probe   time.Duration
	compile func(name string, instances []api.ServiceUpdate, leader api.ServiceUpdate) T

	mu        sync.Mutex
	closed    bool
	entries   map[string]*viewEntry[T]
	lru       list.List // of *viewEntry[T], most recently asked first
	evictions uint64

	storeDown atomic.Bool // the last probe failed
	asked     atomic.Bool // Get was called since the last probe

	ctx    context.Context
	cancel context.CancelFunc
	done   chan struct{}
}

type viewEntry[T any] struct {
	name string
	w    *watch
	elem *list.Element

	mu    sync.Mutex // serialises compiles
	state atomic.Pointer[viewState[T]]
}

// viewState is a compiled value, current until changed is closed.
type viewState[T any] struct {
	v       T
	changed chan struct{}
}

// NewView returns a view of a's service names; compile turns the online
// instances of a name (oldest first) and its leader (the zero
// ServiceUpdate when there is none) into the value Get returns. The caller
// must call Close before closing a.
func NewView[T any](a *Agent, cfg ViewConfig, compile func(name string, instances []api.ServiceUpdate, leader api.ServiceUpdate) T) *View[T] {
	if cfg.Size <= 0 {
		cfg.Size = DefaultViewSize
	}
	if cfg.Probe <= 0 {
		cfg.Probe = DefaultViewProbe
	}
	ctx, cancel := context.WithCancel(a.ctx)
	v := &View[T]{
		a:       a,
		size:    cfg.Size,
		probe:   cfg.Probe,
		compile: compile,
		entries: make(map[string]*viewEntry[T]),
		ctx:     ctx,
		cancel:  cancel,
		done:    make(chan struct{}),
	}
	go v.probeLoop()
	return v
}

// Get returns the compiled value of name, and whether it may be stale:
// the store did not answer the view's last probe, so changes made since
// may be missing. A name the view holds is answered from memory without
// blocking, even while the store is unreachable, unless a write this
// agent made to it is not shown yet: Get then waits for the watch to show
// it (at most a second after the write; ctx.Err() if ctx ends first), so
// that what follows a Register or Unregister sees it. A name it does not hold
// yet starts its watch and blocks until the store's first snapshot, at
// most until ctx is done or the agent's backend timeout. name must be
// valid (api.ValidateName): the caller checks it. Errors: CodeUnavailable
// when the store has not given a first snapshot of name, or the view or
// agent is closed; ctx.Err().
func (v *View[T]) Get(ctx context.Context, name string) (val T, stale bool, err error) {
	if !v.asked.Load() {
		v.asked.Store(true)
	}
	e, err := v.entry(name)
	if err != nil {
		return val, false, err
	}
	select {
	case <-e.w.ready:
	default:
		if err := e.w.waitReady(ctx); err != nil {
			return val, false, err
		}
	}
	e.w.settle(ctx) // a write this agent made is shown (noteLocal)
	if err := ctx.Err(); err != nil && e.w.npending.Load() > 0 {
		// ctx ended before the watch showed a write this agent made: the
		// value would not show it. (A caller that asks with a done ctx
		// first, as the DNS server's read loop does, then asks again
		// with time to wait.)
		return val, false, err
	}
	select {
	case <-e.w.done: // stopped by itself (backend closed) or by Close
		v.drop(e)
		return val, false, errShutdown
	default:
	}
	return v.current(e), v.storeDown.Load(), nil
}

// entry returns the entry of name, marked most recently asked, adding it
// (and dropping the least recently asked beyond the size) if needed.
func (v *View[T]) entry(name string) (*viewEntry[T], error) {
	v.mu.Lock()
	if e := v.entries[name]; e != nil {
		v.lru.MoveToFront(e.elem)
		v.mu.Unlock()
		return e, nil
	}
	v.mu.Unlock()
	w, err := v.a.acquireWatch(name)
	if err != nil {
		return nil, err
	}
	var release []*watch
	v.mu.Lock()
	e := v.entries[name]
	switch {
	case v.closed:
		release = append(release, w)
		err = errShutdown
	case e != nil: // added meanwhile
		release = append(release, w)
		v.lru.MoveToFront(e.elem)
	default:
		e = &viewEntry[T]{name: name, w: w}
		e.elem = v.lru.PushFront(e)
		v.entries[name] = e
		for v.lru.Len() > v.size {
			old := v.lru.Remove(v.lru.Back()).(*viewEntry[T])
			delete(v.entries, old.name)
			release = append(release, old.w)
			v.evictions++
		}
	}
	v.mu.Unlock()
	for _, w := range release {
		v.a.releaseWatch(w)
	}
	return e, err
}

// drop forgets e if the view still holds it.
func (v *View[T]) drop(e *viewEntry[T]) {
	v.mu.Lock()
	if v.entries[e.name] != e {
		v.mu.Unlock()
		return
	}
	delete(v.entries, e.name)
	v.lru.Remove(e.elem)
	v.mu.Unlock()
	v.a.releaseWatch(e.w)
}

// current returns e's compiled value, compiling it again if the watch's
// cache changed since.
func (v *View[T]) current(e *viewEntry[T]) T {
	if s := e.state.Load(); s != nil && !isClosed(s.changed) {
		return s.v
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if s := e.state.Load(); s != nil && !isClosed(s.changed) {
		return s.v
	}
	w := e.w
	w.mu.Lock()
	if w.changed == nil {
		w.changed = make(chan struct{})
	}
	changed := w.changed
	instances, leader := w.snapshotLocked(0), w.leader
	w.mu.Unlock()
	s := &viewState[T]{v: v.compile(e.name, instances, leader), changed: changed}
	e.state.Store(s)
	return s.v
}

func isClosed(c chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}

// probeLoop pings the store every v.probe while the view is asked, and
// records whether the last ping failed. A period without a Get has no
// ping (an idle agent costs the store nothing); the state of the last
// ping stands until the next.
func (v *View[T]) probeLoop() {
	defer close(v.done)
	t := time.NewTicker(v.probe)
	defer t.Stop()
	for {
		select {
		case <-v.ctx.Done():
			return
		case <-t.C:
		}
		if !v.asked.Swap(false) {
			continue
		}
		ctx, cancel := context.WithTimeout(v.ctx, max(v.probe, time.Second))
		err := v.a.backend.Ping(ctx)
		cancel()
		if v.ctx.Err() != nil {
			return
		}
		v.storeDown.Store(err != nil)
	}
}

// Len returns how many names the view holds.
func (v *View[T]) Len() int {
	v.mu.Lock()
	defer v.mu.Unlock()
	return len(v.entries)
}

// Evictions returns how many names were dropped to keep the view within
// its size.
func (v *View[T]) Evictions() uint64 {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.evictions
}

// Close stops the probe, releases every name's watch and waits for the
// probe to return. Get then fails with CodeUnavailable. It is idempotent.
func (v *View[T]) Close() {
	v.mu.Lock()
	if v.closed {
		v.mu.Unlock()
		<-v.done
		return
	}
	v.closed = true
	entries := v.entries
	v.entries = make(map[string]*viewEntry[T])
	v.lru.Init()
	v.mu.Unlock()
	v.cancel()
	<-v.done
	for _, e := range entries {
		v.a.releaseWatch(e.w)
	}
}
