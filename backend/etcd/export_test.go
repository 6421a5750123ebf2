package etcd

// Unexported functions under test in package etcd_test.
var (
	Decode      = decode
	EncodeAttrs = encodeAttrs
)
