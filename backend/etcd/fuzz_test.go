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
// never panic; it must accept every valid address with a value in either
// layout (an older discoverd's flat JSON object of strings, or
// {"attrs":{...}} with a seq or a created token; or no value), reading an
// older value's token as CreateRevision << 7; and what it accepts must
// survive the backend's own encoding unchanged, token included. Seeds:
// testdata/fuzz/FuzzDecode.
func FuzzDecode(f *testing.F) {
	const name, prefix = "web", etcd.DefaultPrefix + "web/"
	const rev = 42
	f.Fuzz(func(t *testing.T, addr string, value []byte, noValue bool) {
		kv := &mvccpb.KeyValue{Key: []byte(prefix + addr), Value: value, CreateRevision: rev}
		if noValue {
			kv.Value = nil
		}
		in, err := etcd.Decode(prefix, name, kv)

		var probe map[string]json.RawMessage
		var flat map[string]string
		oldLayout := kv.Value == nil || (json.Unmarshal(kv.Value, &probe) == nil && probe["attrs"] == nil && json.Unmarshal(kv.Value, &flat) == nil)
		if api.ValidateAddr(addr) != nil {
			if err == nil {
				t.Fatalf("Decode(%q, %q) = %+v, want an error for the address", addr, kv.Value, in)
			}
			return
		}
		if oldLayout {
			if err != nil {
				t.Fatalf("Decode(%q, %q) rejected a valid registration: %v", addr, kv.Value, err)
			}
			if in.Created != rev<<7 || !maps.Equal(in.Attrs, flat) {
				t.Fatalf("Decode(%q, %q) = %+v, want Created %d and attrs %v", addr, kv.Value, in, rev<<7, flat)
			}
		}
		if err != nil {
			return
		}
		if in.Name != name || in.Addr != addr || in.Created == 0 {
			t.Fatalf("Decode(%q, %q) = %+v: wrong name, addr or Created", addr, kv.Value, in)
		}
		if in.Attrs != nil && len(in.Attrs) == 0 {
			t.Fatalf("Decode(%q, %q): empty non-nil Attrs", addr, kv.Value)
		}
		// What the backend would write again for this registration decodes
		// to the same attributes and token.
		attrs, err := etcd.EncodeAttrs(in.Attrs)
		if err != nil {
			t.Fatalf("EncodeAttrs(%v): %v", in.Attrs, err)
		}
		kv.Value = []byte(etcd.EncodeValue(attrs, in.Created, 0))
		kv.CreateRevision = rev + 1
		again, err := etcd.Decode(prefix, name, kv)
		if err != nil {
			t.Fatalf("decoding the encoding %q of %+v: %v", kv.Value, in, err)
		}
		if !maps.Equal(again.Attrs, in.Attrs) || (again.Attrs == nil) != (in.Attrs == nil) || again.Created != in.Created {
			t.Fatalf("%+v encoded as %q decodes as %+v", in, kv.Value, again)
		}
	})
}
