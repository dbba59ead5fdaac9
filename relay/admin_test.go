package relay_test

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/lib/pq"

	"github.com/mailroom-go/mailroom"
	"github.com/mailroom-go/mailroom/internal/testenv"
	"github.com/mailroom-go/mailroom/outbox"
	"github.com/mailroom-go/mailroom/relay"
)

// admAdd writes msgs through outbox.Add and returns their ids.
func admAdd(t *testing.T, s *testenv.Schema, msgs ...outbox.Message) []string {
	t.Helper()
	ob, err := outbox.New(outbox.Config{})
	if err != nil {
		t.Fatal(err)
	}
	ids := make([]string, len(msgs))
	for i := range msgs {
		if msgs[i].ID == "" {
			msgs[i].ID = outbox.NewID()
		}
		if msgs[i].Payload == nil {
			msgs[i].Payload = []byte(`{}`)
		}
		ids[i] = msgs[i].ID
	}
	if err := ob.Add(context.Background(), s.DB, msgs...); err != nil {
		t.Fatal(err)
	}
	return ids
}

// admBury moves outbox rows to the dead-letter table as the relay does
// after MaxAttempts failures.
func admBury(t *testing.T, s *testenv.Schema, reason string, ids ...string) {
	t.Helper()
	_, err := s.DB.Exec(`WITH d AS (DELETE FROM mailroom_outbox WHERE id = ANY($1::uuid[])
  RETURNING seq, id, exchange, routing_key, key, type, content_type, headers, payload, created_at)
INSERT INTO mailroom_outbox_dead (seq, id, exchange, routing_key, key, type, content_type, headers, payload, created_at, attempts, last_error)
SELECT seq, id, exchange, routing_key, key, type, content_type, headers, payload, created_at, 7, $2 FROM d`, pq.StringArray(ids), reason)
	if err != nil {
		t.Fatal(err)
	}
}

func TestStatusEmptyIsZeroNotNull(t *testing.T) {
	t.Parallel()
	s := testenv.NewSchema(t)
	st, err := adminOf(t, s.DB.DB, mailroom.Tables{}).Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if st != (relay.StatusReport{}) {
		t.Fatalf("empty outbox: got %+v, want all zero", st)
	}
	b, err := json.Marshal(st)
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"pending", "oldest_pending_age_seconds", "dead", "relays", "publishing"} {
		if v, ok := m[k].(float64); !ok || v != 0 {
			t.Errorf("JSON %s = %#v, want the number 0 (%s)", k, m[k], b)
		}
	}
}

func TestStatusCountsAndLag(t *testing.T) {
	t.Parallel()
	s := testenv.NewSchema(t)
	ctx := context.Background()
	due := admAdd(t, s, outbox.Message{Exchange: "x", RoutingKey: "a"}, outbox.Message{Exchange: "x", RoutingKey: "b"}, outbox.Message{Exchange: "x", RoutingKey: "c"})
	admAdd(t, s, outbox.Message{Exchange: "x", RoutingKey: "later", AvailableAt: time.Now().Add(time.Hour)})
	// The oldest due row was written 90s ago and failed twice; a leased row
	// is in flight.
	if _, err := s.DB.Exec(`UPDATE mailroom_outbox SET created_at = now() - interval '90 seconds', attempts = 2 WHERE id = $1`, due[0]); err != nil {
		t.Fatal(err)
	}
	if _, err := s.DB.Exec(`UPDATE mailroom_outbox SET lease = gen_random_uuid(), leased_until = now() + interval '1 minute' WHERE id = $1`, due[1]); err != nil {
		t.Fatal(err)
	}
	admBury(t, s, "unroutable", due[2])

	st, err := adminOf(t, s.DB.DB, mailroom.Tables{}).Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if st.Pending != 3 || st.Scheduled != 1 || st.Retrying != 1 || st.InFlight != 1 || st.Dead != 1 {
		t.Fatalf("got %+v; want pending 3, scheduled 1, retrying 1, in flight 1, dead 1", st)
	}
	if st.OldestPendingAge < 90*time.Second || st.OldestPendingAge > time.Hour {
		t.Fatalf("oldest pending age %s, want about 90s (the scheduled row does not count)", st.OldestPendingAge)
	}
}

// The lag counts from when a row was due: a delayed message written an
// hour ago and due a second ago has waited a second, a replayed dead letter
// has waited since its replay; a message that failed has waited since it
// was written, even while it backs off.
func TestStatusLagCountsFromDue(t *testing.T) {
	t.Parallel()
	s := testenv.NewSchema(t)
	ctx := context.Background()
	lag := func() time.Duration {
		t.Helper()
		st, err := adminOf(t, s.DB.DB, mailroom.Tables{}).Status(ctx)
		if err != nil {
			t.Fatal(err)
		}
		return st.OldestPendingAge
	}
	delayed := admAdd(t, s, outbox.Message{Exchange: "x", RoutingKey: "later"})
	if _, err := s.DB.Exec(`UPDATE mailroom_outbox SET created_at = now() - interval '1 hour', available_at = now() - interval '1 second' WHERE id = $1`, delayed[0]); err != nil {
		t.Fatal(err)
	}
	if got := lag(); got < time.Second || got > time.Minute {
		t.Errorf("a delayed row due a second ago: lag %s, want about 1s", got)
	}
	replayed := admAdd(t, s, outbox.Message{Exchange: "x", RoutingKey: "dead"})
	if _, err := s.DB.Exec(`UPDATE mailroom_outbox SET created_at = now() - interval '2 days' WHERE id = $1`, replayed[0]); err != nil {
		t.Fatal(err)
	}
	admBury(t, s, "unroutable", replayed...)
	if _, err := adminOf(t, s.DB.DB, mailroom.Tables{}).ReplayDead(ctx, replayed); err != nil {
		t.Fatal(err)
	}
	if got := lag(); got < time.Second || got > time.Minute {
		t.Errorf("a dead letter replayed just now, written two days ago: lag %s, want about 1s", got)
	}
	failing := admAdd(t, s, outbox.Message{Exchange: "x", RoutingKey: "failing"})
	if _, err := s.DB.Exec(`UPDATE mailroom_outbox SET created_at = now() - interval '10 minutes', attempts = 3, available_at = now() + interval '1 minute' WHERE id = $1`, failing[0]); err != nil {
		t.Fatal(err)
	}
	if got := lag(); got < 10*time.Minute || got > time.Hour {
		t.Errorf("a row failing for 10 minutes, backing off: lag %s, want about 10m", got)
	}
}

func TestStatusBadTableName(t *testing.T) {
	t.Parallel()
	s := testenv.NewSchema(t)
	_, err := relay.NewAdmin(s.DB.DB, mailroom.Tables{Outbox: "no such"})
	if err == nil || !strings.Contains(err.Error(), `"no such" is not a plain identifier`) {
		t.Fatalf("NewAdmin: %v, want the invalid table name named", err)
	}
	// The free function of earlier releases says the same.
	if _, err := relay.Status(context.Background(), s.DB.DB, mailroom.Tables{Outbox: "no such"}); err == nil {
		t.Fatal("Status: want an error for an invalid table name")
	}
}

func TestListReplayDiscardDead(t *testing.T) {
	t.Parallel()
	s := testenv.NewSchema(t)
	ctx := context.Background()
	db := s.DB.DB
	ids := admAdd(t, s,
		outbox.Message{Exchange: "x", RoutingKey: "r", Key: "k1", Type: "t.one"},
		outbox.Message{Exchange: "x", RoutingKey: "r", Key: "k1"},
		outbox.Message{Exchange: "x", RoutingKey: "r"},
	)
	admBury(t, s, "NOT_FOUND - no exchange 'x'", ids[0], ids[2])
	var origSeq int64
	if err := s.DB.Get(&origSeq, `SELECT seq FROM mailroom_outbox_dead WHERE id = $1`, ids[0]); err != nil {
		t.Fatal(err)
	}

	dead, err := adminOf(t, db, mailroom.Tables{}).ListDead(ctx, 0)
	if err != nil {
		t.Fatal(err)
	}
	if len(dead) != 2 || dead[0].ID != ids[0] || dead[1].ID != ids[2] {
		t.Fatalf("ListDead: got %+v, want %s then %s", dead, ids[0], ids[2])
	}
	d := dead[0]
	if d.Exchange != "x" || d.RoutingKey != "r" || d.Key != "k1" || d.Type != "t.one" || d.Attempts != 7 ||
		d.LastError != "NOT_FOUND - no exchange 'x'" || d.PayloadSize != 2 || d.DeadAt.IsZero() || d.CreatedAt.IsZero() {
		t.Fatalf("ListDead row: %+v", d)
	}
	if one, err := adminOf(t, db, mailroom.Tables{}).ListDead(ctx, 1); err != nil || len(one) != 1 {
		t.Fatalf("ListDead limit 1: %v, %v", one, err)
	}

	// One unknown id: nothing is replayed.
	unknown := outbox.NewID()
	_, err = adminOf(t, db, mailroom.Tables{}).ReplayDead(ctx, []string{ids[0], unknown})
	if !errors.Is(err, relay.ErrDeadLetterNotFound) {
		t.Fatalf("replay with an unknown id: %v, want ErrDeadLetterNotFound", err)
	}
	if st, _ := adminOf(t, db, mailroom.Tables{}).Status(ctx); st.Dead != 2 || st.Pending != 1 {
		t.Fatalf("after a failed replay: %+v, want nothing moved", st)
	}
	if _, err := adminOf(t, db, mailroom.Tables{}).ReplayDead(ctx, []string{"not-a-uuid"}); !errors.Is(err, relay.ErrInvalidID) {
		t.Fatalf("replay not-a-uuid: %v, want ErrInvalidID", err)
	}
	if _, err := adminOf(t, db, mailroom.Tables{}).DiscardDead(ctx, nil); !errors.Is(err, relay.ErrInvalidID) {
		t.Fatalf("discard nothing: %v, want ErrInvalidID", err)
	}

	// Replay ids[0] (given twice): back in the outbox with attempts 0, a new
	// seq after the later row of its key, same id and created_at.
	n, err := adminOf(t, db, mailroom.Tables{}).ReplayDead(ctx, []string{ids[0], ids[0]})
	if err != nil || n != 1 {
		t.Fatalf("replay: %d, %v", n, err)
	}
	var row struct {
		Seq       int64   `db:"seq"`
		Attempts  int     `db:"attempts"`
		LastError *string `db:"last_error"`
		Due       bool    `db:"due"`
	}
	if err := s.DB.Get(&row, `SELECT seq, attempts, last_error, available_at <= now() AS due FROM mailroom_outbox WHERE id = $1`, ids[0]); err != nil {
		t.Fatal(err)
	}
	var laterSeq int64
	if err := s.DB.Get(&laterSeq, `SELECT seq FROM mailroom_outbox WHERE id = $1`, ids[1]); err != nil {
		t.Fatal(err)
	}
	if row.Attempts != 0 || row.LastError != nil || !row.Due || row.Seq <= laterSeq || row.Seq == origSeq {
		t.Fatalf("replayed row %+v (later row of the key has seq %d, original seq %d)", row, laterSeq, origSeq)
	}

	// Discard the other one.
	if _, err := adminOf(t, db, mailroom.Tables{}).DiscardDead(ctx, []string{ids[0]}); !errors.Is(err, relay.ErrDeadLetterNotFound) {
		t.Fatalf("discard of a replayed id: %v, want ErrDeadLetterNotFound", err)
	}
	if n, err := adminOf(t, db, mailroom.Tables{}).DiscardDead(ctx, []string{ids[2]}); err != nil || n != 1 {
		t.Fatalf("discard: %d, %v", n, err)
	}
	st, err := adminOf(t, db, mailroom.Tables{}).Status(ctx)
	if err != nil || st.Dead != 0 || st.Pending != 2 {
		t.Fatalf("end: %+v, %v; want 0 dead, 2 pending", st, err)
	}
}

func TestReplayAllDeadKeepsWriteOrder(t *testing.T) {
	t.Parallel()
	s := testenv.NewSchema(t)
	ctx := context.Background()
	var msgs []outbox.Message
	for range 5 {
		msgs = append(msgs, outbox.Message{Exchange: "x", RoutingKey: "r", Key: "same"})
	}
	ids := admAdd(t, s, msgs...)
	admBury(t, s, "nack", ids...)
	n, err := adminOf(t, s.DB.DB, mailroom.Tables{}).ReplayAllDead(ctx)
	if err != nil || n != 5 {
		t.Fatalf("replay all: %d, %v", n, err)
	}
	var got []string
	if err := s.DB.Select(&got, `SELECT id::text FROM mailroom_outbox ORDER BY seq`); err != nil {
		t.Fatal(err)
	}
	for i := range ids {
		if got[i] != ids[i] {
			t.Fatalf("replayed order %v, want %v", got, ids)
		}
	}
	if n, err := adminOf(t, s.DB.DB, mailroom.Tables{}).ReplayAllDead(ctx); err != nil || n != 0 {
		t.Fatalf("replay all of nothing: %d, %v; want 0, nil", n, err)
	}
}

// A dead-letter table larger than one batch is replayed in several
// transactions, every row once, in write order.
func TestReplayAllDeadInBatches(t *testing.T) {
	t.Parallel()
	s := testenv.NewSchema(t)
	const n = 2100 // two full batches of 1000 and a partial one
	s.DB.MustExec(`INSERT INTO mailroom_outbox_dead (seq, id, exchange, routing_key, key, payload, created_at, attempts, last_error)
SELECT nextval(pg_get_serial_sequence('mailroom_outbox', 'seq')), gen_random_uuid(), 'x', 'r', 'k' || (i % 7), '{}', now(), 7, 'nack'
FROM generate_series(1, $1) i`, n)
	var want []string
	if err := s.DB.Select(&want, `SELECT id::text FROM mailroom_outbox_dead ORDER BY seq`); err != nil {
		t.Fatal(err)
	}
	got, err := adminOf(t, s.DB.DB, mailroom.Tables{}).ReplayAllDead(context.Background())
	if err != nil || got != n {
		t.Fatalf("replay all: %d, %v; want %d", got, err, n)
	}
	var replayed []string
	if err := s.DB.Select(&replayed, `SELECT id::text FROM mailroom_outbox ORDER BY seq`); err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(replayed) != fmt.Sprint(want) {
		t.Fatalf("outbox after replay holds %d rows, not the %d dead letters in write order", len(replayed), len(want))
	}
	var perTx []int // rows per writing transaction, in write order
	if err := s.DB.Select(&perTx, `SELECT count(*) FROM mailroom_outbox GROUP BY xmin::text ORDER BY min(seq)`); err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(perTx) != "[1000 1000 100]" {
		t.Fatalf("rows per transaction %v, want [1000 1000 100]", perTx)
	}
}

func TestPurgePublished(t *testing.T) {
	t.Parallel()
	s := testenv.NewSchema(t)
	ctx := context.Background()
	_, err := s.DB.Exec(`INSERT INTO mailroom_outbox_published (seq, id, exchange, routing_key, payload, created_at, attempts, published_at)
SELECT g, gen_random_uuid(), 'x', 'r', '\x7b7d', now(), 0, now() - CASE WHEN g <= 25 THEN interval '2 hours' ELSE interval '1 minute' END
FROM generate_series(1, 30) g`)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := adminOf(t, s.DB.DB, mailroom.Tables{}).PurgePublished(ctx, 0, 0); err == nil {
		t.Fatal("olderThan 0: want an error")
	}
	n, err := adminOf(t, s.DB.DB, mailroom.Tables{}).PurgePublished(ctx, time.Hour, 10) // three batches
	if err != nil || n != 25 {
		t.Fatalf("purge: %d, %v; want 25", n, err)
	}
	var left int
	if err := s.DB.Get(&left, `SELECT count(*) FROM mailroom_outbox_published`); err != nil || left != 5 {
		t.Fatalf("left %d, %v; want the 5 recent rows", left, err)
	}
}

// adminOf is the Admin of tables in db.
func adminOf(t *testing.T, db *sql.DB, tables mailroom.Tables) *relay.Admin {
	t.Helper()
	a, err := relay.NewAdmin(db, tables)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// Dead letters by filter: list and replay select by exchange, type, error
// text and age; show returns one whole, payload and headers included.
func TestDeadLettersByFilterAndShow(t *testing.T) {
	t.Parallel()
	s := testenv.NewSchema(t)
	ctx := context.Background()
	a := adminOf(t, s.DB.DB, mailroom.Tables{})
	ids := admAdd(t, s,
		outbox.Message{Exchange: "orders", RoutingKey: "r", Type: "order.placed", Headers: map[string]string{"tenant": "acme"}, Payload: []byte(`{"n":1}`)},
		outbox.Message{Exchange: "orders", RoutingKey: "r", Type: "order.paid"},
		outbox.Message{Exchange: "billing", RoutingKey: "r", Type: "order.placed"},
	)
	admBury(t, s, "relay: exchange does not exist: \"orders\"", ids[0], ids[1])
	admBury(t, s, "relay: nacked by the broker", ids[2])
	s.DB.MustExec(`UPDATE mailroom_outbox_dead SET dead_at = now() - interval '2 hours' WHERE id = $1`, ids[1])

	for _, c := range []struct {
		name string
		f    relay.DeadFilter
		want []string
	}{
		{"all", relay.DeadFilter{}, ids},
		{"exchange", relay.DeadFilter{Exchange: "orders"}, ids[:2]},
		{"type", relay.DeadFilter{Type: "order.placed"}, []string{ids[0], ids[2]}},
		{"error text", relay.DeadFilter{Error: "nacked"}, ids[2:]},
		{"older than 1h", relay.DeadFilter{MinAge: time.Hour}, ids[1:2]},
		{"newer than 1h", relay.DeadFilter{MaxAge: time.Hour}, []string{ids[0], ids[2]}},
		{"all set", relay.DeadFilter{Exchange: "orders", Type: "order.placed", Error: "does not exist", MaxAge: time.Hour}, ids[:1]},
		{"none match", relay.DeadFilter{Exchange: "nope"}, nil},
	} {
		got, err := a.ListDeadWhere(ctx, c.f, 0)
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		var gotIDs []string
		for _, d := range got {
			gotIDs = append(gotIDs, d.ID)
		}
		if strings.Join(gotIDs, ",") != strings.Join(c.want, ",") {
			t.Errorf("%s: %v, want %v", c.name, gotIDs, c.want)
		}
	}
	if _, err := a.ListDeadWhere(ctx, relay.DeadFilter{MinAge: 2 * time.Hour, MaxAge: time.Hour}, 0); err == nil {
		t.Error("MaxAge below MinAge accepted")
	}

	d, err := a.ShowDead(ctx, ids[0])
	if err != nil {
		t.Fatal(err)
	}
	if string(d.Payload) != `{"n":1}` || d.Headers["tenant"] != "acme" || d.Attempts != 7 || !errors.Is(d.Err(), relay.ErrNoExchange) || d.Type != "order.placed" {
		t.Fatalf("ShowDead: %+v", d)
	}
	if _, err := a.ShowDead(ctx, outbox.NewID()); !errors.Is(err, relay.ErrDeadLetterNotFound) {
		t.Fatalf("ShowDead of an unknown id: %v, want ErrDeadLetterNotFound", err)
	}
	if _, err := a.ShowDead(ctx, "nope"); !errors.Is(err, relay.ErrInvalidID) {
		t.Fatalf("ShowDead of a non-UUID: %v, want ErrInvalidID", err)
	}

	// Replay by filter: the exchange now exists, say; only its rows go back.
	n, err := a.ReplayDeadWhere(ctx, relay.DeadFilter{Exchange: "orders", Error: "does not exist"})
	if err != nil || n != 2 {
		t.Fatalf("ReplayDeadWhere: %d, %v; want the 2 rows of orders", n, err)
	}
	left, _ := a.ListDead(ctx, 0)
	if len(left) != 1 || left[0].ID != ids[2] {
		t.Fatalf("left dead: %+v, want only %s", left, ids[2])
	}
	var pending []string
	if err := s.DB.Select(&pending, `SELECT id::text FROM mailroom_outbox ORDER BY seq`); err != nil || strings.Join(pending, ",") != strings.Join(ids[:2], ",") {
		t.Fatalf("outbox after replay: %v (%v), want %v in order", pending, err, ids[:2])
	}
}
