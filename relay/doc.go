// Package relay moves messages from the outbox table to RabbitMQ: it claims
// due rows in one statement, no transaction held open (with a short lease
// and SKIP LOCKED when several relays publish), publishes them persistent and mandatory on a confirm channel,
// and deletes a row only once the broker acked it and did not return it.
// A nack, a return or a missing exchange counts an attempt and reschedules
// the row with backoff; after MaxAttempts it moves to the dead-letter
// table. A lost channel or a confirm timeout hands rows back without
// counting an attempt. Rows sharing a Key are published one at a time in
// write order. Run any number of relays on one table, in-process or as the
// mailroom-relay sidecar. By default one of them publishes and the others
// stand by, each ready to take over within about a second when it stops,
// dies or loses the broker, or about 10 s when it freezes (Config.ActiveRelays: one relay keeps RabbitMQ
// near its limit, and a second one publishing beside it only costs the
// broker more). Relays that publish at once claim in turns on an advisory
// lock held for one claim statement, so they never scan each other's rows.
//
//	r, err := relay.New(db, relay.Config{URL: amqpURL, DatabaseURL: dbURL})
//	…
//	err = r.Run(ctx) // until ctx ends; then finishes or releases in-flight rows
//
// # Guarantees
//
// No loss: a row leaves the outbox only after the broker acked its publish
// (publisher confirms) and did not return it (mandatory flag). A nack, a
// basic.return, a missing exchange, a confirm timeout or a lost channel all
// mean "not delivered", and the row is published again. Delivery is
// at-least-once: a relay that dies after the broker acked but before the
// row was deleted publishes it again; consumers deduplicate by message id
// (package inbox).
//
// Ordering: for two messages with the same non-empty Key, A before B, where
// A was added earlier in the same transaction or by a transaction that
// committed before B's transaction called Add, A reaches the broker before
// B is published — across any number of relays. A claim takes the first
// row of a key only when no earlier row of it remains in the outbox, or
// when every earlier one is held by this relay (it then continues their
// run), with the rows after it (its run), and the relay publishes them one
// at a time: each only after the broker confirmed the one before it and
// did not return it. A row that fails or is handed back hands back the
// rest of its run unpublished. Messages of concurrent
// transactions are ordered by the sequence their INSERTs drew, which is not
// promised to follow commit order. Different keys, and messages without a
// key, are published in parallel and in no promised order. A failing
// message holds back the later messages of its key while it is retried;
// once it is dead-lettered they continue (a replayed dead letter goes to the
// end of its key). Consumers keep the order only if they apply one key at a
// time (inbox.Config.OrderedByKey with one active consumer).
//
// What bounds a key: one message of a key is in flight at a time, so a key
// moves at one publisher-confirm round trip per message, however fast the
// relay: the broker confirms a persistent message once it is stored (on a
// classic queue, when its consumer acked it or the message store synced;
// on a quorum queue, when a majority wrote it), 1-3 ms on a quiet machine
// here, more under load (the benchmark's keyed figures in the README). A
// backlog over K keys drains at most K messages per round trip. Choose
// keys for the order you need (an aggregate, not a tenant), and spread hot
// aggregates over keys.
//
// Failures: each failed attempt (nack, unroutable, missing exchange)
// increments attempts, records last_error and reschedules the row with
// exponential backoff and jitter (MinBackoff doubling to MaxBackoff); after
// MaxAttempts the row moves to the dead-letter table with its last error,
// in one statement. A poison row never blocks other rows, only the later
// rows of its own key. A lost connection or a confirm timeout is not the
// message's fault: the row is released without counting an attempt.
//
// Wake-up: LISTEN/NOTIFY wakes a sleeping relay within milliseconds of a
// commit, and polling (PollInterval) finds everything when notifications
// are lost or off (PgBouncer in transaction mode: DisableListen). Writers
// send the NOTIFY only while some relay sleeps (see internal/wakeup): a
// relay about to sleep takes an advisory lock, every insert into the
// outbox (the default of its notified column) notifies when it finds the
// lock taken, and a busy relay releases the
// lock and looks for work by itself, since a NOTIFY serialises commits on
// a database-wide lock. The lock is held on a connection of its own, opened
// from DatabaseURL.
//
// Leases: a claim is one short statement; no transaction stays open while
// the broker is awaited, so the vacuum horizon is never pinned. A relay
// publishing alone on its table (the default: see ActiveRelays) only reads
// the rows it claims and keeps them in memory, skipping them at its next
// claims; if it dies, a relay taking over claims them at once. Relays
// publishing side by side lease the rows they claim for Lease; rows of one
// that died are claimed by others when the lease expires. The lease is
// written to a column no index covers, on pages kept 60% free (schema
// version 4), so it is a HOT update: no index entry. Each relay's Name
// must be unique among the relays of a table (the default, host and pid,
// is).
//
// Throughput: the stages overlap. The next batch is claimed while the
// current one is published; up to ConfirmWindow messages await confirms
// while more are published (relays publishing on one table share the default window:
// RabbitMQ does best with about 1024 unconfirmed in all); confirmed rows are deleted in bulk in the
// background (one autocommit statement). The publishes of a batch reach the
// socket in one write (amqp091-go would flush each one), and the relay's
// own bookkeeping commits asynchronously: a lost commit only means a
// duplicate publish.
//
// # Observability
//
// Tracing: each publish is a producer span named "publish <exchange>"
// ("amq.default" for the default exchange), a child of the trace context
// outbox.Add stored in the message headers, with the OpenTelemetry messaging
// attributes messaging.system=rabbitmq, messaging.operation.type=send,
// messaging.operation.name=publish, messaging.destination.name,
// messaging.rabbitmq.destination.routing_key, messaging.message.id and
// messaging.message.body.size. It lasts until the broker's confirm and
// records the failure, if any. Its context replaces the stored traceparent
// in the AMQP headers, so the consumer's span is its child. When the span
// does not record (no SDK installed, or not sampled) the relay does no
// further tracing work and forwards the stored headers unchanged.
//
// Metrics, through Config.MeterProvider (default: the global provider). The
// Prometheus names are those the OpenTelemetry Prometheus exporter renders,
// as the sidecar's /metrics shows them. The names are constants in
// internal/telemetry. Attribute table is the outbox table's name.
//
//	OpenTelemetry name               kind       unit  Prometheus name                               attributes
//	mailroom.relay.published         counter    1     mailroom_relay_published_total                table
//	mailroom.relay.publish.failures  counter    1     mailroom_relay_publish_failures_total         table, reason
//	mailroom.relay.dead_lettered     counter    1     mailroom_relay_dead_lettered_total            table
//	mailroom.relay.released          counter    1     mailroom_relay_released_total                 table
//	mailroom.relay.confirm.duration  histogram  s     mailroom_relay_confirm_duration_seconds       table
//	mailroom.relay.batch.duration    histogram  s     mailroom_relay_batch_duration_seconds         table
//	mailroom.relay.claim.duration    histogram  s     mailroom_relay_claim_duration_seconds         table
//	mailroom.relay.confirm_window    gauge      1     mailroom_relay_confirm_window                 table
//	mailroom.relay.standby           gauge      1     mailroom_relay_standby                        table
//	mailroom.relay.held_rows         gauge      1     mailroom_relay_held_rows                      table
//	mailroom.outbox.pending_rows     gauge      1     mailroom_outbox_pending_rows                  table
//	mailroom.outbox.oldest_pending_age gauge    s     mailroom_outbox_oldest_pending_age_seconds    table
//
// reason is nack, unroutable, no_exchange or unpublishable (a name over 255
// bytes or headers over a frame, in a row not written by outbox.Add):
// attempts of the message, the sum is Stats.Failed; or timeout or
// channel_closed (the broker's answer is
// unknown; the row is released and also counted in released). The counters
// are observable: they read the same counters as Stats, at collection time,
// so publishing pays nothing for them. The confirm duration runs from
// publish to ack, nack or return; the batch duration from the claim until
// the last row of the batch is settled. Histogram buckets run from 1ms to
// 30s.
//
// held_rows counts the rows this relay has claimed and not yet finished:
// its messages in flight (Stats.Held). A relay publishing alone leases
// none, so only this gauge shows them; sum it over the relays of a table.
//
// pending_rows counts every row in the outbox (due, in flight, retrying or
// scheduled); oldest_pending_age is the lag: how long the oldest row that
// is not merely scheduled for later has waited since it was due (or, once
// it failed, since it was written), 0 when none. Both come from Status,
// the query behind the sidecar's status command, which scans the outbox
// table (cheap while the relay keeps up; on the order of 100ms per million
// waiting rows). It runs only when a reader collects and at most once per
// Config.BacklogInterval (default 5s); every relay on a table reports the
// same table-wide figures, so aggregate them with max, not sum.
//
// Logs: Config.Logger (nil discards) gets warnings (retries, reconnects)
// and errors (dead letters), with the keys message_id, exchange,
// routing_key, key, attempt and error. Successful publishes are not logged.
// URLs in errors have their password redacted.
package relay
