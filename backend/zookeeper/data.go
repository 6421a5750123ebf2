package zookeeper

import (
	"bytes"
	"encoding/json"
	"fmt"
)

// The data of a registration's znode comes in two forms (see the package
// doc):
//
//   - flat: the attributes as a JSON object, {"k":"v",...}. The
//     registration's Created is the znode's czxid. A registration whose
//     znode was never re-created is written this way, which is also how
//     earlier versions wrote every registration.
//   - wrapped: {"attrs":{"k":"v",...},"created":N}. Created is N, kept from
//     an earlier znode of the same registration (a takeover or a restore
//     re-creates the znode under a new czxid).
//
// The forms cannot be confused: every value of a flat object is a string,
// while the "attrs" of a wrapped one is an object.

// nodeData is the wrapped form.
type nodeData struct {
	Attrs   map[string]string `json:"attrs"`
	Created uint64            `json:"created,omitempty"`
}

// encodeData returns the canonical data of a znode holding attrs whose
// Created is created, or its own czxid when created is 0. Equal arguments
// give equal bytes.
func encodeData(attrs map[string]string, created uint64) ([]byte, error) {
	if created == 0 {
		return encodeAttrs(attrs)
	}
	if attrs == nil {
		attrs = map[string]string{}
	}
	return json.Marshal(nodeData{Attrs: attrs, Created: created})
}

// decodeData parses a znode's data in either form. created is 0 when the
// data does not carry one (the znode's czxid is the Created). No
// attributes decode as nil.
func decodeData(data []byte) (attrs map[string]string, created uint64, err error) {
	if len(data) == 0 {
		return nil, 0, nil
	}
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(data, &fields); err != nil {
		return nil, 0, err
	}
	if a, ok := fields["attrs"]; !ok || !bytes.HasPrefix(bytes.TrimSpace(a), []byte("{")) {
		attrs, err := decodeAttrs(data)
		return attrs, 0, err
	}
	var nd nodeData
	if err := json.Unmarshal(data, &nd); err != nil {
		return nil, 0, fmt.Errorf("wrapped registration data: %w", err)
	}
	if len(nd.Attrs) == 0 {
		nd.Attrs = nil
	}
	return nd.Attrs, nd.Created, nil
}

// token returns the Created of a znode with the given data and czxid.
// Unreadable data counts as carrying none.
func token(data []byte, czxid int64) uint64 {
	if _, created, err := decodeData(data); err == nil && created != 0 {
		return created
	}
	return uint64(czxid)
}

// encodeAttrs returns the canonical JSON of attrs: keys sorted, and no
// attributes (nil or empty) as "{}", so equal attributes have equal bytes.
func encodeAttrs(attrs map[string]string) ([]byte, error) {
	if len(attrs) == 0 {
		return []byte("{}"), nil
	}
	return json.Marshal(attrs)
}

// decodeAttrs parses flat data. No attributes decode as nil.
func decodeAttrs(data []byte) (map[string]string, error) {
	if len(data) == 0 {
		return nil, nil
	}
	var attrs map[string]string
	if err := json.Unmarshal(data, &attrs); err != nil {
		return nil, err
	}
	if len(attrs) == 0 {
		return nil, nil
	}
	return attrs, nil
}
