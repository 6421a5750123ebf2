package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"strings"
)

// Log formats of the agent ("-log-format").
const (
	LogText = "text" // slog.TextHandler: key=value
	LogJSON = "json" // slog.JSONHandler: one object per line
)

// logFormat is the flag.Value of -log-format.
type logFormat string

func (f *logFormat) String() string { return string(*f) }

func (f *logFormat) Set(s string) error {
	if s != LogText && s != LogJSON {
		return fmt.Errorf("want %s or %s", LogText, LogJSON)
	}
	*f = logFormat(s)
	return nil
}

// newLogger returns the agent's logger: records at level and above, in
// format (LogText or LogJSON), to w, each with at most one component key
// (see componentHandler): "main" unless a part of the agent names itself.
func newLogger(w io.Writer, format string, level slog.Leveler) (*slog.Logger, error) {
	opts := &slog.HandlerOptions{Level: level}
	var h slog.Handler
	switch format {
	case LogText:
		h = slog.NewTextHandler(w, opts)
	case LogJSON:
		h = slog.NewJSONHandler(w, opts)
	default:
		return nil, fmt.Errorf("log format %q: want %s or %s", format, LogText, LogJSON)
	}
	return slog.New(&componentHandler{inner: h, component: "main"}), nil
}

// componentHandler gives every record at most one "component" attribute:
// the innermost one set (a backend's logger is derived from the agent's,
// and each layer names itself), first among the record's own attributes.
// A message that starts with "<name>: ", where name is the component or
// one of discoverd's package names, loses that prefix (which names the
// component a second time); it sets the component if none is set.
type componentHandler struct {
	inner     slog.Handler
	component string
	grouped   bool // after WithGroup: attributes pass through unchanged
}

// logPrefixes are the message prefixes componentHandler removes.
var logPrefixes = map[string]bool{
	"agent": true, "server": true, "rpc": true, "sse": true, "backend": true,
	"etcd": true, "zookeeper": true, "zk": true, "discoverd": true,
}

func (h *componentHandler) Enabled(ctx context.Context, l slog.Level) bool {
	return h.inner.Enabled(ctx, l)
}

func (h *componentHandler) WithAttrs(attrs []slog.Attr) slog.Handler {
	if h.grouped {
		return &componentHandler{inner: h.inner.WithAttrs(attrs), grouped: true}
	}
	c := *h
	rest := make([]slog.Attr, 0, len(attrs))
	for _, a := range attrs {
		if a.Key == "component" {
			c.component = a.Value.String()
			continue
		}
		rest = append(rest, a)
	}
	if len(rest) > 0 {
		c.inner = h.inner.WithAttrs(rest)
	}
	return &c
}

func (h *componentHandler) WithGroup(name string) slog.Handler {
	if name == "" {
		return h
	}
	inner := h.inner
	if h.component != "" && !h.grouped {
		inner = inner.WithAttrs([]slog.Attr{slog.String("component", h.component)})
	}
	return &componentHandler{inner: inner.WithGroup(name), grouped: true}
}

func (h *componentHandler) Handle(ctx context.Context, r slog.Record) error {
	if h.grouped {
		return h.inner.Handle(ctx, r)
	}
	component := h.component
	attrs := make([]slog.Attr, 0, r.NumAttrs()+1)
	attrs = append(attrs, slog.Attr{}) // the component's place
	r.Attrs(func(a slog.Attr) bool {
		if a.Key == "component" {
			component = a.Value.String()
		} else {
			attrs = append(attrs, a)
		}
		return true
	})
	msg := r.Message
	if word, rest, ok := strings.Cut(msg, ": "); ok && (word == component || logPrefixes[word]) {
		msg = rest
		if component == "" {
			component = word
		}
	}
	if component != "" {
		attrs[0] = slog.String("component", component)
	} else {
		attrs = attrs[1:]
	}
	out := slog.NewRecord(r.Time, r.Level, msg, r.PC)
	out.AddAttrs(attrs...)
	return h.inner.Handle(ctx, out)
}

// noticeHandler writes records as the command-line client's notices: one
// plain line "PREFIXmessage (key=value ...)" each, so that the client
// library's warnings read like the CLI's own lines on stderr. A
// "discoverd: " prefix of the message is dropped (PREFIX says it). It
// ignores groups. Each record is one Write of one line, so records from
// concurrent goroutines do not interleave on os.Stderr.
type noticeHandler struct {
	w      io.Writer
	prefix string
	level  slog.Level
	attrs  []slog.Attr
}

func (h *noticeHandler) Enabled(_ context.Context, l slog.Level) bool { return l >= h.level }

func (h *noticeHandler) WithAttrs(attrs []slog.Attr) slog.Handler {
	c := *h
	c.attrs = append(append([]slog.Attr(nil), h.attrs...), attrs...)
	return &c
}

func (h *noticeHandler) WithGroup(string) slog.Handler { return h }

func (h *noticeHandler) Handle(_ context.Context, r slog.Record) error {
	var b strings.Builder
	b.WriteString(h.prefix)
	b.WriteString(strings.TrimPrefix(r.Message, "discoverd: "))
	var kv []string
	add := func(a slog.Attr) bool {
		if a.Key != "agent" { // the CLI talks to one agent
			kv = append(kv, a.Key+"="+a.Value.String())
		}
		return true
	}
	for _, a := range h.attrs {
		add(a)
	}
	r.Attrs(add)
	if len(kv) > 0 {
		b.WriteString(" (" + strings.Join(kv, " ") + ")")
	}
	b.WriteString("\n")
	_, err := io.WriteString(h.w, b.String())
	return err
}
