package mailroom

import (
	"fmt"

	"github.com/mailroom-go/mailroom/internal/sqlident"
)

// Default table names. Unqualified names resolve through the connection's
// search_path, so a schema can be chosen by connection string alone
// (…?search_path=myschema).
const (
	DefaultOutboxTable     = "mailroom_outbox"
	DefaultInboxTable      = "mailroom_inbox"
	DefaultMigrationsTable = "mailroom_schema_migrations"
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

// Resolved is Tables with defaults filled in and every name validated.
type Resolved struct {
	Outbox, Dead, Published, Wake, Inbox, Migrations sqlident.Name
	// Notify is the function that wakes sleeping relays (Outbox +
	// "_notify", in the outbox's schema), called by the default of the
	// outbox's notified column; see migrations 0003 and 0005.
	Notify sqlident.Name
	// LeaseGuard is the outbox's UPDATE trigger function (Outbox +
	// "_lease_guard", in the outbox's schema) that rejects the claims of
	// relays older than schema version 4; see migration 0005.
	LeaseGuard sqlident.Name
}

// Resolve fills defaults and validates every name.
func (t Tables) Resolve() (Resolved, error) {
	var r Resolved
	var err error
	if t.Outbox == "" {
		t.Outbox = DefaultOutboxTable
	}
	if r.Outbox, err = sqlident.Parse(t.Outbox); err != nil {
		return r, fmt.Errorf("mailroom: Tables.Outbox: %w", err)
	}
	derive := func(field, given, suffix string) (sqlident.Name, error) {
		if given != "" {
			n, err := sqlident.Parse(given)
			if err != nil {
				return n, fmt.Errorf("mailroom: Tables.%s: %w", field, err)
			}
			return n, nil
		}
		n, err := r.Outbox.Derived(suffix)
		if err != nil {
			return n, fmt.Errorf("mailroom: Tables.%s (derived from Outbox): %w; set it explicitly", field, err)
		}
		return n, nil
	}
	if r.Dead, err = derive("Dead", t.Dead, "_dead"); err != nil {
		return r, err
	}
	if r.Published, err = derive("Published", t.Published, "_published"); err != nil {
		return r, err
	}
	// The wake table (version 2, kept for writers of that version) is
	// always Outbox + "_wake": they derive it from the outbox name alone.
	if r.Wake, err = r.Outbox.Derived("_wake"); err != nil {
		return r, fmt.Errorf("mailroom: Tables.Outbox (its _wake table): %w", err)
	}
	if r.Notify, err = r.Outbox.Derived("_notify"); err != nil {
		return r, fmt.Errorf("mailroom: Tables.Outbox (its _notify function): %w", err)
	}
	if r.LeaseGuard, err = r.Outbox.Derived("_lease_guard"); err != nil {
		return r, fmt.Errorf("mailroom: Tables.Outbox (its _lease_guard trigger function): %w", err)
	}
	if t.Inbox == "" {
		t.Inbox = DefaultInboxTable
	}
	if r.Inbox, err = sqlident.Parse(t.Inbox); err != nil {
		return r, fmt.Errorf("mailroom: Tables.Inbox: %w", err)
	}
	if t.Migrations == "" {
		t.Migrations = DefaultMigrationsTable
	}
	if r.Migrations, err = sqlident.Parse(t.Migrations); err != nil {
		return r, fmt.Errorf("mailroom: Tables.Migrations: %w", err)
	}
	return r, nil
}
