package pgerr

import (
	"errors"
	"fmt"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/lib/pq"
)

// Both drivers' errors read the same: lib/pq's and pgx's.
func TestBothDrivers(t *testing.T) {
	for _, c := range []struct {
		name            string
		err             error
		state           string
		refused, rolled bool
	}{
		{"pq constraint", &pq.Error{Code: "23503", Severity: "ERROR"}, "23503", true, false},
		{"pgx constraint", &pgconn.PgError{Code: "23503", Severity: "ERROR"}, "23503", true, false},
		{"pq wrapped", fmt.Errorf("commit: %w", &pq.Error{Code: "40001"}), "40001", true, false},
		{"pgx admin shutdown", &pgconn.PgError{Code: "57P01", Severity: "FATAL"}, "57P01", false, false},
		{"pq FATAL", &pq.Error{Code: "53300", Severity: "FATAL"}, "53300", false, false},
		{"pgx connection failure", &pgconn.PgError{Code: "08006"}, "08006", false, false},
		{"pgx idle in transaction timeout", &pgconn.PgError{Code: "25P03"}, "25P03", false, false},
		{"network", errors.New("read tcp: connection reset by peer"), "", false, false},
		{"pq in failed transaction", pq.ErrInFailedTransaction, "", false, true},
		{"pgx commit rollback", fmt.Errorf("commit: %w", pgx.ErrTxCommitRollback), "", false, true},
		{"pgx 25P02", &pgconn.PgError{Code: "25P02"}, "25P02", true, true},
	} {
		if got := SQLState(c.err); got != c.state {
			t.Errorf("%s: SQLState %q, want %q", c.name, got, c.state)
		}
		if got := Refused(c.err); got != c.refused {
			t.Errorf("%s: Refused %v, want %v", c.name, got, c.refused)
		}
		if got := CommitRolledBack(c.err); got != c.rolled {
			t.Errorf("%s: CommitRolledBack %v, want %v", c.name, got, c.rolled)
		}
	}
}
