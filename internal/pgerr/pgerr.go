// Package pgerr reads PostgreSQL errors whichever database/sql driver
// returned them: lib/pq (*pq.Error) and pgx (*pgconn.PgError) both have
// SQLState(), and that is all this package asks of them, so it imports
// neither pgx nor anything a lib/pq user does not already have.
package pgerr

import (
	"errors"
	"strings"

	"github.com/lib/pq"
)

// SQLState is the SQLSTATE of the first PostgreSQL error in err's chain,
// "" when there is none (a network error, a driver's own error).
func SQLState(err error) string {
	var e interface{ SQLState() string }
	if errors.As(err, &e) {
		return e.SQLState()
	}
	return ""
}

// Is reports whether err carries SQLSTATE code.
func Is(err error, code string) bool { return code != "" && SQLState(err) == code }

// CommitRolledBack reports whether a COMMIT's error says the transaction
// had failed before it and was rolled back: lib/pq's ErrInFailedTransaction,
// pgx's ErrTxCommitRollback (matched by its text: importing pgx here would
// make every user build it), or SQLSTATE 25P02.
func CommitRolledBack(err error) bool {
	return errors.Is(err, pq.ErrInFailedTransaction) ||
		err != nil && strings.Contains(err.Error(), "commit unexpectedly resulted in rollback") ||
		Is(err, "25P02")
}

// Refused reports whether err is PostgreSQL's error reply to a statement
// (the transaction was rolled back, nothing committed), as opposed to a
// lost connection or a session ended around it, after which the outcome
// of a COMMIT is unknown: FATAL or PANIC severity (lib/pq says which), or
// by SQLSTATE: class 08 (connection exception), 57P (shutdown, idle
// session timeout), 25P03 (idle in transaction timeout), XX (internal).
func Refused(err error) bool {
	code := SQLState(err)
	if code == "" {
		return false
	}
	var pqErr *pq.Error
	if errors.As(err, &pqErr) && (pqErr.Severity == "FATAL" || pqErr.Severity == "PANIC") {
		return false
	}
	switch {
	case strings.HasPrefix(code, "08"), strings.HasPrefix(code, "57P"), code == "25P03", strings.HasPrefix(code, "XX"):
		return false
	}
	return true
}
