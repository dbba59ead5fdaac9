package relay_test

import (
	"context"
	"testing"
	"time"

	"github.com/mailroom-go/mailroom"
	"github.com/mailroom-go/mailroom/internal/testenv"
	"github.com/mailroom-go/mailroom/relay"
)

// A relay without a session of its own (DisableListen, as behind PgBouncer
// in transaction mode) is counted by Status through its row, beside one
// holding its presence lock; a row not seen for 15 s is not counted, one
// not seen for a minute is deleted, and a relay that stops deletes its own.
func TestStatusCountsRelaysWithoutASession(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	admin, err := relay.NewAdmin(e.s.DB.DB, mailroom.Tables{})
	if err != nil {
		t.Fatal(err)
	}
	status := func() relay.StatusReport {
		t.Helper()
		st, err := admin.Status(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		return st
	}
	// Rows of relays that died: one 20 s ago (not counted), one 2 min ago.
	e.s.DB.MustExec(`INSERT INTO mailroom_outbox_relays (instance, name, seen_at) VALUES
		(gen_random_uuid(), 'died lately', now() - interval '20 seconds'), (gen_random_uuid(), 'died long ago', now() - interval '2 minutes')`)
	if st := status(); st.Relays != 0 || st.Polling != 0 {
		t.Fatalf("status with only rows of dead relays: %d relays, %d polling; want none", st.Relays, st.Polling)
	}

	cfg := e.config()
	cfg.DisableListen = true
	stopPolling := e.start(cfg)
	stopListening := e.start(e.config())
	testenv.Eventually(t, 30*time.Second, "two relays running, one of them polling", func() bool {
		st := status()
		return st.Relays == 2 && st.Polling == 1
	})
	testenv.Eventually(t, 30*time.Second, "the row of the relay dead for minutes deleted", func() bool {
		var n int
		return e.s.DB.Get(&n, `SELECT count(*) FROM mailroom_outbox_relays WHERE name = 'died long ago'`) == nil && n == 0
	})
	stopPolling()
	if st := status(); st.Relays != 1 || st.Polling != 0 {
		t.Fatalf("after the polling relay stopped: %d relays, %d polling; want 1, 0 (its row deleted)", st.Relays, st.Polling)
	}
	stopListening()
}

// On a schema older than version 7 (no _relays table) Status still works,
// and a relay without a session still publishes, uncounted.
func TestStatusWithoutTheRelaysTable(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.s.DB.MustExec(`DROP TABLE mailroom_outbox_relays`)
	cfg := e.config()
	cfg.DisableListen = true
	defer e.start(cfg)()
	e.deliver(5)
	st, err := relay.Status(context.Background(), e.s.DB.DB, mailroom.Tables{})
	if err != nil || st.Polling != 0 {
		t.Fatalf("Status without the _relays table: %+v, %v; want no error, none polling", st, err)
	}
}
