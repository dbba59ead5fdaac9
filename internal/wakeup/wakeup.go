// Package wakeup holds what the outbox's notified default (migrations 0003
// and 0005) and the relay must agree on for NOTIFY on demand: the advisory lock and the
// channel.
//
// A NOTIFY serialises committing transactions on a database-wide lock; paid
// on every commit it costs writers more than the outbox insert itself. So
// writers notify only while a relay sleeps. A relay about to sleep takes the
// wake lock (locks.Wake, outbox table OID) exclusively, looks for rows once
// more, and holds the lock while it sleeps. The default of the outbox's
// notified column takes the lock shared for the writer's transaction and
// notifies when it cannot. The relay's exclusive request waits for every writer holding the
// shared lock, so no commit falls between its last look and its sleep, and
// the lock dies with the relay's session. A relay that keeps finding work
// releases the lock and claims again by itself, so under load writers pay
// only for the shared lock. Polling stays the safety net: nothing waits
// longer than the relay's poll interval, even when a notification is lost.
package wakeup

import "strconv"

// Channel is the NOTIFY channel of the outbox table with the given OID. The
// OID, unlike the name, is unique in the database, so relays of one schema
// are not woken by commits in another schema's table of the same name.
func Channel(oid uint32) string { return "mailroom_" + strconv.FormatUint(uint64(oid), 10) }

// OIDQuery resolves the OID of the outbox table whose quoted name is bound
// to $1 (NULL when it does not exist), through search_path exactly as the
// INSERTs do.
const OIDQuery = `SELECT to_regclass($1)::oid`
