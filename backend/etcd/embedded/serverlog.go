package embedded

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"sync/atomic"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/flynn/discoverd/backend/etcd/internal/zapslog"
)

// serverLogger returns the zap logger of an embedded etcd server: its
// warnings and errors go to l at their level (benign ones, and all of them
// once quiet is set, at debug), and so do the info lines that explain a
// wait (explainsWait), raised to warn. The last warning is kept in
// lastWarn, for the error of a start that times out. A fatal entry calls
// onFatal (see Config.OnFatal) and then exits with status 1.
func serverLogger(l *slog.Logger, quiet *atomic.Bool, lastWarn *atomic.Pointer[string], onFatal func(error)) *zap.Logger {
	core := &serverCore{Core: zapslog.NewCore(l, zapcore.InfoLevel, quiet), lastWarn: lastWarn}
	return zap.New(core, zap.WithFatalHook(fatalHook{onFatal}))
}

// explainsWait lists the info lines of etcd that explain why it does not
// make progress; they are forwarded as warnings.
var explainsWait = map[string]bool{
	// Another process holds the database's lock (checkDataDir usually
	// catches that first), or the disk is very slow.
	"db file is flocked by another process, or taking too long": true,
	// A slow disk: etcd's fsyncs or applies take long.
	"slow fdatasync": true,
	"leader failed to send out heartbeat on time; took too long, leader is overloaded likely from slow disk": true,
}

// serverCore is the zapcore.Core of serverLogger.
type serverCore struct {
	*zapslog.Core
	lastWarn *atomic.Pointer[string]
}

func (c *serverCore) With(fields []zapcore.Field) zapcore.Core {
	return &serverCore{Core: c.Core.With(fields).(*zapslog.Core), lastWarn: c.lastWarn}
}

func (c *serverCore) Check(e zapcore.Entry, ce *zapcore.CheckedEntry) *zapcore.CheckedEntry {
	if e.Level >= zapcore.WarnLevel || explainsWait[e.Message] {
		return ce.AddCore(e, c)
	}
	return ce
}

func (c *serverCore) Write(e zapcore.Entry, fields []zapcore.Field) error {
	if e.Level < zapcore.WarnLevel {
		e.Level = zapcore.WarnLevel // explains a wait
	}
	if c.lastWarn != nil && !zapslog.Benign(e.Message) && !c.Quiet() {
		msg := e.Message
		c.lastWarn.Store(&msg)
	}
	return c.Core.Write(e, shortFields(fields))
}

// maxFieldLen bounds a string field of a forwarded entry: etcd's slow
// request warnings carry the whole request, which for a batch of
// registrations is many KiB.
const maxFieldLen = 512

// shortFields returns fields with string values longer than maxFieldLen
// cut, and fields itself when none is.
func shortFields(fields []zapcore.Field) []zapcore.Field {
	var out []zapcore.Field
	for i, f := range fields {
		var v string
		switch f.Type {
		case zapcore.StringType:
			v = f.String
		case zapcore.StringerType:
			if st, ok := f.Interface.(fmt.Stringer); ok {
				v = st.String()
			}
		}
		if len(v) <= maxFieldLen {
			if out != nil {
				out = append(out, f)
			}
			continue
		}
		if out == nil {
			out = append(make([]zapcore.Field, 0, len(fields)), fields[:i]...)
		}
		out = append(out, zap.String(f.Key, fmt.Sprintf("%s… (%d bytes)", strings.ToValidUTF8(v[:maxFieldLen], ""), len(v))))
	}
	if out == nil {
		return fields
	}
	return out
}

// fatalHook runs after etcd logged a fatal entry.
type fatalHook struct{ onFatal func(error) }

func (h fatalHook) OnWrite(ce *zapcore.CheckedEntry, fields []zapcore.Field) {
	err := errors.New(ce.Message)
	for _, f := range fields {
		if fe, ok := f.Interface.(error); ok && f.Type == zapcore.ErrorType {
			err = fmt.Errorf("%s: %w", ce.Message, fe)
			break
		}
	}
	if h.onFatal != nil {
		h.onFatal(fmt.Errorf("etcd: embedded server: %w", err))
	}
	os.Exit(1)
}
