package embedded_test

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/flynn/discoverd/backend/etcd/embedded"
)

// TestEmbeddedDiskFootprint: a fresh embedded etcd preallocates small WAL
// segments (etcd's default, two segments of 64 MB, put a new data dir
// over 100 MB at once).
func TestEmbeddedDiskFootprint(t *testing.T) {
	dir := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	srv, err := embedded.Start(ctx, embedded.Config{Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	var total int64
	err = filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		if filepath.Base(filepath.Dir(p)) == "wal" && fi.Mode().IsRegular() && fi.Size() > 8<<20 {
			t.Errorf("WAL file %s is %d bytes, want at most 8 MiB", p, fi.Size())
		}
		total += fi.Size()
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if total > 40<<20 {
		t.Errorf("a fresh data dir holds %d bytes", total)
	}
}
