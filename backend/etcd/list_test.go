package etcd_test

import (
	"fmt"
	"testing"
	"time"

	"github.com/flynn/discoverd/backend"
	"github.com/flynn/discoverd/backend/backendtest"
	"github.com/flynn/discoverd/backend/etcd"
	"github.com/flynn/discoverd/backend/etcd/etcdtest"
)

func TestLister(t *testing.T) {
	srv := etcdtest.NewServer(t)
	backendtest.RunLister(t, backendtest.Harness{
		New: func(tb testing.TB, ttl time.Duration) backend.Backend { return mustOpen(tb, srv.Endpoints(), ttl) },
	})
}

// TestListSpansRanges: a page whose services hold more keys than one
// range reads is read in several ranges, and a service split between two
// ranges is counted once.
func TestListSpansRanges(t *testing.T) {
	defer etcd.SetListRangeKeys(3)()
	eps := etcdtest.NewServer(t).Endpoints()
	b := mustOpen(t, eps, time.Minute)
	for i := range 7 {
		if err := b.Register(ctxT(t), "big", addr(i), nil); err != nil {
			t.Fatal(err)
		}
	}
	for _, name := range []string{"a", "c"} {
		if err := b.Register(ctxT(t), name, addr(0), nil); err != nil {
			t.Fatal(err)
		}
	}
	// A key discoverd did not write is skipped.
	if _, err := mustClient(t, eps).Put(ctxT(t), etcd.DefaultPrefix+"bad name/x", "{}"); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		after, want, next string
		limit             int
	}{
		{"", "[a:1 big:7 c:1]", "", 10},
		{"", "[a:1 big:7]", "big", 2},
		{"a", "[big:7]", "big", 1},
		{"big", "[c:1]", "", 1},
		{"c", "[]", "", 1},
	} {
		page, next, err := b.ListServices(ctxT(t), tc.after, tc.limit)
		if err != nil {
			t.Fatal(err)
		}
		got := []string{}
		for _, s := range page {
			got = append(got, fmt.Sprintf("%s:%d", s.Name, s.Instances))
		}
		if fmt.Sprint(got) != tc.want || next != tc.next {
			t.Errorf("ListServices(%q, %d) = %v, %q; want %s, %q", tc.after, tc.limit, got, next, tc.want, tc.next)
		}
	}
}
