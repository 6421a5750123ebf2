package api_test

import (
	"slices"
	"testing"

	"github.com/flynn/discoverd/api"
)

func up(addr string, created uint, attrs map[string]string) api.ServiceUpdate {
	return api.ServiceUpdate{Name: "web", Addr: addr, Online: true, Created: created, Attrs: attrs}
}

func TestClassify(t *testing.T) {
	view := map[string]api.ServiceUpdate{"a:1": up("a:1", 5, map[string]string{"v": "1"})}
	for _, tc := range []struct {
		name string
		next api.ServiceUpdate
		want api.Change
	}{
		{"unknown address is added", up("b:1", 5, nil), api.Added},
		{"same registration and attributes is unchanged", up("a:1", 5, map[string]string{"v": "1"}), api.Unchanged},
		{"new attributes are an update", up("a:1", 5, map[string]string{"v": "2"}), api.Updated},
		{"new Created is a replacement", up("a:1", 6, map[string]string{"v": "1"}), api.Replaced},
	} {
		t.Run(tc.name, func(t *testing.T) {
			old, c := api.Classify(view, tc.next.Addr, tc.next)
			if c != tc.want {
				t.Fatalf("Classify = %d, want %d", c, tc.want)
			}
			if old.Addr != view[tc.next.Addr].Addr {
				t.Fatalf("old = %+v, want the view's %+v", old, view[tc.next.Addr])
			}
		})
	}
}

func TestDiff(t *testing.T) {
	view := map[string]api.ServiceUpdate{
		"a:1": up("a:1", 3, nil), // stays
		"b:1": up("b:1", 2, nil), // gone
		"c:1": up("c:1", 1, nil), // gone, older
		"d:1": up("d:1", 4, nil), // new attributes
		"e:1": up("e:1", 5, nil), // replaced
	}
	snapshot := map[string]api.ServiceUpdate{
		"a:1": up("a:1", 3, nil),
		"d:1": up("d:1", 4, map[string]string{"k": "v"}),
		"e:1": up("e:1", 9, nil),
		"f:1": up("f:1", 7, nil), // added
		"g:1": up("g:1", 7, nil), // added, same Created: the address orders
	}
	gone, put := api.Diff(view, snapshot)
	if want := []string{"c:1", "b:1"}; !slices.Equal(gone, want) {
		t.Errorf("gone = %q, want %q", gone, want)
	}
	if want := []string{"d:1", "f:1", "g:1", "e:1"}; !slices.Equal(put, want) {
		t.Errorf("put = %q, want %q", put, want)
	}
}
