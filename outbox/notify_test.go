package outbox_test

import (
	"context"
	"database/sql"
	"fmt"
	"testing"
	"time"

	"github.com/lib/pq"

	"github.com/mailroom-go/mailroom/internal/locks"
	"github.com/mailroom-go/mailroom/internal/pgerr"
	"github.com/mailroom-go/mailroom/internal/testenv"
	"github.com/mailroom-go/mailroom/internal/wakeup"
	"github.com/mailroom-go/mailroom/outbox"
)

// An insert into the outbox sends a NOTIFY only while a relay sleeps (holds
// the wake lock), for Add, plain SQL and COPY alike: the default of the
// notified column takes the lock (schema version 5). To check for the absence of a
// notification without waiting on a clock, a marker NOTIFY is committed
// after each insert: notifications arrive in commit order, so the first one
// received tells whether the insert notified.
func TestAddNotifiesOnlyWhileARelaySleeps(t *testing.T) {
	t.Parallel()
	s := testenv.NewSchema(t)
	ob := newOutbox(t, outbox.Config{})
	ctx := context.Background()
	oid := outboxOID(t, s)
	channel := wakeup.Channel(oid)
	l := pq.NewListener(s.URL, 10*time.Millisecond, time.Second, nil)
	defer l.Close()
	if err := l.Listen(channel); err != nil {
		t.Fatal(err)
	}
	first := func() string {
		t.Helper()
		if _, err := s.DB.Exec(`SELECT pg_notify($1, 'marker')`, channel); err != nil {
			t.Fatal(err)
		}
		select {
		case n := <-l.Notify:
			if n == nil {
				t.Fatal("listener reconnected; notifications may be lost")
			}
			extra := n.Extra
			if extra != "marker" { // consume the marker too
				<-l.Notify
			}
			return extra
		case <-time.After(30 * time.Second):
			t.Fatal("no notification at all within 30s")
		}
		return ""
	}
	add := func() {
		t.Helper()
		if err := ob.Add(ctx, s.DB, msg(1)); err != nil {
			t.Fatal(err)
		}
	}
	// The relay's side: a session of its own holds the lock.
	relay, err := s.DB.Conn(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer relay.Close()
	lock := func(sql string) {
		t.Helper()
		if _, err := relay.ExecContext(ctx, sql, locks.Wake, int32(oid)); err != nil {
			t.Fatal(err)
		}
	}

	add() // no relay asleep: no NOTIFY
	if got := first(); got != "marker" {
		t.Fatalf("Add notified with no relay asleep (first notification %q)", got)
	}
	lock(`SELECT pg_advisory_lock($1, $2)`)
	add() // a relay asleep: NOTIFY
	if got := first(); got != "" {
		t.Fatalf("Add did not notify a sleeping relay (first notification %q)", got)
	}
	if _, err := s.DB.Exec(`INSERT INTO mailroom_outbox (id, exchange, routing_key, payload) VALUES (gen_random_uuid(), 'x', 'k', '{}')`); err != nil {
		t.Fatal(err)
	}
	if got := first(); got != "" {
		t.Fatalf("a plain SQL insert did not notify a sleeping relay (first notification %q)", got)
	}
	copyIn(t, s)
	if got := first(); got != "" {
		t.Fatalf("a COPY did not notify a sleeping relay (first notification %q)", got)
	}
	lock(`SELECT pg_advisory_unlock($1, $2)`)
	add() // the relay is awake again: no NOTIFY
	if got := first(); got != "marker" {
		t.Fatalf("Add notified an awake relay (first notification %q)", got)
	}
	copyIn(t, s)
	if got := first(); got != "marker" {
		t.Fatalf("a COPY notified an awake relay (first notification %q)", got)
	}
	// Each row records whether its insert notified.
	var notified []bool
	if err := s.DB.Select(&notified, `SELECT notified FROM mailroom_outbox ORDER BY seq`); err != nil {
		t.Fatal(err)
	}
	if got, want := fmt.Sprint(notified), "[false true true true true false false false]"; got != want {
		t.Fatalf("notified column: %s, want %s", got, want)
	}
}

// copyIn inserts two rows into the outbox with COPY, in one transaction.
func copyIn(t *testing.T, s *testenv.Schema) {
	t.Helper()
	db, err := sql.Open("postgres", s.URL) // lib/pq's COPY, whichever driver the tests run on
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	tx, err := db.Begin()
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback()
	st, err := tx.Prepare(pq.CopyIn("mailroom_outbox", "id", "exchange", "routing_key", "payload"))
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 2; i++ {
		if _, err := st.Exec(outbox.NewID(), "x", "k", []byte("{}")); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := st.Exec(); err != nil {
		t.Fatal(err)
	}
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}
}

// A relay going to sleep cannot take the wake lock while a transaction
// that inserted into the outbox is open: its last look for rows, after the
// lock, sees that transaction's rows.
func TestWakeLockWaitsForOpenWriters(t *testing.T) {
	t.Parallel()
	s := testenv.NewSchema(t)
	ob := newOutbox(t, outbox.Config{})
	ctx := context.Background()
	oid := outboxOID(t, s)
	tx, err := s.DB.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback()
	if err := ob.Add(ctx, tx, msg(1)); err != nil {
		t.Fatal(err)
	}
	relay, err := s.DB.Conn(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer relay.Close()
	if _, err := relay.ExecContext(ctx, `SET lock_timeout = '50ms'`); err != nil {
		t.Fatal(err)
	}
	_, err = relay.ExecContext(ctx, `SELECT pg_advisory_lock($1, $2)`, locks.Wake, int32(oid))
	if !pgerr.Is(err, "55P03") {
		t.Fatalf("lock with a writer open: %v, want a lock timeout (55P03)", err)
	}
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}
	if _, err := relay.ExecContext(ctx, `SELECT pg_advisory_lock($1, $2)`, locks.Wake, int32(oid)); err != nil {
		t.Fatalf("lock after the writer committed: %v", err)
	}
	if _, err := relay.ExecContext(ctx, `SELECT pg_advisory_unlock($1, $2)`, locks.Wake, int32(oid)); err != nil {
		t.Fatal(err)
	}
	if _, err := relay.ExecContext(ctx, `RESET lock_timeout`); err != nil {
		t.Fatal(err)
	}
}

// outboxOID is the OID of the test schema's outbox: the second key of its
// wake lock and the suffix of its NOTIFY channel.
func outboxOID(t *testing.T, s *testenv.Schema) uint32 {
	t.Helper()
	var oid uint32
	if err := s.DB.Get(&oid, wakeup.OIDQuery, `"mailroom_outbox"`); err != nil {
		t.Fatal(err)
	}
	return oid
}
