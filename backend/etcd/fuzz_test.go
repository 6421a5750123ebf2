package etcd_test

import (
	"encoding/json"
	"maps"
	"testing"

	"go.etcd.io/etcd/api/v3/mvccpb"

	"github.com/flynn/discoverd/api"
	"github.com/flynn/discoverd/backend/etcd"
)

// FuzzDecode feeds the decoding of stored registrations keys and values
// that anyone with access to the store could have written. Decoding must
// never panic, must accept exactly the valid addresses with a JSON object
// of strings (or no value), and what it accepts must survive the
// backend's own encoding unchanged. Seeds: testdata/fuzz/FuzzDecode.
func FuzzDecode(f *testing.F) {
	const name, prefix = "web", etcd.DefaultPrefix + "web/"
	f.Fuzz(func(t *testing.T, addr string, value []byte, noValue bool) {
		kv := &mvccpb.KeyValue{Key: []byte(prefix + addr), Value: value, CreateRevision: 42}
		if noValue {
			kv.Value = nil
		}
		in, err := etcd.Decode(prefix, name, kv)

		var obj map[string]string
		validValue := kv.Value == nil || json.Unmarshal(kv.Value, &obj) == nil
		valid := api.ValidateAddr(addr) == nil && validValue
		if err != nil {
			if valid {
				t.Fatalf("Decode(%q, %q) rejected a valid registration: %v", addr, kv.Value, err)
			}
			return
		}
		if !valid {
			t.Fatalf("Decode(%q, %q) = %+v, want an error", addr, kv.Value, in)
		}
		if in.Name != name || in.Addr != addr || in.Created != 42 {
			t.Fatalf("Decode(%q, %q) = %+v: wrong name, addr or Created", addr, kv.Value, in)
		}
		if in.Attrs != nil && len(in.Attrs) == 0 {
			t.Fatalf("Decode(%q, %q): empty non-nil Attrs", addr, kv.Value)
		}
		if !maps.Equal(in.Attrs, obj) {
			t.Fatalf("Decode(%q, %q) attrs %v, want %v", addr, kv.Value, in.Attrs, obj)
		}
		// What the backend would write for these attributes decodes to
		// the same attributes.
		enc, err := etcd.EncodeAttrs(in.Attrs)
		if err != nil {
			t.Fatalf("EncodeAttrs(%v): %v", in.Attrs, err)
		}
		kv.Value = []byte(enc)
		again, err := etcd.Decode(prefix, name, kv)
		if err != nil {
			t.Fatalf("decoding the encoding %q of %v: %v", enc, in.Attrs, err)
		}
		if !maps.Equal(again.Attrs, in.Attrs) || (again.Attrs == nil) != (in.Attrs == nil) {
			t.Fatalf("attrs %v encoded as %q decode as %v", in.Attrs, enc, again.Attrs)
		}
	})
}
