package inbox

import (
	"context"
	"errors"
	"fmt"
	"runtime/debug"
	"time"

	"github.com/jmoiron/sqlx"
	amqp "github.com/rabbitmq/amqp091-go"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"

	"github.com/mailroom-go/mailroom/atcommit"
	"github.com/mailroom-go/mailroom/internal/pgerr"
)

// The transactions of a worker: a message or a batch of them, deduplicated
// and handled in one transaction, and what to do when one fails.

// errUnknown marks a commit whose outcome is unknown: the connection failed
// during COMMIT. (An error reply from the server means it rolled back.)
var errUnknown = errors.New("commit outcome unknown; the redelivery will be deduplicated")

// apply runs one message in its own transaction. dup reports a duplicate;
// herr is the handler's failure (including a commit the server refused,
// e.g. a deferred constraint); ierr a database failure: before the commit
// (nothing was applied), or wrapping errUnknown.
func (s *worker) apply(m Message) (dup bool, herr, ierr error) {
	c := s.c
	ctx, span := c.startProcess(s.ctx, &m, nil)
	defer func() { endSpan(span, dup, errors.Join(herr, ierr)) }()
	tx, err := c.db.BeginTxx(ctx, nil)
	if err != nil {
		return false, nil, fmt.Errorf("begin: %w", err)
	}
	defer tx.Rollback() //nolint:errcheck // no-op after Commit
	first, err := c.store.Claim(ctx, tx, c.cfg.Consumer, m.ID)
	if err != nil {
		return false, nil, err
	}
	if !first {
		return true, nil, nil
	}
	if err := c.call(ctx, tx, m); err != nil {
		return false, err, nil
	}
	if err := tx.Commit(); err != nil {
		switch {
		case pgerr.CommitRolledBack(err):
			return false, errors.New("handler returned nil but a statement in its transaction failed"), nil
		case refused(err):
			return false, fmt.Errorf("commit refused: %w", err), nil
		}
		return false, nil, fmt.Errorf("%w: %w", errUnknown, err)
	}
	return false, nil, nil
}

// refused reports whether a failed COMMIT is PostgreSQL's answer that it
// rolled the transaction back (a deferred constraint, a serialization
// failure, a statement timeout in a deferred trigger, the insert of an Add
// sent with it), not a lost connection or a session ended around it, after
// which the outcome is unknown (pgerr.Refused; lib/pq and pgx alike).
func refused(err error) bool { return pgerr.Refused(err) }

// batch applies items in one transaction and returns the items still to
// do: none, or under OrderedByKey the ones after a failure (the failure
// itself has been handled by settle). It tries the batch without
// savepoints first (fast), unless a message in it is being retried; only
// when a handler or a statement fails is that transaction rolled back and
// the batch redone with a savepoint per message (careful).
func (s *worker) batch(items []item) (rest []item) {
	bctx, bspan := s.c.startBatch(s.ctx, items)
	var berr error
	defer func() { endSpan(bspan, false, berr) }()
	if retried(items) {
		// It failed before and may well fail again: a fast attempt
		// would likely be wasted.
		return s.careful(bctx, bspan, items, noFailure, &berr)
	}
	rest, f, settled := s.fast(bctx, bspan, items, &berr)
	if settled {
		return rest
	}
	if bspan != nil {
		id := "unknown"
		if f.at >= 0 {
			id = items[f.at].m.ID
		}
		bspan.AddEvent("mailroom.batch.redo", trace.WithAttributes(attribute.String("mailroom.failed_message_id", id)))
	}
	return s.careful(bctx, bspan, items, f, &berr)
}

// retried reports whether a message of items is being retried.
func retried(items []item) bool {
	for i := range items {
		if items[i].m.Attempt > 1 {
			return true
		}
	}
	return false
}

// failure is a handler failure seen by a rolled-back fast attempt: items[at]
// failed with err. at is -1 when a statement failed and which message's
// handler broke the transaction is unknown.
type failure struct {
	at  int
	err error
}

var noFailure = failure{at: -1}

// fast applies items in one transaction without savepoints. When a
// handler fails, or a statement failed (the transaction is aborted), it
// rolls back and returns settled false with the failure. The handler
// durations of a rolled-back attempt are not recorded, except the failing
// handler's: its failure counts, and careful does not call it again.
func (s *worker) fast(bctx context.Context, bspan trace.Span, items []item, berr *error) (rest []item, f failure, settled bool) {
	c := s.c
	tx, err := c.db.BeginTxx(bctx, nil)
	if err != nil {
		*berr = err
		return s.retryBatch(fmt.Errorf("begin: %w", err), items), noFailure, true
	}
	defer tx.Rollback() //nolint:errcheck // no-op after Commit
	first, err := c.store.ClaimMany(s.ctx, tx, c.cfg.Consumer, msgIDs(items))
	if err != nil {
		return s.retryBatch(err, items), noFailure, true
	}
	took := make([]time.Duration, len(items))
	for i, it := range items {
		if !first[i] {
			continue
		}
		mctx, span := c.startProcess(bctx, &it.m, bspan)
		d, herr := c.run(mctx, tx, it.m)
		endSpan(span, false, herr)
		switch {
		case herr == nil:
			took[i] = d
			continue
		case s.ctx.Err() != nil:
			c.observeHandler(d, herr)
			return nil, noFailure, true // shutdown timed out: left unacked for redelivery
		case aborted(herr):
			// A statement failed earlier, maybe in another message's
			// handler that returned nil: careful finds which.
			return nil, noFailure, false
		}
		c.observeHandler(d, herr)
		return nil, failure{i, herr}, false
	}
	if err := tx.Commit(); err != nil {
		if pgerr.CommitRolledBack(err) || refused(err) {
			// A handler returned nil after a failed statement, or PostgreSQL
			// refused the commit (nothing committed): maybe the insert of
			// an Add sent with the COMMIT (atcommit.OpenDB), which careful
			// sends after each handler, in its savepoint.
			return nil, noFailure, false
		}
		*berr = err
		return s.unknownOutcome(err, items), noFailure, true
	}
	for i := range items {
		if first[i] {
			c.observeHandler(took[i], nil)
		}
	}
	s.infra = 0
	for i := range items {
		s.count(items[i], !first[i])
	}
	s.ack(ds(items)...)
	return nil, noFailure, true
}

// aborted reports whether err says the transaction had already failed
// before the statement that returned it: PostgreSQL refusing it, or (on a
// database of atcommit.OpenDB) the insert of an Add that an earlier
// handler may have made, sent ahead of it.
func aborted(err error) bool {
	return pgerr.Is(err, "25P02") || // in_failed_sql_transaction
		errors.Is(err, atcommit.ErrEarlierDeferred)
}

// careful applies items in one transaction with a savepoint per message,
// after fast rolled back: a failing handler undoes only its own message.
// The handler of f.at already failed in fast and is not called again.
func (s *worker) careful(bctx context.Context, bspan trace.Span, items []item, f failure, berr *error) (rest []item) {
	c := s.c
	tx, err := c.db.BeginTxx(bctx, nil)
	if err != nil {
		*berr = err
		return s.retryBatch(fmt.Errorf("begin: %w", err), items)
	}
	defer tx.Rollback() //nolint:errcheck // no-op after Commit
	first, err := c.store.ClaimMany(s.ctx, tx, c.cfg.Consumer, msgIDs(items))
	if err != nil {
		return s.retryBatch(err, items)
	}
	errs := make([]error, len(items))
	n := len(items) // items[:n] are settled by this transaction
	for i, it := range items {
		if !first[i] {
			continue
		}
		herr := f.err
		if i != f.at {
			if _, err := tx.ExecContext(s.ctx, `SAVEPOINT mailroom_message`); err != nil {
				return s.retryBatch(fmt.Errorf("savepoint: %w", err), items)
			}
			mctx, span := c.startProcess(bctx, &it.m, bspan)
			herr = c.call(mctx, tx, it.m)
			endSpan(span, false, herr)
			if herr == nil {
				_, err := tx.ExecContext(s.ctx, `RELEASE SAVEPOINT mailroom_message`)
				if err == nil {
					continue
				}
				if s.ctx.Err() != nil {
					return nil // shutdown timed out
				}
				herr = fmt.Errorf("handler returned nil but a statement in its transaction failed: %w", err)
			}
			if _, err := tx.ExecContext(s.ctx, `ROLLBACK TO SAVEPOINT mailroom_message`); err != nil {
				return s.retryBatch(fmt.Errorf("rollback to savepoint: %w", err), items)
			}
		}
		errs[i] = herr
		release := items[i : i+1]
		if c.cfg.OrderedByKey {
			// Stop here: the later messages may share its key.
			n, release = i, items[i:]
		}
		for j, r := range release {
			if first[i+j] {
				if err := c.store.Release(s.ctx, tx, c.cfg.Consumer, r.m.ID); err != nil {
					return s.retryBatch(err, items)
				}
			}
		}
		if n < len(items) {
			break
		}
	}
	if err := tx.Commit(); err != nil {
		*berr = err
		if pgerr.CommitRolledBack(err) || refused(err) {
			// Savepoints do not check deferred constraints, nor see a
			// serialization failure: one transaction per message finds
			// whose commit PostgreSQL refuses, and charges only that one.
			s.log.Warn("inbox: commit of a batch refused; applying its messages one at a time", "count", len(items), "error", err)
			for _, it := range items {
				if s.abandon() {
					return nil
				}
				s.one(it)
			}
			return nil
		}
		return s.unknownOutcome(err, items)
	}
	for i := range n {
		s.settle(items[i], !first[i], errs[i], nil)
	}
	if n == len(items) {
		return nil
	}
	// OrderedByKey: retry the failed message in place before the ones
	// behind it.
	s.settle(items[n], false, errs[n], nil)
	if s.abandon() {
		return nil
	}
	return items[n+1:]
}

// retryBatch waits after a database error before the commit (nothing was
// applied), or a commit of unknown outcome under OrderedByKey (dedupe
// finds what was applied), and returns the batch to be tried again, or nil
// when stopping.
func (s *worker) retryBatch(err error, items []item) []item {
	if !s.hold(err) {
		return nil
	}
	return items
}

// unknownOutcome handles a batch whose COMMIT lost its connection: it may
// have committed. The batch is requeued (redeliveries are deduplicated);
// under OrderedByKey it is tried again in place instead (see
// unknownAgain).
func (s *worker) unknownOutcome(err error, items []item) []item {
	err = fmt.Errorf("commit of a batch of %d (outcome unknown; redeliveries are deduplicated): %w", len(items), err)
	switch {
	case !s.c.cfg.OrderedByKey:
		s.requeue(err, ds(items)...)
		return nil
	case !s.unknownAgain(items[0].d):
		s.giveUp(err)
		return nil
	}
	return s.retryBatch(err, items)
}

// unknownAgain counts a commit of unknown outcome of the message or batch
// that starts with d, under OrderedByKey, and reports whether it may be
// tried again in place (dedupe acks what did commit): up to MaxAttempts
// such outcomes of that same delivery in a row. Then giveUp: a message
// whose transaction always ends its session would hold its keys forever,
// and handed back the broker's delivery limit can see it.
func (s *worker) unknownAgain(d *amqp.Delivery) bool {
	if d.DeliveryTag != s.unknownTag {
		s.unknownTag, s.unknowns = d.DeliveryTag, 0
	}
	s.unknowns++
	return s.unknowns < s.c.cfg.MaxAttempts
}

// giveUp hands every delivery of the session back, in order, after a
// failure that cannot be retried in place under OrderedByKey: requeued
// alone, a delivery would be overtaken by the later messages of its key
// that this worker (or amqp091-go's buffer) already holds. The worker
// takes nothing more.
func (s *worker) giveUp(err error) {
	s.left = true
	s.handBack(err)
}

func msgIDs(items []item) []string {
	out := make([]string, len(items))
	for i := range items {
		out[i] = items[i].m.ID
	}
	return out
}

func ds(items []item) []*amqp.Delivery {
	out := make([]*amqp.Delivery, len(items))
	for i := range items {
		out[i] = items[i].d
	}
	return out
}

// call runs the handler and records its duration.
func (c *Consumer) call(ctx context.Context, tx *sqlx.Tx, m Message) error {
	d, err := c.run(ctx, tx, m)
	c.observeHandler(d, err)
	return err
}

// run runs the handler, turning a panic into an error, and says how long
// it took.
func (c *Consumer) run(ctx context.Context, tx *sqlx.Tx, m Message) (took time.Duration, err error) {
	start := time.Now()
	defer func() {
		if r := recover(); r != nil {
			c.cfg.Logger.Error("inbox: handler panicked", "consumer", c.cfg.Consumer, "message_id", m.ID, "key", m.Key, "attempt", m.Attempt, "panic", r, "stack", string(debug.Stack()))
			err = fmt.Errorf("handler panicked: %v", r)
		}
		took = time.Since(start)
	}()
	return 0, c.cfg.Handler(ctx, tx, m)
}
