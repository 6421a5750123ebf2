package main

import (
	"bytes"
	"encoding/json"
	"log/slog"
	"strings"
	"testing"
)

func TestLoggerComponent(t *testing.T) {
	for _, tc := range []struct {
		name string
		log  func(l *slog.Logger)
		want string // the text line without time and level
	}{
		{"default", func(l *slog.Logger) { l.Info("discoverd serving", "addr", "x") },
			`msg="discoverd serving" component=main addr=x`},
		{"innermost wins", func(l *slog.Logger) {
			l.With("component", "backend").With("k", 1, "component", "etcd").Warn("etcd: lease lost", "err", "e")
		}, `msg="lease lost" k=1 component=etcd err=e`},
		{"record attr wins", func(l *slog.Logger) { l.With("component", "agent").Info("x", "component", "server") },
			`msg=x component=server`},
		{"prefix of another package", func(l *slog.Logger) {
			l.With("component", "server").Warn("rpc: closing connection", "reason", "r")
		}, `msg="closing connection" component=server reason=r`},
		{"unknown prefix kept", func(l *slog.Logger) { l.Info("note: this stays") },
			`msg="note: this stays" component=main`},
		{"group", func(l *slog.Logger) { l.With("component", "agent").WithGroup("g").Info("m", "a", 1) },
			`msg=m component=agent g.a=1`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var buf bytes.Buffer
			l, err := newLogger(&buf, LogText, slog.LevelDebug)
			if err != nil {
				t.Fatal(err)
			}
			tc.log(l)
			line := strings.TrimSpace(buf.String())
			_, rest, _ := strings.Cut(line, " level=")
			_, rest, _ = strings.Cut(rest, " ")
			if rest != tc.want {
				t.Fatalf("logged %q, want %q", rest, tc.want)
			}
		})
	}
	t.Run("json", func(t *testing.T) {
		var buf bytes.Buffer
		l, err := newLogger(&buf, LogJSON, slog.LevelInfo)
		if err != nil {
			t.Fatal(err)
		}
		l.With("component", "backend").With("component", "etcd").Info("etcd: resync", "n", 2)
		l.Debug("not logged")
		var rec map[string]any
		if err := json.Unmarshal(buf.Bytes(), &rec); err != nil || strings.Count(buf.String(), `"component"`) != 1 ||
			rec["component"] != "etcd" || rec["msg"] != "resync" || rec["n"] != 2.0 {
			t.Fatalf("logged %s (%v)", buf.String(), err)
		}
	})
	if _, err := newLogger(&bytes.Buffer{}, "xml", slog.LevelInfo); err == nil {
		t.Fatal("newLogger accepted format xml")
	}
}
