package zookeeper

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"

	"github.com/go-zookeeper/zk"

	"github.com/flynn/discoverd/api"
	"github.com/flynn/discoverd/backend"
)

var _ backend.Lister = (*Backend)(nil)

// listParallel bounds the requests in flight of one ListServices (the
// client pipelines them on its one connection).
const listParallel = 16

// ListServices implements backend.Lister: one listing of the service
// znodes, then, for each service of the page, a listing of its instances
// and a stat of each (for the leader's czxid). Services whose znode holds
// no instance (an emptied container znode not yet reaped) are skipped.
// Names discoverd would not accept are skipped. It fails with
// backend.ErrClosed after Close.
func (b *Backend) ListServices(ctx context.Context, after string, limit int) ([]backend.ServiceSummary, string, error) {
	if limit <= 0 {
		limit = backend.DefaultListLimit
	}
	var (
		page []backend.ServiceSummary
		next string
	)
	err := b.do(ctx, func() error {
		names, _, err := b.conn.Children(b.prefix)
		if errors.Is(err, zk.ErrNoNode) {
			return nil // nothing was ever registered
		}
		if err != nil {
			return err
		}
		names = slices.DeleteFunc(names, func(n string) bool {
			return api.ValidateName(n) != nil || (after != "" && backend.ListOrder(n, after) <= 0)
		})
		slices.SortFunc(names, backend.ListOrder)
		for _, name := range names {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			sum, ok, err := b.summarize(name)
			if err != nil {
				return err
			}
			if !ok {
				continue
			}
			if len(page) == limit {
				next = page[len(page)-1].Name
				return nil
			}
			page = append(page, sum)
		}
		return nil
	})
	if err != nil {
		if errors.Is(err, backend.ErrClosed) {
			return nil, "", err
		}
		return nil, "", fmt.Errorf("zookeeper: list services: %w", err)
	}
	return page, next, nil
}

// summarize reads the instances of name; ok is false when it has none.
func (b *Backend) summarize(name string) (sum backend.ServiceSummary, ok bool, err error) {
	dir := b.serviceDir(name)
	kids, _, err := b.conn.Children(dir)
	if errors.Is(err, zk.ErrNoNode) {
		return sum, false, nil
	}
	if err != nil {
		return sum, false, err
	}
	kids = slices.DeleteFunc(kids, func(a string) bool { return api.ValidateAddr(a) != nil })
	var (
		mu       sync.Mutex
		wg       sync.WaitGroup
		firstErr error
		sem      = make(chan struct{}, listParallel)
	)
	sum.Name = name
	for _, addr := range kids {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			// The data, not only the stat: a znode made again for a
			// registration (restore, takeover) carries its token there.
			data, stat, err := b.conn.Get(dir + "/" + addr)
			found := err == nil
			if errors.Is(err, zk.ErrNoNode) {
				err = nil
			}
			var tok uint64
			if found {
				if _, tok, err = decodeData(data); err != nil {
					found, err = false, nil // not a registration
				}
			}
			mu.Lock()
			defer mu.Unlock()
			switch {
			case err != nil:
				if firstErr == nil {
					firstErr = err
				}
			case found:
				in := backend.Instance{Name: name, Addr: addr, Created: cmp.Or(tok, uint64(stat.Czxid))}
				if sum.Instances == 0 || in.Age().Compare(sum.Leader.Age()) < 0 {
					sum.Leader = in
				}
				sum.Instances++
			}
		})
	}
	wg.Wait()
	if firstErr != nil {
		return sum, false, firstErr
	}
	return sum, sum.Instances > 0, nil
}
