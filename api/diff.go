package api

import (
	"maps"
	"slices"
)

// Version is what a view of a service compares to tell whether an
// instance changed: its registration (Created) and its attributes.
type Version struct {
	Created uint64
	Attrs   map[string]string
}

// Versioned is an element of a view: the agent's cache, the client's
// ServiceSet and the backends' streams each keep one, keyed by address.
type Versioned interface {
	Version() Version
}

// Version returns u's registration and attributes.
func (u ServiceUpdate) Version() Version { return Version{uint64(u.Created), u.Attrs} }

// Change is what a new state of an instance means to a view that may hold
// an older one.
type Change uint8

const (
	// Unchanged: the same registration with the same attributes; the
	// reader is told nothing.
	Unchanged Change = iota
	// Added: an address the view does not hold; the reader is told a put.
	Added
	// Updated: the same registration (Created) with other attributes; the
	// reader is told a put.
	Updated
	// Replaced: another registration under a known address (the old one
	// was removed and a new one made, unseen); the reader is told the old
	// one's removal first, then a put, so that a leader change is never
	// hidden behind an attribute update.
	Replaced
)

// Classify returns the instance view holds at addr (the zero T if none)
// and what next, the instance's new state, means to the view. It is the
// one rule by which every view of a service follows the store.
func Classify[T Versioned](view map[string]T, addr string, next T) (old T, c Change) {
	old, ok := view[addr]
	switch {
	case !ok:
		return old, Added
	case old.Version().Created != next.Version().Created:
		return old, Replaced
	case maps.Equal(old.Version().Attrs, next.Version().Attrs):
		return old, Unchanged
	default:
		return old, Updated
	}
}

// Diff returns what takes view to snapshot, a complete new state of the
// service, in the order a reader is told it: gone, the addresses of view
// that snapshot lacks, then put, the addresses of snapshot whose instance
// is not Unchanged; each oldest first (Age). A caller removes the gone
// ones, then applies each put one through Classify, which tells a
// Replaced instance's removal first. Diff modifies neither map.
func Diff[T Versioned](view, snapshot map[string]T) (gone, put []string) {
	for addr := range view {
		if _, ok := snapshot[addr]; !ok {
			gone = append(gone, addr)
		}
	}
	for addr, next := range snapshot {
		if _, c := Classify(view, addr, next); c != Unchanged {
			put = append(put, addr)
		}
	}
	sortByAge(gone, view)
	sortByAge(put, snapshot)
	return gone, put
}

func sortByAge[T Versioned](addrs []string, m map[string]T) {
	slices.SortFunc(addrs, func(a, b string) int {
		return Age{m[a].Version().Created, a}.Compare(Age{m[b].Version().Created, b})
	})
}
