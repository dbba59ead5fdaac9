// Package brokerfaults holds tests that fault the whole RabbitMQ broker:
// close_all_connections, stop_app/start_app, a memory alarm. They would hit
// every other test running at the same time, so they live behind the
// brokerfaults build tag and `make test` runs them alone, after the rest:
//
//	go test -race -count=1 -p 1 -tags brokerfaults ./test/brokerfaults/
//
// Every test restores the broker in its cleanup, even when it fails.
package brokerfaults
