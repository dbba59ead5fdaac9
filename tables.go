package mailroom

import (
	"github.com/mailroom-go/mailroom/internal/tablenames"
)

// Default table names. Unqualified names resolve through the connection's
// search_path, so a schema can be chosen by connection string alone
// (…?search_path=myschema).
const (
	DefaultOutboxTable     = tablenames.DefaultOutbox
	DefaultInboxTable      = tablenames.DefaultInbox
	DefaultMigrationsTable = tablenames.DefaultMigrations
)

// Tables names the tables of one mailroom installation. The zero value means
// all defaults. Each name is "table" or "schema.table", plain identifiers
// only.
type Tables struct {
	Outbox     string // default "mailroom_outbox"
	Dead       string // default Outbox + "_dead"
	Published  string // default Outbox + "_published"
	Inbox      string // default "mailroom_inbox"
	Migrations string // default "mailroom_schema_migrations"
}

// Validate reports the first name that is not a plain identifier (or
// "schema.table"), or whose derived names would be too long.
func (t Tables) Validate() error {
	_, err := t.resolve()
	return err
}

func (t Tables) resolve() (tablenames.Resolved, error) {
	return tablenames.Resolve(tablenames.Names(t))
}
