package rpc_test

import (
	"context"
	"fmt"
	"testing"

	"github.com/flynn/discoverd/rpc"
)

// The connection's writer batches the replies that many handlers queue at
// once (a change fanned out to many streams of one connection). Every
// reply still arrives, in order within its stream, with the stream's end
// after its last reply; a unary call in the middle of the burst is
// answered too.
func TestBurstOfRepliesArrivesInOrder(t *testing.T) {
	forCodecs(t, func(t *testing.T, codec rpc.Codec) {
		const streams, perStream = 40, 30
		ts := startServer(t, nil)
		started := make(chan struct{}, streams)
		gate := make(chan struct{})
		err := rpc.RegisterStream(ts.srv, "Fn.Burst", func(ctx context.Context, args *Args, st rpc.Stream) error {
			started <- struct{}{}
			select {
			case <-gate:
			case <-ctx.Done():
				return ctx.Err()
			}
			for i := range perStream {
				if err := st.Send(&Reply{C: i, S: args.S}); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		c := mustDial(t, ts.addr, codec)
		ctx := testCtx(t)
		chs := make([]chan Reply, streams)
		scs := make([]*rpc.StreamCall, streams)
		for i := range streams {
			chs[i] = make(chan Reply, perStream) // the client's reader never waits for us
			if scs[i], err = c.Stream(ctx, "Fn.Burst", &Args{S: fmt.Sprint(i)}, chs[i]); err != nil {
				t.Fatal(err)
			}
		}
		for range streams {
			recv(t, started, "streams to start")
		}
		close(gate) // every handler is runnable at once
		var r Reply
		if err := c.Call(ctx, "Arith.Add", &Args{A: 1, B: 2}, &r); err != nil || r.C != 3 {
			t.Errorf("Add during the burst = %+v, %v", r, err)
		}
		for i, ch := range chs {
			got := drain(t, ch)
			if len(got) != perStream {
				t.Errorf("stream %d: %d replies, want %d", i, len(got), perStream)
			}
			for j, r := range got {
				if r.C != j || r.S != fmt.Sprint(i) {
					t.Errorf("stream %d reply %d = %+v", i, j, r)
					break
				}
			}
			if err := scs[i].Err(); err != nil {
				t.Errorf("stream %d: Err = %v, want nil (EOS)", i, err)
			}
		}
	})
}

// A reply that no other follows is written at once: the writer does not
// wait for company. Each stream here sends one reply and then stays open
// and silent, so the reply can only arrive if the writer flushed it alone.
func TestLoneReplyIsFlushed(t *testing.T) {
	forCodecs(t, func(t *testing.T, codec rpc.Codec) {
		ts := startServer(t, nil)
		c := mustDial(t, ts.addr, codec)
		ctx := testCtx(t)
		for i := range 3 {
			ch := make(chan Reply, 1)
			sc, err := c.Stream(ctx, "Arith.Forever", &Args{A: 1}, ch)
			if err != nil {
				t.Fatal(err)
			}
			recv(t, ts.arith.connIDs, "stream to start")
			if r := recv(t, ch, fmt.Sprintf("the lone reply of stream %d", i)); r.C != 0 {
				t.Errorf("reply = %+v", r)
			}
			// The stream stays open; the next one's reply is alone too.
			defer func() {
				sc.Close()
				recv(t, ts.arith.streamEnd, "stream to end")
				drain(t, ch)
			}()
		}
	})
}
