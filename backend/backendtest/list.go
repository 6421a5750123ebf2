package backendtest

import (
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/flynn/discoverd/backend"
)

// RunLister runs the conformance tests of backend.Lister against h: the
// backends h.New makes must implement it. Only h.New is used. Call it
// from the store package's tests next to Run:
//
//	func TestLister(t *testing.T) { backendtest.RunLister(t, harness) }
func RunLister(t *testing.T, h Harness) {
	if h.New == nil {
		t.Fatal("backendtest: Harness.New is required")
	}
	if h.TTL <= 0 {
		h.TTL = 2 * time.Second
	}
	s := &suite{h: h}
	for _, tc := range []struct {
		name string
		fn   func(t *testing.T)
	}{
		{"ListsCountAndLeaderInPages", s.testListPages},
		{"ListAfterCloseReturnsErrClosed", s.testListAfterClose},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			tc.fn(t)
		})
	}
}

func (s *suite) lister(tb testing.TB) (backend.Backend, backend.Lister) {
	tb.Helper()
	b := s.open(tb)
	l, ok := b.(backend.Lister)
	if !ok {
		tb.Fatalf("%T does not implement backend.Lister", b)
	}
	return b, l
}

// listFrom pages through the services whose names start with prefix+"-",
// limit at a time, and returns them with the page sizes.
func listFrom(tb testing.TB, l backend.Lister, prefix string, limit int) (all []backend.ServiceSummary, pages []int) {
	tb.Helper()
	after := prefix + "-" // sorts before every prefix+"-"+x (see backend.ListOrder)
	for {
		page, next, err := l.ListServices(callCtx(tb), after, limit)
		if err != nil {
			tb.Fatalf("ListServices(%q, %d): %v", after, limit, err)
		}
		if len(page) > limit {
			tb.Fatalf("ListServices(%q, %d) returned %d services", after, limit, len(page))
		}
		n := 0
		for i, sum := range page {
			if i > 0 && backend.ListOrder(page[i-1].Name, sum.Name) >= 0 {
				tb.Fatalf("page out of ListOrder: %q then %q", page[i-1].Name, sum.Name)
			}
			if !strings.HasPrefix(sum.Name, prefix+"-") {
				return all, append(pages, n)
			}
			all = append(all, sum)
			n++
		}
		pages = append(pages, n)
		if next == "" {
			return all, pages
		}
		if next != page[len(page)-1].Name {
			tb.Fatalf("next = %q, want the page's last name %q", next, page[len(page)-1].Name)
		}
		after = next
	}
}

// testListPages: every service with registrations is listed once, in
// order, with its instance count and its oldest registration as leader;
// a service whose registrations are gone is not listed; pages hold at
// most limit services and chain by their cursor.
func (s *suite) testListPages(t *testing.T) {
	a, l := s.lister(t)
	b := s.open(t)
	p := s.name(t)
	svc := func(x string) string { return p + "-" + x }
	mustRegister(t, a, svc("a"), "10.0.0.1:80", map[string]string{"v": "1"})
	mustRegister(t, b, svc("a"), "10.0.0.2:80", nil)
	mustRegister(t, a, svc("a"), "10.0.0.3:80", nil)
	mustRegister(t, b, svc("b"), "10.0.1.1:80", nil)
	mustRegister(t, a, svc("c"), "10.0.2.1:80", nil)
	mustUnregister(t, a, svc("c"), "10.0.2.1:80")
	mustRegister(t, b, svc("d"), "10.0.3.2:80", nil)
	mustRegister(t, a, svc("d"), "10.0.3.1:80", nil)
	mustRegister(t, a, svc("e.x"), "10.0.4.1:80", nil)

	want := []string{
		svc("a") + " 3 10.0.0.1:80",
		svc("b") + " 1 10.0.1.1:80",
		svc("d") + " 2 10.0.3.2:80",
		svc("e.x") + " 1 10.0.4.1:80",
	}
	for _, limit := range []int{1, 2, 3, 100} {
		all, pages := listFrom(t, l, p, limit)
		var got []string
		for _, sum := range all {
			if sum.Leader.Created == 0 || sum.Leader.Name != sum.Name {
				t.Errorf("limit %d: %s: leader %+v, want its name and a Created", limit, sum.Name, sum.Leader)
			}
			got = append(got, fmt.Sprintf("%s %d %s", sum.Name, sum.Instances, sum.Leader.Addr))
		}
		if strings.Join(got, "\n") != strings.Join(want, "\n") {
			t.Fatalf("limit %d: listed\n%s\nwant\n%s", limit, strings.Join(got, "\n"), strings.Join(want, "\n"))
		}
		if limit < len(want) && pages[0] != limit {
			t.Errorf("limit %d: first page holds %d services", limit, pages[0])
		}
	}
	// The leader is the oldest registration, as subscribers see it.
	r := mustSubscribe(t, b, svc("a"))
	lead, _ := r.leader()
	all, _ := listFrom(t, l, p, 100)
	if all[0].Leader.Created != lead.Created || all[0].Leader.Addr != lead.Addr {
		t.Errorf("listed leader %+v, subscribers see %+v", all[0].Leader, lead)
	}
}

func (s *suite) testListAfterClose(t *testing.T) {
	b, l := s.lister(t)
	b.Close()
	if _, _, err := l.ListServices(callCtx(t), "", 10); !errors.Is(err, backend.ErrClosed) {
		t.Fatalf("ListServices after Close = %v, want ErrClosed", err)
	}
}
