package buildinfo_test

import (
	"runtime/debug"
	"strings"
	"testing"

	"github.com/flynn/discoverd/internal/buildinfo"
)

func TestFrom(t *testing.T) {
	for _, tc := range []struct {
		name string
		bi   *debug.BuildInfo
		want string
	}{
		{"no build info", nil, "discoverd (devel) (revision unknown, go"},
		{"go test or -buildvcs=false", &debug.BuildInfo{GoVersion: "go1.26.0", Main: debug.Module{Version: "(devel)"}},
			"discoverd (devel) (revision unknown, go1.26.0)"},
		{"release", &debug.BuildInfo{GoVersion: "go1.26.0", Main: debug.Module{Version: "v1.2.0"}, Settings: []debug.BuildSetting{
			{Key: "vcs.revision", Value: "1a2b3c4d5e6f7a8b9c0d1a2b3c4d5e6f7a8b9c0d"}, {Key: "vcs.modified", Value: "false"},
		}}, "discoverd v1.2.0 (revision 1a2b3c4d5e6f, go1.26.0)"},
		{"dirty tree", &debug.BuildInfo{GoVersion: "go1.26.0", Main: debug.Module{Version: "v1.2.1-0.20261205105000-1a2b3c4d5e6f+dirty"}, Settings: []debug.BuildSetting{
			{Key: "vcs.revision", Value: "1a2b3c4d5e6f7a8b"}, {Key: "vcs.modified", Value: "true"},
		}}, "discoverd v1.2.1-0.20261205105000-1a2b3c4d5e6f+dirty (revision 1a2b3c4d5e6f+dirty, go1.26.0)"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := buildinfo.From(tc.bi).String(); !strings.HasPrefix(got, tc.want) {
				t.Fatalf("got %q, want %q", got, tc.want)
			}
		})
	}
}
