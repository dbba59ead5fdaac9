package mailroom

import (
	"context"
	"database/sql"
	"embed"
	"fmt"
	"io/fs"
	"regexp"
	"sort"
	"strconv"
	"strings"

	"github.com/mailroom-go/mailroom/internal/locks"
	"github.com/mailroom-go/mailroom/internal/sqlident"
	"github.com/mailroom-go/mailroom/internal/tablenames"
)

// Migrations holds the versioned SQL files (NNNN_name.sql) that Migrate
// applies. They use the default table names and can be copied as they are
// into golang-migrate or goose.
//
//go:embed migrations/*.sql
var Migrations embed.FS

type migration struct {
	version int
	name    string
	sql     string
}

// Migrate creates or upgrades every mailroom table (outbox, dead letters,
// published archive, inbox) to the latest version. It is idempotent and safe
// to run from several processes at once: all pending versions are applied in
// one transaction under an advisory lock, and each applied version is
// recorded in Tables.Migrations.
func Migrate(ctx context.Context, db *sql.DB, tables Tables) error {
	return migrate(ctx, db, tables, 0)
}

// migrate applies the pending versions up to upTo (0: all).
func migrate(ctx context.Context, db *sql.DB, tables Tables, upTo int) error {
	r, err := tables.resolve()
	if err != nil {
		return err
	}
	migs, err := loadMigrations()
	if err != nil {
		return err
	}
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("mailroom: migrate: begin: %w", err)
	}
	defer tx.Rollback() //nolint:errcheck // after Commit this is a no-op
	if _, err := tx.ExecContext(ctx, `SELECT pg_advisory_xact_lock($1)`, int64(locks.Migrate)); err != nil {
		return fmt.Errorf("mailroom: migrate: lock: %w", err)
	}
	if _, err := tx.ExecContext(ctx, `CREATE TABLE IF NOT EXISTS `+r.Migrations.Quoted()+` (
		tables     text        NOT NULL,
		version    integer     NOT NULL,
		name       text        NOT NULL,
		applied_at timestamptz NOT NULL DEFAULT now(),
		PRIMARY KEY (tables, version))`); err != nil {
		return fmt.Errorf("mailroom: migrate: create %s: %w", r.Migrations, err)
	}
	// One migrations table may serve several table sets in a schema; each
	// set is identified by its outbox table name.
	set := r.Outbox.String()
	var current int
	if err := tx.QueryRowContext(ctx, `SELECT coalesce(max(version), 0) FROM `+r.Migrations.Quoted()+` WHERE tables = $1`, set).Scan(&current); err != nil {
		return fmt.Errorf("mailroom: migrate: read version: %w", err)
	}
	if current > 0 {
		// Versions are recorded per outbox table: a set naming other
		// dead-letter, published or inbox tables beside a migrated outbox
		// would find nothing to do and leave its tables missing.
		for _, t := range []struct {
			what string
			name sqlident.Name
		}{{"outbox", r.Outbox}, {"dead-letter", r.Dead}, {"published", r.Published}, {"inbox", r.Inbox}} {
			var exists bool
			if err := tx.QueryRowContext(ctx, `SELECT to_regclass($1) IS NOT NULL`, t.name.Quoted()).Scan(&exists); err != nil {
				return fmt.Errorf("mailroom: migrate: look for %s: %w", t.name, err)
			}
			if !exists {
				return fmt.Errorf("mailroom: migrate: the tables of outbox %s are at schema version %d, but its %s table %s does not exist: versions are recorded per outbox table, so name the %s table it was migrated with (or, for another %s table, migrate a table set with an outbox of its own)", r.Outbox, current, t.what, t.name, t.what, t.what)
			}
		}
	}
	for _, m := range migs {
		if m.version <= current || (upTo > 0 && m.version > upTo) {
			continue
		}
		stmt, err := render(m.sql, r)
		if err != nil {
			return fmt.Errorf("mailroom: migrate: %04d_%s: %w", m.version, m.name, err)
		}
		if _, err := tx.ExecContext(ctx, stmt); err != nil {
			return fmt.Errorf("mailroom: migrate: apply %04d_%s: %w", m.version, m.name, err)
		}
		if _, err := tx.ExecContext(ctx, `INSERT INTO `+r.Migrations.Quoted()+` (tables, version, name) VALUES ($1, $2, $3)`, set, m.version, m.name); err != nil {
			return fmt.Errorf("mailroom: migrate: record %04d_%s: %w", m.version, m.name, err)
		}
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("mailroom: migrate: commit: %w", err)
	}
	return nil
}

// SchemaVersion reports the latest applied migration version for the table
// set (0 when none) and the latest version this build knows.
func SchemaVersion(ctx context.Context, db *sql.DB, tables Tables) (applied, latest int, err error) {
	r, err := tables.resolve()
	if err != nil {
		return 0, 0, err
	}
	migs, err := loadMigrations()
	if err != nil {
		return 0, 0, err
	}
	latest = migs[len(migs)-1].version
	err = db.QueryRowContext(ctx, `SELECT coalesce(max(version), 0) FROM `+r.Migrations.Quoted()+` WHERE tables = $1`, r.Outbox.String()).Scan(&applied)
	if err != nil {
		return 0, latest, fmt.Errorf("mailroom: read schema version from %s (run `mailroom-relay migrate`?): %w", r.Migrations, err)
	}
	return applied, latest, nil
}

var fileName = regexp.MustCompile(`^(\d{4})_([a-z0-9_]+)\.sql$`)

func loadMigrations() ([]migration, error) {
	entries, err := fs.ReadDir(Migrations, "migrations")
	if err != nil {
		return nil, err
	}
	var out []migration
	for _, e := range entries {
		m := fileName.FindStringSubmatch(e.Name())
		if m == nil {
			return nil, fmt.Errorf("mailroom: migration file %q does not match NNNN_name.sql", e.Name())
		}
		v, _ := strconv.Atoi(m[1])
		b, err := Migrations.ReadFile("migrations/" + e.Name())
		if err != nil {
			return nil, err
		}
		out = append(out, migration{version: v, name: m[2], sql: string(b)})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].version < out[j].version })
	return out, nil
}

var defaultIdent = regexp.MustCompile(`\bmailroom_[a-z_]+\b`)

// render substitutes the configured table names into a migration written with
// the defaults. A default table name becomes the configured, quoted, possibly
// schema-qualified name; a name derived from it (an index) keeps its suffix
// on the configured table name, so two table sets in one schema never share
// an index name.
func render(src string, r tablenames.Resolved) (string, error) {
	known := []struct {
		def  string
		name sqlident.Name
	}{ // longest first, so mailroom_outbox_dead wins over mailroom_outbox
		{"mailroom_outbox_published", r.Published},
		{"mailroom_outbox_dead", r.Dead},
		{"mailroom_outbox_wake", r.Wake},
		{"mailroom_outbox_notify", r.Notify},
		{"mailroom_outbox_lease_guard", r.LeaseGuard},
		{"mailroom_outbox_relays", r.Relays},
		{"mailroom_outbox", r.Outbox},
		{"mailroom_inbox", r.Inbox},
	}
	var firstErr error
	out := defaultIdent.ReplaceAllStringFunc(src, func(id string) string {
		for _, k := range known {
			if id == k.def {
				return k.name.Quoted()
			}
			if suffix, ok := strings.CutPrefix(id, k.def+"_"); ok {
				n, err := sqlident.Parse(k.name.Table + "_" + suffix)
				if err != nil && firstErr == nil {
					firstErr = fmt.Errorf("derived name for %s: %w (choose a shorter table name)", id, err)
				}
				return n.Quoted()
			}
		}
		if firstErr == nil {
			firstErr = fmt.Errorf("unknown mailroom identifier %s in migration", id)
		}
		return id
	})
	return out, firstErr
}
