package testenv

import (
	"context"
	"database/sql"
	"os/exec"
	"strings"
	"testing"
	"time"
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
