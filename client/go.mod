module github.com/flynn/discoverd/client

go 1.25.0

require (
	github.com/flynn/discoverd/api v0.0.0-00010101000000-000000000000
	github.com/flynn/discoverd/rpc v0.0.0-00010101000000-000000000000
	go.uber.org/goleak v1.3.0
)

replace (
	github.com/flynn/discoverd/api => ../api
	github.com/flynn/discoverd/rpc => ../rpc
)
