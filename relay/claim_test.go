package relay

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/lib/pq"

	"github.com/mailroom-go/mailroom/internal/locks"
	"github.com/mailroom-go/mailroom/internal/pgerr"
	"github.com/mailroom-go/mailroom/internal/testenv"
)

// claimLockWaiters counts sessions waiting for the outbox's claim lock.
func claimLockWaiters(t *testing.T, s *testenv.Schema) int {
	t.Helper()
	var n int
	err := s.DB.Get(&n, `SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted
AND classid::text::bigint = $1 AND objid::text::bigint = 'mailroom_outbox'::regclass::oid::integer::bigint & 4294967295`, locks.Claim)
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
	if _, err := conn.ExecContext(ctx, `SELECT pg_advisory_lock($1, 'mailroom_outbox'::regclass::oid::integer)`, locks.Claim); err != nil {
		t.Fatal(err)
	}
	return func() {
		if _, err := conn.ExecContext(ctx, `SELECT pg_advisory_unlock($1, 'mailroom_outbox'::regclass::oid::integer)`, locks.Claim); err != nil {
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
	// Noticing the waiter and releasing the lock must not race the claim's
	// lock timeout (1 s) on a loaded machine.
	wait := strings.Replace(r.q.turn, "lock_timeout = 1000;", "lock_timeout = 60000;", 1)
	if wait == r.q.turn {
		t.Fatalf("no lock_timeout of 1000 ms in %q", r.q.turn)
	}
	r.q.turn = wait
	r.q.turnTimeout = strings.Replace(r.q.turnTimeout, "lock_timeout = 1000", "lock_timeout = 60000", 1) // the same, one statement at a time (pgx)
	release := holdClaimLock(t, s)
	claimed := make(chan []*row, 1)
	go func() {
		rows, err := r.claim(context.Background())
		if err != nil {
			t.Error(err)
		}
		claimed <- rows
	}()
	testenv.Eventually(t, 30*time.Second, "the claim waiting for the claim lock", func() bool { return claimLockWaiters(t, s) == 1 })
	select {
	case rows := <-claimed:
		t.Fatalf("claimed %d rows while another claim held the lock", len(rows))
	default:
	}
	release()
	rows := <-claimed
	heads := 0
	for _, w := range rows {
		if w.rn == 0 {
			heads++
		}
	}
	if len(rows) != 10 || heads != 3 { // each key's first row, with the rest of its run: 3 keys
		t.Fatalf("claimed %d rows (%d heads) after the lock was released, want 10 (3 heads: one per key)", len(rows), heads)
	}
	if r.turnSkipped.Load() != 0 {
		t.Fatal("the claim lock was given up although it came free")
	}
}

// outcomes builds one outcome of kind for each row.
func outcomes(rows []*row, kind outcomeKind, err error) []outcome {
	os := make([]outcome, len(rows))
	for i, w := range rows {
		os[i] = outcome{row: w, kind: kind, err: err}
	}
	return os
}

func sorted(s []int64) []int64 { slices.Sort(s); return s }

func seqsOfRows(rows []*row) []int64 {
	seqs := make([]int64, len(rows))
	for i, w := range rows {
		seqs[i] = w.seq
	}
	return seqs
}

// A relay publishing alone on its table claims without the claim lock and
// without leases: it writes nothing at the claim, skips the rows it holds,
// and records each outcome of a row so claimed — unless another relay has
// leased the row meanwhile.
func TestLoneRelayClaimsWithoutLeases(t *testing.T) {
	t.Parallel()
	s := testenv.NewSchema(t)
	fillOutbox(t, s, "mailroom_outbox", 12, 0)
	s.DB.MustExec(`UPDATE mailroom_outbox SET attempts = 1 WHERE seq % 2 = 0`) // one failure from the dead-letter table
	r, err := New(s.DB.DB, Config{URL: testenv.AMQPURL(), DatabaseURL: s.URL, BatchSize: 4, MaxAttempts: 2})
	if err != nil {
		t.Fatal(err)
	}
	r.coord.alone.Store(true)
	defer r.stmts.close()
	defer holdClaimLock(t, s)()
	ctx := context.Background()
	claim := func(what string) []*row {
		t.Helper()
		rows, err := r.claim(ctx)
		if err != nil || len(rows) != 4 {
			t.Fatalf("%s: claimed %d rows, %v; want 4 (with the claim lock held elsewhere)", what, len(rows), err)
		}
		return rows
	}
	versions := func() (v string) {
		t.Helper()
		if err := s.DB.Get(&v, `SELECT string_agg(xmin::text || ':' || coalesce(lease::text, '') || ':' || coalesce(leased_until::text, ''), ',' ORDER BY seq) FROM mailroom_outbox`); err != nil {
			t.Fatal(err)
		}
		return v
	}
	before := versions()
	first, second := claim("first claim"), claim("second claim")
	for _, w := range second {
		if slices.Contains(seqsOfRows(first), w.seq) {
			t.Fatalf("row %d claimed twice while held", w.seq)
		}
	}
	if after := versions(); after != before {
		t.Fatalf("the claims wrote to the outbox: rows (xmin:lease:leased_until) were %s, now %s", before, after)
	}
	if n := r.coord.held.leaseless(); n != 8 {
		t.Fatalf("%d rows held without a lease, want 8", n)
	}
	r.finish(ctx, outcomes(first, delivered, nil))
	r.finish(ctx, outcomes(second, released, nil))
	again := claim("claim after the release")
	if !slices.Equal(sorted(seqsOfRows(again)), sorted(seqsOfRows(second))) {
		t.Fatalf("claimed %v after releasing %v: a released row keeps its place, want the same rows", seqsOfRows(again), seqsOfRows(second))
	}
	// Of the rows now held: one is leased by another relay meanwhile, and
	// every one fails. The two without a first failure are scheduled
	// again, the other two buried, and the leased one left alone.
	// Rows of equal available_at come in any order: the test sets which
	// of them are at their last attempt.
	taken := again[0]
	for i, w := range again {
		w.attempts = i % 2
		s.DB.MustExec(`UPDATE mailroom_outbox SET attempts = $2 WHERE seq = $1`, w.seq, w.attempts)
	}
	const buried = 2 // again[1] and again[3]
	s.DB.MustExec(`UPDATE mailroom_outbox SET lease = gen_random_uuid(), leased_until = now() + interval '1 minute' WHERE seq = $1`, taken.seq)
	r.finish(ctx, outcomes(again, failed, ErrUnroutable))
	if n := r.coord.held.leaseless(); n != 0 {
		t.Fatalf("%d rows held after every outcome was recorded, want 0", n)
	}
	for _, w := range again {
		var attempts, dead int
		var lastError *string
		if err := s.DB.QueryRow(`SELECT (SELECT coalesce(max(attempts), -1) FROM mailroom_outbox WHERE seq = $1), (SELECT last_error FROM mailroom_outbox WHERE seq = $1), (SELECT count(*) FROM mailroom_outbox_dead WHERE seq = $1)`, w.seq).Scan(&attempts, &lastError, &dead); err != nil {
			t.Fatal(err)
		}
		switch {
		case w == taken:
			if attempts != w.attempts || lastError != nil || dead != 0 {
				t.Errorf("row %d, leased by another relay: attempts %d, last error %v, dead %d; want it untouched", w.seq, attempts, lastError, dead)
			}
		case w.attempts == 1:
			if attempts != -1 || dead != 1 {
				t.Errorf("row %d at its last attempt: in the outbox %v, dead letters %d; want it moved to the dead-letter table", w.seq, attempts != -1, dead)
			}
		default:
			if attempts != 1 || lastError == nil || dead != 0 {
				t.Errorf("row %d at its first attempt: attempts %d, last error %v, dead %d; want 1 attempt recorded", w.seq, attempts, lastError, dead)
			}
		}
	}
	var left int
	if err := s.DB.Get(&left, `SELECT count(*) FROM mailroom_outbox`); err != nil || left != 12-4-buried {
		t.Fatalf("%d rows left in the outbox (%v), want %d: 12, less 4 delivered and %d buried", left, err, 12-4-buried, buried)
	}
}

// A relay skips the rows it holds in leasing claims too: one whose lease
// ran out while the relay still holds it (the broker slow to confirm) is
// not claimed again by the same relay.
func TestClaimSkipsHeldRowsAfterTheirLease(t *testing.T) {
	t.Parallel()
	s := testenv.NewSchema(t)
	fillOutbox(t, s, "mailroom_outbox", 6, 0)
	r, err := New(s.DB.DB, Config{URL: testenv.AMQPURL(), DisableListen: true, BatchSize: 3})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	first, err := r.claim(ctx)
	if err != nil || len(first) != 3 {
		t.Fatalf("claimed %d rows, %v; want 3", len(first), err)
	}
	s.DB.MustExec(`UPDATE mailroom_outbox SET leased_until = now() - interval '1 second' WHERE leased_until IS NOT NULL`)
	second, err := r.claim(ctx)
	if err != nil || len(second) != 3 {
		t.Fatalf("second claim: %d rows, %v; want 3", len(second), err)
	}
	for _, w := range second {
		if slices.Contains(seqsOfRows(first), w.seq) {
			t.Fatalf("row %d claimed again while held", w.seq)
		}
	}
	r.finish(ctx, outcomes(first, released, nil))
	if third, err := r.claim(ctx); err != nil || !slices.Equal(sorted(seqsOfRows(third)), sorted(seqsOfRows(first))) {
		t.Fatalf("after the release: claimed %v, %v; want %v", seqsOfRows(third), err, seqsOfRows(first))
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

// hotUpdates reads the outbox's update counters, once the server has
// flushed them (within seconds of the updating session going idle).
func hotUpdates(t *testing.T, s *testenv.Schema, atLeast int64) (updates, hot int64) {
	t.Helper()
	testenv.Eventually(t, 30*time.Second, "the outbox's update statistics", func() bool {
		err := s.DB.QueryRow(`SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relid = 'mailroom_outbox'::regclass`).Scan(&updates, &hot)
		if err != nil {
			t.Fatal(err)
		}
		return updates >= atLeast
	})
	return updates, hot
}

// A claim leases rows with HOT updates: leased_until is in no index and
// the page has room for the new versions, so no index entry is written.
func TestLeasesAreHOTUpdates(t *testing.T) {
	t.Parallel()
	s := testenv.NewSchema(t)
	// Every row of every page is leased at once: the page must hold two
	// versions of all its rows.
	fillOutbox(t, s, "mailroom_outbox", 300, 0)
	r, err := New(s.DB.DB, Config{URL: testenv.AMQPURL(), DisableListen: true, BatchSize: 300})
	if err != nil {
		t.Fatal(err)
	}
	rows, err := r.claim(context.Background())
	if err != nil || len(rows) != 300 {
		t.Fatalf("claimed %d rows, %v; want 300", len(rows), err)
	}
	var leased int
	if err := s.DB.Get(&leased, `SELECT count(*) FROM mailroom_outbox WHERE leased_until > now()`); err != nil || leased != 300 {
		t.Fatalf("%d rows leased (%v); want the 300 claimed", leased, err)
	}
	if updates, hot := hotUpdates(t, s, 300); hot != updates {
		t.Fatalf("%d of %d lease updates were HOT; want all", hot, updates)
	}
}

// Relays before schema version 4 lease by available_at alone; their claims
// are rejected by the lease guard (a CHECK constraint in version 4, an
// UPDATE trigger since version 5), so they cannot claim rows that a relay
// of this version leased.
func TestClaimOfAnOlderRelayIsRejected(t *testing.T) {
	t.Parallel()
	s := testenv.NewSchema(t)
	fillOutbox(t, s, "mailroom_outbox", 5, 0)
	_, err := s.DB.Exec(`UPDATE mailroom_outbox o SET available_at = now() + interval '60 seconds', lease = gen_random_uuid()
FROM (SELECT seq FROM mailroom_outbox WHERE available_at <= now() ORDER BY available_at LIMIT 5 FOR UPDATE SKIP LOCKED) c WHERE o.seq = c.seq`)
	var hint string // the driver's error carries it: lib/pq or pgx (MAILROOM_TEST_DRIVER)
	var pqErr *pq.Error
	var pgxErr *pgconn.PgError
	switch {
	case errors.As(err, &pqErr):
		hint = pqErr.Hint
	case errors.As(err, &pgxErr):
		hint = pgxErr.Hint
	}
	if !pgerr.Is(err, "23514") || !strings.Contains(err.Error(), "older than mailroom schema version 4") || !strings.Contains(hint, "Upgrade every relay") {
		t.Fatalf("a claim of schema version 3: %v; want the lease guard's check_violation (23514) with its hint", err)
	}
	var leased int
	if err := s.DB.Get(&leased, `SELECT count(*) FROM mailroom_outbox WHERE lease IS NOT NULL`); err != nil || leased != 0 {
		t.Fatalf("%d rows leased (%v); want none", leased, err)
	}
}

// A relay burying a row whose lease ran out while another relay claimed it
// (here the other claim commits while the bury waits for the row) leaves
// the row to that relay: not copied to the dead-letter table while it
// stays in the outbox, nor counted as buried.
func TestBuryAfterTheLeaseWasTakenLeavesTheRow(t *testing.T) {
	t.Parallel()
	s := testenv.NewSchema(t)
	fillOutbox(t, s, "mailroom_outbox", 1, 0)
	const mine, theirs = "00000000-0000-0000-0000-00000000000a", "00000000-0000-0000-0000-00000000000b"
	var seq int64
	if err := s.DB.Get(&seq, `UPDATE mailroom_outbox SET lease = $1, leased_until = now() RETURNING seq`, mine); err != nil {
		t.Fatal(err)
	}
	r, err := New(s.DB.DB, Config{URL: testenv.AMQPURL(), DisableListen: true, MaxAttempts: 1})
	if err != nil {
		t.Fatal(err)
	}
	other, err := s.DB.Beginx() // the other relay's claim, not yet committed
	if err != nil {
		t.Fatal(err)
	}
	defer other.Rollback()
	other.MustExec(`UPDATE mailroom_outbox SET lease = $1, leased_until = now() + interval '1 minute' WHERE seq = $2`, theirs, seq)
	type result struct {
		buried, stuck []outcome
		err           error
	}
	done := make(chan result, 1)
	go func() {
		o := outcome{row: &row{seq: seq, lease: mine}, kind: failed, err: ErrUnroutable}
		buried, stuck, err := r.apply(nil, nil, []outcome{o}, nil)
		done <- result{buried, stuck, err}
	}()
	testenv.Eventually(t, 30*time.Second, "the bury waiting for the row", func() bool {
		var n int
		s.DB.Get(&n, `SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%mailroom_outbox_dead%'`)
		return n >= 1
	})
	if err := other.Commit(); err != nil {
		t.Fatal(err)
	}
	res := <-done
	if res.err != nil || len(res.buried) != 0 || len(res.stuck) != 0 {
		t.Fatalf("apply: buried %d, stuck %d, %v; want neither, no error", len(res.buried), len(res.stuck), res.err)
	}
	var dead int
	var lease string
	if err := s.DB.Get(&dead, `SELECT count(*) FROM mailroom_outbox_dead`); err != nil || dead != 0 {
		t.Errorf("%d dead letters (%v), want none: the row belongs to the other relay", dead, err)
	}
	if err := s.DB.Get(&lease, `SELECT lease::text FROM mailroom_outbox WHERE seq = $1`, seq); err != nil || lease != theirs {
		t.Errorf("the row's lease %q (%v), want the other relay's", lease, err)
	}
}

// A claim continues the runs this relay holds: with a key's first rows
// held (claimed, not yet finished), the next claim takes the rows after
// them, headed by one that names the last held row (prev). The publisher
// puts it behind that row while the run goes on, and hands it back once
// the run was cut; another relay takes none of the key's rows meanwhile.
func TestClaimContinuesHeldRuns(t *testing.T) {
	t.Parallel()
	for _, alone := range []bool{true, false} {
		t.Run(fmt.Sprintf("alone=%v", alone), func(t *testing.T) {
			t.Parallel()
			s := testenv.NewSchema(t)
			fillOutbox(t, s, "mailroom_outbox", 12, 1) // one key
			relay := func(name string) *Relay {
				r, err := New(s.DB.DB, Config{Name: name, URL: testenv.AMQPURL(), DatabaseURL: s.URL, BatchSize: 2, ConfirmWindow: 4})
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(r.stmts.close)
				return r
			}
			r := relay("a")
			r.coord.alone.Store(alone)
			ctx := context.Background()
			claim := func(what string, prev int64) []*row {
				t.Helper()
				rows, err := r.claim(ctx)
				if err != nil || len(rows) != 4 {
					t.Fatalf("%s: claimed %d rows, %v; want 4 (the confirm window)", what, len(rows), err)
				}
				for i, w := range rows {
					if w.rn != i || (i == 0 && w.prev != prev) || (i > 0 && w.seq != rows[i-1].seq+1) {
						t.Fatalf("%s: row %d is seq %d, place %d, after %d; want a run of consecutive seqs after %d", what, i, w.seq, w.rn, w.prev, prev)
					}
				}
				return rows
			}
			first := claim("first claim", 0)
			second := claim("second claim, the first held", first[3].seq)
			if !alone {
				other := relay("b")
				if rows, err := other.claim(ctx); err != nil || len(rows) != 0 {
					t.Fatalf("another relay claimed %d rows (%v) of a key this one holds, want none", len(rows), err)
				}
			}

			// The run goes on: the second claim's rows queue behind the
			// first's, and a cut hands them all back.
			c := newChains()
			admit := func(w *row) (publish, handBack bool) { c.newBatch(); return c.admit(w) }
			for i, w := range append(slices.Clone(first), second...) {
				if publish, handBack := admit(w); publish != (i == 0) || handBack {
					t.Fatalf("row %d admitted: publish %v, hand back %v; want only the first published, the rest waiting", i, publish, handBack)
				}
			}
			c.settled(&outcome{row: first[0], kind: delivered})
			if ready := c.next(); len(ready) != 1 || ready[0] != first[1] {
				t.Fatalf("after the first delivery %d rows ready, want the second row", len(ready))
			}
			if back := c.settled(&outcome{row: first[1], kind: failed}); len(back) != 6 {
				t.Fatalf("a failure handed back %d rows, want the 6 behind it (2 of the first claim, 4 of the second)", len(back))
			}

			// A run cut before the continuing row comes: it is handed back.
			c = newChains()
			admit(first[0])
			c.settled(&outcome{row: first[0], kind: failed})
			if publish, handBack := admit(second[0]); publish || !handBack {
				t.Fatalf("a row continuing a cut run: publish %v, hand back %v; want it handed back", publish, handBack)
			}
			// Nor does a row continue a run whose last row is not its prev.
			c = newChains()
			admit(first[0])
			if publish, handBack := admit(second[0]); publish || !handBack {
				t.Fatalf("a row continuing another row than the run's last: publish %v, hand back %v; want it handed back", publish, handBack)
			}
		})
	}
}
