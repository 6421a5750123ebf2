package etcd_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/flynn/discoverd/backend/etcd"
)

func startEmbedded(t *testing.T, dir string) (*etcd.Embedded, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	e, err := etcd.StartEmbedded(ctx, etcd.EmbedConfig{Dir: dir})
	if err == nil {
		t.Cleanup(func() { e.Close() })
	}
	return e, err
}

// A second server on a data dir in use fails at once, and says who holds
// it, instead of waiting for the lock for ever.
func TestEmbeddedDataDirInUse(t *testing.T) {
	dir := t.TempDir()
	if _, err := startEmbedded(t, dir); err != nil {
		t.Fatal(err)
	}
	_, err := startEmbedded(t, dir)
	if !errors.Is(err, etcd.ErrDataDirLocked) {
		t.Fatalf("second server on the same dir: %v, want ErrDataDirLocked", err)
	}
	if !strings.Contains(err.Error(), "this process ("+strconv.Itoa(os.Getpid())+")") {
		t.Errorf("error %q does not name the holder", err)
	}
}

func TestEmbeddedUnusableDataDir(t *testing.T) {
	file := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ name, dir, want string }{
		{"a file", file, "not a directory"},
		{"under a file", filepath.Join(file, "etcd"), "not a directory"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := startEmbedded(t, tc.dir)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("StartEmbedded(%s): %v, want an error with %q", tc.dir, err, tc.want)
			}
		})
	}
}

// Done is closed when the server stops by itself, never by Close.
func TestEmbeddedDone(t *testing.T) {
	e, err := startEmbedded(t, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if e.Err() != nil {
		t.Fatalf("Err of a running server: %v", e.Err())
	}
	e.StopServer()
	select {
	case <-e.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("Done not closed after the server stopped")
	}
	if e.Err() == nil {
		t.Fatal("Err nil after Done")
	}

	e2, err := startEmbedded(t, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	e2.Close()
	select {
	case <-e2.Done():
		t.Fatal("Done closed by Close")
	default:
	}
}
