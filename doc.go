// Package mailroom holds what the outbox, relay and inbox packages share:
// the table names (Tables) and the schema migrations (Migrate).
//
// Run Migrate once at deploy time (or `mailroom-relay migrate`); production
// code paths never create tables on their own.
//
//	if err := mailroom.Migrate(ctx, db, mailroom.Tables{}); err != nil {
//		return err
//	}
//
// The SQL lives in migrations/ with the default table names, ready to copy
// into golang-migrate or goose. Upgrading between schema versions, and the
// rest of running mailroom: docs/operations.md in the repository; the
// README has the guarantees, the API and the current figures.
package mailroom
