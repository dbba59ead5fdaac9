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
//
// # Failures
//
// A delivery without message_id, or with content_type application/json (or
// …+json) and a body that is not JSON, never reaches the handler: it goes to
// the dead-letter queue with the reason in the x-mailroom-reason header.
//
// A handler error or panic rolls the transaction back. The consumer then
// publishes a copy of the message (with publisher confirms) to the retry
// queue with x-mailroom-attempt = attempt+1 and a per-message TTL of the
// backoff delay (cenkalti/backoff: MinBackoff doubling to MaxBackoff, ±20%
// jitter), and acks the original. The retry queue has no consumers; when
// the TTL expires RabbitMQ dead-letters the copy back to the work queue.
// The delay is thus held by the broker, not by a process: a failing message
// costs no broker round trips while it waits, and a consumer crash loses
// nothing (the copy is confirmed before the original is acked; a crash in
// between only duplicates it, which dedupe absorbs). A message waits at
// most MaxBackoff longer than its own delay (RabbitMQ expires messages at
// the head of a queue only). After MaxAttempts the message goes to the
// dead-letter queue with the last error in x-mailroom-reason. Retries and
// dead letters travel through the default exchange; the exchange and
// routing key the message was first published with ride along in
// x-mailroom-exchange and x-mailroom-routing-key (read only on deliveries
// through the default exchange, so a publisher to a named exchange cannot
// claim another), and Message.Exchange and Message.RoutingKey are those on
// every attempt. A dead letter the consumer sends carries no
// x-mailroom-attempt: moved back to the work queue (the management UI's
// "Move messages", a shovel), it starts again at attempt 1 with
// MaxAttempts before it. (One the broker dead-letters at a quorum queue's
// delivery limit is the broker's copy and keeps the header.)
// Message.Attempt is 1 on first delivery; it counts retries and, on quorum
// queues, redeliveries after a crash (x-delivery-count).
//
// A database error before the commit (begin, claim, savepoint) applied
// nothing: the worker keeps the delivery and tries again after a backoff
// delay, so a database outage neither spins through the queue nor spends
// the quorum delivery limit. A COMMIT the server refuses (a deferred
// constraint, a serialization failure) rolled back and counts as a handler
// failure. A COMMIT whose connection failed, or whose session ended
// around it, has an unknown outcome: the delivery is requeued after a
// delay, never acked, and dedupe settles it. A retry or dead letter that
// cannot be published is requeued likewise. Under OrderedByKey a requeued
// delivery would be overtaken by the later messages of its key, so
// neither is: a dead letter is published again in place, and a commit of
// unknown outcome is tried again in place up to MaxAttempts times in a row
// for the same message (other database errors do not count), after which
// the consumer hands every delivery back in order (see Connections). A
// delivery whose message_id PostgreSQL cannot store (a NUL byte, invalid
// UTF-8) goes to the dead-letter queue at once.
//
// At the start of each session Run checks that the retry and dead-letter
// queues exist and declares a missing one as DeclareTopology would (a
// quorum queue), leaving the work queue as it is: a plain queue declared
// by someone else works too. With Config.NoDeclare it returns an error
// wrapping ErrQueueNotFound instead. A check that fails otherwise than
// with NOT_FOUND ends the session, which is retried.
//
// # Throughput and ordering
//
// Concurrency workers (default 4) run in parallel with a prefetch of
// 2 × Concurrency × BatchSize, each holding a connection of db while it
// works: give db at least Concurrency + 1 idle connections
// (db.SetMaxIdleConns; database/sql keeps 2). BatchSize > 1 applies up to
// that many waiting deliveries in one transaction: one ClaimMany, the
// handlers one after the other, one commit, then the acks. Acks go out as
// one multiple ack per run of deliveries once every earlier delivery of
// the channel is settled (so never covering one that another worker still
// holds); until then they wait, and are sent one by one when a worker runs
// out of deliveries, when half the prefetch is waiting, or when Run stops.
//
// A savepoint costs a round trip and a subtransaction, so a batch first
// runs without them. If a handler fails, the transaction is rolled back
// and the batch redone with a SAVEPOINT per message (a failing handler
// rolls back to it and its claim is released). The failing handler is not
// called again by the redo: its failure stands, and Stats and the handler
// duration metric count it once (the other runs that were rolled back
// are not recorded). The handlers before it run again, with the same
// Message.Attempt; their traces show both process spans, and the batch
// span has an event mailroom.batch.redo. When a handler returns nil after
// a failed statement, which message broke the transaction is unknown, so
// the redo runs every handler again and the savepoints find it. A batch
// holding a retried message (Attempt > 1) uses savepoints from the start.
// Savepoints do not see what only the COMMIT checks (a deferred
// constraint, a serialization failure): when PostgreSQL refuses the
// redo's COMMIT too, the batch's messages are applied one transaction
// each, and only the one whose commit is refused is charged. A handler's
// error must wrap (%w) the error of a statement it ran for the inbox to
// tell a statement that failed because an earlier one had (the
// transaction was aborted) from the handler's own failure.
//
// OrderedByKey sends all deliveries with the same x-mailroom-key header to
// the same worker, so they are applied one at a time in queue order; a
// failed one is retried in place (holding back its worker) rather than
// through the retry queue, which would reorder it. Order holds within one
// consumer process; to keep it with several processes on one queue,
// declare it with Topology.SingleActiveConsumer.
//
// # Connections
//
// Run dials with backoff under Config.ConnectionName, sets QoS, consumes,
// and on any loss (connection or channel closed, consumer cancelled by the
// broker) waits for its workers and starts over on a new connection. Acks
// go only to the channel a delivery came from: after a reconnect the old
// deliveries are redelivered and deduplicated, never acked by tag on the
// new channel. When ctx ends Run cancels the consumer, handles what the
// broker already delivered to its workers and lets running handlers
// finish, for up to ShutdownTimeout in all, and returns nil; what is left
// returns to the queue. (Handing delivered messages back costs each an
// attempt on a quorum queue of RabbitMQ before 4.3, which counts every
// return in x-delivery-count: at every deploy.) A worker hands back the
// rest of its deliveries once one waits on a delay (a retry, a database
// error), and after the session breaks nothing more is handled: its acks
// could not reach the broker. Under OrderedByKey a stopping consumer does not cancel
// and hands back what its workers hold, in order: on a quorum queue with
// a single active consumer a cancel makes the next consumer active at
// once, while earlier messages of its keys are still here (the handover
// would reorder them); the next one becomes active when this one's
// channel closes and gets them first.
//
// A delivery held unacked for Config.HoldLimit (25 min; held through a
// database outage, say) makes Run hand every delivery back: it closes the
// connection, which returns them to the queue in order, and consumes
// again once the database answers a ping. Otherwise RabbitMQ's
// consumer_timeout (30 min by default) would close the channel and return
// them with their delivery count raised, and a quorum queue would
// dead-letter a message past its delivery limit without a reason. Every
// session waits until the database answers before it consumes.
//
// This consumer's message ids (scope Consumer) are remembered for
// Retention (7 days) and purged every PurgeInterval; other consumers' ids
// on the table are left to them. See package dedupe.
//
// # Observability
//
// Tracing: the handler runs in a consumer span named "process <queue>",
// a child of the trace context in the message headers (written by
// outbox.Add, continued by the relay's publish span), so
// trace.SpanContextFromContext(ctx) in the handler carries the writer's
// trace id. The span covers the transaction (dedupe claim, handler,
// commit) and has the messaging attributes messaging.system=rabbitmq,
// messaging.operation.type=process, messaging.destination.name (the
// exchange), messaging.rabbitmq.destination.routing_key,
// messaging.message.id, messaging.consumer.group.name (Consumer),
// messaging.destination.subscription.name (Queue) and mailroom.attempt.
// A batched transaction (BatchSize > 1) has its own span, linked to every
// message's context, and each handler call still runs in a span that is a
// child of its own message's context (linked to the batch span).
// Config.TracerProvider and Config.Propagator default to the global ones.
//
// Metrics, through Config.MeterProvider (attributes consumer and queue; the
// Prometheus names are what the OpenTelemetry Prometheus exporter renders):
//
//	mailroom.inbox.processed        counter    mailroom_inbox_processed_total
//	mailroom.inbox.duplicates       counter    mailroom_inbox_duplicates_total
//	mailroom.inbox.failures         counter    mailroom_inbox_failures_total
//	mailroom.inbox.retries          counter    mailroom_inbox_retries_total
//	mailroom.inbox.dead_lettered    counter    mailroom_inbox_dead_lettered_total
//	mailroom.inbox.requeued         counter    mailroom_inbox_requeued_total
//	mailroom.inbox.handler.duration histogram  mailroom_inbox_handler_duration_seconds (+ result=ok|error)
//	mailroom.dedupe.purged          counter    mailroom_dedupe_purged_total (table only)
//
// The counters are observable views of the counters Stats returns, read at
// collection time, so they cost the message path nothing and cannot
// disagree with Stats. They are registered while Run runs.
//
// Logs: Config.Logger gets warnings and errors with the keys consumer,
// queue, message_id, exchange, routing_key, key, attempt, error and
// retry_in; per-message lines for successful messages are at Debug only.
package inbox
