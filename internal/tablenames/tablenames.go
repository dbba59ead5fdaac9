// Package tablenames resolves the table names of one mailroom
// installation (mailroom.Tables): defaults filled in, every name validated,
// and the names derived from the outbox's. The packages that build SQL use
// Resolved; it is not part of the public API.
package tablenames

import (
	"fmt"

	"github.com/mailroom-go/mailroom/internal/sqlident"
)

// The default names (mailroom.DefaultOutboxTable and the others are these).
const (
	DefaultOutbox     = "mailroom_outbox"
	DefaultInbox      = "mailroom_inbox"
	DefaultMigrations = "mailroom_schema_migrations"
)

// Names has the fields of mailroom.Tables, which converts to it:
// tablenames.Names(tables).
type Names struct {
	Outbox     string
	Dead       string
	Published  string
	Inbox      string
	Migrations string
}

// Resolved is Names with defaults filled in and every name validated.
type Resolved struct {
	Outbox, Dead, Published, Wake, Inbox, Migrations sqlident.Name
	// Notify is the function that wakes sleeping relays (Outbox +
	// "_notify", in the outbox's schema), called by the default of the
	// outbox's notified column; see migrations 0003 and 0005.
	Notify sqlident.Name
	// Relays is where relays without a session of their own
	// (DisableListen) show themselves (Outbox + "_relays", in the
	// outbox's schema); see migration 0007.
	Relays sqlident.Name
	// LeaseGuard is the outbox's UPDATE trigger function (Outbox +
	// "_lease_guard", in the outbox's schema) that rejects the claims of
	// relays older than schema version 4; see migration 0005.
	LeaseGuard sqlident.Name
}

// Resolve fills defaults and validates every name.
func Resolve(t Names) (Resolved, error) {
	var r Resolved
	var err error
	if t.Outbox == "" {
		t.Outbox = DefaultOutbox
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
	if r.Relays, err = r.Outbox.Derived("_relays"); err != nil {
		return r, fmt.Errorf("mailroom: Tables.Outbox (its _relays table): %w", err)
	}
	if r.LeaseGuard, err = r.Outbox.Derived("_lease_guard"); err != nil {
		return r, fmt.Errorf("mailroom: Tables.Outbox (its _lease_guard trigger function): %w", err)
	}
	if t.Inbox == "" {
		t.Inbox = DefaultInbox
	}
	if r.Inbox, err = sqlident.Parse(t.Inbox); err != nil {
		return r, fmt.Errorf("mailroom: Tables.Inbox: %w", err)
	}
	if t.Migrations == "" {
		t.Migrations = DefaultMigrations
	}
	if r.Migrations, err = sqlident.Parse(t.Migrations); err != nil {
		return r, fmt.Errorf("mailroom: Tables.Migrations: %w", err)
	}
	return r, nil
}

// Parse parses the one table a Config gives as Table or as Tables.<field>
// (see One), def when neither is set. Its errors begin with the Config
// field to fix ("Table: …", "Tables.Inbox: …").
func Parse(table, field, fromTables, def string) (sqlident.Name, error) {
	t, err := One(table, field, fromTables)
	if err != nil {
		return sqlident.Name{}, err
	}
	from := "Table"
	if table == "" && t != "" {
		from = "Tables." + field
	}
	if t == "" {
		t = def
	}
	n, err := sqlident.Parse(t)
	if err != nil {
		return n, fmt.Errorf("%s: %w", from, err)
	}
	return n, nil
}

// One is the name of one table that a Config may give in two ways: Table
// (its short form, one name) or a field of Tables (field names it; the
// form the relay and Migrate take too, so one value names the installation
// everywhere). "" when neither is set; an error when both are, differently.
func One(table, field, fromTables string) (string, error) {
	switch {
	case table == "":
		return fromTables, nil
	case fromTables == "" || fromTables == table:
		return table, nil
	default:
		return "", fmt.Errorf("Table %q and Tables.%s %q differ: set one of them", table, field, fromTables)
	}
}
