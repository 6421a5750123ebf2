package rpc_test

import (
	"context"
	"net"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/flynn/discoverd/rpc"
)

// TestIdleConnections runs in fake time (testing/synctest): a connection
// with no call, no stream and no request for IdleTimeout is closed; a call,
// an open stream or KeepIdle keeps it.
func TestIdleConnections(t *testing.T) {
	const idle = time.Minute
	setup := func(t *testing.T, keep *atomic.Bool) (*rpc.Server, *Arith, func() (*rpc.Client, <-chan struct{})) {
		srv := rpc.NewServer()
		srv.IdleTimeout = idle
		srv.KeepIdle = func(rpc.Conn) bool { return keep.Load() }
		arith := newArith()
		if err := srv.Register(arith); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { srv.Close(context.Background()) })
		dial := func() (*rpc.Client, <-chan struct{}) {
			serverSide, clientSide := net.Pipe()
			served := make(chan struct{})
			go func() {
				defer close(served)
				srv.ServeConn(serverSide, rpc.Gob)
			}()
			c := rpc.NewClient(clientSide, rpc.Gob)
			t.Cleanup(func() { c.Close() })
			return c, served
		}
		return srv, arith, dial
	}
	// open reports whether the connection is still served after d more
	// of fake time.
	open := func(d time.Duration, served <-chan struct{}) bool {
		time.Sleep(d)
		synctest.Wait()
		select {
		case <-served:
			return false
		default:
			return true
		}
	}

	t.Run("idle connection closed", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			_, _, dial := setup(t, new(atomic.Bool))
			c, served := dial()
			if !open(idle-time.Second, served) {
				t.Fatal("closed before IdleTimeout")
			}
			if open(2*time.Second, served) {
				t.Fatal("still open after IdleTimeout")
			}
			<-c.Done()
		})
	})
	t.Run("a call restarts the wait", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			_, _, dial := setup(t, new(atomic.Bool))
			c, served := dial()
			time.Sleep(idle / 2)
			if err := c.Call(context.Background(), "Arith.Add", &Args{A: 1}, &Reply{}); err != nil {
				t.Fatal(err)
			}
			if !open(idle-time.Second, served) {
				t.Fatal("closed less than IdleTimeout after a call")
			}
			if open(2*time.Second, served) {
				t.Fatal("still open IdleTimeout after the last call")
			}
		})
	})
	t.Run("open stream keeps it", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			_, arith, dial := setup(t, new(atomic.Bool))
			c, served := dial()
			ch := make(chan Reply, 1)
			sc, err := c.Stream(context.Background(), "Arith.Forever", &Args{}, ch)
			if err != nil {
				t.Fatal(err)
			}
			<-arith.connIDs
			if !open(10*idle, served) {
				t.Fatal("closed with a stream open")
			}
			sc.Close()
			<-arith.streamEnd
			if open(idle+time.Second, served) {
				t.Fatal("still open IdleTimeout after its stream ended")
			}
		})
	})
	t.Run("executing call keeps it", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			_, arith, dial := setup(t, new(atomic.Bool))
			c, served := dial()
			call := c.Go("Arith.Block", &Args{}, &Reply{}, nil)
			<-arith.blocked
			if !open(10*idle, served) {
				t.Fatal("closed with a call executing")
			}
			close(arith.release)
			<-call.Done
			if open(idle+time.Second, served) {
				t.Fatal("still open IdleTimeout after its call returned")
			}
		})
	})
	t.Run("KeepIdle keeps it", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			keep := new(atomic.Bool)
			keep.Store(true)
			_, _, dial := setup(t, keep)
			_, served := dial()
			if !open(10*idle, served) {
				t.Fatal("closed although KeepIdle claims it")
			}
			keep.Store(false)
			if open(idle+time.Second, served) {
				t.Fatal("still open IdleTimeout after KeepIdle let it go")
			}
		})
	})
	t.Run("zero IdleTimeout never closes", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			srv, _, dial := setup(t, new(atomic.Bool))
			srv.IdleTimeout = 0
			_, served := dial()
			if !open(100*idle, served) {
				t.Fatal("closed without IdleTimeout")
			}
		})
	})
}
