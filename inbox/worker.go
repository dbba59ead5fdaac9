package inbox

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"runtime/debug"
	"strconv"
	"strings"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/jmoiron/sqlx"
	"github.com/lib/pq"
	amqp "github.com/rabbitmq/amqp091-go"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"

	"github.com/mailroom-go/mailroom/atcommit"
	"github.com/mailroom-go/mailroom/internal/wait"
)

// session holds what the workers of one connection share.
type session struct {
	c    *Consumer
	ctx  context.Context // handlers' context: outlives Run's by ShutdownTimeout
	stop <-chan struct{} // closed: Run stops or the session broke (see work)
	// finish is true when the stop is Run's (not a broken session): then
	// each worker first handles what was already delivered to it.
	finish   *atomic.Bool
	broken   <-chan struct{} // closed when the connection or channel is lost
	left     bool            // this worker left a delivery unacked as the session stopped
	pub      *publisher
	handBack func(why error) // returns every delivery to the queue, in order, ending the session
	log      *slog.Logger
	acks     *acker // the consuming channel's
	infra    int    // consecutive database/broker failures of this worker (see work)
	// unknowns counts the commits of unknown outcome in a row of the
	// message or batch that starts with delivery unknownTag (see
	// unknownAgain).
	unknownTag uint64
	unknowns   int
}

// item is a decoded delivery.
type item struct {
	d *amqp.Delivery
	m Message
}

// work takes deliveries from in, up to BatchSize of those already waiting
// at a time, until stop (and then, see below, what in still holds). Each
// worker runs on its own copy of the session (its own infra and left).
func (s session) work(in <-chan amqp.Delivery) {
	size := s.c.cfg.BatchSize
	for {
		var first amqp.Delivery
		if s.stopped() {
			// Run is stopping: handle what the broker already delivered
			// rather than hand it back (a quorum queue counts every
			// return in x-delivery-count, an attempt lost at each
			// deploy), until in is empty or ShutdownTimeout ends the
			// handlers' context. Not under OrderedByKey (see
			// Consumer.session), not after a delivery was left unacked,
			// nor when the session broke (its acks cannot reach the
			// broker).
			if s.abandon() {
				return
			}
			select {
			case first = <-in:
			default:
				s.flushAcks() // not held back by a slower worker's last handler
				return
			}
		} else {
			select {
			case first = <-in:
			default:
				s.flushAcks()
				select {
				case <-s.stop:
					continue
				case first = <-in:
				}
			}
		}
		batch := []amqp.Delivery{first}
	fill:
		for len(batch) < size {
			select {
			case d := <-in:
				batch = append(batch, d)
			default:
				break fill
			}
		}
		s.handle(batch)
	}
}

// flushAcks sends the acks held for coalescing (see acker): when a worker
// runs out of work.
func (s *session) flushAcks() {
	if err := s.acks.flush(); err != nil {
		s.log.Debug("inbox: acks lost with their channel; the redeliveries will be deduplicated", "error", err)
	}
}

// abandon reports whether the worker must leave what it holds unacked for
// the broker to redeliver: it left one such already (see pause), the
// session broke, or ShutdownTimeout passed.
func (s *session) abandon() bool {
	if s.left || s.ctx.Err() != nil {
		return true
	}
	select {
	case <-s.broken:
		return true
	default:
		return s.stopped() && !s.finish.Load()
	}
}

func (s *session) stopped() bool {
	select {
	case <-s.stop:
		return true
	default:
		return false
	}
}

// handle dead-letters undecodable deliveries and applies the rest.
func (s *session) handle(ds []amqp.Delivery) {
	items := make([]item, 0, len(ds))
	for i := range ds {
		m, err := decode(&ds[i])
		if err != nil {
			s.deadLetter(&ds[i], "undecodable: "+err.Error())
			continue
		}
		items = append(items, item{&ds[i], m})
	}
	for len(items) > 0 && !s.abandon() {
		if len(items) == 1 {
			s.one(items[0])
			return
		}
		items = s.batch(items)
	}
}

// one applies a single message in its own transaction.
func (s *session) one(it item) {
	dup, herr, ierr := s.apply(it.m)
	s.settle(it, dup, herr, ierr)
}

// settle acks, retries or requeues a message after an attempt. Under
// OrderedByKey a failed message is retried here, in place: the later
// messages of its key (and worker) wait for it.
func (s *session) settle(it item, dup bool, herr, ierr error) {
	for {
		switch {
		case ierr != nil && errors.Is(ierr, errUnknown) && !s.c.cfg.OrderedByKey:
			s.requeue(ierr, it.d)
			return
		case ierr != nil && errors.Is(ierr, errUnknown) && !s.unknownAgain(it.d):
			s.giveUp(ierr)
			return
		case ierr != nil:
			if !s.hold(ierr) {
				return
			}
			dup, herr, ierr = s.apply(it.m)
			continue
		case herr == nil:
			s.infra = 0
			s.done(it, dup)
			return
		case s.ctx.Err() != nil:
			return // shutdown timed out: leave it unacked for redelivery
		}
		s.c.stats.failed.Add(1)
		if !s.c.cfg.OrderedByKey || it.m.Attempt >= s.c.cfg.MaxAttempts {
			s.failed(it, herr)
			return
		}
		wait := s.c.delay(it.m.Attempt)
		s.log.Warn("inbox: handler failed; retrying in place", msgAttrs(&it.m, "retry_in", wait.String(), "error", herr)...)
		s.c.stats.retried.Add(1)
		if !s.pause(wait) {
			return // stopping: unacked, so redelivered in order
		}
		it.m.Attempt++
		dup, herr, ierr = s.apply(it.m)
	}
}

// errUnknown marks a commit whose outcome is unknown: the connection failed
// during COMMIT. (An error reply from the server means it rolled back.)
var errUnknown = errors.New("commit outcome unknown; the redelivery will be deduplicated")

// apply runs one message in its own transaction. dup reports a duplicate;
// herr is the handler's failure (including a commit the server refused,
// e.g. a deferred constraint); ierr a database failure: before the commit
// (nothing was applied), or wrapping errUnknown.
func (s *session) apply(m Message) (dup bool, herr, ierr error) {
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
		case errors.Is(err, pq.ErrInFailedTransaction):
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
// sent with it), not a lost connection or a session ended around it
// (FATAL, SQLSTATE class 08, or 57P: shutdown), after which the outcome is
// unknown. (lib/pq turns most FATAL errors into driver.ErrBadConn, which
// is no *pq.Error either.)
func refused(err error) bool {
	var pqErr *pq.Error
	if !errors.As(err, &pqErr) {
		return false
	}
	switch {
	case pqErr.Severity == "FATAL" || pqErr.Severity == "PANIC":
		return false
	case strings.HasPrefix(string(pqErr.Code), "08"), strings.HasPrefix(string(pqErr.Code), "57P"):
		return false
	}
	return true
}

// batch applies items in one transaction and returns the items still to
// do: none, or under OrderedByKey the ones after a failure (the failure
// itself has been handled by settle). It tries the batch without
// savepoints first (fast), unless a message in it is being retried; only
// when a handler or a statement fails is that transaction rolled back and
// the batch redone with a savepoint per message (careful).
func (s *session) batch(items []item) (rest []item) {
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
func (s *session) fast(bctx context.Context, bspan trace.Span, items []item, berr *error) (rest []item, f failure, settled bool) {
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
		if errors.Is(err, pq.ErrInFailedTransaction) || refused(err) {
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
	var pqErr *pq.Error
	return errors.As(err, &pqErr) && pqErr.Code == "25P02" || // in_failed_sql_transaction
		errors.Is(err, atcommit.ErrEarlierDeferred)
}

// careful applies items in one transaction with a savepoint per message,
// after fast rolled back: a failing handler undoes only its own message.
// The handler of f.at already failed in fast and is not called again.
func (s *session) careful(bctx context.Context, bspan trace.Span, items []item, f failure, berr *error) (rest []item) {
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
		if errors.Is(err, pq.ErrInFailedTransaction) || refused(err) {
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
func (s *session) retryBatch(err error, items []item) []item {
	if !s.hold(err) {
		return nil
	}
	return items
}

// unknownOutcome handles a batch whose COMMIT lost its connection: it may
// have committed. The batch is requeued (redeliveries are deduplicated);
// under OrderedByKey it is tried again in place instead (see
// unknownAgain).
func (s *session) unknownOutcome(err error, items []item) []item {
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
func (s *session) unknownAgain(d *amqp.Delivery) bool {
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
func (s *session) giveUp(err error) {
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

// done acks a message that was applied or found to be a duplicate.
func (s *session) done(it item, dup bool) {
	s.count(it, dup)
	s.ack(it.d)
}

// count counts a message that was applied or found to be a duplicate.
func (s *session) count(it item, dup bool) {
	if dup {
		s.c.stats.duplicates.Add(1)
		s.log.Debug("inbox: duplicate acked without calling the handler", "message_id", it.m.ID)
	} else {
		s.c.stats.handled.Add(1)
		if s.c.afterCommit != nil {
			s.c.afterCommit(it.m)
		}
	}
}

// ack acks ds, all from the session's channel, through its acker (maybe
// later, in one multiple ack with others). If the channel is gone the ack
// is lost, never misdirected: the broker redelivers and dedupe absorbs it.
func (s *session) ack(ds ...*amqp.Delivery) {
	if err := s.acks.ack(ds...); err != nil {
		s.log.Debug("inbox: ack lost with its channel; the redelivery will be deduplicated", "count", len(ds), "message_id", ds[0].MessageId, "error", err)
	}
}

// nack rejects d, returning it to the queue when requeue is true.
func (s *session) nack(d *amqp.Delivery, requeue bool) {
	_ = d.Nack(false, requeue) // a lost channel returns it anyway
	s.acks.settled(d.DeliveryTag)
}

// failed sends a message whose handler failed to the retry queue, or to the
// dead-letter queue after MaxAttempts.
func (s *session) failed(it item, herr error) {
	attempt, cfg := it.m.Attempt, s.c.cfg
	if attempt >= cfg.MaxAttempts {
		s.deadLetter(it.d, fmt.Sprintf("handler failed %d times, last error: %v", attempt, herr))
		return
	}
	wait := s.c.delay(attempt)
	s.log.Warn("inbox: handler failed; will retry", msgAttrs(&it.m, "retry_in", wait.String(), "error", herr)...)
	s.c.stats.retried.Add(1)
	msg := republish(it.d, amqp.Table{HeaderAttempt: int64(attempt + 1)})
	msg.Expiration = strconv.FormatInt(max(1, wait.Milliseconds()), 10)
	if err := s.pub.publish(s.ctx, cfg.RetryQueue, msg); err != nil {
		s.requeue(fmt.Errorf("send to retry queue: %w", err), it.d)
		return
	}
	s.ack(it.d)
}

// maxReason caps the x-mailroom-reason header (an error text can be long).
const maxReason = 4096

// deadLetter moves d to the dead-letter queue with reason.
func (s *session) deadLetter(d *amqp.Delivery, reason string) {
	s.log.Error("inbox: dead-lettering message", "message_id", d.MessageId, "exchange", d.Exchange, "routing_key", d.RoutingKey, "key", headerString(d.Headers[HeaderKey]), "reason", reason)
	if len(reason) > maxReason { // headers must fit in one AMQP frame
		n := maxReason
		for n > 0 && !utf8.RuneStart(reason[n]) {
			n--
		}
		reason = reason[:n] + "…"
	}
	msg := republish(d, amqp.Table{HeaderReason: reason, HeaderQueue: s.c.cfg.Queue, HeaderConsumer: s.c.cfg.Consumer})
	// Moved back to the work queue by an operator, it starts again at
	// attempt 1 (the reason says how many it took), not one failure away
	// from this queue.
	delete(msg.Headers, HeaderAttempt)
	for {
		err := s.pub.publish(s.ctx, s.c.cfg.DeadLetterQueue, msg)
		if err == nil {
			break
		}
		err = fmt.Errorf("send to dead-letter queue: %w", err)
		if !s.c.cfg.OrderedByKey {
			s.requeue(err, d)
			return
		}
		// Requeued, it would be overtaken by the later messages of its
		// key: try again in place.
		if !s.wait("inbox: broker error; retrying in place after a delay", err) {
			return
		}
	}
	s.c.stats.dead.Add(1)
	s.ack(d)
}

// requeue returns deliveries to the queue after a database or broker
// failure, once a backoff delay has passed, so a database outage does not
// spin through the queue. They are not acked: a commit that did succeed is
// caught by dedupe on redelivery.
func (s *session) requeue(err error, ds ...*amqp.Delivery) {
	if s.ctx.Err() != nil {
		return // shutdown timed out; the broker redelivers
	}
	s.infra++
	wait := s.c.delay(min(s.infra, 30))
	s.log.Warn("inbox: database or broker error; requeueing after a delay", "count", len(ds), "retry_in", wait.String(), "error", err)
	s.c.stats.requeued.Add(uint64(len(ds)))
	if !s.pause(wait) {
		return
	}
	for _, d := range ds {
		s.nack(d, true)
	}
}

// hold waits after a database error that happened before any commit (or a
// commit of unknown outcome, see retryUnknownInPlace), so the delivery can
// be tried again in place: a database outage neither
// spins through the queue nor counts against its delivery limit. It
// reports false when the session stops (the delivery then returns to the
// queue unacked).
func (s *session) hold(err error) bool {
	if s.ctx.Err() != nil {
		return false
	}
	s.c.stats.dbErrors.Add(1)
	return s.wait("inbox: database error; retrying after a delay", err)
}

// wait logs msg and waits a delay that grows with the worker's
// consecutive failures, unless the session stops first (see pause).
func (s *session) wait(msg string, err error) bool {
	if s.ctx.Err() != nil {
		return false
	}
	s.infra++
	wait := s.c.delay(min(s.infra, 30))
	s.log.Warn(msg, "retry_in", wait.String(), "error", err)
	return s.pause(wait)
}

// msgAttrs are the log attributes of a message, then extra.
func msgAttrs(m *Message, extra ...any) []any {
	return append([]any{"message_id", m.ID, "exchange", m.Exchange, "routing_key", m.RoutingKey, "key", m.Key, "attempt", m.Attempt}, extra...)
}

// pause waits d unless the session stops first; it reports whether d
// passed. When it did not, the delivery waiting on it stays unacked: the
// worker then takes no more (see work).
func (s *session) pause(d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		if !s.stopped() {
			return true
		}
	case <-s.stop:
	}
	s.left = true
	return false
}

// delay is the backoff before retry number attempt (1-based): exponential
// from MinBackoff, capped at MaxBackoff, with ±20% jitter.
func (c *Consumer) delay(attempt int) time.Duration {
	return min(wait.Backoff(c.cfg.MinBackoff, c.cfg.MaxBackoff, 0.2, attempt), c.cfg.MaxBackoff)
}
