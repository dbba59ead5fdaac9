// Package wakeup holds what outbox.Add and the relay must agree on for
// NOTIFY on demand: the channel name and the wake table.
//
// A NOTIFY serialises committing transactions on a database-wide lock; paid
// on every commit it costs writers more than the outbox insert itself. So
// Add notifies only while some relay has a row in the wake table (outbox
// table name + "_wake") whose wake_until lies in the future: a relay that
// is asleep and waiting. A relay that keeps finding work marks itself awake
// and claims again by itself, so under load writers pay nothing for
// wake-ups. Polling stays the safety net: nothing waits longer than the
// relay's poll interval, even when a notification is lost.
package wakeup

import "github.com/mailroom-go/mailroom/internal/sqlident"

// ChannelExpr is the SQL expression of the NOTIFY channel of the outbox
// table whose quoted name is bound to param: "mailroom_" and the table's
// OID. The OID, unlike the name, is unique in the database, so relays of
// one schema are not woken by commits in another schema's table of the
// same name; to_regclass resolves the name through search_path exactly as
// the INSERT does.
func ChannelExpr(param string) string {
	return `'mailroom_' || to_regclass(` + param + `)::oid::text`
}

// Table is the wake table of an outbox table.
func Table(outbox sqlident.Name) (sqlident.Name, error) { return outbox.Derived("_wake") }
