// Package relay moves messages from the outbox table to RabbitMQ: it claims
// due rows in one short statement (no transaction held open), publishes
// them persistent and mandatory on a confirm channel, and deletes a row
// only once the broker acked it and did not return it.
//
//	r, err := relay.New(db, relay.Config{URL: amqpURL, DatabaseURL: dbURL})
//	…
//	err = r.Run(ctx) // until ctx ends; then finishes or releases in-flight rows
//
// No loss: a nack, a basic.return, a missing exchange, a confirm timeout or
// a lost channel all mean "not delivered", and the row is published again.
// Delivery is at-least-once: a relay that dies after the broker acked but
// before the row was deleted publishes it again; consumers deduplicate by
// message id (package inbox).
//
// Ordering: for two messages with the same non-empty Key, A before B, where
// A was added earlier in the same transaction or by a transaction that
// committed before B's transaction called Add, A reaches the broker before
// B is published — across any number of relays. Messages of concurrent
// transactions are ordered by the sequence their INSERTs drew, which is not
// promised to follow commit order; different keys, and messages without a
// key, are published in parallel and in no promised order. One message of
// a key is in flight at a time, so a key moves at one publisher-confirm
// round trip per message, and a backlog over K keys drains at most K
// messages per round trip: choose keys for the order you need (an
// aggregate, not a tenant). Measured (docs/performance.md, 2026-12-06): one
// key moves at 0.98× RabbitMQ alone publishing one message at a time
// (about 1,300/s here), 50 keys at 0.90× RabbitMQ alone with one message of
// each key in flight; the broker is the bound.
//
// Failures: a nack, a return, a missing exchange, a broker refusal, a row
// over MaxMessageSize or one that breaks the wire contract counts an
// attempt and reschedules the row with exponential backoff and jitter;
// after MaxAttempts it moves to the dead-letter table with its last error
// (Admin.ListDead, ReplayDead; DeadLetter.Err tells the kinds apart). A
// poison row holds back only the later rows of its own key. A lost channel
// or a confirm timeout hands rows back without counting an attempt.
//
// Run any number of relays on one table, in-process or as the
// mailroom-relay sidecar. By default one of them publishes and the others
// stand by, taking over within about a second when it stops, dies or loses
// the broker, or about 10 s when it freezes (Config.ActiveRelays lets
// several publish at once). A sleeping relay is woken by a NOTIFY within
// milliseconds of a commit; polling (PollInterval) finds everything when
// notifications are lost or off (DisableListen, for PgBouncer).
//
// Each publish is a producer span "publish <exchange>" continuing the trace
// outbox.Add stored in the headers. The metrics are mailroom.relay.published,
// .publish.failures (by reason), .dead_lettered, .released,
// .confirm.duration, .batch.duration, .claim.duration, .confirm_window,
// .standby and .held_rows, and mailroom.outbox.pending_rows and
// .oldest_pending_age (the lag), all with attribute table. Config.Logger
// gets warnings and errors, never a line per successful publish.
//
// The detail is in the repository's docs: docs/relay.md (the ordering
// promise in full, failures, wake-up, leases, several relays, throughput),
// docs/observability.md (each span attribute and metric, with its
// Prometheus name), docs/operations.md (the sidecar, dead letters, replay)
// and docs/wire.md (what a row becomes on the wire).
package relay
