package testkit_test

import (
	"fmt"
	"regexp"
	"sync"
	"testing"
	"time"

	"github.com/flynn/discoverd/api"
	"github.com/flynn/discoverd/internal/testkit"
)

func TestSyncBuffer(t *testing.T) {
	var b testkit.SyncBuffer
	wrote := b.Wrote()
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Go(func() { fmt.Fprintf(&b, "%d\n", i) })
	}
	wg.Wait()
	select {
	case <-wrote:
	default:
		t.Fatal("no signal after writes")
	}
	if n := len(regexp.MustCompile(`\d\n`).FindAllString(b.String(), -1)); n != 8 {
		t.Fatalf("%d lines in %q, want 8", n, b.String())
	}
}

func TestEventually(t *testing.T) {
	start := time.Now()
	testkit.Eventually(t, time.Second, "time to pass", func() bool { return time.Since(start) > 30*time.Millisecond })
}

func TestServiceName(t *testing.T) {
	t.Run("Sub_Test", func(t *testing.T) {
		n := testkit.ServiceName(t, "x")
		if err := api.ValidateName(n); err != nil || n != "testservicename-sub-test-x" {
			t.Fatalf("ServiceName = %q (%v)", n, err)
		}
	})
}
