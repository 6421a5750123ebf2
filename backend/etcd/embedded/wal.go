package embedded

import (
	"time"

	"go.etcd.io/etcd/server/v3/storage/wal"
)

// Disk bounds of the embedded etcd (Start). The workload is small
// keys under churn: the history, not the live data, is what grows, so it
// is compacted often. Measured in docs/OPERATIONS.md: an hour of 100
// registrations/s of churn stays well under 100 MB.
const (
	// embedRetention is the periodic auto-compaction window: every
	// embedRetention etcd drops the history older than embedRetention.
	embedRetention = 5 * time.Minute
	// embedQuotaBytes bounds the database file. Past it etcd refuses
	// writes (alarm NOSPACE) until compacted and defragmented; live
	// registrations use far less (10,000 with 1 KiB of attributes each
	// are ~15 MB).
	embedQuotaBytes = 512 << 20
	// embedDefragMB: a start that would free at least this many MB of
	// the database file defragments it first.
	embedDefragMB = 16
	// embedMaxWALs is how many WAL segments and snapshot files are kept.
	embedMaxWALs = 5
	// walSegmentBytes is the size each WAL segment is preallocated to
	// (etcd's default is 64 MB, and a fresh member holds two: the
	// segment in use and the next one, ready).
	walSegmentBytes = 8 << 20
)

// etcd sets its WAL segment size in a package variable, not in
// embed.Config; it is read when a server starts or cuts a segment, so it
// is set once, before any server of this process starts. It applies to
// every etcd server embedded in the process.
func init() { wal.SegmentSizeBytes = walSegmentBytes }
