// Package inboxtest runs an inbox.Handler the way the consumer applies one
// message, without a broker: in a transaction of your database that also
// records the message id (package dedupe, scoped by the consumer name), so
// a test sees what the consumer would do — apply, skip a duplicate, or
// retry a failure — and what the handler wrote.
//
//	out, err := inboxtest.Run(ctx, db, "payments", handler, inbox.Message{ID: id, Payload: body})
//	// out.Applied, out.Duplicate, out.Err
//
// The database needs the mailroom tables (mailroom.Migrate): the inbox
// table holds the recorded ids.
package inboxtest

import (
	"context"
	"fmt"

	"github.com/jmoiron/sqlx"

	"github.com/mailroom-go/mailroom"
	"github.com/mailroom-go/mailroom/dedupe"
	"github.com/mailroom-go/mailroom/inbox"
	"github.com/mailroom-go/mailroom/internal/pgerr"
)

// Outcome is what the consumer would do with the message.
type Outcome struct {
	// Applied: the handler returned nil and its transaction, with the
	// message id recorded, committed. The consumer acks.
	Applied bool
	// Duplicate: the id was already recorded for this consumer; the
	// handler was not called. The consumer acks.
	Duplicate bool
	// Err is the handler's error, its panic, or PostgreSQL's refusal of
	// the commit (a statement of the handler failed though it returned
	// nil, a deferred constraint): nothing was written. The consumer
	// retries the message, and dead-letters it after MaxAttempts.
	Err error
}

// Options are Run's settings; the zero value is the consumer's defaults.
type Options struct {
	// Tables names the inbox table as the consumer's Config does (default
	// mailroom_inbox).
	Tables mailroom.Tables
}

// Run applies m with h for consumer as the consumer does for one message:
// begin, record (consumer, m.ID), call h in that transaction (a panic
// becomes Outcome.Err), commit. m.Attempt 0 is taken as 1. The error is
// for what would stop the consumer from trying at all (the database
// unreachable, a bad message id).
func Run(ctx context.Context, db *sqlx.DB, consumer string, h inbox.Handler, m inbox.Message, opts ...Options) (Outcome, error) {
	var o Options
	if len(opts) > 0 {
		o = opts[0]
	}
	store, err := dedupe.New(dedupe.Config{Tables: o.Tables})
	if err != nil {
		return Outcome{}, err
	}
	if m.Attempt == 0 {
		m.Attempt = 1
	}
	tx, err := db.BeginTxx(ctx, nil)
	if err != nil {
		return Outcome{}, fmt.Errorf("inboxtest: begin: %w", err)
	}
	defer tx.Rollback() //nolint:errcheck // no-op after Commit
	first, err := store.Claim(ctx, tx, consumer, m.ID)
	if err != nil {
		return Outcome{}, fmt.Errorf("inboxtest: %w", err)
	}
	if !first {
		return Outcome{Duplicate: true}, nil
	}
	if err := call(ctx, tx, h, m); err != nil {
		return Outcome{Err: err}, nil
	}
	if err := tx.Commit(); err != nil {
		if pgerr.CommitRolledBack(err) || pgerr.Refused(err) {
			return Outcome{Err: fmt.Errorf("commit refused: %w", err)}, nil
		}
		return Outcome{}, fmt.Errorf("inboxtest: commit: %w", err)
	}
	return Outcome{Applied: true}, nil
}

func call(ctx context.Context, tx *sqlx.Tx, h inbox.Handler, m inbox.Message) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("handler panicked: %v", r)
		}
	}()
	return h(ctx, tx, m)
}
