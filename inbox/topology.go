package inbox

import (
	"errors"
	"fmt"

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
	base := func() amqp.Table {
		if t.Classic {
			return amqp.Table{"x-queue-type": "classic"}
		}
		return amqp.Table{"x-queue-type": "quorum"}
	}
	deadLettering := func(args amqp.Table, exchange string) amqp.Table {
		args["x-dead-letter-exchange"] = exchange
		if !t.Classic {
			args["x-dead-letter-strategy"] = "at-least-once"
			args["x-overflow"] = "reject-publish"
		}
		return args
	}

	if err := ch.ExchangeDeclare(t.DeadLetterExchange, "fanout", true, false, false, false, nil); err != nil {
		return fmt.Errorf("inbox: declare dead-letter exchange %q: %w", t.DeadLetterExchange, err)
	}
	if err := declareQueue(ch, t.DeadLetterQueue, base()); err != nil {
		return err
	}
	if err := ch.QueueBind(t.DeadLetterQueue, "", t.DeadLetterExchange, false, nil); err != nil {
		return fmt.Errorf("inbox: bind %q to %q: %w", t.DeadLetterQueue, t.DeadLetterExchange, err)
	}
	work := deadLettering(base(), t.DeadLetterExchange)
	if !t.Classic && t.DeliveryLimit > 0 {
		work["x-delivery-limit"] = int64(t.DeliveryLimit)
	}
	if t.SingleActiveConsumer {
		work["x-single-active-consumer"] = true
	}
	if err := declareQueue(ch, t.Queue, work); err != nil {
		return err
	}
	retry := deadLettering(base(), "") // the default exchange routes by queue name
	retry["x-dead-letter-routing-key"] = t.Queue
	if err := declareQueue(ch, t.RetryQueue, retry); err != nil {
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
