package pgxtx_test

import (
	"context"
	"testing"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/mailroom-go/mailroom/internal/testenv"
	"github.com/mailroom-go/mailroom/outbox"
	"github.com/mailroom-go/mailroom/outbox/pgxtx"
)

// Add through a native pgx transaction of a pgxpool: the message commits
// with the transaction, and a rollback takes it back.
func TestAddThroughAPgxTransaction(t *testing.T) {
	t.Parallel()
	s := testenv.NewSchema(t)
	ctx := context.Background()
	pool, err := pgxpool.New(ctx, s.URL)
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	ob, err := outbox.New(outbox.Config{})
	if err != nil {
		t.Fatal(err)
	}
	add := func(id string) {
		tx, err := pool.Begin(ctx)
		if err != nil {
			t.Fatal(err)
		}
		defer tx.Rollback(ctx)
		err = ob.Add(ctx, pgxtx.Wrap(tx),
			outbox.Message{ID: id, Exchange: "orders", RoutingKey: "order.placed", Key: "o-1", Payload: []byte(`{"id":"o-1"}`)},
			outbox.Message{Exchange: "orders", RoutingKey: "order.paid", Key: "o-1", Payload: []byte(`{"id":"o-1"}`)})
		if err != nil {
			t.Fatal(err)
		}
		if id == "" { // roll back
			return
		}
		if err := tx.Commit(ctx); err != nil {
			t.Fatal(err)
		}
	}
	id := outbox.NewID()
	add(id)
	add("") // rolled back: nothing of it stays
	var n int
	var first string
	if err := s.DB.Get(&n, `SELECT count(*) FROM mailroom_outbox`); err != nil || n != 2 {
		t.Fatalf("%d rows (%v), want the 2 of the committed transaction", n, err)
	}
	if err := s.DB.Get(&first, `SELECT id::text FROM mailroom_outbox ORDER BY seq LIMIT 1`); err != nil || first != id {
		t.Fatalf("first row %q (%v), want %s", first, err, id)
	}
	// A bad message is refused before anything is sent.
	tx, _ := pool.Begin(ctx)
	defer tx.Rollback(ctx)
	if err := ob.Add(ctx, pgxtx.Wrap(tx), outbox.Message{}); err == nil {
		t.Fatal("Add of a message without an exchange succeeded")
	}
}
