package backend

import (
	"context"
	"strings"
)

// Lister is implemented by a backend that can list the services in its
// store. It is optional: a front end that finds it answers "which
// services exist" (GET /services, `discoverd services`); without it,
// that question gets "not implemented". A new store need not implement it
// to plug in.
type Lister interface {
	// ListServices returns up to limit services whose names come after
	// the cursor after ("" for the first page), in ListOrder, and the
	// cursor of the next page: "" when this page is the last. Only
	// services with at least one registration are listed. A page is read
	// from the store, not from a cache, in one consistent read where the
	// store allows (etcd: one range at one revision, more only
	// for a page of more than a few thousand instances; ZooKeeper: one
	// listing of the service znodes, then one per listed service); pages
	// are not consistent with each other. limit ≤ 0 means
	// DefaultListLimit. It blocks until the store answers or ctx is done.
	// It is safe for concurrent use.
	ListServices(ctx context.Context, after string, limit int) (page []ServiceSummary, next string, err error)
}

// DefaultListLimit is the page size of ListServices when limit ≤ 0, and
// the largest one a front end should ask for.
const DefaultListLimit = 1000

// ServiceSummary describes one service in the store.
type ServiceSummary struct {
	Name string
	// Instances is the number of registrations of the service.
	Instances int
	// Leader is the oldest registration (api.Age). Its Attrs are nil: a
	// listing reads keys, not values.
	Leader Instance
}

// ListOrder orders service names as listings return them: by the bytes
// of name+"/", the order of the store's keys. (It is name order except
// that a name sorts after its extensions by '-' or '.': "a-b" and "a.b"
// come before "a".) A listing's cursor is the last name of a page.
func ListOrder(a, b string) int { return strings.Compare(a+"/", b+"/") }
