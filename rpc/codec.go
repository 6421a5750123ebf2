package rpc

import (
	"bufio"
	"bytes"
	"encoding/gob"
	"encoding/json"
	"fmt"
	"io"
	"sync"
)

// Wire headers of the gob flavour. gob matches fields by name, so these
// names are the contract with rpcplus peers.
type gobRequest struct {
	ServiceMethod string
	Seq           uint64
}

type gobResponse struct {
	ServiceMethod string
	Seq           uint64
	Error         string
}

// Messages of the JSON flavour.
type jsonRequest struct {
	Method string          `json:"method"`
	Params json.RawMessage `json:"params"`
	ID     json.RawMessage `json:"id"`
}

type jsonServerResponse struct {
	ID     json.RawMessage `json:"id"`
	Result any             `json:"result"`
	Error  any             `json:"error"`
}

type jsonClientRequest struct {
	Method string `json:"method"`
	Params []any  `json:"params"`
	ID     uint64 `json:"id"`
}

type jsonClientResponse struct {
	ID     json.RawMessage `json:"id"`
	Result json.RawMessage `json:"result"`
	Error  any             `json:"error"`
}

// request is a call header as the server sees it, whatever the codec.
type request struct {
	method string
	seq    uint64
}

// response is one reply the server writes: a unary reply, a stream item, or
// the final header of a stream.
type response struct {
	method  string
	seq     uint64
	errText string // "" for a value; "EOS" or an error text otherwise
	body    any    // ignored when errText is set
	final   bool   // the last reply for seq
	// shared: body is an immutable value that other replies may carry
	// too (SharedValues); the codec encodes it once for a run of them.
	shared bool
	// slot, when set, is the pool of the call's slot (serverConn), given
	// back once this reply is written.
	slot chan struct{}
}

// emptyBody is the body written with an error or end-of-stream header.
var emptyBody = struct{}{}

// serverCodec is the server's seam over one connection. Reads happen on the
// connection's reader goroutine, writes on its writer goroutine.
type serverCodec interface {
	readRequestHeader(*request) error
	// readRequestBody decodes the body of the request just read into v, or
	// discards it when v is nil. An error of type *paramsError leaves the
	// connection usable; any other error means the stream is corrupt.
	readRequestBody(v any) error
	writeResponse(*response) error
	flush() error
}

// paramsError reports JSON params that are well-formed JSON but do not fit
// the method's argument type: the caller gets an error reply and the
// connection goes on.
type paramsError struct{ err error }

func (e *paramsError) Error() string { return "rpc: cannot decode params: " + e.err.Error() }

func newServerCodec(c Codec, rw io.ReadWriter, maxMsg int) serverCodec {
	if c == JSON {
		return newJSONServerCodec(rw, maxMsg)
	}
	return newGobServerCodec(rw, maxMsg)
}

type gobServerCodec struct {
	dec *gob.Decoder
	enc *gob.Encoder
	w   *bufio.Writer
	tap *tapWriter  // between enc and w
	hdr gobResponse // the header being written (encoded through a pointer: no allocation per reply)

	// The last shared body written and its gob message (without the
	// type definitions that may have preceded it).
	lastBody any
	lastMsg  []byte
}

// tapWriter passes writes on, keeping a copy of the last one while on.
// A gob.Encoder writes each message (a type definition, a value) with one
// Write, so after encoding a value the last write is the value's message.
type tapWriter struct {
	w    io.Writer
	on   bool
	last []byte
}

func (t *tapWriter) Write(p []byte) (int, error) {
	if t.on {
		t.last = append(t.last[:0], p...)
	}
	return t.w.Write(p)
}

func newGobServerCodec(rw io.ReadWriter, maxMsg int) *gobServerCodec {
	w := bufio.NewWriter(rw)
	tap := &tapWriter{w: w}
	return &gobServerCodec{
		dec: gob.NewDecoder(newGobFrameReader(rw, maxMsg)),
		enc: gob.NewEncoder(tap),
		w:   w,
		tap: tap,
	}
}

func (c *gobServerCodec) readRequestHeader(r *request) error {
	var h gobRequest
	if err := c.dec.Decode(&h); err != nil {
		return err
	}
	r.method, r.seq = h.ServiceMethod, h.Seq
	return nil
}

func (c *gobServerCodec) readRequestBody(v any) error { return c.dec.Decode(v) }

func (c *gobServerCodec) writeResponse(r *response) error {
	c.hdr = gobResponse{ServiceMethod: r.method, Seq: r.seq, Error: r.errText}
	if err := c.enc.Encode(&c.hdr); err != nil {
		return fmt.Errorf("rpc: encoding response header: %w", err)
	}
	body := r.body
	if r.errText != "" || body == nil {
		body = emptyBody
	}
	shared := r.shared && body == r.body
	if shared && body == c.lastBody {
		// Encoded for the previous reply: this encoder has sent its type.
		if _, err := c.w.Write(c.lastMsg); err != nil {
			return fmt.Errorf("rpc: writing reply body of %s: %w", r.method, err)
		}
		return nil
	}
	c.tap.on = shared
	err := c.enc.Encode(body)
	c.tap.on = false
	if err != nil {
		return fmt.Errorf("rpc: encoding reply body of %s: %w", r.method, err)
	}
	if shared {
		c.lastBody = body
		c.lastMsg, c.tap.last = c.tap.last, c.lastMsg
	}
	return nil
}

func (c *gobServerCodec) flush() error { return c.w.Flush() }

// jsonServerCodec gives each request an internal sequence number and keeps
// the request's JSON id (compacted, at most MaxJSONIDLen bytes, one copy
// shared by both maps) until its final reply is written. A JSON
// CloseStream names the stream by that id.
type jsonServerCodec struct {
	lr  *jsonLimitReader
	dec *json.Decoder
	w   *bufio.Writer
	enc *json.Encoder

	params json.RawMessage // of the request just read; reader goroutine only

	// The last shared body written and its JSON (writer goroutine only).
	lastBody any
	lastJSON json.RawMessage

	mu   sync.Mutex
	seq  uint64
	ids  map[uint64]string // in-flight seq → compact id
	byID map[string]uint64 // compact id → newest in-flight seq with it
}

// MaxJSONIDLen caps, in bytes, the id of a JSON request. A request with a
// longer id closes the connection (the server keeps each id until the
// call's final reply, and an id is all a reply can be matched by).
const MaxJSONIDLen = 256

func newJSONServerCodec(rw io.ReadWriter, maxMsg int) *jsonServerCodec {
	lr := &jsonLimitReader{r: rw, max: maxMsg}
	w := bufio.NewWriter(rw)
	return &jsonServerCodec{
		lr:   lr,
		dec:  json.NewDecoder(lr),
		w:    w,
		enc:  json.NewEncoder(w),
		ids:  make(map[uint64]string),
		byID: make(map[string]uint64),
	}
}

var jsonNull = json.RawMessage("null")

func (c *jsonServerCodec) readRequestHeader(r *request) error {
	c.lr.reset(c.dec.Buffered())
	var req jsonRequest
	if err := c.dec.Decode(&req); err != nil {
		return err
	}
	if len(req.ID) == 0 {
		req.ID = jsonNull
	}
	id := compactID(req.ID)
	if len(id) > MaxJSONIDLen {
		return fmt.Errorf("rpc: JSON request id of %d bytes, over the limit of %d", len(id), MaxJSONIDLen)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if req.Method == closeStream {
		// The id names the stream to cancel; 0 (no such stream) is ignored.
		r.method, r.seq = closeStream, c.byID[id]
		c.params = nil
		return nil
	}
	c.seq++
	c.ids[c.seq] = id
	c.byID[id] = c.seq
	r.method, r.seq = req.Method, c.seq
	c.params = req.Params
	return nil
}

func (c *jsonServerCodec) readRequestBody(v any) error {
	p := bytes.TrimSpace(c.params)
	c.params = nil
	if v == nil || len(p) == 0 || bytes.Equal(p, jsonNull) {
		return nil
	}
	var err error
	if p[0] == '[' {
		// rpcplus and net/rpc/jsonrpc send [ARGS].
		params := [1]any{v}
		err = json.Unmarshal(p, &params)
	} else {
		err = json.Unmarshal(p, v)
	}
	if err != nil {
		return &paramsError{err}
	}
	return nil
}

func (c *jsonServerCodec) writeResponse(r *response) error {
	c.mu.Lock()
	id, ok := c.ids[r.seq]
	if r.final {
		delete(c.ids, r.seq)
		if c.byID[id] == r.seq {
			delete(c.byID, id)
		}
	}
	c.mu.Unlock()
	resp := jsonServerResponse{ID: jsonNull}
	if ok {
		resp.ID = json.RawMessage(id)
	}
	switch {
	case r.errText != "":
		resp.Error = r.errText
	case r.shared && r.body != nil:
		if r.body != c.lastBody {
			b, err := json.Marshal(r.body)
			if err != nil {
				return fmt.Errorf("rpc: encoding reply of %s: %w", r.method, err)
			}
			c.lastBody, c.lastJSON = r.body, b
		}
		resp.Result = c.lastJSON
	default:
		resp.Result = r.body
	}
	if err := c.enc.Encode(resp); err != nil {
		return fmt.Errorf("rpc: encoding reply of %s: %w", r.method, err)
	}
	return nil
}

func (c *jsonServerCodec) flush() error { return c.w.Flush() }

// clientCodec is the client's seam over one connection. encodeRequest and
// flush are called by the client's writer goroutine only; reads happen on
// its reader goroutine.
type clientCodec interface {
	// encodeRequest appends a request to the codec's buffer. It does no
	// I/O, and it is done with body when it returns.
	encodeRequest(method string, seq uint64, body any) error
	// flush writes the buffered requests to the connection.
	flush() error
	readResponseHeader(*response) error
	readResponseBody(v any) error // v nil discards
}

func newClientCodec(c Codec, rw io.ReadWriter) clientCodec {
	if c == JSON {
		return newJSONClientCodec(rw)
	}
	return newGobClientCodec(rw)
}

// requestBuffer holds encoded requests until they are written.
type requestBuffer struct {
	buf bytes.Buffer
	w   io.Writer
}

// maxIdleRequestBuffer is the capacity a requestBuffer keeps after a
// flush; a larger one (after a large request) is released.
const maxIdleRequestBuffer = 64 << 10

func (b *requestBuffer) flush() error {
	_, err := b.w.Write(b.buf.Bytes())
	if b.buf.Cap() > maxIdleRequestBuffer {
		b.buf = bytes.Buffer{}
	} else {
		b.buf.Reset()
	}
	return err
}

type gobClientCodec struct {
	requestBuffer
	dec *gob.Decoder
	enc *gob.Encoder
}

func newGobClientCodec(rw io.ReadWriter) *gobClientCodec {
	c := &gobClientCodec{
		requestBuffer: requestBuffer{w: rw},
		dec:           gob.NewDecoder(newGobFrameReader(rw, DefaultMaxMessageSize)),
	}
	c.enc = gob.NewEncoder(&c.buf)
	return c
}

func (c *gobClientCodec) encodeRequest(method string, seq uint64, body any) error {
	if err := c.enc.Encode(gobRequest{ServiceMethod: method, Seq: seq}); err != nil {
		return err
	}
	if body == nil {
		body = emptyBody
	}
	return c.enc.Encode(body)
}

func (c *gobClientCodec) readResponseHeader(r *response) error {
	var h gobResponse
	if err := c.dec.Decode(&h); err != nil {
		return err
	}
	r.method, r.seq, r.errText = h.ServiceMethod, h.Seq, h.Error
	return nil
}

func (c *gobClientCodec) readResponseBody(v any) error { return c.dec.Decode(v) }

type jsonClientCodec struct {
	requestBuffer
	lr     *jsonLimitReader
	dec    *json.Decoder
	enc    *json.Encoder
	result json.RawMessage // of the response just read; reader goroutine only
}

func newJSONClientCodec(rw io.ReadWriter) *jsonClientCodec {
	lr := &jsonLimitReader{r: rw, max: DefaultMaxMessageSize}
	c := &jsonClientCodec{requestBuffer: requestBuffer{w: rw}, lr: lr, dec: json.NewDecoder(lr)}
	c.enc = json.NewEncoder(&c.buf)
	return c
}

func (c *jsonClientCodec) encodeRequest(method string, seq uint64, body any) error {
	req := jsonClientRequest{Method: method, Params: []any{body}, ID: seq}
	if method == closeStream {
		req.Params = []any{}
	}
	return c.enc.Encode(req)
}

func (c *jsonClientCodec) readResponseHeader(r *response) error {
	c.lr.reset(c.dec.Buffered())
	var resp jsonClientResponse
	if err := c.dec.Decode(&resp); err != nil {
		return err
	}
	if err := json.Unmarshal(resp.ID, &r.seq); err != nil {
		return fmt.Errorf("rpc: reply id %s is not one of ours: %w", resp.ID, err)
	}
	c.result = resp.Result
	r.errText = ""
	switch e := resp.Error.(type) {
	case nil:
	case string:
		r.errText = e
	default:
		r.errText = fmt.Sprintf("rpc: invalid error %v", e)
	}
	return nil
}

func (c *jsonClientCodec) readResponseBody(v any) error {
	res := c.result
	c.result = nil
	if v == nil || len(res) == 0 || bytes.Equal(res, jsonNull) {
		return nil
	}
	return json.Unmarshal(res, v)
}
