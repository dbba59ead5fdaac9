package outbox_test

import (
	"context"
	"fmt"
	"os"
	"testing"

	"github.com/mailroom-go/mailroom/atcommit"
	"github.com/mailroom-go/mailroom/internal/testenv"
	"github.com/mailroom-go/mailroom/outbox"
)

// TestMain skips the package, examples included, when PostgreSQL is down
// (fails it with CI=true): a runnable example cannot skip itself.
func TestMain(m *testing.M) {
	testenv.SkipWithoutServices(false)
	os.Exit(m.Run())
}

// Record an event in the transaction of the business change: both commit,
// or neither. The relay publishes it afterwards.
func ExampleOutbox_Add() {
	env := testenv.Example() // a fresh schema of the local database; yours: your DATABASE_URL
	defer env.Done()
	ctx := context.Background()

	db, err := atcommit.OpenDB(env.DatabaseURL) // Add's insert travels with the COMMIT
	if err != nil {
		panic(err)
	}
	defer db.Close()
	if _, err := db.ExecContext(ctx, `CREATE TABLE orders (id text PRIMARY KEY, total int)`); err != nil {
		panic(err)
	}
	ob, err := outbox.New(outbox.Config{DB: db})
	if err != nil {
		panic(err)
	}

	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		panic(err)
	}
	defer tx.Rollback()
	if _, err := tx.ExecContext(ctx, `INSERT INTO orders VALUES ('o-1', 4200)`); err != nil {
		panic(err)
	}
	err = ob.Add(ctx, tx, outbox.Message{
		Exchange: "orders", RoutingKey: "order.placed",
		Key:     "o-1", // the order's events are published in write order
		Type:    "order.placed",
		Payload: []byte(`{"id":"o-1","total":4200}`),
	})
	if err != nil {
		panic(err) // a bad message: wraps outbox.ErrInvalidMessage, names the field
	}
	if err := tx.Commit(); err != nil {
		panic(err)
	}

	var key, typ string
	if err := db.QueryRowContext(ctx, `SELECT key, type FROM mailroom_outbox`).Scan(&key, &typ); err != nil {
		panic(err)
	}
	fmt.Println("waiting for the relay:", typ, "of", key)
	// Output: waiting for the relay: order.placed of o-1
}
