package relay

import (
	"context"
	"testing"
	"time"

	"github.com/mailroom-go/mailroom/internal/testenv"
)

// claimLockWaiters counts sessions waiting for the outbox's claim lock.
func claimLockWaiters(t *testing.T, s *testenv.Schema) int {
	t.Helper()
	var n int
	err := s.DB.Get(&n, `SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted
AND classid::text::bigint = $1 AND objid::text::bigint = 'mailroom_outbox'::regclass::oid::integer::bigint & 4294967295`, claimLockKey)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// holdClaimLock takes the outbox's claim lock on a session of its own, as
// another relay's claim would, until release is called.
func holdClaimLock(t *testing.T, s *testenv.Schema) (release func()) {
	t.Helper()
	ctx := context.Background()
	conn, err := s.DB.Conn(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := conn.ExecContext(ctx, `SELECT pg_advisory_lock($1, 'mailroom_outbox'::regclass::oid::integer)`, claimLockKey); err != nil {
		t.Fatal(err)
	}
	return func() {
		if _, err := conn.ExecContext(ctx, `SELECT pg_advisory_unlock($1, 'mailroom_outbox'::regclass::oid::integer)`, claimLockKey); err != nil {
			t.Error(err)
		}
		conn.Close()
	}
}

// A claim waits for another relay's claim on the same table to commit, and
// then leases the rows that claim left.
func TestClaimsTakeTurns(t *testing.T) {
	t.Parallel()
	s := testenv.NewSchema(t)
	fillOutbox(t, s, "mailroom_outbox", 10, 3)
	r, err := New(s.DB.DB, Config{URL: testenv.AMQPURL(), DisableListen: true})
	if err != nil {
		t.Fatal(err)
	}
	release := holdClaimLock(t, s)
	claimed := make(chan []*row, 1)
	go func() {
		rows, err := r.claim(context.Background())
		if err != nil {
			t.Error(err)
		}
		claimed <- rows
	}()
	testenv.Eventually(t, 10*time.Second, "the claim waiting for the claim lock", func() bool { return claimLockWaiters(t, s) == 1 })
	select {
	case rows := <-claimed:
		t.Fatalf("claimed %d rows while another claim held the lock", len(rows))
	default:
	}
	release()
	if rows := <-claimed; len(rows) != 3 { // one row per key: 3 keys
		t.Fatalf("claimed %d rows after the lock was released, want 3 (one per key)", len(rows))
	}
	if r.turnSkipped.Load() != 0 {
		t.Fatal("the claim lock was given up although it came free")
	}
}

// A relay whose claim waits claimLockTimeout for the lock (its holder is
// stalled) claims without it, and keeps doing so for claimLockSkip.
func TestClaimWithoutTheLockWhenItsHolderStalls(t *testing.T) {
	t.Parallel()
	s := testenv.NewSchema(t)
	fillOutbox(t, s, "mailroom_outbox", 10, 0)
	r, err := New(s.DB.DB, Config{URL: testenv.AMQPURL(), DisableListen: true, BatchSize: 4})
	if err != nil {
		t.Fatal(err)
	}
	release := holdClaimLock(t, s)
	defer release()
	ctx := context.Background()
	rows, err := r.claim(ctx)
	if err != nil || len(rows) != 4 {
		t.Fatalf("claim behind a stalled lock holder: %d rows, %v; want 4", len(rows), err)
	}
	skipped := r.turnSkipped.Load()
	if skipped == 0 {
		t.Fatal("the claim lock timeout was not recorded")
	}
	rows, err = r.claim(ctx) // the lock is still held: this claim must not wait for it
	if err != nil || len(rows) != 4 {
		t.Fatalf("second claim: %d rows, %v; want 4", len(rows), err)
	}
	if r.turnSkipped.Load() != skipped {
		t.Fatal("the second claim waited for the lock again")
	}
}
