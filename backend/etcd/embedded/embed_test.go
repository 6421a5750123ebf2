package embedded_test

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/flynn/discoverd/backend/etcd/embedded"
	"github.com/flynn/discoverd/backend/etcd/etcdtest"

	"github.com/flynn/discoverd/internal/testkit"
)

func TestMain(m *testing.M) {
	etcdtest.VerifyTestMain(m)
}

const waitTimeout = 15 * time.Second // bound on waits for events; not a speed assertion

func startEmbedded(t *testing.T, dir string) (*embedded.Server, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	e, err := embedded.Start(ctx, embedded.Config{Dir: dir})
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
	if !errors.Is(err, embedded.ErrDataDirLocked) {
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
				t.Fatalf("Start(%s): %v, want an error with %q", tc.dir, err, tc.want)
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

// A fatal entry of etcd reaches OnFatal with its message and error, and
// warnings and the info lines that explain a wait reach the log at warn.
func TestServerLogger(t *testing.T) {
	var buf testkit.SyncBuffer
	log := slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelDebug}))
	fatal := make(chan error, 1)
	lg := embedded.ServerLogger(log, new(atomic.Bool), new(atomic.Pointer[string]), func(err error) {
		fatal <- err
		runtime.Goexit() // OnFatal must not return; this test's goroutine ends here instead of the process
	})
	lg.Info("starting an etcd server")
	lg.Info("db file is flocked by another process, or taking too long")
	lg.Warn("slow disk", zap.String("request", strings.Repeat("x", 10000)))
	go lg.Fatal("failed to purge wal file", zap.Error(errors.New("too many open files")))
	select {
	case err := <-fatal:
		if want := "etcd: embedded server: failed to purge wal file: too many open files"; err.Error() != want {
			t.Errorf("OnFatal got %q, want %q", err, want)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("OnFatal not called")
	}
	out := buf.String()
	for _, want := range []string{`level=WARN msg="db file is flocked`, `level=WARN msg="slow disk"`} {
		if !strings.Contains(out, want) {
			t.Errorf("log lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, strings.Repeat("x", 513)) || !strings.Contains(out, "(10000 bytes)") {
		t.Errorf("a long field was not cut:\n%.2000s", out)
	}
	if strings.Contains(out, "starting an etcd server") {
		t.Errorf("an ordinary info line was logged:\n%s", out)
	}
}
