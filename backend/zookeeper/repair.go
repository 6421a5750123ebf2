package zookeeper

import (
	"errors"
	"fmt"
	"path"
	"sync"

	"github.com/go-zookeeper/zk"
)

// Anti-entropy. Every TTL/2, on a session whose registrations are all
// written (restored), the session goroutine compares what the store holds
// on the backend's session with what the backend holds, in every service
// it has written under:
//
//   - a znode of this session that the backend does not hold (a write whose
//     outcome it lost: the create was applied but the answer never came) is
//     deleted;
//   - a held registration whose znode is missing (deleted behind the
//     backend's back) is created again with its Created;
//   - a held registration whose znode another session holds now (taken
//     over through another agent) is dropped and counted lost; it is never
//     taken back.
//
// Each fix is made under the znode's key lock, after reading the znode
// again, so it never undoes a Register or Unregister running at the same
// time, and is counted in SessionState.Repairs. A pass costs one
// getChildren per service and one exists per znode there; it writes only
// to fix drift.
//
// Limit: a missing znode does not say why it went. If another session
// took a registration over and then deleted it (Unregister) before this
// backend's next pass saw the takeover, the pass takes it for a znode
// deleted behind its back and writes it again, on this session, with its
// Created. A data watch on each held znode would see the takeover as it
// happens and shrink that window to a round trip.

// repairWorkers bounds the znodes checked at once by one pass (the
// requests are pipelined on the backend's one connection).
const repairWorkers = 8

// forgetDirAfter is the number of passes in a row that must find nothing
// of the backend's in a service, with no write there meanwhile, before
// anti-entropy stops visiting it.
const forgetDirAfter = 3

// noteDir records that the backend writes under the service znode dir.
func (b *Backend) noteDir(dir string) {
	b.mu.Lock()
	b.dirs[dir] = 0
	b.mu.Unlock()
}

// antiEntropy runs one pass on session id. It gives up at the first
// error that is not about one znode (the connection went, the session
// changed); the next pass tries again.
func (b *Backend) antiEntropy(id int64) {
	b.mu.Lock()
	dirs := make([]string, 0, len(b.dirs))
	for d := range b.dirs {
		dirs = append(dirs, d)
	}
	held := make(map[string][]string) // by dir
	for p := range b.regs {
		d := path.Dir(p)
		held[d] = append(held[d], p)
		if _, ok := b.dirs[d]; !ok {
			// Held but never noted: cannot happen (Register notes it
			// first), but a held registration is always visited.
			b.dirs[d] = 0
			dirs = append(dirs, d)
		}
	}
	b.mu.Unlock()
	for _, dir := range dirs {
		if b.life.Err() != nil {
			return
		}
		if err := b.repairDir(id, dir, held[dir]); err != nil {
			b.log.Debug("zookeeper: anti-entropy pass stopped", "service", dir, "err", err)
			return
		}
	}
}

// repairDir checks the children of dir and the registrations held there.
func (b *Backend) repairDir(id int64, dir string, held []string) error {
	kids, _, err := b.conn.Children(dir)
	if err != nil && !errors.Is(err, zk.ErrNoNode) {
		return err
	}
	paths := make(map[string]bool, len(kids)+len(held))
	for _, c := range kids {
		paths[dir+"/"+c] = true
	}
	for _, p := range held {
		paths[p] = true
	}

	var (
		wg      sync.WaitGroup
		mu      sync.Mutex
		ours    bool  // a znode of the backend's, or a registration it holds, is there
		firstEr error // the first error that stops the pass
	)
	sem := make(chan struct{}, repairWorkers)
	for p := range paths {
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer func() { <-sem; wg.Done() }()
			found, err := b.repairNode(id, p)
			mu.Lock()
			defer mu.Unlock()
			ours = ours || found
			if err != nil && firstEr == nil {
				firstEr = fmt.Errorf("%s: %w", p, err)
			}
		}()
	}
	wg.Wait()
	if firstEr != nil {
		return firstEr
	}
	if !ours {
		b.mu.Lock()
		if n, ok := b.dirs[dir]; ok {
			if n+1 >= forgetDirAfter {
				delete(b.dirs, dir)
			} else {
				b.dirs[dir] = n + 1
			}
		}
		b.mu.Unlock()
	}
	return nil
}

// repairNode checks one znode against the backend's registrations and
// fixes it. found reports whether the znode is the backend's or held by
// it (before the fix).
func (b *Backend) repairNode(id int64, p string) (found bool, err error) {
	unlock, err := b.lockKey(b.life, p)
	if err != nil {
		return false, err
	}
	defer unlock()
	if b.conn.SessionID() != id || b.restored.Load() != id {
		return false, errors.New("session changed")
	}
	b.mu.Lock()
	reg, held := b.regs[p]
	b.mu.Unlock()
	exists, stat, err := b.conn.Exists(p)
	if err != nil {
		return false, err
	}
	mine := exists && stat.EphemeralOwner == id
	switch {
	case mine && !held:
		if err := b.conn.Delete(p, stat.Version); err != nil {
			if errors.Is(err, zk.ErrNoNode) || errors.Is(err, zk.ErrBadVersion) {
				return true, nil // changed meanwhile; the next pass looks again
			}
			return true, err
		}
		b.repairs.Add(1)
		b.log.Warn("zookeeper anti-entropy: deleted a znode of this session that it does not hold", "znode", p)
	case held && !exists:
		_, err := b.put(p, reg.attrs, reg.token, false, false)
		if errors.Is(err, errOwned) {
			b.drop(p, "anti-entropy")
			return true, nil
		}
		if err != nil {
			return true, err
		}
		b.repairs.Add(1)
		b.log.Warn("zookeeper anti-entropy: wrote again a held registration that was missing", "znode", p, "created", reg.token)
	case held && !mine:
		b.drop(p, "anti-entropy")
	}
	return mine || held, nil
}
