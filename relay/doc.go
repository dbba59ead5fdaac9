// Package relay moves messages from the outbox table to RabbitMQ: it claims
// due rows with a short lease (SKIP LOCKED, one statement, no transaction
// held open), publishes them persistent and mandatory on a confirm channel,
// and deletes a row only once the broker acked it and did not return it.
// A nack, a return or a missing exchange counts an attempt and reschedules
// the row with backoff; after MaxAttempts it moves to the dead-letter
// table. A lost channel or a confirm timeout hands rows back without
// counting an attempt. Rows sharing a Key are published one at a time in
// write order. Run any number of relays on one table, in-process or as the
// mailroom-relay sidecar.
//
//	r, err := relay.New(db, relay.Config{URL: amqpURL, DatabaseURL: dbURL})
//	…
//	err = r.Run(ctx) // until ctx ends; then finishes or releases in-flight rows
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
//	mailroom.outbox.pending_rows     gauge      1     mailroom_outbox_pending_rows                  table
//	mailroom.outbox.oldest_pending_age gauge    s     mailroom_outbox_oldest_pending_age_seconds    table
//
// reason is nack, unroutable or no_exchange (attempts of the message, the
// sum is Stats.Failed) or timeout or channel_closed (the broker's answer is
// unknown; the row is released and also counted in released). The counters
// are observable: they read the same counters as Stats, at collection time,
// so publishing pays nothing for them. The confirm duration runs from
// publish to ack, nack or return; the batch duration from the claim until
// the last row of the batch is settled. Histogram buckets run from 1ms to
// 30s.
//
// pending_rows counts every row in the outbox (due, in flight, retrying or
// scheduled); oldest_pending_age is the lag: the age of the oldest row that
// is not merely scheduled for later, 0 when none. Both come from Status,
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
