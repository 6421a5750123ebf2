// Package zookeeper is discoverd's ZooKeeper backend: it implements
// backend.Backend on github.com/go-zookeeper/zk.
//
//	b, err := zookeeper.Open(ctx, zookeeper.Config{
//		Servers: []string{"10.0.0.1:2181", "10.0.0.2:2181", "10.0.0.3:2181"},
//		TTL:     10 * time.Second,
//	})
//	if err != nil {
//		return err
//	}
//	defer b.Close()
//	err = b.Register(ctx, "web", "10.0.0.7:80", map[string]string{"v": "1"})
//
// Layout. Each registration is an ephemeral znode <Prefix>/<name>/<addr>.
// <Prefix> and its ancestors are persistent znodes; <Prefix>/<name> is a
// container znode (ZooKeeper deletes it once it has been empty for a
// while). All are created on demand.
//
// Created, the fencing token. A registration's Created is the czxid of the
// znode first created for it, and it is kept when that znode is replaced
// by another for the same registration (a takeover, a restore after a
// lost session, a repair): the new znode carries it in its data. The data
// is one of
//
//	{"k":"v",...}                        the attributes; Created = the znode's czxid
//	{"attrs":{"k":"v",...},"created":N}  the attributes; Created = N
//
// (every value of the first form is a string, so the two cannot be
// confused; the first is how earlier versions wrote every registration).
// Since czxids are unique and grow with ZooKeeper's commit order, Created
// is unique among the registrations of a name and strictly larger for a
// registration acknowledged after another; an attribute update (a setData)
// keeps it.
//
// Ownership. A registration belongs to the session whose ephemeral znode
// holds it. Register takes over a znode of another session (a new process
// on the address, registered through another agent) atomically, keeping
// its Created. Unregister deletes the znode only while it is an ephemeral
// of this backend's session, conditional on the version it read; a former
// owner's Unregister or Close leaves the new owner's znode alone. A
// backend never takes a registration back by itself: one whose znode
// another session holds when it comes to write it again (a restore, a
// repair) is dropped and counted in SessionState.Lost.
//
// Liveness. A Backend holds exactly one ZooKeeper session, with session
// timeout = Config.TTL (the server clamps it to its own min and max session
// timeouts; the negotiated value is logged when it differs). All of the
// backend's registrations are ephemeral znodes of that session, so they
// vanish together when the agent dies and the session expires, or at once
// when Close ends the session. Nothing is written per heartbeat.
//
// Recovery. The backend remembers every registration it holds. When the
// session expires while the agent is alive (a long partition), the client
// library opens a new session and the backend creates every remembered
// registration again, with its Created (subscribers see a Delete and a Put
// of the same Created). A stream keeps its last view while the connection
// is down and emits the difference once it is back.
//
// Anti-entropy. Every TTL/2 the backend compares the znodes of its session
// with the registrations it holds, in each service it has written under:
// it deletes a znode of its session that it does not hold (a write whose
// answer was lost), writes again a held registration whose znode is
// missing (with its Created), and drops one that another session holds
// now. Each fix is counted in SessionState.Repairs. A pass reads the
// children of each such service and the stat of each child.
package zookeeper

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"path"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-zookeeper/zk"

	"github.com/flynn/discoverd/api"
	"github.com/flynn/discoverd/api/retry"
	"github.com/flynn/discoverd/backend"
	"github.com/flynn/discoverd/internal/keylock"
)

// DefaultPrefix is the znode under which registrations live when
// Config.Prefix is empty.
const DefaultPrefix = "/discoverd/services"

// maxPacket bounds one packet read from a server, so that a broken or
// hostile peer cannot make the client allocate without limit. It is well
// above ZooKeeper's own default jute.maxbuffer (1 MiB).
const maxPacket = 16 << 20

// maxWriteAttempts bounds the retries of one write that races with other
// writers of the same znode (version conflicts, a node vanishing between
// two requests).
const maxWriteAttempts = 8

// Config configures Open.
type Config struct {
	// Servers are the ZooKeeper servers as host:port. Required.
	Servers []string
	// TTL is the session timeout: how long the registrations of an agent
	// that died (or is cut off) stay visible. Default api.DefaultTTL.
	TTL time.Duration
	// Prefix is the znode that holds one child per service name. It must
	// be an absolute ZooKeeper path without a trailing slash. Default
	// DefaultPrefix.
	Prefix string
	// Logger receives the backend's and the ZooKeeper client's log lines.
	// Default slog.Default().
	Logger *slog.Logger
	// Auth, if set, is "user:password": the session authenticates with
	// ZooKeeper's digest scheme, and every znode the backend creates gets
	// the ACL "that user may do anything, anyone may read", so that other
	// ZooKeeper users cannot change or delete registrations. Every agent
	// of a fleet must use the same user. Without it znodes are open to
	// all (world:anyone).
	Auth string
}

// Backend is a backend.Backend on one ZooKeeper session. It is safe for
// concurrent use. Create it with Open; stop it with Close.
type Backend struct {
	prefix string
	log    *slog.Logger
	acl    []zk.ACL // of every znode the backend creates
	conn   *zk.Conn
	zkEv   <-chan zk.Event // the client's event channel; closed when its goroutines are done
	dial   *cutDialer

	// kick wakes the session goroutine after a client state change.
	kick chan struct{}
	// life is cancelled by Close: it ends the waits of the backend's
	// goroutines.
	life    context.Context
	endLife context.CancelFunc
	wg      sync.WaitGroup

	locks keylock.Set[string] // serialises writes per znode

	mu      sync.Mutex
	closed  bool
	regs    map[string]registration         // by znode path; the registrations this backend holds
	streams map[string]map[*stream]struct{} // by service znode
	// dirs are the service znodes this backend has written under, which
	// anti-entropy visits, with the number of passes in a row that found
	// nothing of the backend's there (it forgets a dir after a few).
	dirs map[string]int
	// onLost is told of registrations dropped for another session
	// (backend.LossNotifier).
	onLost func(name, addr string)

	// Watches set in the client library, by znode path. The library keeps
	// one channel per watch request until the watch fires, so setting a
	// watch again on a path whose watch has not fired would pile channels
	// up; streams set one only when none is armed. A watch counts as armed
	// from the answer to the request that set it until any event for its
	// path (fired, or dropped with the session); an event that arrives
	// while a request is in flight makes it count as not armed, which at
	// worst costs one redundant watch.
	armed   map[string]bool
	arming  map[string]int  // watch requests in flight
	dirtied map[string]bool // an event arrived while arming

	closeOnce sync.Once

	// restored is the id of the latest session on which every remembered
	// registration was written: the session Open established, then each
	// one sessionLoop restored. sessions counts those sessions.
	restored atomic.Int64
	sessions atomic.Uint64

	// ttl is the session timeout asked for; anti-entropy runs every
	// ttl/2.
	ttl time.Duration
	// repairs and lost are SessionState's counters.
	repairs atomic.Uint64
	lost    atomic.Uint64
}

var (
	_ backend.Backend         = (*Backend)(nil)
	_ backend.SessionReporter = (*Backend)(nil)
)

// registration is what the backend remembers of one of its registrations:
// enough to create it again, with its Created, under a new session.
type registration struct {
	attrs map[string]string
	enc   []byte // canonical attrs JSON (encodeAttrs), to tell a heartbeat from an update
	token uint64 // its Created
}

// Open connects to ZooKeeper, establishes a session and starts the
// backend's session goroutine. It blocks until the session exists, or
// returns an error when ctx ends first (the servers are unreachable) or the
// configuration is invalid.
func Open(ctx context.Context, cfg Config) (*Backend, error) {
	if len(cfg.Servers) == 0 {
		return nil, errors.New("zookeeper: no servers configured")
	}
	if cfg.TTL <= 0 {
		cfg.TTL = api.DefaultTTL
	}
	if cfg.Prefix == "" {
		cfg.Prefix = DefaultPrefix
	}
	if !strings.HasPrefix(cfg.Prefix, "/") || strings.HasSuffix(cfg.Prefix, "/") || path.Clean(cfg.Prefix) != cfg.Prefix {
		return nil, fmt.Errorf("zookeeper: prefix %q is not a clean absolute path", cfg.Prefix)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	acl := zk.WorldACL(zk.PermAll)
	if cfg.Auth != "" {
		user, pass, ok := strings.Cut(cfg.Auth, ":")
		if !ok || user == "" || pass == "" {
			return nil, errors.New("zookeeper: auth must be user:password")
		}
		acl = append(zk.DigestACL(zk.PermAll, user, pass), zk.WorldACL(zk.PermRead)...)
	}
	life, endLife := context.WithCancel(context.Background())
	b := &Backend{
		prefix:  cfg.Prefix,
		acl:     acl,
		log:     cfg.Logger.With("backend", "zookeeper"),
		dial:    &cutDialer{},
		kick:    make(chan struct{}, 1),
		life:    life,
		endLife: endLife,
		regs:    make(map[string]registration),
		dirs:    make(map[string]int),
		ttl:     cfg.TTL,
		streams: make(map[string]map[*stream]struct{}),
		armed:   make(map[string]bool),
		arming:  make(map[string]int),
		dirtied: make(map[string]bool),
	}
	conn, events, err := zk.Connect(cfg.Servers, cfg.TTL,
		zk.WithDialer(b.dial.dial),
		zk.WithLogger(zkLogger{b.log}),
		zk.WithLogInfo(false),
		zk.WithMaxBufferSize(maxPacket),
		zk.WithEventCallback(b.onEvent),
	)
	if err != nil {
		endLife()
		return nil, fmt.Errorf("zookeeper: connect %v: %w", cfg.Servers, err)
	}
	b.conn, b.zkEv = conn, events

	if err := b.waitSession(ctx); err != nil {
		endLife()
		b.shutdownConn()
		return nil, fmt.Errorf("zookeeper: open session with %v: %w", cfg.Servers, err)
	}
	if cfg.Auth != "" {
		// The client keeps the credentials and sends them again on every
		// reconnection.
		if err := conn.AddAuth("digest", []byte(cfg.Auth)); err != nil {
			endLife()
			b.shutdownConn()
			return nil, fmt.Errorf("zookeeper: digest auth: %w", err)
		}
	}
	if err := b.do(ctx, func() error { return b.ensurePath(b.prefix) }); err != nil {
		endLife()
		b.shutdownConn()
		return nil, fmt.Errorf("zookeeper: create %s: %w", b.prefix, err)
	}
	session := conn.SessionID()
	b.log.Info("zookeeper session established", "session", fmt.Sprintf("%#x", session), "servers", cfg.Servers)

	b.restored.Store(session)
	b.sessions.Store(1)
	b.wg.Add(1)
	go b.sessionLoop()
	return b, nil
}

// waitSession blocks until the client has a session or ctx ends.
func (b *Backend) waitSession(ctx context.Context) error {
	for b.conn.State() != zk.StateHasSession {
		select {
		case <-b.kick:
		case <-ctx.Done():
			return fmt.Errorf("no session (state %v): %w", b.conn.State(), context.Cause(ctx))
		}
	}
	return nil
}

// onEvent is the client library's event callback. It runs on the
// library's receive goroutine and must not block.
func (b *Backend) onEvent(ev zk.Event) {
	if ev.Type == zk.EventSession {
		select {
		case b.kick <- struct{}{}:
		default:
		}
		if ev.State == zk.StateHasSession {
			// Reconnected (same or new session): let every stream check
			// its view.
			b.forStreams(func(s *stream) { s.notifyAll() })
		}
		return
	}
	if ev.Path == "" {
		return
	}
	// A watch fired (or was dropped: EventNotWatching) on a service
	// directory or on one instance znode.
	b.mu.Lock()
	defer b.mu.Unlock()
	delete(b.armed, ev.Path)
	if b.arming[ev.Path] > 0 {
		b.dirtied[ev.Path] = true
	}
	for s := range b.streams[ev.Path] {
		s.notifyDir()
	}
	dir, child := path.Split(ev.Path)
	for s := range b.streams[strings.TrimSuffix(dir, "/")] {
		s.notifyChild(child)
	}
}

// watchArmed reports whether a watch on p is set in the client library.
func (b *Backend) watchArmed(p string) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.armed[p]
}

// beginArm must precede a request that sets a watch on p; endArm follows
// it, with ok telling whether the request set the watch.
func (b *Backend) beginArm(p string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.arming[p]++
}

func (b *Backend) endArm(p string, ok bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if ok && !b.dirtied[p] {
		b.armed[p] = true
	}
	if b.arming[p]--; b.arming[p] == 0 {
		delete(b.arming, p)
		delete(b.dirtied, p)
	}
}

func (b *Backend) forStreams(f func(*stream)) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, set := range b.streams {
		for s := range set {
			f(s)
		}
	}
}

// sessionLoop is the backend's one goroutine. When the client gets a new
// session (the old one expired), it creates the remembered registrations
// again, retrying with backoff until that succeeds or the session changes
// again, and then records the session as restored. On a restored session
// it runs an anti-entropy pass every TTL/2 (repair.go). It returns when
// Close is called.
func (b *Backend) sessionLoop() {
	defer b.wg.Done()
	var retry <-chan time.Time
	backoff := newBackoff()
	var seen int64 // the last new session logged, to log each one once
	tick := time.NewTicker(max(b.ttl/2, 10*time.Millisecond))
	defer tick.Stop()
	for {
		repair := false
		select {
		case <-b.life.Done():
			return
		case <-b.kick:
		case <-retry:
			retry = nil
		case <-tick.C:
			repair = true
		}
		if b.conn.State() != zk.StateHasSession {
			continue
		}
		id, old := b.conn.SessionID(), b.restored.Load()
		if id == old {
			if repair {
				b.antiEntropy(id)
			}
			continue
		}
		if id != seen {
			seen = id
			b.log.Warn("zookeeper session expired; registering again", "old", fmt.Sprintf("%#x", old), "new", fmt.Sprintf("%#x", id))
		}
		if err := b.restore(); err != nil {
			b.log.Warn("zookeeper: restoring registrations", "session", fmt.Sprintf("%#x", id), "err", err)
			retry = time.After(backoff.Next())
			continue
		}
		// Written on id, or on a later session whose kick is pending and
		// brings us back here: either way id itself is restored.
		b.restored.Store(id)
		b.sessions.Add(1)
		backoff.Reset()
	}
}

// restore writes every remembered registration again, with its Created.
// A registration whose znode another session holds now (another agent
// took it over while this backend's session was gone) is not stolen back:
// the backend drops it and counts it lost.
func (b *Backend) restore() error {
	b.mu.Lock()
	paths := make([]string, 0, len(b.regs))
	for p := range b.regs {
		paths = append(paths, p)
	}
	b.mu.Unlock()
	var n int
	for _, p := range paths {
		unlock, err := b.lockKey(b.life, p)
		if err != nil {
			return err
		}
		b.mu.Lock()
		reg, ok := b.regs[p]
		b.mu.Unlock()
		if ok {
			_, err = b.put(p, reg.attrs, reg.token, false, false)
			if errors.Is(err, errOwned) {
				b.drop(p, "restore")
				err = nil
			} else {
				n++
			}
		}
		unlock()
		if err != nil {
			return fmt.Errorf("%s: %w", p, err)
		}
	}
	b.log.Info("zookeeper registrations restored", "count", n)
	return nil
}

// drop forgets the registration p, which another session holds now, and
// counts it lost. The caller holds p's key lock.
func (b *Backend) drop(p, during string) {
	b.mu.Lock()
	_, held := b.regs[p]
	delete(b.regs, p)
	onLost := b.onLost
	b.mu.Unlock()
	if held {
		b.lost.Add(1)
		b.log.Warn("registration taken over by another session; no longer held", "znode", p, "during", during)
		if onLost != nil {
			rel := strings.TrimPrefix(p, b.prefix+"/")
			name, addr, _ := strings.Cut(rel, "/")
			onLost(name, addr)
		}
	}
}

// OnLost sets the function told of registrations b stops holding because
// another session took them over (backend.LossNotifier).
func (b *Backend) OnLost(f func(name, addr string)) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.onLost = f
}

// Forget drops name/addr from what b holds, without a store call
// (backend.Forgetter): b's restores and anti-entropy no longer write it,
// and the anti-entropy deletes its znode if it is still b's.
func (b *Backend) Forget(name, addr string) {
	p := b.nodePath(name, addr)
	b.mu.Lock()
	defer b.mu.Unlock()
	delete(b.regs, p)
}

var (
	_ backend.LossNotifier = (*Backend)(nil)
	_ backend.Forgetter    = (*Backend)(nil)
	_ backend.Claimer      = (*Backend)(nil)
)

// Register stores name/addr with attrs as an ephemeral znode of the
// backend's session, creating the parents as needed. Registering again
// with equal attributes writes nothing; with other attributes it updates
// the znode's data in place (Created stays). A znode at the same path that
// another session holds (a process on that address registered through
// another agent, or this agent before a restart) is taken over: replaced
// atomically by one of this backend's session that keeps its Created.
//
// It blocks until ZooKeeper answers or ctx ends. When ctx ends first the
// write may still take effect; the backend then remembers it, so
// Unregister and Close still remove it. Errors: backend.ErrClosed, ctx's
// error, or the ZooKeeper error wrapped with the operation.
func (b *Backend) Register(ctx context.Context, name, addr string, attrs map[string]string) error {
	return b.register(ctx, name, addr, attrs, false)
}

// Claim is Register that looks at the znode even when b already stored
// these attributes, so that a znode another session took over meanwhile
// is taken back (backend.Claimer).
func (b *Backend) Claim(ctx context.Context, name, addr string, attrs map[string]string) error {
	return b.register(ctx, name, addr, attrs, true)
}

func (b *Backend) register(ctx context.Context, name, addr string, attrs map[string]string, claim bool) error {
	p := b.nodePath(name, addr)
	enc, err := encodeAttrs(attrs)
	if err != nil {
		return fmt.Errorf("zookeeper: register %s/%s: %w", name, addr, err)
	}
	attrs = maps.Clone(attrs)
	err = b.withKey(ctx, p, func() error {
		b.mu.Lock()
		old, known := b.regs[p]
		b.mu.Unlock()
		if known && bytes.Equal(old.enc, enc) && !claim {
			return nil // a heartbeat: nothing to write
		}
		// Before and after the write, so that anti-entropy keeps
		// visiting the service while a write there may leave something.
		b.noteDir(path.Dir(p))
		defer b.noteDir(path.Dir(p))
		tok, err := b.put(p, attrs, old.token, known, true)
		if err != nil {
			return err
		}
		b.mu.Lock()
		b.regs[p] = registration{attrs: attrs, enc: enc, token: tok}
		b.mu.Unlock()
		return nil
	})
	if err != nil {
		return fmt.Errorf("zookeeper: register %s/%s: %w", name, addr, err)
	}
	return nil
}

// errOwned is put's answer when the znode belongs to another session and
// it was asked not to take it over.
var errOwned = errors.New("znode held by another session")

// put makes the znode p an ephemeral node of this session holding attrs,
// and returns its Created. The Created of a znode that exists is kept
// (whoever holds it); tok is the one to give a znode created anew (0: a
// fresh registration, whose Created is its czxid). known says whether the
// backend believes it already holds p (then the znode is read first). A
// znode of another session is replaced when takeover is set, else put
// returns errOwned. It must be called with p's key lock held.
func (b *Backend) put(p string, attrs map[string]string, tok uint64, known, takeover bool) (uint64, error) {
	read := known
	for range maxWriteAttempts {
		if !read {
			created, err := b.create(p, attrs, tok)
			switch {
			case err == nil:
				return created, nil
			case errors.Is(err, zk.ErrNoNode):
				if err := b.ensureServiceDir(path.Dir(p)); err != nil {
					return 0, err
				}
				continue
			case errors.Is(err, zk.ErrNodeExists):
				read = true
				continue
			default:
				return 0, err
			}
		}
		cur, stat, err := b.conn.Get(p)
		switch {
		case errors.Is(err, zk.ErrNoNode):
			read = false
			continue
		case err != nil:
			return 0, err
		}
		kept := token(cur, stat.Czxid)
		if stat.EphemeralOwner != b.conn.SessionID() {
			if !takeover {
				return 0, errOwned
			}
			// Replace it atomically, keeping its Created, so that a
			// concurrent change makes the swap fail rather than
			// overwrite it.
			data, err := encodeData(attrs, kept)
			if err != nil {
				return 0, err
			}
			_, err = b.conn.Multi(
				&zk.DeleteRequest{Path: p, Version: stat.Version},
				&zk.CreateRequest{Path: p, Data: data, Acl: b.acl, Flags: zk.FlagEphemeral},
			)
			switch {
			case err == nil:
				return kept, nil
			case errors.Is(err, zk.ErrNoNode), errors.Is(err, zk.ErrBadVersion), errors.Is(err, zk.ErrNodeExists):
				continue
			default:
				return 0, err
			}
		}
		data, err := encodeData(attrs, ownToken(kept, stat.Czxid))
		if err != nil {
			return 0, err
		}
		if bytes.Equal(cur, data) {
			return kept, nil
		}
		_, err = b.conn.Set(p, data, stat.Version)
		switch {
		case err == nil:
			return kept, nil
		case errors.Is(err, zk.ErrNoNode):
			read = false
			continue
		case errors.Is(err, zk.ErrBadVersion):
			continue
		default:
			return 0, err
		}
	}
	return 0, fmt.Errorf("%s: gave up after %d conflicting writes", p, maxWriteAttempts)
}

// ownToken is the created field to write into a znode whose czxid is
// czxid for a registration whose Created is tok: none when they agree.
func ownToken(tok uint64, czxid int64) uint64 {
	if tok == uint64(czxid) {
		return 0
	}
	return tok
}

// create creates p as an ephemeral znode of this session holding attrs
// and returns its Created: tok, written into its data, or for a fresh
// registration (tok 0) the znode's czxid. Create does not return the
// czxid, so a fresh znode is created together with a no-op setData in
// one transaction, whose answer carries the znode's stat.
func (b *Backend) create(p string, attrs map[string]string, tok uint64) (uint64, error) {
	data, err := encodeData(attrs, tok)
	if err != nil {
		return 0, err
	}
	acl := b.acl
	if tok != 0 {
		_, err := b.conn.Create(p, data, zk.FlagEphemeral, acl)
		return tok, err
	}
	res, err := b.conn.Multi(
		&zk.CreateRequest{Path: p, Data: data, Acl: acl, Flags: zk.FlagEphemeral},
		&zk.SetDataRequest{Path: p, Data: data, Version: 0},
	)
	if err != nil {
		return 0, err
	}
	if len(res) != 2 || res[1].Stat == nil || res[1].Stat.Czxid <= 0 {
		return 0, fmt.Errorf("create %s: no stat in the answer", p)
	}
	return uint64(res[1].Stat.Czxid), nil
}

// ensureServiceDir creates the znode of a service as a container node, which
// ZooKeeper removes by itself some time after its last instance is gone,
// so that names no longer used do not pile up. Its ancestors (the prefix)
// are persistent.
func (b *Backend) ensureServiceDir(dir string) error {
	for range 2 {
		_, err := b.conn.CreateContainer(dir, nil, zk.FlagContainer, b.acl)
		switch {
		case err == nil, errors.Is(err, zk.ErrNodeExists):
			return nil
		case errors.Is(err, zk.ErrNoNode):
			if err := b.ensurePath(path.Dir(dir)); err != nil {
				return err
			}
		default:
			return fmt.Errorf("create %s: %w", dir, err)
		}
	}
	return fmt.Errorf("create %s: parent keeps vanishing", dir)
}

// ensurePath creates p and its missing ancestors as persistent znodes.
func (b *Backend) ensurePath(p string) error {
	if p == "/" {
		return nil
	}
	_, err := b.conn.Create(p, nil, 0, b.acl)
	switch {
	case err == nil, errors.Is(err, zk.ErrNodeExists):
		return nil
	case errors.Is(err, zk.ErrNoAuth):
		// ZooKeeper checks the parent's ACL before it looks for p, so a
		// parent we may not write answers this even when p exists.
		if ok, _, xerr := b.conn.Exists(p); xerr == nil && ok {
			return nil
		}
	case errors.Is(err, zk.ErrNoNode):
		if err := b.ensurePath(path.Dir(p)); err != nil {
			return err
		}
		_, err = b.conn.Create(p, nil, 0, b.acl)
		if err == nil || errors.Is(err, zk.ErrNodeExists) {
			return nil
		}
	}
	return fmt.Errorf("create %s: %w", p, err)
}

// Unregister forgets the registration name/addr and deletes its znode if
// that is still an ephemeral node of this backend's session: a znode that
// another session took over is left alone. Deleting a registration that
// does not exist is not an error. It blocks until ZooKeeper answers or ctx
// ends; when ctx ends first, the delete may still take effect. Errors:
// backend.ErrClosed, ctx's error, or the ZooKeeper error wrapped with the
// operation.
//
// The delete is conditional on the version read with the owner, so a
// takeover between the two makes it fail and it is re-checked. ZooKeeper
// cannot compare the owner itself in the delete; the one interleaving that
// version does not catch (our znode replaced, in that round trip, by one
// of another session with the same version) removes the other session's
// znode, which that backend's anti-entropy writes again within its TTL.
func (b *Backend) Unregister(ctx context.Context, name, addr string) error {
	p := b.nodePath(name, addr)
	err := b.withKey(ctx, p, func() error {
		b.mu.Lock()
		delete(b.regs, p)
		b.mu.Unlock()
		_, err := b.deleteOwn(p)
		return err
	})
	switch {
	case errors.Is(err, backend.ErrNotOwner):
		return err
	case err != nil:
		return fmt.Errorf("zookeeper: unregister %s/%s: %w", name, addr, err)
	}
	return nil
}

// deleteOwn deletes p if it is an ephemeral node of this session, and
// says whether it did; it returns backend.ErrNotOwner for another
// session's node. It must be called with p's key lock held.
func (b *Backend) deleteOwn(p string) (bool, error) {
	for range maxWriteAttempts {
		ok, stat, err := b.conn.Exists(p)
		switch {
		case err != nil:
			return false, err
		case !ok:
			return false, nil
		case stat.EphemeralOwner != b.conn.SessionID():
			return false, backend.ErrNotOwner
		}
		err = b.conn.Delete(p, stat.Version)
		switch {
		case err == nil:
			return true, nil
		case errors.Is(err, zk.ErrNoNode):
			return false, nil
		case errors.Is(err, zk.ErrBadVersion):
			continue
		default:
			return false, err
		}
	}
	return false, fmt.Errorf("%s: gave up after %d conflicting writes", p, maxWriteAttempts)
}

// SessionState reports the backend's session. It does not block.
//
// Live is true when the backend is open, the client is connected with a
// session, and every remembered registration has been written on that
// session: it is false while the client is disconnected (even if the
// session may still be valid on the server), while the registrations are
// being restored on a new session (including while that restore fails and
// is retried), and after Close.
//
// Established is 1 for the session Open established plus one for each
// later session on which the registrations were restored; a session that
// expired before its restore succeeded is not counted. Repairs counts the
// fixes of anti-entropy (repair.go); Lost counts the registrations dropped
// because another session held their znode when the backend came to write
// them again (a restore, a repair).
func (b *Backend) SessionState() backend.SessionState {
	b.mu.Lock()
	closed := b.closed
	b.mu.Unlock()
	live := !closed && b.conn.State() == zk.StateHasSession && b.conn.SessionID() == b.restored.Load()
	return backend.SessionState{
		Live:        live,
		Established: b.sessions.Load(),
		Repairs:     b.repairs.Load(),
		Lost:        b.lost.Load(),
	}
}

// Ping reports whether the backend has a live session with a reachable
// server: an error at once when the client is not connected, else the
// result of a read of "/". It blocks at most until ctx ends.
func (b *Backend) Ping(ctx context.Context) error {
	if b.isClosed() {
		return backend.ErrClosed
	}
	if st := b.conn.State(); st != zk.StateHasSession {
		return fmt.Errorf("zookeeper: ping: not connected (%v)", st)
	}
	err := b.do(ctx, func() error {
		_, _, err := b.conn.Exists("/")
		return err
	})
	if err != nil {
		return fmt.Errorf("zookeeper: ping: %w", err)
	}
	return nil
}

// Close ends the session, which deletes every registration of this backend
// at once, ends all streams that are still open (their Err is then
// backend.ErrClosed; a stream closed by its own Close before keeps a nil
// Err) and stops every goroutine.
// Closing the session is bounded by the client library (about a second
// when no server answers). It is idempotent and always returns nil.
func (b *Backend) Close() error {
	b.closeOnce.Do(func() {
		b.mu.Lock()
		b.closed = true
		b.mu.Unlock()
		b.endLife()
		// Cancel the streams first, then stop the client, which fails
		// every request a stream may be blocked in, then wait for them.
		streams := b.allStreams()
		for _, s := range streams {
			s.cancel(backend.ErrClosed)
		}
		b.shutdownConn()
		for _, s := range streams {
			s.Close()
		}
		b.wg.Wait()
	})
	return nil
}

// Abandon is a test and fault-injection hook: it makes the backend die the
// way a SIGKILLed agent does. It cuts the TCP connection and forbids new
// ones, so the session is never closed and its registrations vanish only
// when ZooKeeper expires it after the TTL; then it stops everything like
// Close. Calling Close afterwards is safe.
func (b *Backend) Abandon() {
	b.dial.cut()
	b.Close()
}

func (b *Backend) allStreams() []*stream {
	b.mu.Lock()
	defer b.mu.Unlock()
	var all []*stream
	for _, set := range b.streams {
		for s := range set {
			all = append(all, s)
		}
	}
	return all
}

// shutdownConn closes the client (sending closeSession when a connection is
// up) and waits for the library's goroutines to end: its event channel is
// closed last.
func (b *Backend) shutdownConn() {
	b.conn.Close()
	timer := time.NewTimer(10 * time.Second)
	defer timer.Stop()
	for {
		select {
		case _, ok := <-b.zkEv:
			if !ok {
				return
			}
		case <-timer.C:
			b.log.Error("zookeeper client did not stop within 10s")
			return
		}
	}
}

func (b *Backend) isClosed() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.closed
}

// withKey runs f with the key lock of p held, on a goroutine the backend
// owns, and waits for it or for ctx. The ZooKeeper client cannot cancel a
// request, so f runs to its end even when ctx ends first; it holds the key
// lock until then, which keeps the writes to p in order.
func (b *Backend) withKey(ctx context.Context, p string, f func() error) error {
	return b.do(ctx, func() error {
		unlock, err := b.lockKey(ctx, p)
		if err != nil {
			return err
		}
		defer unlock()
		return f()
	})
}

// do runs f on a goroutine the backend owns (Close waits for it) and waits
// for its result or for ctx.
func (b *Backend) do(ctx context.Context, f func() error) error {
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return backend.ErrClosed
	}
	b.wg.Add(1)
	b.mu.Unlock()
	res := make(chan error, 1)
	go func() {
		defer b.wg.Done()
		res <- f()
	}()
	select {
	case err := <-res:
		if b.isClosed() && isConnErr(err) {
			return backend.ErrClosed
		}
		return err
	case <-ctx.Done():
		return context.Cause(ctx)
	}
}

func isConnErr(err error) bool {
	return errors.Is(err, zk.ErrClosing) || errors.Is(err, zk.ErrConnectionClosed) || errors.Is(err, zk.ErrNoServer) || errors.Is(err, errClosing)
}

// nodePath returns the znode of name/addr. Both are valid (the backend
// contract): neither is "." or ".." or holds a '/' that could escape the
// service directory.
func (b *Backend) nodePath(name, addr string) string { return b.serviceDir(name) + "/" + addr }

func (b *Backend) serviceDir(name string) string { return b.prefix + "/" + name }

// errClosing is returned by key-lock waits cut short by Close.
var errClosing = errors.New("backend closing")

// lockKey acquires the key lock of p, giving up when ctx is done (with
// ctx's error) or the backend closes (with errClosing). A ctx that is done
// by the time the lock is free never gets it.
func (b *Backend) lockKey(ctx context.Context, p string) (unlock func(), err error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	defer context.AfterFunc(b.life, cancel)()
	unlock, err = b.locks.Lock(ctx, p)
	if err != nil && b.life.Err() != nil {
		return nil, errClosing
	}
	return unlock, err
}

// cutDialer dials TCP and can cut the live connection and refuse new ones:
// for good (Abandon), which leaves the session open on the server until it
// expires, or for a while (tests of partitions).
type cutDialer struct {
	mu      sync.Mutex
	isCut   bool // refuse for good
	blocked bool // refuse until unblocked
	active  net.Conn
}

var errCut = errors.New("zookeeper: connection cut")

func (d *cutDialer) dial(network, addr string, timeout time.Duration) (net.Conn, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.isCut || d.blocked {
		return nil, errCut
	}
	c, err := net.DialTimeout(network, addr, timeout)
	if err != nil {
		return nil, err
	}
	d.active = c
	return c, nil
}

// cut closes the live connection and refuses new ones for good.
func (d *cutDialer) cut() {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.isCut = true
	if d.active != nil {
		d.active.Close()
	}
}

// block closes the live connection and refuses new ones until unblock.
func (d *cutDialer) block() {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.blocked = true
	if d.active != nil {
		d.active.Close()
	}
}

func (d *cutDialer) unblock() {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.blocked = false
}

// zkLogger sends the client library's log lines to slog at debug level:
// they are chatty about every reconnect; the backend logs what matters.
type zkLogger struct{ log *slog.Logger }

func (l zkLogger) Printf(format string, args ...any) {
	l.log.Debug("zk: " + fmt.Sprintf(format, args...))
}

// newBackoff yields the retry delays of the one rule (retry.Backoff)
// between 50 ms and 2 s, without jitter.
func newBackoff() *retry.Backoff {
	return &retry.Backoff{Min: 50 * time.Millisecond, Max: 2 * time.Second}
}
