package atcommit_test

import (
	"context"
	"database/sql"
	"errors"
	"strings"
	"testing"

	"github.com/mailroom-go/mailroom/atcommit"
	"github.com/mailroom-go/mailroom/internal/testenv"
)

// openDB opens a fresh schema's database through atcommit.OpenDB, with a
// table t (n unique, positive) to insert into.
func openDB(t *testing.T) (*testenv.Schema, *sql.DB) {
	t.Helper()
	s := testenv.NewEmptySchema(t)
	s.DB.MustExec(`CREATE TABLE t (n int PRIMARY KEY CHECK (n > 0))`)
	db, err := atcommit.OpenDB(s.URL)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	db.SetMaxOpenConns(1)
	return s, db
}

func count(t *testing.T, s *testenv.Schema) int {
	t.Helper()
	var n int
	if err := s.DB.Get(&n, `SELECT count(*) FROM t`); err != nil {
		t.Fatal(err)
	}
	return n
}

// A Deferred statement with two sets of arguments is kept (two rows
// affected, nothing sent), runs with the COMMIT, and is visible after it.
// A statement of the transaction after it sees its rows.
func TestDeferredRunsWithTheCommit(t *testing.T) {
	t.Parallel()
	s, db := openDB(t)
	if !atcommit.Enabled(db) {
		t.Fatal("Enabled: false for a database of OpenDB")
	}
	if atcommit.Enabled(s.DB.DB) {
		t.Fatal("Enabled: true for a plain lib/pq database")
	}
	ctx := context.Background()
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	res, err := tx.ExecContext(ctx, atcommit.Deferred(`INSERT INTO t VALUES ($1)`), 1, 2)
	if err != nil {
		t.Fatal(err)
	}
	if n, _ := res.RowsAffected(); n != 2 {
		t.Fatalf("rows affected %d, want 2 (one per set of arguments)", n)
	}
	if got := count(t, s); got != 0 {
		t.Fatalf("%d rows visible before the commit, want 0", got)
	}
	var seen int
	if err := tx.QueryRowContext(ctx, `SELECT count(*) FROM t`).Scan(&seen); err != nil || seen != 2 {
		t.Fatalf("a later statement of the transaction sees %d rows (%v), want 2", seen, err)
	}
	if _, err := tx.ExecContext(ctx, atcommit.Deferred(`INSERT INTO t VALUES ($1)`), 3); err != nil {
		t.Fatal(err)
	}
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}
	if got := count(t, s); got != 3 {
		t.Fatalf("%d rows after the commit, want 3", got)
	}
}

// A Deferred statement that fails makes Commit fail and rolls back the
// whole transaction; a statement between it and the COMMIT fails with
// ErrEarlierDeferred without running. The connection is then as good as new.
func TestDeferredFailureRollsBack(t *testing.T) {
	t.Parallel()
	s, db := openDB(t)
	ctx := context.Background()

	tx, _ := db.BeginTx(ctx, nil)
	if _, err := tx.ExecContext(ctx, `INSERT INTO t VALUES (10)`); err != nil {
		t.Fatal(err)
	}
	if _, err := tx.ExecContext(ctx, atcommit.Deferred(`INSERT INTO t VALUES ($1)`), -1); err != nil {
		t.Fatalf("Exec of a Deferred statement: %v, want nil (it is only kept)", err)
	}
	if err := tx.Commit(); err == nil || !strings.Contains(err.Error(), "t_n_check") {
		t.Fatalf("Commit: %v, want the CHECK's failure", err)
	}
	if got := count(t, s); got != 0 {
		t.Fatalf("%d rows after the failed commit, want 0 (all rolled back)", got)
	}

	tx, _ = db.BeginTx(ctx, nil)
	if _, err := tx.ExecContext(ctx, atcommit.Deferred(`INSERT INTO t VALUES ($1)`), -1); err != nil {
		t.Fatal(err)
	}
	_, err := tx.ExecContext(ctx, `INSERT INTO t VALUES (11)`)
	if !errors.Is(err, atcommit.ErrEarlierDeferred) {
		t.Fatalf("statement after a failing Deferred one: %v, want ErrEarlierDeferred", err)
	}
	tx.Rollback()

	tx, _ = db.BeginTx(ctx, nil)
	if _, err := tx.ExecContext(ctx, atcommit.Deferred(`INSERT INTO t VALUES ($1)`), 12); err != nil {
		t.Fatal(err)
	}
	if err := tx.Commit(); err != nil {
		t.Fatalf("the next transaction on the connection: %v", err)
	}
	if got := count(t, s); got != 1 {
		t.Fatalf("%d rows, want 1", got)
	}
}

// A malformed database URL is named without its password, with what to do.
func TestOpenDBBadURL(t *testing.T) {
	t.Parallel()
	_, err := atcommit.OpenDB("postgres://user:s3cret@127.0.0.1:5432/db?sslmode=nonsense")
	if err == nil {
		t.Fatal("want an error for sslmode=nonsense")
	}
	if strings.Contains(err.Error(), "s3cret") {
		t.Fatalf("the error shows the password: %v", err)
	}
	if !strings.Contains(err.Error(), "sslmode") {
		t.Fatalf("the error does not say what is wrong: %v", err)
	}
}
