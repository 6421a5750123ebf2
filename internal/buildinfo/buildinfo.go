// Package buildinfo says which build of discoverd is running, from the
// information the Go toolchain embeds in the binary (runtime/debug).
//
//	info := buildinfo.Read()
//	fmt.Println(info) // discoverd v1.2.0 (revision 1a2b3c4d5e6f, go1.26.0)
package buildinfo

import (
	"fmt"
	"runtime"
	"runtime/debug"
)

// Info describes the running binary.
type Info struct {
	// Version is the main module's version: a release tag (v1.2.0), a
	// pseudo-version, or "(devel)" for a build without VCS information.
	Version string
	// Revision is the VCS commit the binary was built from, "" when the
	// build did not record one (go run, go test, -buildvcs=false).
	Revision string
	// Time is the commit time (RFC 3339), "" when not recorded.
	Time string
	// Modified reports that the work tree had uncommitted changes.
	Modified bool
	// GoVersion is the toolchain that built the binary.
	GoVersion string
}

// Read returns the build information of the running binary. It does not
// block and never fails: what the binary does not record is left empty
// (Version "(devel)").
func Read() Info {
	bi, _ := debug.ReadBuildInfo()
	return From(bi)
}

// From extracts an Info from bi, which may be nil.
func From(bi *debug.BuildInfo) Info {
	info := Info{Version: "(devel)", GoVersion: runtime.Version()}
	if bi == nil {
		return info
	}
	if v := bi.Main.Version; v != "" {
		info.Version = v
	}
	if bi.GoVersion != "" {
		info.GoVersion = bi.GoVersion
	}
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			info.Revision = s.Value
		case "vcs.time":
			info.Time = s.Value
		case "vcs.modified":
			info.Modified = s.Value == "true"
		}
	}
	return info
}

// ShortRevision is the first 12 hex digits of Revision, with "+dirty"
// when Modified; "unknown" when no revision was recorded.
func (i Info) ShortRevision() string {
	r := i.Revision
	if r == "" {
		return "unknown"
	}
	if len(r) > 12 {
		r = r[:12]
	}
	if i.Modified {
		r += "+dirty"
	}
	return r
}

// String is the one-line form `discoverd version` prints.
func (i Info) String() string {
	return fmt.Sprintf("discoverd %s (revision %s, %s)", i.Version, i.ShortRevision(), i.GoVersion)
}
