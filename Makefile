# The README's commands: `make demo` and `make test`.
.PHONY: test demo bench

# The parallel suite first, then the whole-broker fault tests alone (they
# close every connection and restart the broker app, so nothing else may
# run beside them).
test:
	go test -race -count=1 ./...
	go test -race -count=1 -p 1 -tags brokerfaults ./internal/brokerfaults/

demo:
	go run ./examples/orderservice demo --orders 100

bench:
	go run ./internal/bench
