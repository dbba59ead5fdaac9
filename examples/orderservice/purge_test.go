package main

import (
	"context"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/mailroom-go/mailroom/internal/testenv"
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
	// The app's own purge, at its start, may hold old-key (locked, not yet
	// deleted) when this one runs, which then skips it: purge until it is
	// gone, checking what is left each time.
	var left []string
	testenv.Eventually(t, 30*time.Second, "old-key purged, the consumer's old id left", func() bool {
		if _, err := a.Orders.PurgeKeys(context.Background()); err != nil {
			t.Fatal(err)
		}
		left = nil
		if err := a.DB().Select(&left, `SELECT scope || '/' || id FROM orders_inbox ORDER BY 1`); err != nil {
			t.Fatal(err)
		}
		if !slices.Contains(left, "orders/old-message") || !slices.Contains(left, "orders-api/new-key") {
			t.Fatalf("left %v: purged what it must not", left)
		}
		return !slices.Contains(left, "orders-api/old-key")
	})
	if got, want := strings.Join(left, " "), "orders-api/new-key orders/old-message"; got != want {
		t.Fatalf("left %s, want %s", got, want)
	}
}
