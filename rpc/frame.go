package rpc

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
)

// gobFrameReader sits between a connection and a gob.Decoder and enforces
// the message cap before gob allocates anything.
//
// A gob stream is a sequence of messages, each prefixed by its byte count in
// gob's unsigned-integer encoding (one byte below 0x80; otherwise a byte
// holding the negated length of a big-endian count that follows). At each
// message boundary the reader peeks the count; a message larger than max is
// rejected with ErrMessageTooLarge before a byte of it reaches the decoder,
// so encoding/gob's own limit (gigabytes) is never relied on.
//
// It also caps the total size of the type-definition messages (those whose
// leading type id is negative) one peer may send, since gob keeps every
// definition for the life of the decoder. Type definitions that gob reads
// from inside an interface value are not seen here; argument types with
// interfaces should be avoided.
type gobFrameReader struct {
	r          *bufio.Reader
	max        int
	typeBudget int // bytes of type-definition messages still allowed
	remaining  int // bytes of the current message (prefix included) not yet read
	err        error
}

func newGobFrameReader(r io.Reader, max int) *gobFrameReader {
	br, ok := r.(*bufio.Reader)
	if !ok {
		br = bufio.NewReader(r)
	}
	return &gobFrameReader{r: br, max: max, typeBudget: max}
}

// Read implements io.Reader; it never returns bytes of two messages at once.
func (f *gobFrameReader) Read(p []byte) (int, error) {
	if f.err != nil {
		return 0, f.err
	}
	if f.remaining == 0 {
		if err := f.next(); err != nil {
			f.err = err
			return 0, err
		}
	}
	if len(p) > f.remaining {
		p = p[:f.remaining]
	}
	n, err := f.r.Read(p)
	f.remaining -= n
	if err == io.EOF && f.remaining > 0 {
		err = io.ErrUnexpectedEOF
	}
	if err != nil {
		f.err = err
	}
	return n, err
}

// next parses the count of the message that starts now, without consuming
// it, and checks it against the limits.
func (f *gobFrameReader) next() error {
	b, err := f.r.Peek(1)
	if err != nil {
		return err
	}
	prefix, count := 1, uint64(b[0])
	if b[0] >= 0x80 {
		n := -int(int8(b[0]))
		if n > 8 {
			return fmt.Errorf("rpc: corrupt gob message length (prefix byte %#x)", b[0])
		}
		hdr, err := f.r.Peek(1 + n)
		if err != nil {
			return noEOF(err)
		}
		prefix, count = 1+n, 0
		for _, c := range hdr[1:] {
			count = count<<8 | uint64(c)
		}
	}
	if count > uint64(f.max) {
		return fmt.Errorf("%w: gob message of %d bytes, limit %d", ErrMessageTooLarge, count, f.max)
	}
	f.remaining = prefix + int(count)
	if count > 0 {
		typedef, err := f.isTypeDefinition(prefix, int(count))
		if err != nil {
			return err
		}
		if typedef {
			f.typeBudget -= int(count)
			if f.typeBudget < 0 {
				return fmt.Errorf("%w: gob type definitions exceed %d bytes on this connection", ErrMessageTooLarge, f.max)
			}
		}
	}
	return nil
}

// isTypeDefinition reports whether the message whose payload starts after
// prefix bytes begins with a negative type id (a gob int: its unsigned form
// has the low bit set when negative).
func (f *gobFrameReader) isTypeDefinition(prefix, count int) (bool, error) {
	b, err := f.r.Peek(prefix + 1)
	if err != nil {
		return false, noEOF(err)
	}
	first := b[prefix]
	if first < 0x80 {
		return first&1 == 1, nil
	}
	n := -int(int8(first))
	if n > 8 || 1+n > count {
		return false, nil // malformed; let gob report it
	}
	b, err = f.r.Peek(prefix + 1 + n)
	if err != nil {
		return false, noEOF(err)
	}
	return b[prefix+n]&1 == 1, nil
}

// ReadByte implements io.ByteReader so gob does not add its own buffering.
func (f *gobFrameReader) ReadByte() (byte, error) {
	var b [1]byte
	if _, err := io.ReadFull(f, b[:]); err != nil {
		return 0, err
	}
	return b[0], nil
}

func noEOF(err error) error {
	if err == io.EOF {
		return io.ErrUnexpectedEOF
	}
	return err
}

// jsonLimitReader bounds how many bytes a json.Decoder may read for the
// message it is decoding. Before each Decode the caller calls reset with the
// number of bytes the decoder already holds (which, when the decoder needs
// to read at all, are a prefix of the current message); reads past max in
// total fail with ErrMessageTooLarge, so no message larger than max (plus the
// whitespace around it) is ever buffered.
type jsonLimitReader struct {
	r         io.Reader
	max       int
	remaining int
}

func (l *jsonLimitReader) reset(buffered io.Reader) {
	n := 0
	if b, ok := buffered.(interface{ Len() int }); ok {
		n = b.Len()
	}
	l.remaining = max(l.max-n, 0) + 64 // slack for surrounding whitespace
}

func (l *jsonLimitReader) Read(p []byte) (int, error) {
	if l.remaining <= 0 {
		return 0, fmt.Errorf("%w: JSON message over %d bytes", ErrMessageTooLarge, l.max)
	}
	if len(p) > l.remaining {
		p = p[:l.remaining]
	}
	n, err := l.r.Read(p)
	l.remaining -= n
	return n, err
}

// compactID returns a canonical form of a JSON-RPC id, used to find the
// stream a JSON CloseStream refers to.
func compactID(id []byte) string {
	var b bytes.Buffer
	if err := json.Compact(&b, id); err != nil {
		return string(id)
	}
	return b.String()
}
