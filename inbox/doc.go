// Package inbox is the consumer side of mailroom: it applies each message
// from a RabbitMQ queue exactly once, in a database transaction of yours.
//
//	ch, _ := conn.Channel()
//	err := inbox.DeclareTopology(ch, inbox.Topology{Queue: "payments", Exchange: "orders", BindingKeys: []string{"order.placed"}})
//	c, err := inbox.New(db, inbox.Config{
//		URL: amqpURL, Queue: "payments", Consumer: "payments",
//		Handler: func(ctx context.Context, tx *sqlx.Tx, m inbox.Message) error {
//			_, err := tx.ExecContext(ctx, `INSERT INTO charges …`, …)
//			return err
//		},
//	})
//	err = c.Run(ctx) // until ctx ends; nil after a clean stop
//
// For each delivery a worker begins a transaction, records (Consumer,
// message_id) with dedupe.Store.Claim, runs the handler in that
// transaction, commits, and only then acks. A message already recorded is
// acked without calling the handler, so a redelivery (after a lost ack, a
// crash, a reconnect, or a relay publishing twice) has no second effect.
// That covers the writes the handler makes through tx, while the id is
// remembered (Config.Retention, 7 days; purged every PurgeInterval by this
// consumer, for its own scope only): effects outside tx may repeat, so
// make them idempotent by m.ID.
//
// A handler error or panic rolls the transaction back; the message is
// retried through the retry queue, whose per-message TTL holds the backoff
// delay in the broker, and after MaxAttempts goes to the dead-letter queue
// with the reason in the x-mailroom-reason header, as do messages without
// a message_id or with an undecodable body. A database error before the
// commit keeps the delivery and tries again after a delay; a commit of
// unknown outcome is requeued and dedupe settles it. Run declares a
// missing retry or dead-letter queue (not with Config.NoDeclare); see
// DeclareTopology for the broker settings that can drop messages.
//
// Concurrency workers (default 4) each hold a connection of db while they
// work: give db at least Concurrency + 1 idle connections
// (db.SetMaxIdleConns). BatchSize > 1 applies several deliveries in one
// transaction. OrderedByKey applies the messages of one x-mailroom-key one
// at a time in queue order; with several consumer processes, declare the
// queue with Topology.SingleActiveConsumer. Run reconnects on any loss; when
// ctx ends it finishes what the broker already delivered, within
// ShutdownTimeout; a delivery held unacked for HoldLimit (25 min) makes it
// hand everything back before RabbitMQ's consumer_timeout would.
//
// The handler runs in a consumer span "process <queue>", a child of the
// writer's trace. The metrics, with attributes consumer and queue, are
// mailroom.inbox.processed, .duplicates, .failures, .retries,
// .dead_lettered, .requeued and .handler.duration, and
// mailroom.dedupe.purged. Config.Logger gets warnings and errors;
// successful messages are logged at Debug only.
//
// The detail is in the repository's docs: docs/inbox.md (failure handling
// case by case, batches and savepoints, ordering, connections and
// stopping) and docs/observability.md (span attributes, metrics with their
// Prometheus names, log keys).
package inbox
