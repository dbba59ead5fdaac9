# The README's test command: `make test`.
.PHONY: test demo bench

test:
	go test -race -count=1 ./...

demo:
	go run ./examples/orderservice demo --orders 100
