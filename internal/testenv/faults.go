package testenv

import (
	"context"
	"database/sql"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jmoiron/sqlx"
)

// TerminateBackends ends every PostgreSQL session whose application_name is
// name (see WithAppName) and returns how many it ended.
func TerminateBackends(t testing.TB, name string) int {
	t.Helper()
	db, err := sql.Open("postgres", DatabaseURL())
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var n int
	err = db.QueryRowContext(ctx, `SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1 AND pid <> pg_backend_pid()`, name).Scan(&n)
	if err != nil {
		t.Fatalf("pg_terminate_backend: %v", err)
	}
	return n
}

// BuildBinary builds a main package into the test's temp dir and returns
// its path.
func BuildBinary(t testing.TB, pkg string) string {
	t.Helper()
	bin := t.TempDir() + "/" + pkg[strings.LastIndex(pkg, "/")+1:]
	cmd := exec.Command("go", "build", "-o", bin, pkg)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build %s: %v\n%s", pkg, err, out)
	}
	return bin
}

// HoldSnapshot opens a session of its own on dbURL (application_name app,
// unique) holding a REPEATABLE READ snapshot: the vacuum horizon stays
// where it is until release (or the test's end), as a forgotten
// transaction or a long report would hold it.
func HoldSnapshot(t testing.TB, dbURL string) (app string, release func()) {
	t.Helper()
	app = Unique("horizon")
	db, err := sql.Open(Driver(), WithAppName(dbURL, app))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	tx, err := db.BeginTx(context.Background(), &sql.TxOptions{Isolation: sql.LevelRepeatableRead})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(`SELECT 1`); err != nil { // the snapshot is taken here
		t.Fatal(err)
	}
	var once sync.Once
	release = func() { once.Do(func() { _ = tx.Rollback() }) }
	t.Cleanup(release)
	return app, release
}

// DeadRows writes n rows into db's mailroom_outbox and deletes the first
// dead of them, on one session that then flushes its statistics, so
// pg_stat_user_tables counts them at once; while a snapshot is held
// (HoldSnapshot) the deleted rows stay as dead tuples.
func DeadRows(t testing.TB, db *sqlx.DB, n, dead int) {
	t.Helper()
	ctx := context.Background()
	conn, err := db.Conn(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	for _, q := range []string{
		`INSERT INTO mailroom_outbox (id, exchange, routing_key, payload) SELECT gen_random_uuid(), 'x', 'r', '\x7b7d' FROM generate_series(1, ` + strconv.Itoa(n) + `)`,
		`DELETE FROM mailroom_outbox WHERE seq IN (SELECT seq FROM mailroom_outbox ORDER BY seq LIMIT ` + strconv.Itoa(dead) + `)`,
		`SELECT pg_stat_force_next_flush()`,
	} {
		if _, err := conn.ExecContext(ctx, q); err != nil {
			t.Fatal(err)
		}
	}
}
