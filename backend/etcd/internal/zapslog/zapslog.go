// Package zapslog forwards the zap logs of etcd's client and embedded
// server to a slog.Logger, so that both log through the agent's logger
// instead of their own stderr output. It is shared by backend/etcd (the
// client) and backend/etcd/embedded (the server).
package zapslog

import (
	"context"
	"log/slog"
	"maps"
	"slices"
	"sync/atomic"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// Logger returns a zap logger that forwards entries at minLevel and
// above to l (slog.Default() if nil). Once quiet is set (if not nil),
// entries are logged at debug level: a server shutting down reports its
// closed listeners as errors.
func Logger(l *slog.Logger, minLevel zapcore.Level, quiet *atomic.Bool) *zap.Logger {
	return zap.New(NewCore(l, minLevel, quiet))
}

// NewCore returns the zapcore.Core of Logger, for a core that wraps it.
func NewCore(l *slog.Logger, minLevel zapcore.Level, quiet *atomic.Bool) *Core {
	if l == nil {
		l = slog.Default()
	}
	return &Core{l: l, min: minLevel, quiet: quiet}
}

// Core is a zapcore.Core writing to a slog.Logger.
type Core struct {
	l     *slog.Logger
	min   zapcore.Level
	quiet *atomic.Bool
	attrs []slog.Attr // from With
}

func (c *Core) Enabled(l zapcore.Level) bool { return l >= c.min }

func (c *Core) With(fields []zapcore.Field) zapcore.Core {
	clone := *c
	clone.attrs = append(slices.Clip(c.attrs), fieldAttrs(fields)...)
	return &clone
}

func (c *Core) Check(e zapcore.Entry, ce *zapcore.CheckedEntry) *zapcore.CheckedEntry {
	if c.Enabled(e.Level) {
		return ce.AddCore(e, c)
	}
	return ce
}

func (c *Core) Write(e zapcore.Entry, fields []zapcore.Field) error {
	attrs := append(slices.Clip(c.attrs), fieldAttrs(fields)...)
	if e.LoggerName != "" {
		attrs = append(attrs, slog.String("logger", e.LoggerName))
	}
	level := slogLevel(e.Level)
	if c.Quiet() || Benign(e.Message) {
		level = slog.LevelDebug
	}
	c.l.LogAttrs(context.Background(), level, e.Message, attrs...)
	return nil
}

func (c *Core) Sync() error { return nil }

// Quiet reports whether quiet was set: entries go to debug level.
func (c *Core) Quiet() bool { return c.quiet != nil && c.quiet.Load() }

// Benign reports whether msg is one of the errors etcd logs that are
// expected and need no action (logged at debug level).
func Benign(msg string) bool { return benign[msg] }

// benign lists messages etcd logs as errors that are expected and need no
// action; they are logged at debug level.
var benign = map[string]bool{
	// A new member's storage-version monitor runs before the first raft
	// term is stored; it retries every few seconds and then succeeds.
	"failed to update storage version": true,
	"Failed to detect schema version":  true, // likewise, before the first term
	// Warnings of every embedded start about settings chosen on purpose:
	// one listener for HTTP and gRPC, and no authentication tokens.
	"Running http and grpc server on single port. This is not recommended for production.": true,
	"simple token is not cryptographically signed":                                         true,
}

func fieldAttrs(fields []zapcore.Field) []slog.Attr {
	if len(fields) == 0 {
		return nil
	}
	enc := zapcore.NewMapObjectEncoder()
	for _, f := range fields {
		f.AddTo(enc)
	}
	attrs := make([]slog.Attr, 0, len(enc.Fields))
	for _, k := range slices.Sorted(maps.Keys(enc.Fields)) {
		attrs = append(attrs, slog.Any(k, enc.Fields[k]))
	}
	return attrs
}

func slogLevel(l zapcore.Level) slog.Level {
	switch {
	case l >= zapcore.ErrorLevel:
		return slog.LevelError
	case l >= zapcore.WarnLevel:
		return slog.LevelWarn
	case l >= zapcore.InfoLevel:
		return slog.LevelInfo
	}
	return slog.LevelDebug
}
