package inbox

import (
	"errors"
	"fmt"
	"log/slog"

	amqp "github.com/rabbitmq/amqp091-go"
)

// DefaultDeliveryLimit is the quorum-queue delivery limit DeclareTopology
// sets on the work queue.
const DefaultDeliveryLimit = 20

// RetryQueueName is the default retry queue of queue: queue + ".retry".
func RetryQueueName(queue string) string { return queue + ".retry" }

// DeadLetterQueueName is the default dead-letter queue of queue: queue + ".dead".
func DeadLetterQueueName(queue string) string { return queue + ".dead" }

// DeadLetterExchangeName is the default dead-letter exchange of queue: queue + ".dlx".
func DeadLetterExchangeName(queue string) string { return queue + ".dlx" }

// Topology describes a work queue and what the consumer's failure handling
// needs around it. Only Queue is required.
type Topology struct {
	// Queue is the work queue the Consumer consumes.
	Queue string
	// Exchange, when set, is declared (durable, of kind ExchangeKind) and
	// Queue is bound to it with each of BindingKeys.
	Exchange string
	// ExchangeKind defaults to "topic".
	ExchangeKind string
	// BindingKeys default to ["#"] (everything published to Exchange).
	BindingKeys []string
	// Classic declares classic queues instead of quorum queues. Quorum
	// queues (the default) replicate, and bound redeliveries with a
	// delivery limit; classic queues suit a single-node broker.
	Classic bool
	// DeliveryLimit caps how often a quorum queue redelivers a message that
	// was returned to it (a consumer that crashed or lost its connection
	// while holding it); past the limit the message is dead-lettered to
	// DeadLetterQueue. Default DefaultDeliveryLimit (20); negative means
	// unlimited, so a message that crashes every consumer loops forever.
	// Ignored for classic queues.
	DeliveryLimit int
	// SingleActiveConsumer sets x-single-active-consumer on Queue: of all
	// consumers of the queue only one receives deliveries, the others stand
	// by and take over when it goes away. Use it with Config.OrderedByKey
	// when several consumer processes run: otherwise the broker spreads one
	// key's messages over them and per-key order holds only per process.
	// With OrderedByKey a stopping consumer also hands over in order (see
	// Consumer.Run); without it, it finishes what it holds while the next
	// one starts.
	SingleActiveConsumer bool
	// RetryQueue, DeadLetterQueue and DeadLetterExchange default to Queue +
	// ".retry", ".dead" and ".dlx".
	RetryQueue, DeadLetterQueue, DeadLetterExchange string
}

// DeclareTopology declares, idempotently:
//
//   - DeadLetterExchange (fanout) and DeadLetterQueue bound to it;
//   - Queue, durable, dead-lettering to DeadLetterExchange;
//   - RetryQueue, durable, without consumers: the Consumer publishes a failed
//     message there with a per-message TTL (the backoff delay) and the
//     broker dead-letters it back to Queue through the default exchange
//     when the TTL expires;
//   - Exchange and its bindings to Queue, when Exchange is set.
//
// Settings that make RabbitMQ drop messages, and what this declares instead:
//
//   - x-max-length / x-max-length-bytes with the default overflow
//     "drop-head" silently discards the oldest messages, even confirmed
//     ones. No length limit is set; if a policy adds one, it must use
//     x-overflow "reject-publish" (publishers then see nacks and retry).
//   - A quorum queue with x-delivery-limit and no dead-letter exchange drops
//     a message at the limit. The work queue always has a dead-letter
//     exchange.
//   - Quorum dead-lettering is at-most-once by default: a message expiring
//     from the retry queue could be lost if the target queue is
//     unavailable at that moment. Quorum queues here use
//     x-dead-letter-strategy "at-least-once", which RabbitMQ requires to
//     be combined with x-overflow "reject-publish".
//   - A message TTL or queue expiry (x-message-ttl, x-expires) on the work
//     or dead-letter queue discards messages; none is set.
//
// (Run declares a missing RetryQueue or DeadLetterQueue itself, unless
// Config.NoDeclare; it never declares Queue.)
//
// Declaring an existing queue with different arguments fails with
// PRECONDITION_FAILED and closes ch: delete the queue or declare it as it
// was. Use a fresh channel after an error.
func DeclareTopology(ch *amqp.Channel, t Topology) error {
	if t.Queue == "" {
		return errors.New("inbox: Topology.Queue: required")
	}
	if t.RetryQueue == "" {
		t.RetryQueue = RetryQueueName(t.Queue)
	}
	if t.DeadLetterQueue == "" {
		t.DeadLetterQueue = DeadLetterQueueName(t.Queue)
	}
	if t.DeadLetterExchange == "" {
		t.DeadLetterExchange = DeadLetterExchangeName(t.Queue)
	}
	if t.DeliveryLimit == 0 {
		t.DeliveryLimit = DefaultDeliveryLimit
	}
	if t.ExchangeKind == "" {
		t.ExchangeKind = "topic"
	}
	if len(t.BindingKeys) == 0 {
		t.BindingKeys = []string{"#"}
	}
	if err := ch.ExchangeDeclare(t.DeadLetterExchange, "fanout", true, false, false, false, nil); err != nil {
		return fmt.Errorf("inbox: declare dead-letter exchange %q: %w", t.DeadLetterExchange, err)
	}
	if err := declareQueue(ch, t.DeadLetterQueue, queueArgs(t.Classic)); err != nil {
		return err
	}
	if err := ch.QueueBind(t.DeadLetterQueue, "", t.DeadLetterExchange, false, nil); err != nil {
		return fmt.Errorf("inbox: bind %q to %q: %w", t.DeadLetterQueue, t.DeadLetterExchange, err)
	}
	work := deadLettering(queueArgs(t.Classic), t.DeadLetterExchange, t.Classic)
	if !t.Classic && t.DeliveryLimit > 0 {
		work["x-delivery-limit"] = int64(t.DeliveryLimit)
	}
	if t.SingleActiveConsumer {
		work["x-single-active-consumer"] = true
	}
	if err := declareQueue(ch, t.Queue, work); err != nil {
		return err
	}
	if err := declareQueue(ch, t.RetryQueue, retryArgs(t.Queue, t.Classic)); err != nil {
		return err
	}
	if t.Exchange != "" {
		if err := ch.ExchangeDeclare(t.Exchange, t.ExchangeKind, true, false, false, false, nil); err != nil {
			return fmt.Errorf("inbox: declare exchange %q (%s): %w", t.Exchange, t.ExchangeKind, err)
		}
		for _, k := range t.BindingKeys {
			if err := ch.QueueBind(t.Queue, k, t.Exchange, false, nil); err != nil {
				return fmt.Errorf("inbox: bind %q to %q with %q: %w", t.Queue, t.Exchange, k, err)
			}
		}
	}
	return nil
}

// queueArgs are the arguments every queue of a Topology has.
func queueArgs(classic bool) amqp.Table {
	if classic {
		return amqp.Table{"x-queue-type": "classic"}
	}
	return amqp.Table{"x-queue-type": "quorum"}
}

// deadLettering adds dead-lettering to exchange to args.
func deadLettering(args amqp.Table, exchange string, classic bool) amqp.Table {
	args["x-dead-letter-exchange"] = exchange
	if !classic {
		args["x-dead-letter-strategy"] = "at-least-once"
		args["x-overflow"] = "reject-publish"
	}
	return args
}

// retryArgs are the arguments of the retry queue of queue: expired
// messages go back to queue through the default exchange, which routes by
// queue name.
func retryArgs(queue string, classic bool) amqp.Table {
	args := deadLettering(queueArgs(classic), "", classic)
	args["x-dead-letter-routing-key"] = queue
	return args
}

func declareQueue(ch *amqp.Channel, name string, args amqp.Table) error {
	if _, err := ch.QueueDeclare(name, true, false, false, false, args); err != nil {
		var ae *amqp.Error
		if errors.As(err, &ae) && ae.Code == amqp.PreconditionFailed {
			return fmt.Errorf("inbox: queue %q exists with other arguments than %v; delete it or declare it as it was: %w", name, args, err)
		}
		return fmt.Errorf("inbox: declare queue %q: %w", name, err)
	}
	return nil
}

// ErrQueueNotFound is wrapped by the error Run returns when Config.NoDeclare
// is set and the retry or dead-letter queue does not exist.
var ErrQueueNotFound = errors.New("queue not found")

// ensureQueues makes sure the retry and dead-letter queues exist at the
// start of a session: without them a failed message would wait on its
// backoff in a worker, and a dead letter would be dropped. A missing one
// is declared as DeclareTopology would, unless NoDeclare. Queue itself is
// left alone: it may exist with other arguments (a redeclare would fail),
// and the retry queue reaches it through the default exchange anyway.
func (c *Consumer) ensureQueues(conn *amqp.Connection, log *slog.Logger) error {
	for _, q := range []struct {
		what, name string
		args       amqp.Table
	}{
		{"retry queue", c.cfg.RetryQueue, retryArgs(c.cfg.Queue, false)},
		{"dead-letter queue", c.cfg.DeadLetterQueue, queueArgs(false)},
	} {
		found, err := queueExists(conn, q.name)
		switch {
		case err != nil:
			return fmt.Errorf("check %s %q: %w", q.what, q.name, err) // retried with the session
		case found:
			continue
		case c.cfg.NoDeclare:
			return fmt.Errorf("inbox: %w: %s %q (Config.NoDeclare is set): declare it, e.g. with inbox.DeclareTopology, or unset NoDeclare to let Run declare it", ErrQueueNotFound, q.what, q.name)
		}
		ch, err := conn.Channel()
		if err != nil {
			return fmt.Errorf("open channel: %w", err)
		}
		err = declareQueue(ch, q.name, q.args)
		_ = ch.Close()
		if err != nil {
			return fmt.Errorf("declare missing %s (or set Config.NoDeclare and declare it yourself): %w", q.what, err)
		}
		log.Info("inbox: declared missing queue", "declared", q.name, "args", q.args)
	}
	return nil
}

// queueExists checks with a passive declare on a throwaway channel (a
// missing queue closes the channel). Only NOT_FOUND means missing: any
// other failure (a lost connection, an exclusive queue of another
// connection) is an error.
func queueExists(conn *amqp.Connection, name string) (bool, error) {
	ch, err := conn.Channel()
	if err != nil {
		return false, fmt.Errorf("open channel: %w", err)
	}
	defer ch.Close()
	_, err = ch.QueueDeclarePassive(name, true, false, false, false, nil)
	var ae *amqp.Error
	switch {
	case err == nil:
		return true, nil
	case errors.As(err, &ae) && ae.Code == amqp.NotFound:
		return false, nil
	}
	return false, err
}
