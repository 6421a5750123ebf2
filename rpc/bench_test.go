package rpc_test

import (
	"context"
	"testing"
)

// BenchmarkCall: one unary call at a time over TCP loopback, per codec:
// the round trip an agent adds to every store operation (client writer,
// server reader, the handler's goroutine, the connection's writer, the
// client's reader). The handler itself does nothing.
func BenchmarkCall(b *testing.B) {
	for _, codec := range codecs {
		b.Run(codec.String(), func(b *testing.B) {
			srv := startServer(b, nil)
			c := mustDial(b, srv.addr, codec)
			ctx := context.Background()
			args := &Args{A: 1, B: 2, Attrs: map[string]string{"k": "v"}}
			for b.Loop() {
				var r Reply
				if err := c.Call(ctx, "Arith.Add", args, &r); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
