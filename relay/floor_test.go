package relay

import (
	"context"
	"testing"
	"time"

	"github.com/mailroom-go/mailroom/internal/testenv"
)

// The seq floor rises to the least live seq, but not past a row that a
// transaction still open when the floor was looked at may commit: that
// row, committed later than a newer row of its key, is claimed, first of
// its key, and not hidden below the floor.
func TestSeqFloorWaitsForOpenWriters(t *testing.T) {
	t.Parallel()
	s := testenv.NewSchema(t)
	ctx := context.Background()
	add := `INSERT INTO mailroom_outbox (id, exchange, routing_key, key, payload) VALUES (gen_random_uuid(), 'x', 'r', $1, '\x7b7d') RETURNING seq`
	var seqs []int64
	for range 10 {
		var seq int64
		if err := s.DB.QueryRowContext(ctx, add, "done").Scan(&seq); err != nil {
			t.Fatal(err)
		}
		seqs = append(seqs, seq)
	}
	// A writer draws the next seq for key K and stays open.
	open, err := s.DB.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer open.Rollback()
	var early int64
	if err := open.QueryRowContext(ctx, add, "K").Scan(&early); err != nil {
		t.Fatal(err)
	}
	var late int64
	if err := s.DB.QueryRowContext(ctx, add, "K").Scan(&late); err != nil {
		t.Fatal(err)
	}
	s.DB.MustExec(`DELETE FROM mailroom_outbox WHERE key = 'done'`) // published

	r, err := New(s.DB.DB, Config{URL: testenv.AMQPURL(), DisableListen: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(r.stmts.close)
	move := func() {
		t.Helper()
		r.floor.next = time.Time{}
		r.refreshFloor(ctx)
		if r.floor.off {
			t.Fatal("floor turned off")
		}
	}
	for range 3 {
		move()
	}
	if f := r.floor.value.Load(); f > early {
		t.Fatalf("floor %d above seq %d, which an open transaction may still commit", f, early)
	}
	if err := open.Commit(); err != nil {
		t.Fatal(err)
	}
	for range 3 {
		move()
	}
	if f := r.floor.value.Load(); f != early {
		t.Fatalf("floor %d, want %d: the least live seq once no writer is open (the %d published rows below it)", f, early, len(seqs))
	}
	rows, err := r.claim(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if got := seqsOfRows(rows); len(got) == 0 || got[0] != early {
		t.Fatalf("claimed %v, want %d (committed late, first of key K) first", got, early)
	}
}

// A row due long ago that appears after the relay looked (written with an
// old available_at, or by a transaction that began long ago) is claimed
// once the relay looks again: the window moves back to it.
func TestWindowMovesBackForAnOldRow(t *testing.T) {
	t.Parallel()
	s := testenv.NewSchema(t)
	ctx := context.Background()
	add := `INSERT INTO mailroom_outbox (id, exchange, routing_key, payload, available_at) VALUES (gen_random_uuid(), 'x', 'r', '\x7b7d', now() - $1 * interval '1 second') RETURNING seq`
	var recent, old int64
	if err := s.DB.QueryRowContext(ctx, add, 0).Scan(&recent); err != nil {
		t.Fatal(err)
	}
	r, err := New(s.DB.DB, Config{URL: testenv.AMQPURL(), DisableListen: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(r.stmts.close)
	rows, err := r.claim(ctx) // looks, then claims the recent row
	if err != nil || len(rows) != 1 || rows[0].seq != recent {
		t.Fatalf("first claim: %v, %v; want seq %d", seqsOfRows(rows), err, recent)
	}
	if from := r.floor.windowFrom(); from.IsZero() {
		t.Fatal("the window starts at the beginning after a look")
	}
	if err := s.DB.QueryRowContext(ctx, add, 3600).Scan(&old); err != nil { // due an hour ago
		t.Fatal(err)
	}
	r.floor.next = time.Time{} // the next look is due
	rows, err = r.claim(ctx)
	if err != nil || len(rows) != 1 || rows[0].seq != old {
		t.Fatalf("claim after the next look: %v, %v; want the old row %d", seqsOfRows(rows), err, old)
	}
}
