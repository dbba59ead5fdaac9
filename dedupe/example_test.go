package dedupe_test

import (
	"context"
	"fmt"
	"os"
	"testing"

	"github.com/jmoiron/sqlx"

	"github.com/mailroom-go/mailroom/dedupe"
	"github.com/mailroom-go/mailroom/internal/testenv"
)

// TestMain skips the package, examples included, when PostgreSQL is down
// (fails it with CI=true): a runnable example cannot skip itself.
func TestMain(m *testing.M) {
	testenv.SkipWithoutServices(false)
	os.Exit(m.Run())
}

// Apply an effect once per idempotency key, in the effect's transaction:
// the second request with the same key finds it claimed and does nothing.
func ExampleStore_Claim() {
	env := testenv.Example() // a fresh schema of the local database; yours: your DATABASE_URL
	defer env.Done()
	ctx := context.Background()
	db := sqlx.MustOpen("postgres", env.DatabaseURL)
	defer db.Close()
	db.MustExec(`CREATE TABLE orders (id text PRIMARY KEY)`)
	store, err := dedupe.New(dedupe.Config{})
	if err != nil {
		panic(err)
	}

	placeOrder := func(idempotencyKey, id string) {
		tx, err := db.BeginTxx(ctx, nil)
		if err != nil {
			panic(err)
		}
		defer tx.Rollback()
		first, err := store.Claim(ctx, tx, "http:orders", idempotencyKey)
		if err != nil {
			panic(err)
		}
		if !first {
			fmt.Println(idempotencyKey, "already done: return the stored response")
			return
		}
		tx.MustExec(`INSERT INTO orders (id) VALUES ($1)`, id)
		if err := tx.Commit(); err != nil {
			panic(err)
		}
		fmt.Println(idempotencyKey, "placed", id)
	}
	placeOrder("key-1", "o-1")
	placeOrder("key-1", "o-1") // the client retried
	// Output:
	// key-1 placed o-1
	// key-1 already done: return the stored response
}

// Purge a scope's expired entries periodically; each batch commits on its
// own. Other scopes in the table are left to their owners.
func ExampleStore_Purge() {
	env := testenv.Example()
	defer env.Done()
	db := sqlx.MustOpen("postgres", env.DatabaseURL)
	defer db.Close()
	store, _ := dedupe.New(dedupe.Config{})
	n, err := store.Purge(context.Background(), db, "http:orders", 0) // its entries older than 7 days
	if err != nil {
		panic(err)
	}
	fmt.Println("purged", n)
	// Output: purged 0
}
