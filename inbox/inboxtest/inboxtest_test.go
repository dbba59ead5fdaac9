package inboxtest_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"

	"github.com/jmoiron/sqlx"

	"github.com/mailroom-go/mailroom/inbox"
	"github.com/mailroom-go/mailroom/inbox/inboxtest"
	"github.com/mailroom-go/mailroom/internal/testenv"
)

// TestMain skips the package, examples included, when PostgreSQL is down
// (fails it with CI=true): a runnable example cannot skip itself.
func TestMain(m *testing.M) {
	testenv.SkipWithoutServices(false)
	os.Exit(m.Run())
}

func TestRunOutcomes(t *testing.T) {
	t.Parallel()
	s := testenv.NewSchema(t)
	s.DB.MustExec(`CREATE TABLE charges (order_id text PRIMARY KEY)`)
	ctx := context.Background()
	charge := func(ctx context.Context, tx *sqlx.Tx, m inbox.Message) error {
		switch string(m.Payload) {
		case "fail":
			return errors.New("card declined")
		case "panic":
			panic("boom")
		case "swallow": // a failing statement whose error is dropped
			tx.ExecContext(ctx, `INSERT INTO no_such_table VALUES (1)`)
			return nil
		}
		_, err := tx.ExecContext(ctx, `INSERT INTO charges VALUES ($1)`, m.Key)
		return err
	}
	charges := func() int {
		var n int
		s.DB.Get(&n, `SELECT count(*) FROM charges`)
		return n
	}
	out, err := inboxtest.Run(ctx, s.DB, "payments", charge, inbox.Message{ID: "m1", Key: "o-1"})
	if err != nil || !out.Applied || out.Duplicate || out.Err != nil || charges() != 1 {
		t.Fatalf("first: %+v, %v, %d charges; want applied, 1 charge", out, err, charges())
	}
	out, err = inboxtest.Run(ctx, s.DB, "payments", charge, inbox.Message{ID: "m1", Key: "o-1"})
	if err != nil || out.Applied || !out.Duplicate || charges() != 1 {
		t.Fatalf("again: %+v, %v, %d charges; want a duplicate, still 1 charge", out, err, charges())
	}
	out, err = inboxtest.Run(ctx, s.DB, "refunds", charge, inbox.Message{ID: "m1", Key: "o-2"})
	if err != nil || !out.Applied || charges() != 2 {
		t.Fatalf("another consumer, same id: %+v, %v; want applied (ids are per consumer)", out, err)
	}
	for _, c := range []struct{ payload, want string }{{"fail", "card declined"}, {"panic", "handler panicked: boom"}, {"swallow", "commit refused"}} {
		id := "m-" + c.payload
		out, err := inboxtest.Run(ctx, s.DB, "payments", charge, inbox.Message{ID: id, Key: "o-3", Payload: []byte(c.payload)})
		if err != nil || out.Applied || out.Duplicate || out.Err == nil || !strings.Contains(out.Err.Error(), c.want) {
			t.Errorf("%s: %+v, %v; want Err with %q", c.payload, out, err, c.want)
		}
		// Nothing was recorded: the retry runs the handler again.
		out, _ = inboxtest.Run(ctx, s.DB, "payments", charge, inbox.Message{ID: id, Key: "o-" + c.payload})
		if !out.Applied {
			t.Errorf("%s, then fixed: %+v, want applied (the failed attempt recorded nothing)", c.payload, out)
		}
	}
}

// Test a handler without a broker: the outcome the consumer would see, and
// what the handler wrote.
func ExampleRun() {
	env := testenv.Example() // a fresh schema of the local database (mailroom.Migrate done)
	defer env.Done()
	ctx := context.Background()
	db := sqlx.MustOpen("postgres", env.DatabaseURL)
	defer db.Close()
	db.MustExec(`CREATE TABLE charges (order_id text PRIMARY KEY)`)

	handler := func(ctx context.Context, tx *sqlx.Tx, m inbox.Message) error {
		_, err := tx.ExecContext(ctx, `INSERT INTO charges VALUES ($1)`, m.Key)
		return err
	}
	msg := inbox.Message{ID: "0190c3a4-0000-7000-8000-000000000001", Key: "o-1", Payload: []byte(`{}`)}
	for range 2 { // delivered twice
		out, err := inboxtest.Run(ctx, db, "payments", handler, msg)
		if err != nil {
			panic(err)
		}
		fmt.Printf("applied=%v duplicate=%v err=%v\n", out.Applied, out.Duplicate, out.Err)
	}
	// Output:
	// applied=true duplicate=false err=<nil>
	// applied=false duplicate=true err=<nil>
}
