// Package chaos is the fault-injection suite: writers add events through the
// outbox while the relay sidecar and inbox consumers run as separate
// processes behind in-process toxiproxy proxies, and a driver injects faults
// from a seeded schedule — SIGKILL of relays and consumers, closed broker
// connections, terminated database sessions, a broker restart, latency and
// cut connections. When the run drains, the invariants are checked from the
// database and the broker, never from the processes' own counters.
//
//	go test -tags chaos -count=1 -v ./test/chaos/                       # short profile (~2 min)
//	go test -tags chaos -count=1 -v ./test/chaos/ -chaos.duration 20m    # long profile
//	go test -tags chaos -count=1 -v ./test/chaos/ -chaos.seed 1234       # replay a seed
//
// It faults the whole broker, so it runs alone (`make test` runs it last).
package chaos
