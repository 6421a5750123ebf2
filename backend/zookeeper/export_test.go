package zookeeper

import (
	"fmt"
	"path"

	"github.com/go-zookeeper/zk"
)

// Hooks for the external tests of this package.

// Partition cuts the backend's connection to ZooKeeper and refuses to
// reconnect until the returned heal function is called.
func (b *Backend) Partition() (heal func()) {
	b.dial.block()
	return b.dial.unblock
}

// SessionID is the backend's current ZooKeeper session id.
func (b *Backend) SessionID() int64 { return b.conn.SessionID() }

// Plant creates the znode of name/addr as an ephemeral node of b's session
// without b knowing (it does not hold it): what a create whose answer was
// lost leaves behind.
func (b *Backend) Plant(name, addr string) error {
	p := b.nodePath(name, addr)
	if err := b.ensureServiceDir(path.Dir(p)); err != nil {
		return err
	}
	if _, err := b.conn.Create(p, []byte("{}"), zk.FlagEphemeral, zk.WorldACL(zk.PermAll)); err != nil {
		return fmt.Errorf("plant %s: %w", p, err)
	}
	return nil
}

// The znode data codec, for the fuzz target.
var (
	EncodeData = encodeData
	DecodeData = decodeData
)
