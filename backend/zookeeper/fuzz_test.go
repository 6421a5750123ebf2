package zookeeper_test

import (
	"maps"
	"testing"

	"github.com/flynn/discoverd/backend/zookeeper"
)

// FuzzDecodeAttrs feeds arbitrary znode data (another writer, a corrupt
// node) to the decoder: it must never panic, and whatever it accepts must
// encode to canonical data that decodes to the same attributes, so equal
// attributes are never rewritten.
func FuzzDecodeAttrs(f *testing.F) {
	f.Fuzz(func(t *testing.T, data []byte) {
		attrs, err := zookeeper.DecodeAttrs(data)
		if err != nil {
			return
		}
		enc, err := zookeeper.EncodeAttrs(attrs)
		if err != nil {
			t.Fatalf("EncodeAttrs(%v): %v", attrs, err)
		}
		back, err := zookeeper.DecodeAttrs(enc)
		if err != nil || !maps.Equal(back, attrs) {
			t.Fatalf("round trip of %q: %v, %v; want %v", enc, back, err, attrs)
		}
		again, _ := zookeeper.EncodeAttrs(back)
		if string(again) != string(enc) {
			t.Fatalf("encoding is not canonical: %q then %q", enc, again)
		}
	})
}
