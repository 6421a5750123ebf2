package etcd

import (
	"encoding/json"
	"fmt"
	"strconv"
	"strings"

	"go.etcd.io/etcd/api/v3/mvccpb"

	"github.com/flynn/discoverd/api"
	"github.com/flynn/discoverd/backend"
)

// Fencing tokens. etcd gives every key written in one transaction the
// same CreateRevision, and the backend batches concurrent registrations
// into transactions, so CreateRevision alone repeats. A registration's
// token (its Created) is therefore
//
//	CreateRevision << seqBits | seq
//
// where seq is the place of the creating put in its transaction (a
// transaction holds at most 1 << seqBits operations). Tokens are unique
// per key space and ordered like the transactions that created them.
//
// A token must survive a key being written again under a new
// CreateRevision: when the backend restores its registrations after
// losing its lease, repairs a missing key, or takes over a key, it writes
// the token it already has into the value, and that stored token wins.
//
// Value layout: {"attrs":{...},"seq":N} on the put that creates a key,
// {"attrs":{...},"created":T} on every later write. A value written by an
// older discoverd (the attributes as a flat JSON object) decodes with
// seq 0.
const seqBits = 7

// maxTxnOps is the most operations one transaction may hold, both for the
// token's seq and for etcd's --max-txn-ops default.
const maxTxnOps = 1 << seqBits

// token returns the fencing token of a key created at rev by the put at
// place seq of its transaction.
func token(rev int64, seq int) uint64 { return uint64(rev)<<seqBits | uint64(seq) }

// encodeAttrs returns attrs as a JSON object (keys sorted, so equal attrs
// encode equal); no attributes encode as {}.
func encodeAttrs(attrs map[string]string) (string, error) {
	if len(attrs) == 0 {
		return "{}", nil
	}
	buf, err := json.Marshal(attrs)
	if err != nil {
		return "", fmt.Errorf("encoding attributes: %w", err)
	}
	return string(buf), nil
}

// encodeValue builds a stored value from attributes already encoded by
// encodeAttrs: with the token when it is known (tok != 0), else with the
// put's place in its transaction.
func encodeValue(attrs string, tok uint64, seq int) string {
	var b strings.Builder
	b.Grow(len(attrs) + 32)
	b.WriteString(`{"attrs":`)
	b.WriteString(attrs)
	if tok != 0 {
		b.WriteString(`,"created":`)
		b.WriteString(strconv.FormatUint(tok, 10))
	} else {
		b.WriteString(`,"seq":`)
		b.WriteString(strconv.Itoa(seq))
	}
	b.WriteByte('}')
	return b.String()
}

// storedValue is the decoded value of a registration key.
type storedValue struct {
	Attrs   map[string]string `json:"attrs"`
	Created uint64            `json:"created"`
	Seq     int               `json:"seq"`
}

// decodeValue decodes a stored value and returns the attributes and the
// token of the key kv.
func decodeValue(kv *mvccpb.KeyValue) (map[string]string, uint64, error) {
	var probe map[string]json.RawMessage
	if err := json.Unmarshal(kv.Value, &probe); err != nil {
		return nil, 0, fmt.Errorf("value is not a JSON object: %w", err)
	}
	if _, ok := probe["attrs"]; !ok {
		// An older discoverd's value: the attributes alone.
		var attrs map[string]string
		if err := json.Unmarshal(kv.Value, &attrs); err != nil {
			return nil, 0, fmt.Errorf("value is not a JSON object of strings: %w", err)
		}
		return attrs, token(kv.CreateRevision, 0), nil
	}
	var v storedValue
	if err := json.Unmarshal(kv.Value, &v); err != nil {
		return nil, 0, fmt.Errorf("value: %w", err)
	}
	if v.Created != 0 {
		return v.Attrs, v.Created, nil
	}
	if v.Seq < 0 || v.Seq >= maxTxnOps {
		return nil, 0, fmt.Errorf("value: seq %d out of range", v.Seq)
	}
	return v.Attrs, token(kv.CreateRevision, v.Seq), nil
}

// Decode turns a registration key-value read from the store under
// prefix, the key prefix of service name (Config.Prefix + name + "/"),
// into an Instance whose Created is its fencing token. It fails on keys
// and values that discoverd did not write. It is for tools and tests that
// read the store directly.
func Decode(prefix, name string, kv *mvccpb.KeyValue) (backend.Instance, error) {
	return decode(prefix, name, kv)
}

// decode is Decode.
func decode(prefix, name string, kv *mvccpb.KeyValue) (backend.Instance, error) {
	addr, ok := strings.CutPrefix(string(kv.Key), prefix)
	if !ok || api.ValidateAddr(addr) != nil {
		return backend.Instance{}, fmt.Errorf("key %q is not a registration", kv.Key)
	}
	in := backend.Instance{Name: name, Addr: addr}
	if kv.Value == nil {
		in.Created = token(kv.CreateRevision, 0)
		return in, nil
	}
	attrs, tok, err := decodeValue(kv)
	if err != nil {
		return backend.Instance{}, fmt.Errorf("key %q: %w", kv.Key, err)
	}
	in.Created = tok
	if len(attrs) > 0 {
		in.Attrs = attrs
	}
	return in, nil
}
