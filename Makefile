# The README's commands: `make demo` and `make test`.
.PHONY: test demo bench chaos chaos-cluster cluster
SHELL := /bin/bash

# The parallel suite first, then the database packages again on pgx's
# database/sql driver (lib/pq is the default), then, one package at a time,
# the whole-broker fault tests and the short fault-injection profile (each
# on a private RabbitMQ node it starts: they stop, restart and alarm it)
# and the cluster tests (on a private 3-node cluster); last the two-minute
# soak (the sidecar under steady load through a held snapshot).
test:
	go test -race -count=1 ./...
	MAILROOM_TEST_DRIVER=pgx go test -race -count=1 ./outbox/... ./inbox/... ./dedupe/ ./relay/
	go test -race -count=1 -p 1 -tags brokerfaults ./test/brokerfaults/
	go test -count=1 -p 1 -tags chaos -v -run TestChaos ./test/chaos/ | grep -v '^=== '; test $${PIPESTATUS[0]} -eq 0
	go test -race -count=1 -p 1 -tags cluster ./internal/testenv/cluster/ ./test/cluster/
	go test -count=1 -tags soak -v ./test/soak/ | grep -v '^=== '; test $${PIPESTATUS[0]} -eq 0

# The long fault-injection profile (20 minutes); replay a seed with
# CHAOS_FLAGS='-chaos.seed N'.
chaos:
	go test -count=1 -timeout 40m -tags chaos -v -run TestChaos ./test/chaos/ -chaos.duration 20m $(CHAOS_FLAGS)

# The cluster profile: the same faults on a private 3-node cluster, the
# processes given every node, a node stopped and started every 40 s.
chaos-cluster:
	go test -count=1 -timeout 40m -tags chaos -v -run TestChaos ./test/chaos/ -chaos.nodes 3 -chaos.duration 5m $(CHAOS_FLAGS)

# A private 3-node RabbitMQ cluster on loopback ports until Ctrl-C; prints
# its AMQP URLs (for AMQP_URL) and node names. CLUSTER_FLAGS='-n 1'.
cluster:
	go run ./internal/testenv/cluster/cmd $(CLUSTER_FLAGS)

demo:
	go run ./examples/orderservice demo --orders 100

bench:
	go run ./bench
