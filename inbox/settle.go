package inbox

import (
	"errors"
	"fmt"
	"strconv"
	"time"
	"unicode/utf8"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/mailroom-go/mailroom/internal/wait"
)

// settle acks, retries or requeues a message after an attempt. Under
// OrderedByKey a failed message is retried here, in place: the later
// messages of its key (and worker) wait for it.
func (s *worker) settle(it item, dup bool, herr, ierr error) {
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

// done acks a message that was applied or found to be a duplicate.
func (s *worker) done(it item, dup bool) {
	s.count(it, dup)
	s.ack(it.d)
}

// count counts a message that was applied or found to be a duplicate.
func (s *worker) count(it item, dup bool) {
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
func (s *worker) ack(ds ...*amqp.Delivery) {
	if err := s.acks.ack(ds...); err != nil {
		s.log.Debug("inbox: ack lost with its channel; the redelivery will be deduplicated", "count", len(ds), "message_id", ds[0].MessageId, "error", err)
	}
}

// nack rejects d, returning it to the queue when requeue is true.
func (s *worker) nack(d *amqp.Delivery, requeue bool) {
	_ = d.Nack(false, requeue) // a lost channel returns it anyway
	s.acks.settled(d.DeliveryTag)
}

// failed sends a message whose handler failed to the retry queue, or to the
// dead-letter queue after MaxAttempts.
func (s *worker) failed(it item, herr error) {
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
func (s *worker) deadLetter(d *amqp.Delivery, reason string) {
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
func (s *worker) requeue(err error, ds ...*amqp.Delivery) {
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
func (s *worker) hold(err error) bool {
	if s.ctx.Err() != nil {
		return false
	}
	s.c.stats.dbErrors.Add(1)
	return s.wait("inbox: database error; retrying after a delay", err)
}

// wait logs msg and waits a delay that grows with the worker's
// consecutive failures, unless the session stops first (see pause).
func (s *worker) wait(msg string, err error) bool {
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
func (s *worker) pause(d time.Duration) bool {
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
