package main

import (
	"context"
	"strings"
	"testing"
)

// Idempotency-Keys share orders_inbox with the "orders" consumer's message
// ids: the API purges its keys after keyRetention and leaves the
// consumer's ids to the consumer.
func TestPurgeKeysOnlyItsScope(t *testing.T) {
	t.Parallel()
	a := newTestApp(t, false)
	a.DB().MustExec(`INSERT INTO orders_inbox (scope, id, recorded_at) VALUES
		($1, 'old-key', now() - $2 * interval '1 microsecond' - interval '1 hour'),
		($1, 'new-key', now()),
		('orders', 'old-message', now() - $2 * interval '1 microsecond' - interval '1 hour')`, idempotencyScope, keyRetention.Microseconds())
	if _, err := a.Orders.PurgeKeys(context.Background()); err != nil {
		t.Fatal(err)
	}
	var left []string
	if err := a.DB().Select(&left, `SELECT scope || '/' || id FROM orders_inbox ORDER BY 1`); err != nil {
		t.Fatal(err)
	}
	if got, want := strings.Join(left, " "), "orders-api/new-key orders/old-message"; got != want {
		t.Fatalf("left %s, want %s", got, want)
	}
}
