package dedupe_test

import (
	"context"
	"fmt"

	"github.com/jmoiron/sqlx"

	"github.com/mailroom-go/mailroom/dedupe"
)

// Apply an effect once per idempotency key, in the effect's transaction.
func ExampleStore_Claim() {
	ctx := context.Background()
	db := sqlx.MustOpen("postgres", "postgres://localhost/app?sslmode=disable")
	store, err := dedupe.New(dedupe.Config{})
	if err != nil {
		panic(err)
	}
	tx, err := db.BeginTxx(ctx, nil)
	if err != nil {
		panic(err)
	}
	defer tx.Rollback()
	first, err := store.Claim(ctx, tx, "http:orders", "idempotency-key-from-request")
	if err != nil {
		panic(err)
	}
	if !first {
		fmt.Println("already done; return the stored response")
		return
	}
	tx.MustExec(`INSERT INTO orders (id) VALUES ($1)`, "o-1")
	if err := tx.Commit(); err != nil {
		panic(err)
	}
}

// Purge a scope's expired entries periodically; each batch commits on its
// own. Other scopes in the table are left to their owners.
func ExampleStore_Purge() {
	ctx := context.Background()
	db := sqlx.MustOpen("postgres", "postgres://localhost/app?sslmode=disable")
	store, _ := dedupe.New(dedupe.Config{})
	n, err := store.Purge(ctx, db, "http:orders", 0) // its entries older than 7 days
	if err != nil {
		panic(err)
	}
	fmt.Println("purged", n)
}
