package zookeeper

// Hooks for the external tests of this package.

// Partition cuts the backend's connection to ZooKeeper and refuses to
// reconnect until the returned heal function is called.
func (b *Backend) Partition() (heal func()) {
	b.dial.block()
	return b.dial.unblock
}

// SessionID is the backend's current ZooKeeper session id.
func (b *Backend) SessionID() int64 { return b.conn.SessionID() }

// The znode data codec, for the fuzz target.
var (
	EncodeData = encodeData
	DecodeData = decodeData
)
