package inbox_test

import (
	"testing"
	"time"

	"github.com/mailroom-go/mailroom/inbox"
	"github.com/mailroom-go/mailroom/internal/testenv"
)

// Two consumers share the inbox table with different retentions: each
// purges only its own ids, by its own Retention. A consumer with a short
// Retention must not forget another consumer's ids: a redelivery of those
// would apply its effect twice.
func TestPurgeKeepsOtherConsumersIDs(t *testing.T) {
	t.Parallel()
	e := newEnv(t, inbox.Topology{})
	e.db.MustExec(`INSERT INTO mailroom_inbox (scope, id, recorded_at) VALUES
		('short', 'old', now() - interval '2 hours'),
		('short', 'new', now()),
		('long', 'recent', now() - interval '2 hours'),
		('long', 'expired', now() - interval '40 days')`)
	short := e.config(record)
	short.Consumer, short.Retention, short.PurgeInterval = "short", time.Hour, 20*time.Millisecond
	long := e.config(record)
	long.Consumer, long.Retention, long.PurgeInterval = "long", 30*24*time.Hour, 20*time.Millisecond
	e.start(short)
	e.start(long)
	testenv.Eventually(t, wait, "each consumer's expired id purged", func() bool {
		var n int
		return e.db.Get(&n, `SELECT count(*) FROM mailroom_inbox WHERE (scope, id) IN (('short', 'old'), ('long', 'expired'))`) == nil && n == 0
	})
	var left []string
	e.db.Select(&left, `SELECT scope || '/' || id FROM mailroom_inbox ORDER BY 1`)
	if len(left) != 2 || left[0] != "long/recent" || left[1] != "short/new" {
		t.Fatalf("left %v, want [long/recent short/new]: a consumer purged ids of another", left)
	}
}
