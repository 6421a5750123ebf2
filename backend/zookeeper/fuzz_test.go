package zookeeper_test

import (
	"maps"
	"testing"

	"github.com/flynn/discoverd/backend/zookeeper"
)

// FuzzDecodeData feeds arbitrary znode data (another writer, a corrupt
// node, either form) to the decoder: it must never panic, and whatever it
// accepts must encode to canonical data that decodes to the same
// attributes and Created, so equal registrations are never rewritten.
func FuzzDecodeData(f *testing.F) {
	f.Add([]byte(`{"attrs":{"k":"v"},"created":42}`))
	f.Add([]byte(`{"attrs":"not wrapped"}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		attrs, created, err := zookeeper.DecodeData(data)
		if err != nil {
			return
		}
		enc, err := zookeeper.EncodeData(attrs, created)
		if err != nil {
			t.Fatalf("EncodeData(%v, %d): %v", attrs, created, err)
		}
		back, backCreated, err := zookeeper.DecodeData(enc)
		if err != nil || !maps.Equal(back, attrs) || backCreated != created {
			t.Fatalf("round trip of %q: %v, %d, %v; want %v, %d", enc, back, backCreated, err, attrs, created)
		}
		again, _ := zookeeper.EncodeData(back, backCreated)
		if string(again) != string(enc) {
			t.Fatalf("encoding is not canonical: %q then %q", enc, again)
		}
	})
}
