// Package dedupe remembers which ids a scope has already seen, inside the
// caller's transaction, so an effect happens exactly once even when its
// trigger (a message, an HTTP request with an Idempotency-Key) arrives twice.
//
//	store, err := dedupe.New(dedupe.Config{}) // table "mailroom_inbox"
//	…
//	tx, _ := db.BeginTxx(ctx, nil)
//	first, err := store.Claim(ctx, tx, "payments", msgID)
//	if err == nil && first {
//		err = charge(ctx, tx, …) // the effect, in the same transaction
//	}
//	… commit (or roll back: the claim disappears with the effect)
//
// Claim is INSERT … ON CONFLICT DO NOTHING on the primary key (scope, id):
// a duplicate reports first=false; a concurrent claim of the same pair waits
// for the first transaction and then knows whether it committed. ClaimMany
// does the same for a batch in one statement, and Release undoes one claim
// of a batch inside the transaction (after rolling back to a savepoint).
// Through an sqlx handle on lib/pq, Claim and ClaimMany are one round trip
// each: their values go inline as quoted literals, since lib/pq spends two
// round trips on a statement with parameters.
// The inbox package calls these for every delivery; an HTTP idempotency
// middleware can call them with scope "http:orders" and the request's key.
//
// # Purging
//
// Each scope keeps its entries for a window of its own and is purged by
// its owner with Purge(ctx, db, scope, olderThan), which touches no other
// scope: scopes share the table but not their retention. The inbox
// consumer purges its Consumer scope by its Retention (see
// inbox.Config.PurgeInterval); an HTTP idempotency middleware purges its
// scope itself; the mailroom-relay sidecar purges only the scopes it is
// told to (--purge-inbox scope=retention), none by default. Purge deletes
// in batches of Config.PurgeBatch (1000) rows, oldest first along the
// (scope, recorded_at) index, each batch its own short autocommit statement
// with FOR UPDATE SKIP LOCKED: no purge holds locks for more than one
// batch, concurrent purgers never wait on each other or on claims, and
// autovacuum reclaims the space as it goes.
//
// Run mailroom.Migrate (or `mailroom-relay migrate`) to create the table.
// Who purges what, and why batched deletes rather than time partitions:
// docs/operations.md in the repository.
package dedupe
