GO ?= go
# The whole suite: unit, integration (embedded etcd, real ZooKeeper when
# installed) and fault tests, with the race detector, then go vet.
test:
	$(GO) vet ./...
	$(GO) test -race -count=1 -timeout 15m ./...

build:
	$(GO) build -o bin/discoverd .

run:
	$(GO) run .

lint:
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { gofmt -l $$(git ls-files '*.go'); exit 1; }
	$(GO) vet ./...
	$(GO) run honnef.co/go/tools/cmd/staticcheck@2025.1.1 ./...

.PHONY: test build run lint
