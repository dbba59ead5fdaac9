// Package atcommit is a database/sql connector for lib/pq whose
// connections keep the statements marked by Deferred and send them in the
// same message as the transaction's COMMIT (or before its next statement),
// saving their round trip. outbox.Add marks its insert so: a database
// opened with OpenDB and given to the Outbox as Config.DB adds a message at
// no round trip of its own. Everything else on the database works as with
// lib/pq. Not behind PgBouncer in transaction mode (see NewConnector);
// docs/outbox.md in the repository has the detail.
package atcommit

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"encoding/hex"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/lib/pq"

	"github.com/mailroom-go/mailroom/internal/redact"
)

// Why: Add's insert costs one round trip to the database, and in a short
// business transaction (BEGIN, a statement, COMMIT) that is a quarter or
// more of the transaction. Here the connection keeps the insert and sends
// it with the COMMIT, as one simple query:
//
//	EXECUTE mailroom_add_1('0190…', 'orders', …); COMMIT
//
// The statement is prepared once per connection (its first use prepares
// it, and so finds a missing table or column at once), so the database
// neither parses nor plans it again. The transaction's statements still
// commit together or not at all: if a kept statement fails, the COMMIT is
// not run, the transaction is rolled back and Commit returns the error.

// marker is the comment Deferred puts before a statement. Elsewhere
// (another database) it is an ordinary comment.
const marker = "/* mailroom: at commit */ "

// Deferred marks query, one statement with parameters $1…$n, for a
// connection of NewConnector to keep. Executed in a transaction with k×n
// arguments, it is kept as k executions (all or none) until the
// transaction's next statement or its COMMIT, and reports k rows affected;
// outside a transaction the k executions run at once, in one message. On
// any other database the mark is a comment and query runs as it is (with
// k > 1 it then fails: too many arguments). Only Exec takes the mark, and
// query must hold no '$' but its placeholders (in a literal or comment).
func Deferred(query string) string { return marker + query }

// NewConnector wraps a lib/pq connector (pq.NewConnector, pq.NewConnectorConfig)
// so that Add of an Outbox whose Config.DB is the database opened with it,
// sql.OpenDB(atcommit.NewConnector(c)), sends its insert with the
// transaction's COMMIT instead of in a round trip of its own. Everything
// else on the database works as with c. With sqlx:
// sqlx.NewDb(sql.OpenDB(atcommit.NewConnector(c)), "postgres").
//
// What changes for the caller: an insert that fails (a constraint, a lost
// connection) makes Commit fail, with the transaction rolled back, rather
// than Add; Add still validates its messages, and the first Add on each
// connection prepares the insert, so a missing table or column fails Add
// itself. A statement of the transaction after the Add runs after the
// insert; if the insert fails, that statement returns ErrEarlierDeferred
// without running. (An inbox handler's insert that fails is charged to
// that handler: the inbox redoes a batch message by message.) A
// DEALLOCATE or DISCARD ALL on these connections fails the next
// transaction that adds a message on it (or the next Add outside a
// transaction there); the one after prepares again.
// Not behind PgBouncer in transaction mode: it does not carry an SQL
// PREPARE from one transaction to the next.
func NewConnector(c driver.Connector) driver.Connector { return &connector{c} }

// OpenDB opens the PostgreSQL database named by dsn (as for
// sql.Open("postgres", dsn)) with lib/pq through NewConnector.
func OpenDB(dsn string) (*sql.DB, error) {
	c, err := pq.NewConnector(dsn)
	if err != nil {
		return nil, fmt.Errorf("atcommit: the database URL %s: %w (a postgres:// URL or key=value list, as lib/pq takes)", redact.String(dsn), redact.Error(err, dsn))
	}
	return sql.OpenDB(NewConnector(c)), nil
}

type connector struct{ driver.Connector }

type atCommitDriver struct{ driver.Driver }

func (c *connector) Driver() driver.Driver { return atCommitDriver{c.Connector.Driver()} }

// Enabled reports whether db was opened with NewConnector.
func Enabled(db *sql.DB) bool {
	_, ok := db.Driver().(atCommitDriver)
	return ok
}

// pqConn is what a connection of lib/pq offers and conn uses.
type pqConn interface {
	driver.Conn
	driver.ConnBeginTx
	driver.ConnPrepareContext
	driver.ExecerContext
	driver.QueryerContext
	driver.NamedValueChecker
	driver.Pinger
	driver.SessionResetter
	driver.Validator
}

func (c *connector) Connect(ctx context.Context) (driver.Conn, error) {
	dc, err := c.Connector.Connect(ctx)
	if err != nil {
		return nil, err
	}
	pc, ok := dc.(pqConn)
	if !ok {
		dc.Close()
		return nil, fmt.Errorf("atcommit: NewConnector needs a lib/pq connector (pq.NewConnector); its connections are %T", dc)
	}
	return &conn{pqConn: pc, prepared: map[string]preparedStmt{}}, nil
}

// conn is a connection that keeps Add's inserts until they can travel
// with the next message to the database. database/sql uses a connection
// from one goroutine at a time.
type conn struct {
	pqConn
	inTx     bool
	pending  []string                // EXECUTE statements not yet sent, in Add order
	prepared map[string]preparedStmt // Add's statements prepared on this connection
	bad      bool                    // a failed Commit could not roll back: never reuse
	copying  int                     // COPYs in progress (their statements' copying)
}

// preparedNames numbers the statements Add prepares, process-wide: after
// one of a connection's statements was deallocated and forgotten, the
// others are still prepared there, and a new name must not collide.
var preparedNames atomic.Uint64

// preparedStmt is one of Add's statements as prepared on a connection.
type preparedStmt struct {
	name   string
	params int // placeholders ($1…$params); Add passes a multiple: one set per message
}

// ExecContext keeps Deferred statements (one execution per set of the statement's
// parameters in args, all or none) while in a transaction, and runs them
// at once (as one simple query) outside one. Any other statement first
// sends what is pending, so it runs after the inserts, as written.
func (c *conn) ExecContext(ctx context.Context, query string, args []driver.NamedValue) (driver.Result, error) {
	if strings.HasPrefix(query, marker) {
		if c.copying > 0 {
			return nil, errors.New("atcommit: Add during a COPY on this connection: finish the COPY (its statement's final Exec, or Close) first")
		}
		execs, err := c.execute(ctx, query, args)
		if err != nil {
			return nil, err
		}
		if c.inTx {
			c.pending = append(c.pending, execs...)
			return driver.RowsAffected(len(execs)), nil
		}
		res, err := c.pqConn.ExecContext(ctx, strings.Join(execs, "; "), nil)
		if err != nil {
			c.forgetIfDeallocated(err)
		}
		return res, err
	}
	if rollsBack(query) {
		// Every statement before it sent what was pending, savepoints
		// included: what is pending now came after the savepoint, and
		// this undoes it. Sending it first could only fail the rollback
		// (an insert that fails, in a transaction it would have aborted).
		// Unless the rollback did not reach the server.
		kept := c.pending
		c.pending = nil
		res, err := c.pqConn.ExecContext(ctx, query, args)
		var pqErr *pq.Error
		if err != nil && !errors.As(err, &pqErr) {
			c.pending = kept
		}
		return res, err
	}
	if err := c.flush(ctx); err != nil {
		return nil, err
	}
	return c.pqConn.ExecContext(ctx, query, args)
}

// rollsBack reports whether query is a ROLLBACK, ROLLBACK TO SAVEPOINT or
// ABORT, as a statement of its own.
func rollsBack(query string) bool {
	q := strings.TrimLeft(query, " \t\r\n")
	for _, kw := range []string{"ROLLBACK", "ABORT"} {
		if len(q) >= len(kw) && strings.EqualFold(q[:len(kw)], kw) && (len(q) == len(kw) || !isIdentByte(q[len(kw)])) {
			return !strings.Contains(strings.TrimRight(q, "; \t\r\n"), ";") // not several statements
		}
	}
	return false
}

func isIdentByte(b byte) bool {
	return b == '_' || b >= '0' && b <= '9' || b >= 'a' && b <= 'z' || b >= 'A' && b <= 'Z'
}

func (c *conn) QueryContext(ctx context.Context, query string, args []driver.NamedValue) (driver.Rows, error) {
	if err := c.flush(ctx); err != nil {
		return nil, err
	}
	return c.pqConn.QueryContext(ctx, query, args)
}

// PrepareContext sends what is pending first (preparing a COPY starts
// it), and wraps the statement so that running it does too, when it was
// prepared before the Add.
func (c *conn) PrepareContext(ctx context.Context, query string) (driver.Stmt, error) {
	if err := c.flush(ctx); err != nil {
		return nil, err
	}
	st, err := c.pqConn.PrepareContext(ctx, query)
	if err != nil {
		return nil, err
	}
	// lib/pq starts a COPY when it is prepared, and ends it at its
	// statement's final Exec (no arguments) or Close.
	_, isCopy := st.(interface {
		CopyData(context.Context, string) (driver.Result, error)
	})
	s := &stmt{Stmt: st, c: c, copying: isCopy}
	if isCopy {
		c.copying++
	}
	return s, nil
}

func (c *conn) Prepare(query string) (driver.Stmt, error) {
	return c.PrepareContext(context.Background(), query)
}

// BeginTx begins on lib/pq with a context that is never cancelled: lib/pq
// ties its own watch of ctx to its Commit, which a transaction with pending
// inserts does not call. database/sql still rolls the transaction back when
// ctx is cancelled, and each statement is cancelled by its own context.
func (c *conn) BeginTx(ctx context.Context, opts driver.TxOptions) (driver.Tx, error) {
	tx, err := c.pqConn.BeginTx(context.WithoutCancel(ctx), opts)
	if err != nil {
		return nil, err
	}
	c.inTx, c.pending = true, c.pending[:0]
	return &atCommitTx{Tx: tx, c: c}, nil
}

// ResetSession drops what a transaction database/sql gave up on left.
func (c *conn) ResetSession(ctx context.Context) error {
	if c.bad {
		return driver.ErrBadConn
	}
	c.inTx, c.pending = false, c.pending[:0]
	return c.pqConn.ResetSession(ctx)
}

// IsValid is false once a failed Commit left the connection in a
// transaction, or in a state not known: database/sql then closes it.
func (c *conn) IsValid() bool { return !c.bad && c.pqConn.IsValid() }

func (c *conn) Begin() (driver.Tx, error) {
	return c.BeginTx(context.Background(), driver.TxOptions{})
}

// execute returns the EXECUTE statements that run Add's query once for
// each set of its parameters in args, with the values as literals,
// preparing the query on this connection the first time.
func (c *conn) execute(ctx context.Context, query string, args []driver.NamedValue) ([]string, error) {
	st, ok := c.prepared[query]
	if !ok {
		st = preparedStmt{name: "mailroom_add_" + strconv.FormatUint(preparedNames.Add(1), 10), params: placeholders(query)}
		if _, err := c.pqConn.ExecContext(ctx, "PREPARE "+st.name+" AS "+query, nil); err != nil {
			return nil, err
		}
		c.prepared[query] = st
	}
	if st.params == 0 || len(args)%st.params != 0 {
		return nil, fmt.Errorf("atcommit: %d arguments for a statement with %d parameters per message", len(args), st.params)
	}
	var execs []string
	for len(args) > 0 {
		var b strings.Builder
		b.WriteString("EXECUTE " + st.name + "(")
		for i, a := range args[:st.params] {
			if i > 0 {
				b.WriteString(", ")
			}
			if err := writeLiteral(&b, a.Value); err != nil {
				return nil, fmt.Errorf("atcommit: argument %d: %w", a.Ordinal, err)
			}
		}
		b.WriteString(")")
		execs = append(execs, b.String())
		args = args[st.params:]
	}
	return execs, nil
}

// placeholders is the highest $n in query (see Deferred: no other '$').
func placeholders(query string) int {
	most := 0
	for i := 0; i < len(query); i++ {
		if query[i] != '$' {
			continue
		}
		n := 0
		for i+1 < len(query) && query[i+1] >= '0' && query[i+1] <= '9' {
			i++
			n = n*10 + int(query[i]-'0')
		}
		most = max(most, n)
	}
	return most
}

// writeLiteral writes v, a value database/sql passes to the driver, as an
// SQL literal: the prepared statement's parameter gives it its type.
func writeLiteral(b *strings.Builder, v driver.Value) error {
	switch v := v.(type) {
	case nil:
		b.WriteString("NULL")
	case string:
		b.WriteString(pq.QuoteLiteral(v))
	case []byte:
		b.WriteString(`E'\\x` + hex.EncodeToString(v) + `'`)
	case time.Time:
		b.WriteString(timeLiteral(v))
	case int64:
		b.WriteString(strconv.FormatInt(v, 10))
	case bool:
		b.WriteString(strconv.FormatBool(v))
	default:
		return fmt.Errorf("%T is not a type Add sends", v)
	}
	return nil
}

// ErrEarlierDeferred is wrapped by the error of a statement before which a
// connection of NewConnector sent the Deferred statements (an outbox Add's
// insert) kept in its transaction, and one failed: the statement did not
// run, and the transaction is aborted. (The inbox redoes a batch one
// message at a time on it, to find whose handler added the message.)
var ErrEarlierDeferred = errors.New("atcommit: the insert of an earlier Add in this transaction failed")

// flush sends the pending inserts on their own, before another statement of
// the transaction.
//
// When lib/pq refuses to send them (a query's rows or a COPY still open on
// the connection) or the connection is lost, they stay pending: the
// statement fails as it would have without them, and Commit can still only
// succeed with them. When the transaction had already failed before them
// (25P02), the statement runs as it would have: it fails too, unless it is
// a ROLLBACK [TO SAVEPOINT], which undoes them anyway.
func (c *conn) flush(ctx context.Context) error {
	if len(c.pending) == 0 {
		return nil
	}
	q := c.takePending("")
	_, err := c.pqConn.ExecContext(ctx, q, nil)
	var pqErr *pq.Error
	switch {
	case err == nil:
		return nil
	case !errors.As(err, &pqErr):
		c.pending = append(c.pending, q)
		return err
	case pqErr.Code == "25P02": // in_failed_sql_transaction
		return nil
	}
	c.forgetIfDeallocated(err)
	return fmt.Errorf("%w (this statement did not run): %w", ErrEarlierDeferred, err)
}

// takePending returns the pending inserts as one simple query, followed by
// then, and empties the list.
func (c *conn) takePending(then string) string {
	q := strings.Join(c.pending, "; ") + then
	c.pending = c.pending[:0]
	return q
}

// forgetIfDeallocated forgets this connection's prepared inserts when err
// says one is gone (DEALLOCATE, DISCARD ALL): that transaction fails, the
// next Add prepares again.
func (c *conn) forgetIfDeallocated(err error) {
	var pqErr *pq.Error
	if errors.As(err, &pqErr) && pqErr.Code == "26000" { // invalid_sql_statement_name
		clear(c.prepared)
	}
}

type atCommitTx struct {
	driver.Tx
	c *conn
}

// Commit sends the pending inserts and the COMMIT as one message. When an
// insert fails PostgreSQL skips the COMMIT; the transaction is then rolled
// back here and Commit returns the insert's error.
func (t *atCommitTx) Commit() error {
	c := t.c
	c.inTx = false
	if len(c.pending) == 0 {
		return t.Tx.Commit()
	}
	ctx := context.Background()
	_, err := c.pqConn.ExecContext(ctx, c.takePending("; COMMIT"), nil)
	if err == nil {
		return nil
	}
	c.forgetIfDeallocated(err)
	// Ends the transaction if an insert failed; after a failed COMMIT
	// there is none, and PostgreSQL only warns. If even the ROLLBACK
	// fails (a lost connection), the connection may still be in the
	// transaction: it is closed, which rolls it back.
	if _, rbErr := c.pqConn.ExecContext(ctx, "ROLLBACK", nil); rbErr != nil {
		c.bad = true
		var pqErr *pq.Error
		if !errors.As(err, &pqErr) && !c.pqConn.IsValid() {
			return fmt.Errorf("atcommit: commit with the inserts of Add: the connection failed, so whether the transaction committed is unknown: %w", errors.Join(err, rbErr))
		}
		return fmt.Errorf("atcommit: commit with the inserts of Add failed, and so did the rollback; the connection is closed, which rolls the transaction back: %w", errors.Join(err, rbErr))
	}
	var pqErr *pq.Error
	if errors.As(err, &pqErr) && pqErr.Code == "25P02" { // an earlier statement failed
		return pq.ErrInFailedTransaction
	}
	return fmt.Errorf("atcommit: commit with the inserts of Add (the transaction was rolled back): %w", err)
}

func (t *atCommitTx) Rollback() error {
	t.c.inTx, t.c.pending = false, t.c.pending[:0]
	return t.Tx.Rollback()
}

// stmt is a statement prepared on a conn: it sends the conn's pending
// inserts before it runs.
type stmt struct {
	driver.Stmt
	c       *conn
	copying bool // a COPY in progress, counted in c.copying
}

// copyEnded notes that the statement's COPY is over.
func (s *stmt) copyEnded() {
	if s.copying {
		s.copying = false
		s.c.copying--
	}
}

func (s *stmt) Close() error {
	s.copyEnded()
	return s.Stmt.Close()
}

func (s *stmt) ExecContext(ctx context.Context, args []driver.NamedValue) (driver.Result, error) {
	if err := s.c.flush(ctx); err != nil {
		return nil, err
	}
	if st, ok := s.Stmt.(driver.StmtExecContext); ok {
		return st.ExecContext(ctx, args)
	}
	if len(args) == 0 {
		defer s.copyEnded() // a COPY's final Exec ends it, whatever it returns
	}
	return s.Stmt.Exec(plain(args)) //nolint:staticcheck // lib/pq's COPY statement has only Exec
}

func (s *stmt) QueryContext(ctx context.Context, args []driver.NamedValue) (driver.Rows, error) {
	if err := s.c.flush(ctx); err != nil {
		return nil, err
	}
	if st, ok := s.Stmt.(driver.StmtQueryContext); ok {
		return st.QueryContext(ctx, args)
	}
	return s.Stmt.Query(plain(args)) //nolint:staticcheck // as above
}

func plain(args []driver.NamedValue) []driver.Value {
	vs := make([]driver.Value, len(args))
	for i, a := range args {
		vs[i] = a.Value
	}
	return vs
}

// timeLiteral is t as an SQL literal, as lib/pq sends a time parameter
// (outbox has the same, for its own literals).
func timeLiteral(t time.Time) string { return "'" + string(pq.FormatTimestamp(t)) + "'" }
