// Package pgxtx lets outbox.Add write through a native pgx transaction
// (pgx.Tx, as pgxpool hands out), for services that do not go through
// database/sql. Only this package imports pgx: users of lib/pq do not
// build it.
//
//	tx, err := pool.Begin(ctx)
//	…
//	err = ob.Add(ctx, pgxtx.Wrap(tx), outbox.Message{…})
//	err = tx.Commit(ctx)
//
// Leave outbox.Config.DB nil for such an Outbox (it names a *sql.DB); Add
// then sends each call as one statement with its values as literals.
// Through database/sql, pgx's stdlib driver needs no adapter.
package pgxtx

import (
	"context"
	"database/sql"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/mailroom-go/mailroom/outbox"
)

// Tx is what Wrap needs of a transaction: pgx.Tx and *pgxpool.Tx have it
// (and so do *pgx.Conn and *pgxpool.Pool, outside a transaction).
type Tx interface {
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
}

// Wrap returns tx as the outbox.Execer that Add takes.
func Wrap(tx Tx) outbox.Execer { return execer{tx} }

type execer struct{ tx Tx }

func (e execer) ExecContext(ctx context.Context, query string, args ...any) (sql.Result, error) {
	tag, err := e.tx.Exec(ctx, query, args...)
	if err != nil {
		return nil, err
	}
	return result(tag.RowsAffected()), nil
}

type result int64

func (r result) LastInsertId() (int64, error) { return 0, nil }
func (r result) RowsAffected() (int64, error) { return int64(r), nil }
