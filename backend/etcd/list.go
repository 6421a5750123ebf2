package etcd

import (
	"context"
	"fmt"
	"strings"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/flynn/discoverd/api"
	"github.com/flynn/discoverd/backend"
)

var _ backend.Lister = (*Backend)(nil)

// listRangeKeys bounds the keys of one range request of ListServices.
// A page whose services hold more keys is read in several ranges, all at
// the revision of the first.
var listRangeKeys = 4096

// ListServices implements backend.Lister with range reads of the prefix
// (values included: a registration's token may be in its value): a page costs one range unless its services hold more than
// listRangeKeys registrations. Keys that discoverd did not write are
// skipped. It fails with backend.ErrClosed after Close.
func (b *Backend) ListServices(ctx context.Context, after string, limit int) ([]backend.ServiceSummary, string, error) {
	if limit <= 0 {
		limit = backend.DefaultListLimit
	}
	ctx, cancel := b.opContext(ctx)
	defer cancel()
	if b.isClosed() {
		return nil, "", backend.ErrClosed
	}
	start, end := b.prefix, clientv3.GetPrefixRangeEnd(b.prefix)
	if after != "" {
		// Keys of after are after+"/"+addr; '0' is the byte after '/'.
		start = b.prefix + after + "0"
	}
	var (
		page []backend.ServiceSummary
		cur  *backend.ServiceSummary
		rev  int64
	)
	for {
		opts := []clientv3.OpOption{clientv3.WithRange(end), clientv3.WithLimit(int64(listRangeKeys))}
		if rev != 0 {
			opts = append(opts, clientv3.WithRev(rev))
		}
		resp, err := b.client.Get(ctx, start, opts...)
		if err != nil {
			if b.isClosed() {
				return nil, "", backend.ErrClosed
			}
			return nil, "", fmt.Errorf("etcd: list services: %w", err)
		}
		rev = resp.Header.Revision
		for _, kv := range resp.Kvs {
			name, _, ok := strings.Cut(strings.TrimPrefix(string(kv.Key), b.prefix), "/")
			if !ok || api.ValidateName(name) != nil {
				continue // not a registration
			}
			// decode derives Created (the fencing token) as streams do:
			// it needs the value, which may carry the token.
			in, err := decode(b.prefix+name+"/", name, kv)
			if err != nil {
				continue // not a registration
			}
			if cur == nil || cur.Name != name {
				if cur != nil {
					if len(page) == limit-1 {
						// A service follows the full page.
						return append(page, *cur), cur.Name, nil
					}
					page = append(page, *cur)
				}
				cur = &backend.ServiceSummary{Name: name, Leader: in}
			}
			cur.Instances++
			if in.Age().Compare(cur.Leader.Age()) < 0 {
				cur.Leader = in
			}
		}
		if !resp.More || len(resp.Kvs) == 0 {
			break
		}
		start = string(resp.Kvs[len(resp.Kvs)-1].Key) + "\x00"
	}
	if cur != nil {
		page = append(page, *cur)
	}
	return page, "", nil
}
