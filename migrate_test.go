package mailroom_test

import (
	"context"
	"strings"
	"sync"
	"testing"

	"github.com/mailroom-go/mailroom"
	"github.com/mailroom-go/mailroom/internal/testenv"
)

func TestMigrateTwiceAndConcurrently(t *testing.T) {
	t.Parallel()
	s := testenv.NewEmptySchema(t)
	ctx := context.Background()
	var wg sync.WaitGroup
	errs := make([]error, 4)
	for i := range errs {
		wg.Add(1)
		go func() { defer wg.Done(); errs[i] = mailroom.Migrate(ctx, s.DB.DB, mailroom.Tables{}) }()
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			t.Fatalf("concurrent migrate: %v", err)
		}
	}
	// Again on a database that already has the latest version.
	if err := mailroom.Migrate(ctx, s.DB.DB, mailroom.Tables{}); err != nil {
		t.Fatal(err)
	}
	applied, latest, err := mailroom.SchemaVersion(ctx, s.DB.DB, mailroom.Tables{})
	if err != nil {
		t.Fatal(err)
	}
	if applied != latest || latest < 1 {
		t.Fatalf("applied %d, latest %d", applied, latest)
	}
	var records int
	if err := s.DB.Get(&records, `SELECT count(*) FROM mailroom_schema_migrations`); err != nil {
		t.Fatal(err)
	}
	if records != latest {
		t.Fatalf("%d version records, want one per version (%d)", records, latest)
	}
	var tables []string
	if err := s.DB.Select(&tables, `SELECT table_name FROM information_schema.tables WHERE table_schema = $1 ORDER BY 1`, s.Name); err != nil {
		t.Fatal(err)
	}
	want := "mailroom_inbox mailroom_outbox mailroom_outbox_dead mailroom_outbox_published mailroom_outbox_relays mailroom_outbox_wake mailroom_schema_migrations"
	if got := strings.Join(tables, " "); got != want {
		t.Fatalf("tables %q, want %q", got, want)
	}
}

func TestMigrateCustomNames(t *testing.T) {
	t.Parallel()
	s := testenv.NewEmptySchema(t)
	ctx := context.Background()
	// Two table sets side by side in one schema: index names must not collide.
	for _, tb := range []mailroom.Tables{{Outbox: s.Name + ".events", Inbox: "seen"}, {Outbox: "events2", Inbox: "seen2"}} {
		if err := mailroom.Migrate(ctx, s.DB.DB, tb); err != nil {
			t.Fatal(err)
		}
	}
	var idx []string
	if err := s.DB.Select(&idx, `SELECT indexname FROM pg_indexes WHERE schemaname = $1 AND indexname LIKE 'events%' ORDER BY 1`, s.Name); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"events_available_idx", "events2_available_idx", "events_dead_id_idx", "events2_key_idx"} {
		found := false
		for _, i := range idx {
			found = found || i == want
		}
		if !found {
			t.Errorf("index %s missing; have %v", want, idx)
		}
	}
	// Each outbox keeps room on its pages for HOT lease updates (version
	// 4) and has no CHECK constraint left (version 5 moved the lease check
	// to an UPDATE trigger).
	var pages []string
	if err := s.DB.Select(&pages, `SELECT c.relname || ' ' || array_to_string(c.reloptions, ',') || ' ' ||
  (SELECT count(*) FROM pg_constraint k WHERE k.conrelid = c.oid AND k.contype = 'c')
FROM pg_class c WHERE c.relnamespace = $1::regnamespace AND c.relname IN ('events', 'events2') ORDER BY 1`, s.Name); err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(pages, ", "); got != "events fillfactor=40 0, events2 fillfactor=40 0" {
		t.Errorf("outboxes (name, options, checks): %s", got)
	}
	// Each outbox takes its own wake lock in the default of its notified
	// column, calling a function in the outbox's schema (version 5), and
	// the wake-up trigger of version 3 is gone.
	var wakes []string
	if err := s.DB.Select(&wakes, `SELECT c.relname || ' ' || pn.nspname || '.' || p.proname
FROM pg_attrdef d
JOIN pg_class c ON c.oid = d.adrelid
JOIN pg_attribute a ON a.attrelid = d.adrelid AND a.attnum = d.adnum
JOIN pg_depend dep ON dep.classid = 'pg_attrdef'::regclass AND dep.objid = d.oid AND dep.refclassid = 'pg_proc'::regclass
JOIN pg_proc p ON p.oid = dep.refobjid JOIN pg_namespace pn ON pn.oid = p.pronamespace
WHERE a.attname = 'notified' AND c.relnamespace = $1::regnamespace ORDER BY 1`, s.Name); err != nil {
		t.Fatal(err)
	}
	if got, want := strings.Join(wakes, ", "), "events "+s.Name+".events_notify, events2 "+s.Name+".events2_notify"; got != want {
		t.Errorf("wake-up defaults: %s, want %s", got, want)
	}
	// The only triggers left are the lease guards (version 5), each
	// calling a function in its outbox's schema: version 3's wake-up
	// trigger is gone.
	if got, want := triggers(t, s), "events events_lease_guard_trg "+s.Name+".events_lease_guard, events2 events2_lease_guard_trg "+s.Name+".events2_lease_guard"; got != want {
		t.Errorf("triggers: %s, want %s", got, want)
	}
}

// triggers lists the user triggers of the schema's tables: table, trigger
// and schema-qualified function.
func triggers(t *testing.T, s *testenv.Schema) string {
	t.Helper()
	var trgs []string
	if err := s.DB.Select(&trgs, `SELECT c.relname || ' ' || t.tgname || ' ' || pn.nspname || '.' || p.proname
FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_proc p ON p.oid = t.tgfoid JOIN pg_namespace pn ON pn.oid = p.pronamespace
WHERE c.relnamespace = $1::regnamespace AND NOT t.tgisinternal ORDER BY 1`, s.Name); err != nil {
		t.Fatal(err)
	}
	return strings.Join(trgs, ", ")
}

func TestTablesRejectHostileNames(t *testing.T) {
	t.Parallel()
	for _, tb := range []mailroom.Tables{
		{Outbox: `x"; DROP SCHEMA public CASCADE; --`},
		{Inbox: "a b"},
		{Dead: "a.b.c"},
		{Migrations: "1x"},
		{Outbox: strings.Repeat("o", 60)}, // the derived _dead name would be truncated by PostgreSQL
	} {
		if err := tb.Validate(); err == nil {
			t.Errorf("%+v accepted", tb)
		}
	}
}

// An outbox of version 4 with rows in it upgrades to version 5 in place:
// no table rewrite (same relfilenode), the rows are kept (notified NULL),
// and inserts written for version 4 take the wake lock through the new
// default; the wake-up trigger is gone, the lease guard in its place.
func TestMigrateFromVersion4(t *testing.T) {
	t.Parallel()
	s := testenv.NewEmptySchema(t)
	ctx := context.Background()
	if err := mailroom.MigrateTo(ctx, s.DB.DB, mailroom.Tables{}, 4); err != nil {
		t.Fatal(err)
	}
	insert := `INSERT INTO mailroom_outbox (id, exchange, routing_key, payload) VALUES (gen_random_uuid(), 'x', 'k', '{}')`
	if _, err := s.DB.Exec(insert); err != nil {
		t.Fatal(err)
	}
	var before uint32
	if err := s.DB.Get(&before, `SELECT relfilenode FROM pg_class WHERE oid = 'mailroom_outbox'::regclass`); err != nil {
		t.Fatal(err)
	}
	if err := mailroom.Migrate(ctx, s.DB.DB, mailroom.Tables{}); err != nil {
		t.Fatal(err)
	}
	var after uint32
	if err := s.DB.Get(&after, `SELECT relfilenode FROM pg_class WHERE oid = 'mailroom_outbox'::regclass`); err != nil {
		t.Fatal(err)
	}
	if after != before {
		t.Errorf("the upgrade rewrote the outbox (relfilenode %d, was %d)", after, before)
	}
	if _, err := s.DB.Exec(insert); err != nil {
		t.Fatal(err)
	}
	var notified []string
	if err := s.DB.Select(&notified, `SELECT coalesce(notified::text, 'NULL') FROM mailroom_outbox ORDER BY seq`); err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(notified, " "); got != "NULL false" {
		t.Errorf("notified after the upgrade: %s, want NULL (written by version 4) false (no relay asleep)", got)
	}
	if got, want := triggers(t, s), "mailroom_outbox mailroom_outbox_lease_guard_trg "+s.Name+".mailroom_outbox_lease_guard"; got != want {
		t.Errorf("triggers after the upgrade: %s, want %s", got, want)
	}
	applied, latest, err := mailroom.SchemaVersion(ctx, s.DB.DB, mailroom.Tables{})
	if err != nil || applied != latest {
		t.Fatalf("schema version %d of %d (%v)", applied, latest, err)
	}
}

// A table set that names another inbox (or dead-letter, published) table
// beside an outbox already migrated gets an error naming the missing
// table, not a silent success.
func TestMigrateOtherTablesBesideAMigratedOutbox(t *testing.T) {
	t.Parallel()
	s := testenv.NewEmptySchema(t)
	ctx := context.Background()
	if err := mailroom.Migrate(ctx, s.DB.DB, mailroom.Tables{}); err != nil {
		t.Fatal(err)
	}
	err := mailroom.Migrate(ctx, s.DB.DB, mailroom.Tables{Inbox: "payments_inbox"})
	if err == nil || !strings.Contains(err.Error(), "inbox table payments_inbox does not exist") {
		t.Fatalf("Migrate with another inbox table: %v, want an error naming it", err)
	}
}

// The tables migrated to version 4 by another tool (the files copied into
// golang-migrate or goose, no version recorded here) upgrade through
// Migrate: every version can be applied again.
func TestMigrateOverTablesOfAnotherTool(t *testing.T) {
	t.Parallel()
	s := testenv.NewEmptySchema(t)
	ctx := context.Background()
	if err := mailroom.MigrateTo(ctx, s.DB.DB, mailroom.Tables{}, 4); err != nil {
		t.Fatal(err)
	}
	s.DB.MustExec(`DELETE FROM mailroom_schema_migrations`)
	if err := mailroom.Migrate(ctx, s.DB.DB, mailroom.Tables{}); err != nil {
		t.Fatalf("Migrate over tables at version 4 with no record: %v", err)
	}
	applied, latest, err := mailroom.SchemaVersion(ctx, s.DB.DB, mailroom.Tables{})
	if err != nil || applied != latest {
		t.Fatalf("schema version %d of %d (%v)", applied, latest, err)
	}
}
