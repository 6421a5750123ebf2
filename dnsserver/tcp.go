package dnsserver

import (
	"bufio"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"time"
)

// tcpIdleTimeout closes a TCP connection that sends no query for that
// long, or whose client does not read our replies for that long.
const tcpIdleTimeout = 10 * time.Second

// serveTCP accepts connections on ln, each served by serveConn in a
// goroutine of its own, until ln is closed.
func (s *Server) serveTCP(ln net.Listener) {
	defer s.wg.Done()
	for {
		c, err := ln.Accept()
		if err != nil {
			if s.ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return
			}
			s.log.Debug("dns: tcp accept", "err", err)
			select { // out of file descriptors, say: do not spin
			case <-s.ctx.Done():
				return
			case <-time.After(10 * time.Millisecond):
			}
			continue
		}
		s.mu.Lock()
		if s.ctx.Err() != nil {
			s.mu.Unlock()
			c.Close()
			return
		}
		s.conns[c] = struct{}{}
		s.wg.Add(1)
		s.mu.Unlock()
		go s.serveConn(c) // ends when c is closed: by the client, an error, the idle timeout or Close
	}
}

// serveConn answers the queries of one TCP connection (RFC 7766: each a
// 2-byte length and a message), in order, any number of them. Replies
// are buffered while more queries are already read, and sent together:
// a client that pipelines queries gets few large writes.
func (s *Server) serveConn(c net.Conn) {
	defer s.wg.Done()
	defer func() {
		s.mu.Lock()
		delete(s.conns, c)
		s.mu.Unlock()
		c.Close()
	}()
	r := bufio.NewReaderSize(c, 16<<10)
	w := bufio.NewWriterSize(c, 64<<10)
	in := make([]byte, 1<<16)
	out := make([]byte, 0, 2+1<<16)
	for {
		if !queryBuffered(r) {
			// Reading will wait: send the replies so far first.
			if err := w.Flush(); err != nil {
				return
			}
			// One deadline per batch of queries: the reads that wait and
			// the writes of their replies.
			c.SetDeadline(time.Now().Add(tcpIdleTimeout))
		}
		if _, err := io.ReadFull(r, in[:2]); err != nil {
			return
		}
		pkt := in[:binary.BigEndian.Uint16(in)]
		if _, err := io.ReadFull(r, pkt); err != nil {
			return
		}
		start := time.Now()
		out = append(out[:0], 0, 0) // the length, set below
		var (
			reply []byte
			oc    outcome
			qtype = -1
			q     query
			err   error
		)
		if parseQuery(pkt, &q) {
			qtype = int(q.qtype)
			reply, oc, err = s.reply(s.ctx, &q, true, true, out)
		} else {
			var ok bool
			if reply, qtype, oc, ok, err = s.replyPacket(pkt, true, true, out); !ok {
				return // not a query: the client is confused, or hostile
			}
		}
		if err != nil {
			return
		}
		binary.BigEndian.PutUint16(reply, uint16(len(reply)-2))
		if _, err := w.Write(reply); err != nil {
			return
		}
		out = reply
		s.metrics.observe(qtype, oc, time.Since(start))
	}
}

// queryBuffered reports whether r holds a whole query already.
func queryBuffered(r *bufio.Reader) bool {
	n := r.Buffered()
	if n < 2 {
		return false
	}
	b, _ := r.Peek(2)
	return n >= 2+int(binary.BigEndian.Uint16(b))
}
