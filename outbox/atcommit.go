package outbox

import (
	"database/sql"
	"database/sql/driver"

	"github.com/mailroom-go/mailroom/atcommit"
)

// The connector that sends Add's insert with the COMMIT moved to package
// atcommit; these names stay for one release.

// OpenDB is atcommit.OpenDB.
//
// Deprecated: use atcommit.OpenDB.
func OpenDB(dsn string) (*sql.DB, error) { return atcommit.OpenDB(dsn) }

// NewConnector is atcommit.NewConnector.
//
// Deprecated: use atcommit.NewConnector.
func NewConnector(c driver.Connector) driver.Connector { return atcommit.NewConnector(c) }

// ErrEarlierAdd is atcommit.ErrEarlierDeferred (the same error value).
//
// Deprecated: use atcommit.ErrEarlierDeferred.
var ErrEarlierAdd = atcommit.ErrEarlierDeferred
