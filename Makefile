# The README's commands: `make demo` and `make test`.
.PHONY: test demo bench chaos
SHELL := /bin/bash

# The parallel suite first, then the database packages again on pgx's
# database/sql driver (lib/pq is the default), then the whole-broker fault tests and the short
# fault-injection profile alone (they close every connection and restart the
# broker app, so nothing else may run beside them).
test:
	go test -race -count=1 ./...
	MAILROOM_TEST_DRIVER=pgx go test -race -count=1 ./outbox/... ./inbox/... ./dedupe/ ./relay/
	go test -race -count=1 -p 1 -tags brokerfaults ./test/brokerfaults/
	go test -count=1 -p 1 -tags chaos -v -run TestChaos ./test/chaos/ | grep -v '^=== '; test $${PIPESTATUS[0]} -eq 0

# The long fault-injection profile (20 minutes); replay a seed with
# CHAOS_FLAGS='-chaos.seed N'.
chaos:
	go test -count=1 -timeout 40m -tags chaos -v -run TestChaos ./test/chaos/ -chaos.duration 20m $(CHAOS_FLAGS)

demo:
	go run ./examples/orderservice demo --orders 100

bench:
	go run ./bench
