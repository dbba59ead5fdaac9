// Package outbox is the write side of mailroom: it stores events in the
// outbox table inside the caller's own database transaction, so an event
// exists if and only if the business change that produced it committed.
//
//	db, err := atcommit.OpenDB(dsn) // lib/pq; Add's insert travels with the COMMIT
//	ob, err := outbox.New(outbox.Config{DB: db}) // table "mailroom_outbox"
//	…
//	tx, _ := db.BeginTx(ctx, nil)
//	_, _ = tx.ExecContext(ctx, `INSERT INTO orders …`)
//	err = ob.Add(ctx, tx, outbox.Message{
//		Exchange: "orders", RoutingKey: "order.placed", Key: orderID,
//		Type: "order.placed", Payload: body,
//	})
//	…
//	err = tx.Commit()
//
// Add validates every message before it touches the database (errors wrap
// ErrInvalidMessage and name the message index and field), writes all of
// them with one INSERT in one round trip — or, on a database opened with
// atcommit.OpenDB (or atcommit.NewConnector) and given as Config.DB, in no
// round trip of its own: the connection sends the inserts in the same message as the
// transaction's COMMIT, and an insert that fails then fails Commit, with
// the whole transaction rolled back. The default of the outbox's
// notified column (migration 0005) sends a NOTIFY with it, so a sleeping relay publishes
// within milliseconds of the commit — but only while some relay is asleep
// waiting for work: a NOTIFY serialises commits on a database-wide lock,
// and a busy relay claims again by itself, so under load writers pay only
// for a shared advisory lock. Rows inserted with plain SQL wake the relay
// the same way. The relay package moves the rows to RabbitMQ; run
// mailroom.Migrate (or `mailroom-relay migrate`) first to create the
// tables.
//
// Message ids are UUIDs; Add generates time-ordered UUIDv7 ids when ID is
// empty. Ids must be unique: consumers deduplicate by id, so a reused id
// is treated as a duplicate delivery.
//
// Add writes the trace context of its ctx into each message's headers
// through Config.Propagator (default: the global OpenTelemetry propagator;
// set it to propagation.TraceContext{} for W3C traceparent/tracestate),
// keeping headers the caller set; the relay's publish span and the inbox's
// handler span continue that trace.
//
// The detail is in the repository's docs: docs/outbox.md (Add's limits,
// atcommit, the wake-up, idempotency keys with package dedupe) and
// docs/wire.md (the columns for rows written with plain SQL or COPY).
package outbox
