GO ?= go
FUZZTIME ?= 60s

# The modules of the workspace (go.work): the server at the root, and the
# client with the two packages it shares with the server, each a module of
# its own (docs/DECISIONS.md). ./... stops at a nested module, so every
# command that means "everything" names them all.
MODULES := . ./api ./rpc ./client
PKGS := $(addsuffix /...,$(MODULES))

# The whole suite: unit, integration (embedded etcd, real ZooKeeper when
# installed) and fault tests, with the race detector, after go vet.
test:
	$(GO) vet $(PKGS)
	$(GO) test -race -count=1 -timeout 15m $(PKGS)

build:
	$(GO) build -o bin/discoverd .

run:
	$(GO) run .

lint: mod
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { gofmt -l $$(git ls-files '*.go'); exit 1; }
	$(GO) vet $(PKGS)
	$(GO) run honnef.co/go/tools/cmd/staticcheck@v0.8.2 $(PKGS)

# Each module's go.mod and go.sum are tidy (as the module stands alone,
# GOWORK=off) and the downloaded dependencies match go.sum.
mod:
	@set -e; for m in $(MODULES); do \
	  echo "go mod tidy -diff ($$m)"; \
	  (cd $$m && GOWORK=off $(GO) mod tidy -diff); \
	done
	$(GO) mod verify

# The load tool of docs/BENCHMARKS.md: prints a table, writes JSON.
bench:
	$(GO) run ./bench -json bench-results.json

# The DNS scenario alone: dnsperf against the agent and Unbound (Debian
# packages dnsperf and unbound; skipped with a note when missing).
bench-dns:
	$(GO) run ./bench -run dns -json bench-results-dns.json

# The fault suite alone (it also runs in make test).
faults:
	$(GO) test -race -count=1 -v -timeout 10m ./faults/...

# The membership checker of issue 11 (faults/checker_test.go) for
# SOAKTIME (default 10m) of random operations and faults; make test runs it
# for 20s. SEED=n replays a run's choices; a failed run writes its whole
# history to soak-history.txt.
SOAKTIME ?= 10m
SEED ?= 0
soak:
	$(GO) test -race -count=1 -v -run 'TestMembershipChecker' -timeout 60m ./faults/ -args -checker.duration=$(SOAKTIME) -checker.seed=$(SEED) -checker.history=$(CURDIR)/soak-history.txt

# Every fuzz target of every package, FUZZTIME each (default 60s).
fuzz:
	@set -e; for pkg in $$($(GO) list $(PKGS)); do \
	  for f in $$($(GO) test -list '^Fuzz' $$pkg | grep '^Fuzz' || true); do \
	    echo "== $$pkg $$f ($(FUZZTIME))"; \
	    $(GO) test -run '^$$' -fuzz "^$$f\$$" -fuzztime $(FUZZTIME) $$pkg; \
	  done; \
	done

.PHONY: test build run lint mod fuzz bench bench-dns faults soak
