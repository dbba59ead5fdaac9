package outbox_test

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/jmoiron/sqlx"
	"github.com/lib/pq"

	"github.com/mailroom-go/mailroom/atcommit"
	"github.com/mailroom-go/mailroom/internal/locks"
	"github.com/mailroom-go/mailroom/internal/testenv"
	"github.com/mailroom-go/mailroom/internal/wakeup"
	"github.com/mailroom-go/mailroom/outbox"
)

// atCommitEnv returns a new schema whose outbox refuses messages of type
// "bad" (a CHECK: an insert that fails in the database, after Add's own
// checks), its database opened through atcommit.OpenDB with
// application_name app (when not empty) and at most conns connections
// (0: no limit), and an Outbox on that database.
func atCommitEnv(t *testing.T, app string, conns int) (*testenv.Schema, *sqlx.DB, *outbox.Outbox) {
	t.Helper()
	s := testenv.NewSchema(t)
	s.DB.MustExec(`ALTER TABLE mailroom_outbox ADD CONSTRAINT no_bad_type CHECK (type <> 'bad')`)
	db := atCommitDB(t, s, app)
	db.SetMaxOpenConns(conns)
	return s, db, newOutbox(t, outbox.Config{DB: db.DB})
}

// preparedTx returns atCommitEnv's schema and Outbox on a database of one
// connection where the insert is already prepared (by a first Add, of
// msg(0)), and a transaction open on it, rolled back when the test ends
// unless committed: an Add in it talks to nothing until the next
// statement.
func preparedTx(t *testing.T) (*testenv.Schema, *outbox.Outbox, *sqlx.Tx) {
	t.Helper()
	s, db, ob := atCommitEnv(t, "", 1)
	if err := addInTx(db, ob, msg(0)); err != nil {
		t.Fatal(err)
	}
	tx := db.MustBeginTx(context.Background(), nil)
	t.Cleanup(func() { tx.Rollback() })
	return s, ob, tx
}

// addInTx adds msgs in a transaction of db of their own and commits it.
func addInTx(db *sqlx.DB, ob *outbox.Outbox, msgs ...outbox.Message) error {
	ctx := context.Background()
	tx, err := db.BeginTxx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	if err := ob.Add(ctx, tx, msgs...); err != nil {
		return err
	}
	return tx.Commit()
}

// payloads returns the outbox's payloads in seq order, from the offset-th.
func payloads(t *testing.T, s *testenv.Schema, offset int) string {
	t.Helper()
	var ps []string
	if err := s.DB.Select(&ps, `SELECT convert_from(payload, 'UTF8') FROM mailroom_outbox ORDER BY seq OFFSET $1`, offset); err != nil {
		t.Fatal(err)
	}
	return strings.Join(ps, " ")
}

// atCommitDB opens the schema's database through atcommit.OpenDB, with
// application_name app when it is not empty.
func atCommitDB(t *testing.T, s *testenv.Schema, app string) *sqlx.DB {
	t.Helper()
	u := s.URL
	if app != "" {
		u = testenv.WithAppName(u, app)
	}
	db, err := atcommit.OpenDB(u)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	return sqlx.NewDb(db, "postgres")
}

// An insert Add leaves to the COMMIT fails with the COMMIT: Add returns
// nil, Commit returns the insert's error, and the business change is rolled
// back with it. The connection is then as good as new.
func TestAtCommitInsertFailsWithTheCommit(t *testing.T) {
	t.Parallel()
	s, db, ob := atCommitEnv(t, "", 1) // every transaction below reuses one connection
	s.DB.MustExec(`CREATE TABLE orders (id int PRIMARY KEY)`)
	ctx := context.Background()

	tx := db.MustBeginTx(ctx, nil)
	tx.MustExec(`INSERT INTO orders VALUES (1)`)
	bad := msg(1)
	bad.Type = "bad"
	if err := ob.Add(ctx, tx, bad); err != nil {
		t.Fatalf("Add sent its insert at once: %v", err)
	}
	err := tx.Commit()
	var pqErr *pq.Error
	if !errors.As(err, &pqErr) || pqErr.Code != "23514" || !strings.Contains(err.Error(), "rolled back") {
		t.Fatalf("Commit with a failing insert: %v; want the check violation, saying the transaction was rolled back", err)
	}
	var orders int
	if err := s.DB.Get(&orders, `SELECT count(*) FROM orders`); err != nil || orders != 0 || count(t, s) != 0 {
		t.Fatalf("after the failed commit: %d orders (%v), %d outbox rows; want none", orders, err, count(t, s))
	}

	tx = db.MustBeginTx(ctx, nil)
	tx.MustExec(`INSERT INTO orders VALUES (1)`)
	if err := ob.Add(ctx, tx, msg(2)); err != nil {
		t.Fatal(err)
	}
	if err := tx.Commit(); err != nil {
		t.Fatalf("the next transaction on the connection: %v", err)
	}
	if err := s.DB.Get(&orders, `SELECT count(*) FROM orders`); err != nil || orders != 1 || count(t, s) != 1 {
		t.Fatalf("after the good commit: %d orders (%v), %d outbox rows; want 1 and 1", orders, err, count(t, s))
	}
}

// When the COMMIT itself fails (a deferred constraint), after the insert
// succeeded in the same message, nothing is written either.
func TestAtCommitFailingCommit(t *testing.T) {
	t.Parallel()
	s, db, ob := atCommitEnv(t, "", 1)
	s.DB.MustExec(`CREATE TABLE customers (id int PRIMARY KEY);
		CREATE TABLE orders (id int PRIMARY KEY, customer int REFERENCES customers DEFERRABLE INITIALLY DEFERRED)`)
	ctx := context.Background()
	tx := db.MustBeginTx(ctx, nil)
	tx.MustExec(`INSERT INTO orders VALUES (1, 42)`) // no customer 42: fails at COMMIT
	if err := ob.Add(ctx, tx, msg(1)); err != nil {
		t.Fatal(err)
	}
	err := tx.Commit()
	var pqErr *pq.Error
	if !errors.As(err, &pqErr) || pqErr.Code != "23503" {
		t.Fatalf("Commit: %v; want the foreign key violation", err)
	}
	if n := count(t, s); n != 0 {
		t.Fatalf("%d outbox rows after the failed commit, want 0", n)
	}
	var inTx bool // the connection is out of the failed transaction
	if err := db.Get(&inTx, `SELECT now() <> statement_timestamp()`); err != nil || inTx {
		t.Fatalf("after the failed commit the connection is still in a transaction (%v)", err)
	}
}

// Any other statement of the transaction, prepared before the Add or not,
// runs after the inserts Add left pending, as written: it sees the rows. A
// failing insert then fails that statement.
func TestAtCommitStatementsAfterAddSeeItsRows(t *testing.T) {
	t.Parallel()
	s, db, ob := atCommitEnv(t, "", 0)
	ctx := context.Background()
	tx := db.MustBeginTx(ctx, nil)
	defer tx.Rollback()
	st, err := tx.Preparex(`SELECT count(*) FROM mailroom_outbox`)
	if err != nil {
		t.Fatal(err)
	}
	for i, run := range []func() (int, error){
		func() (n int, err error) { return n, tx.Get(&n, `SELECT count(*) FROM mailroom_outbox`) },
		func() (n int, err error) { return n, st.Get(&n) },
		func() (n int, err error) {
			res, err := tx.Exec(`UPDATE mailroom_outbox SET attempts = attempts`)
			if err != nil {
				return 0, err
			}
			m, err := res.RowsAffected()
			return int(m), err
		},
	} {
		if err := ob.Add(ctx, tx, msg(i)); err != nil {
			t.Fatal(err)
		}
		if n, err := run(); err != nil || n != i+1 {
			t.Fatalf("statement %d after Add: %d rows, %v; want %d", i, n, err, i+1)
		}
	}
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}

	tx = db.MustBeginTx(ctx, nil)
	defer tx.Rollback()
	bad := msg(9)
	bad.Type = "bad"
	if err := ob.Add(ctx, tx, bad); err != nil {
		t.Fatal(err)
	}
	var n int
	err = tx.Get(&n, `SELECT 1`)
	if err == nil || !strings.Contains(err.Error(), "earlier Add") || !strings.Contains(err.Error(), "no_bad_type") {
		t.Fatalf("the statement after a failing insert: %v; want the insert's error", err)
	}
	if err := tx.Commit(); !errors.Is(err, pq.ErrInFailedTransaction) {
		t.Fatalf("Commit of the failed transaction: %v, want pq.ErrInFailedTransaction", err)
	}
	if n := count(t, s); n != 3 {
		t.Fatalf("%d rows, want the first transaction's 3", n)
	}
}

// Rollback drops what Add left pending; a statement that failed before the
// Add makes Commit fail as lib/pq's own Commit does; several messages, in
// one Add or several, are all written, in order.
func TestAtCommitRollbackAndOrder(t *testing.T) {
	t.Parallel()
	s, db, ob := atCommitEnv(t, "", 1)
	ctx := context.Background()

	tx := db.MustBeginTx(ctx, nil)
	if err := ob.Add(ctx, tx, msg(1), msg(2)); err != nil {
		t.Fatal(err)
	}
	if err := tx.Rollback(); err != nil {
		t.Fatal(err)
	}

	tx = db.MustBeginTx(ctx, nil)
	if _, err := tx.Exec(`SELECT 1/0`); err == nil {
		t.Fatal("1/0 did not fail")
	}
	if err := ob.Add(ctx, tx, msg(3)); err != nil {
		t.Fatal(err)
	}
	if err := tx.Commit(); !errors.Is(err, pq.ErrInFailedTransaction) {
		t.Fatalf("Commit after a failed statement: %v, want pq.ErrInFailedTransaction", err)
	}
	if n := count(t, s); n != 0 {
		t.Fatalf("%d rows after a rollback and a failed transaction, want 0", n)
	}

	tx = db.MustBeginTx(ctx, nil)
	for _, m := range [][]outbox.Message{{msg(4)}, {msg(5), msg(6), msg(7)}, {msg(8)}} {
		if err := ob.Add(ctx, tx, m...); err != nil {
			t.Fatal(err)
		}
	}
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}
	if got := payloads(t, s, 0); got != `{"n":4} {"n":5} {"n":6} {"n":7} {"n":8}` {
		t.Fatalf("rows in seq order: %s", got)
	}
}

// Outside a transaction Add writes at once, through the database itself or
// one of its connections; several messages then go in one statement, all
// or nothing.
func TestAtCommitWithoutTransaction(t *testing.T) {
	t.Parallel()
	s, db, ob := atCommitEnv(t, "", 0)
	ctx := context.Background()
	if err := ob.Add(ctx, db.DB, msg(1)); err != nil {
		t.Fatal(err)
	}
	if n := count(t, s); n != 1 {
		t.Fatalf("%d rows after Add on the database, want 1", n)
	}
	conn, err := db.Conn(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	bad := msg(3)
	bad.Type = "bad"
	if err := ob.Add(ctx, conn, msg(2), bad); err == nil || !strings.Contains(err.Error(), "no_bad_type") {
		t.Fatalf("Add of a message the table refuses: %v", err)
	}
	if err := ob.Add(ctx, conn, msg(2), msg(3)); err != nil {
		t.Fatal(err)
	}
	if n := count(t, s); n != 3 {
		t.Fatalf("%d rows, want 3 (none of the failed Add)", n)
	}
}

// A transaction of another database than Config.DB (opened by OpenDB)
// writes one message as a plain statement; several get an error that says
// what is wrong, and nothing is written.
func TestAtCommitOnAnotherDatabase(t *testing.T) {
	t.Parallel()
	s, _, ob := atCommitEnv(t, "", 0)
	ctx := context.Background()
	tx := s.DB.MustBeginTx(ctx, nil) // the plain database
	defer tx.Rollback()
	if err := ob.Add(ctx, tx, msg(1)); err != nil {
		t.Fatalf("one message: %v", err)
	}
	err := ob.Add(ctx, tx, msg(2), msg(3))
	if err == nil || !strings.Contains(err.Error(), "Config.DB is not the database of this transaction") {
		t.Fatalf("two messages: %v", err)
	}
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}
	if got := payloads(t, s, 0); got != `{"n":1}` {
		t.Fatalf("rows: %s", got)
	}
}

// The insert the COMMIT carries takes the wake lock like any other: while a
// relay sleeps, the commit notifies it.
func TestAtCommitNotifiesASleepingRelay(t *testing.T) {
	t.Parallel()
	s, db, ob := atCommitEnv(t, "", 0)
	ctx := context.Background()
	oid := outboxOID(t, s)
	l := pq.NewListener(s.URL, 10*time.Millisecond, time.Second, nil)
	defer l.Close()
	if err := l.Listen(wakeup.Channel(oid)); err != nil {
		t.Fatal(err)
	}
	relay, err := s.DB.Conn(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer relay.Close()
	if _, err := relay.ExecContext(ctx, `SELECT pg_advisory_lock($1, $2)`, locks.Wake, int32(oid)); err != nil {
		t.Fatal(err)
	}
	if err := addInTx(db, ob, msg(1)); err != nil {
		t.Fatal(err)
	}
	select {
	case n := <-l.Notify:
		if n == nil {
			t.Fatal("listener reconnected; the notification may be lost")
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the commit did not notify the sleeping relay within 30s")
	}
	var notified bool
	if err := s.DB.Get(&notified, `SELECT notified FROM mailroom_outbox`); err != nil || !notified {
		t.Fatalf("notified = %v (%v), want true", notified, err)
	}
}

// A connection that drops between Add and Commit makes Commit fail and
// writes nothing; the pool replaces the connection.
func TestAtCommitConnectionDropped(t *testing.T) {
	t.Parallel()
	app := testenv.Unique("atcommit")
	s, db, ob := atCommitEnv(t, app, 0)
	ctx := context.Background()
	tx := db.MustBeginTx(ctx, nil)
	if err := ob.Add(ctx, tx, msg(1)); err != nil {
		t.Fatal(err)
	}
	if n := testenv.TerminateBackends(t, app); n != 1 {
		t.Fatalf("terminated %d sessions, want 1", n)
	}
	if err := tx.Commit(); err == nil {
		t.Fatal("Commit on a dropped connection succeeded")
	}
	if n := count(t, s); n != 0 {
		t.Fatalf("%d rows, want 0", n)
	}
	if err := addInTx(db, ob, msg(2)); err != nil {
		t.Fatalf("a transaction on a new connection: %v", err)
	}
	if n := count(t, s); n != 1 {
		t.Fatalf("%d rows, want 1", n)
	}
}

// A cancelled transaction context rolls back, pending inserts included.
func TestAtCommitCancelledContext(t *testing.T) {
	t.Parallel()
	s, db, ob := atCommitEnv(t, "", 1)
	ctx, cancel := context.WithCancel(context.Background())
	tx, err := db.BeginTxx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := ob.Add(ctx, tx, msg(1)); err != nil {
		t.Fatal(err)
	}
	cancel()
	if err := tx.Commit(); err == nil {
		t.Fatal("Commit after the context was cancelled succeeded")
	}
	if n := count(t, s); n != 0 {
		t.Fatalf("%d rows, want 0", n)
	}
	if err := addInTx(db, ob, msg(2)); err != nil { // the one connection is usable
		t.Fatal(err)
	}
	if n := count(t, s); n != 1 {
		t.Fatalf("%d rows, want 1", n)
	}
}

// COPY (pq.CopyIn) works through the connector's statements, after an Add
// in the same transaction too.
func TestAtCommitCopyIn(t *testing.T) {
	t.Parallel()
	s, db, ob := atCommitEnv(t, "", 0)
	copyIn(t, &testenv.Schema{Name: s.Name, URL: s.URL, DB: db})
	if n := count(t, s); n != 2 {
		t.Fatalf("%d rows, want 2", n)
	}
	ctx := context.Background()
	tx := db.MustBeginTx(ctx, nil)
	defer tx.Rollback()
	if err := ob.Add(ctx, tx, msg(1)); err != nil {
		t.Fatal(err)
	}
	st, err := tx.Prepare(pq.CopyIn("mailroom_outbox", "id", "exchange", "routing_key", "payload"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := st.Exec(outbox.NewID(), "x", "k", []byte(`{"n":2}`)); err != nil {
		t.Fatal(err)
	}
	if _, err := st.Exec(); err != nil {
		t.Fatal(err)
	}
	st.Close()
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}
	if got := payloads(t, s, 2); got != `{"n":1} {"n":2}` {
		t.Fatalf("Add then COPY in one transaction: %s", got)
	}
}

// A DEALLOCATE on a connection fails the next transaction that adds a
// message there, with nothing written; the one after prepares again.
func TestAtCommitAfterDeallocate(t *testing.T) {
	t.Parallel()
	s, db, ob := atCommitEnv(t, "", 1)
	if err := addInTx(db, ob, msg(1)); err != nil {
		t.Fatal(err)
	}
	db.MustExec(`DEALLOCATE ALL`)
	var pqErr *pq.Error
	if err := addInTx(db, ob, msg(2)); !errors.As(err, &pqErr) || pqErr.Code != "26000" {
		t.Fatalf("the transaction after DEALLOCATE: %v, want prepared statement does not exist", err)
	}
	if err := addInTx(db, ob, msg(3)); err != nil {
		t.Fatalf("the next transaction: %v", err)
	}
	if got := payloads(t, s, 0); got != `{"n":1} {"n":3}` {
		t.Fatalf("rows: %s", got)
	}
}

// A DEALLOCATE of one of a connection's statements (here the one of the
// first of two outboxes) fails that outbox's next transaction there; both
// outboxes then add again on that connection.
func TestAtCommitAfterDeallocateOfOne(t *testing.T) {
	t.Parallel()
	s, db, first := atCommitEnv(t, "", 1)
	s.DB.MustExec(`CREATE TABLE second_outbox (LIKE mailroom_outbox INCLUDING ALL)`)
	second := newOutbox(t, outbox.Config{DB: db.DB, Table: "second_outbox"})
	var name string
	for _, ob := range []*outbox.Outbox{first, second} {
		if err := addInTx(db, ob, msg(1)); err != nil {
			t.Fatal(err)
		}
		if name == "" {
			db.Get(&name, `SELECT name FROM pg_prepared_statements WHERE statement LIKE '%mailroom_outbox%' AND name LIKE 'mailroom_add_%'`)
		}
	}
	if name == "" {
		t.Fatal("the first outbox's statement is not in pg_prepared_statements")
	}
	db.MustExec(`DEALLOCATE ` + name)
	var pqErr *pq.Error
	if err := addInTx(db, first, msg(2)); !errors.As(err, &pqErr) || pqErr.Code != "26000" {
		t.Fatalf("the transaction after DEALLOCATE: %v, want prepared statement does not exist", err)
	}
	for _, ob := range []*outbox.Outbox{first, second, first, second} {
		if err := addInTx(db, ob, msg(3)); err != nil {
			t.Fatalf("a transaction after that: %v", err)
		}
	}
	var firstRows, secondRows int
	if err := s.DB.QueryRow(`SELECT (SELECT count(*) FROM mailroom_outbox), (SELECT count(*) FROM second_outbox)`).Scan(&firstRows, &secondRows); err != nil {
		t.Fatal(err)
	}
	if firstRows != 3 || secondRows != 3 {
		t.Fatalf("rows in the two outboxes: %d and %d, want 3 and 3", firstRows, secondRows)
	}
}

// NewConnector names what it needs when given another driver's connector.
func TestAtCommitNeedsLibPQ(t *testing.T) {
	t.Parallel()
	db := sql.OpenDB(atcommit.NewConnector(otherConnector{}))
	defer db.Close()
	err := db.Ping()
	if err == nil || !strings.Contains(err.Error(), "needs a lib/pq connector") {
		t.Fatalf("Ping through another driver: %v", err)
	}
}

// otherConnector stands for a driver that is not lib/pq.
type otherConnector struct{}

func (otherConnector) Connect(context.Context) (driver.Conn, error) { return otherConn{}, nil }
func (otherConnector) Driver() driver.Driver                        { return nil }

type otherConn struct{}

func (otherConn) Prepare(string) (driver.Stmt, error) { return nil, errors.New("not implemented") }
func (otherConn) Close() error                        { return nil }
func (otherConn) Begin() (driver.Tx, error)           { return nil, errors.New("not implemented") }

// A statement lib/pq refuses to send while a query's rows are still open
// leaves the pending insert pending: it fails as it would without the
// Add, and the insert still commits with the transaction.
func TestAtCommitStatementWhileRowsOpen(t *testing.T) {
	t.Parallel()
	s, ob, tx := preparedTx(t)
	s.DB.MustExec(`CREATE TABLE orders (id int PRIMARY KEY)`)
	ctx := context.Background()
	rows, err := tx.Query(`SELECT generate_series(1, 3)`)
	if err != nil {
		t.Fatal(err)
	}
	rows.Next()
	if err := ob.Add(ctx, tx, msg(1)); err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(`INSERT INTO orders VALUES (1)`); err == nil || errors.Is(err, atcommit.ErrEarlierDeferred) {
		t.Fatalf("a statement while rows are open: %v, want lib/pq's query in progress", err)
	}
	rows.Close()
	if _, err := tx.Exec(`INSERT INTO orders VALUES (1)`); err != nil {
		t.Fatal(err)
	}
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}
	if got := payloads(t, s, 1); got != `{"n":1}` {
		t.Fatalf("outbox rows: %q, want the Add's", got)
	}
}

// In a transaction that already failed, an Add is undone by a ROLLBACK TO
// SAVEPOINT like any statement after the savepoint, and the ROLLBACK TO
// SAVEPOINT itself runs.
func TestAtCommitRollbackToSavepointAfterFailure(t *testing.T) {
	t.Parallel()
	s, ob, tx := preparedTx(t)
	ctx := context.Background()
	tx.MustExec(`SAVEPOINT a`)
	if _, err := tx.Exec(`SELECT 1/0`); err == nil {
		t.Fatal("division by zero succeeded")
	}
	if err := ob.Add(ctx, tx, msg(1)); err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(`ROLLBACK TO SAVEPOINT a`); err != nil {
		t.Fatalf("ROLLBACK TO SAVEPOINT after a failure and an Add: %v", err)
	}
	if err := ob.Add(ctx, tx, msg(2)); err != nil {
		t.Fatal(err)
	}
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}
	if got := payloads(t, s, 1); got != `{"n":2}` {
		t.Fatalf("outbox rows: %q, want only the Add after the savepoint's rollback", got)
	}
}

// After DISCARD ALL, Add outside a transaction fails once on that
// connection and prepares again the next time.
func TestAtCommitWithoutTransactionAfterDiscard(t *testing.T) {
	t.Parallel()
	s, db, ob := atCommitEnv(t, "", 1)
	ctx := context.Background()
	if err := ob.Add(ctx, db, msg(1)); err != nil {
		t.Fatal(err)
	}
	db.MustExec(`DISCARD ALL`)
	var pqErr *pq.Error
	if err := ob.Add(ctx, db, msg(2)); !errors.As(err, &pqErr) || pqErr.Code != "26000" {
		t.Fatalf("Add after DISCARD ALL: %v, want prepared statement does not exist", err)
	}
	if err := ob.Add(ctx, db, msg(3)); err != nil {
		t.Fatalf("the next Add: %v", err)
	}
	if got := payloads(t, s, 0); got != `{"n":1} {"n":3}` {
		t.Fatalf("rows: %s", got)
	}
}

// A ROLLBACK TO SAVEPOINT drops the inserts of the Adds after the
// savepoint without sending them, so one that would fail cannot fail the
// rollback; RELEASE SAVEPOINT sends them.
func TestAtCommitRollbackToSavepointDropsPending(t *testing.T) {
	t.Parallel()
	s, ob, tx := preparedTx(t)
	ctx := context.Background()
	for _, rollback := range []string{`ROLLBACK TO SAVEPOINT a`, " \n rollback to a ;"} {
		tx.MustExec(`SAVEPOINT a`)
		bad := msg(1)
		bad.Type = "bad"
		if err := ob.Add(ctx, tx, bad); err != nil {
			t.Fatal(err)
		}
		if _, err := tx.Exec(rollback); err != nil {
			t.Fatalf("%q after an Add whose insert would fail: %v", rollback, err)
		}
	}
	tx.MustExec(`SAVEPOINT b`)
	if err := ob.Add(ctx, tx, msg(2)); err != nil {
		t.Fatal(err)
	}
	tx.MustExec(`RELEASE SAVEPOINT b`)
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}
	if got := payloads(t, s, 1); got != `{"n":2}` {
		t.Fatalf("outbox rows: %q, want only the Add kept by RELEASE", got)
	}
}

// A ROLLBACK TO SAVEPOINT that lib/pq refuses to send (a query's rows
// still open) undoes nothing, so the Adds before it stay pending and
// commit with the transaction.
func TestAtCommitRollbackNotSentKeepsPending(t *testing.T) {
	t.Parallel()
	s, ob, tx := preparedTx(t)
	ctx := context.Background()
	tx.MustExec(`SAVEPOINT a`)
	rows, err := tx.Query(`SELECT generate_series(1, 3)`)
	if err != nil {
		t.Fatal(err)
	}
	rows.Next()
	if err := ob.Add(ctx, tx, msg(1)); err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(`ROLLBACK TO SAVEPOINT a`); err == nil {
		t.Fatal("ROLLBACK TO SAVEPOINT with rows open succeeded")
	}
	rows.Close()
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}
	if got := payloads(t, s, 1); got != `{"n":1}` {
		t.Fatalf("outbox rows: %q, want the Add the refused rollback did not undo", got)
	}
}

// Add during a COPY on the same connection fails at once, naming the COPY:
// its insert could be sent neither before the COPY ends nor by the COPY's
// statements. After the COPY, Add works.
func TestAtCommitAddDuringCopy(t *testing.T) {
	t.Parallel()
	s, db, ob := atCommitEnv(t, "", 0)
	ctx := context.Background()
	tx := db.MustBeginTx(ctx, nil)
	defer tx.Rollback()
	st, err := tx.Prepare(pq.CopyIn("mailroom_outbox", "id", "exchange", "routing_key", "payload"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := st.Exec(outbox.NewID(), "x", "k", []byte(`{"n":1}`)); err != nil {
		t.Fatal(err)
	}
	if err := ob.Add(ctx, tx, msg(2)); err == nil || !strings.Contains(err.Error(), "during a COPY") {
		t.Fatalf("Add during a COPY: %v, want an error naming the COPY", err)
	}
	if _, err := st.Exec(); err != nil {
		t.Fatal(err)
	}
	if err := ob.Add(ctx, tx, msg(3)); err != nil { // the COPY is over, its statement not yet closed
		t.Fatalf("Add after the COPY: %v", err)
	}
	st.Close()
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}
	if got := payloads(t, s, 0); got != `{"n":1} {"n":3}` {
		t.Fatalf("outbox rows: %q", got)
	}
}
