package outbox_test

import (
	"bytes"
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/mailroom-go/mailroom"
	"github.com/mailroom-go/mailroom/internal/testenv"
	"github.com/mailroom-go/mailroom/outbox"
)

func newOutbox(t *testing.T, cfg outbox.Config) *outbox.Outbox {
	t.Helper()
	ob, err := outbox.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return ob
}

func count(t *testing.T, s *testenv.Schema) int {
	t.Helper()
	var n int
	if err := s.DB.Get(&n, `SELECT count(*) FROM mailroom_outbox`); err != nil {
		t.Fatal(err)
	}
	return n
}

func msg(i int) outbox.Message {
	return outbox.Message{Exchange: "orders", RoutingKey: "order.placed", Type: "order.placed", Payload: []byte(fmt.Sprintf(`{"n":%d}`, i))}
}

func TestRollbackLeavesNoRow(t *testing.T) {
	t.Parallel()
	s := testenv.NewSchema(t)
	ob := newOutbox(t, outbox.Config{})
	ctx := context.Background()
	tx, err := s.DB.BeginTx(ctx, nil) // *sql.Tx
	if err != nil {
		t.Fatal(err)
	}
	if err := ob.Add(ctx, tx, msg(1), msg(2)); err != nil {
		t.Fatal(err)
	}
	if err := tx.Rollback(); err != nil {
		t.Fatal(err)
	}
	if n := count(t, s); n != 0 {
		t.Fatalf("after rollback: %d rows, want 0", n)
	}
}

// Add's paths, each checked here: one statement with literal values; with
// Config.DB set, a prepared statement (one message per Add); and with
// Config.DB opened by atcommit.OpenDB, the inserts sent with the COMMIT.
const (
	literals = "literals"
	prepared = "prepared"
	atCommit = "at-commit"
)

// addPaths runs test once for each of Add's paths.
func addPaths(t *testing.T, test func(t *testing.T, path string)) {
	for _, path := range []string{literals, prepared, atCommit} {
		t.Run(path, func(t *testing.T) { t.Parallel(); test(t, path) })
	}
}

// pathSchema returns a new schema, with its database opened by
// atcommit.OpenDB for the at-commit path, and an Outbox for path.
func pathSchema(t *testing.T, path string) (*testenv.Schema, *outbox.Outbox) {
	s := testenv.NewSchema(t)
	cfg := outbox.Config{}
	switch path {
	case prepared:
		cfg.DB = s.DB.DB
	case atCommit:
		s = &testenv.Schema{Name: s.Name, URL: s.URL, DB: atCommitDB(t, s, "")}
		cfg.DB = s.DB.DB
	}
	return s, newOutbox(t, cfg)
}

// AvailableAt is stored as the instant it is, on every path: with an
// offset of hours, minutes and seconds (local mean time, before time zones
// were rounded) and in a year before 1 (BC).
func TestAvailableAtKeepsItsInstant(t *testing.T) {
	t.Parallel()
	addPaths(t, func(t *testing.T, path string) {
		s, ob := pathSchema(t, path)
		times := []time.Time{
			time.Date(1900, 1, 1, 12, 0, 0, 0, time.FixedZone("LMT", 19*60+32)),
			time.Date(-5, 3, 1, 4, 5, 6, 789000, time.UTC),
			time.Date(2026, 11, 27, 10, 0, 0, 123456000, time.FixedZone("", -(3*3600+30*60))),
		}
		for _, n := range []int{1, len(times)} { // one message, and several in one Add
			s.DB.MustExec(`DELETE FROM mailroom_outbox`)
			var msgs []outbox.Message
			for i, at := range times[:n] {
				m := msg(i)
				m.AvailableAt = at
				msgs = append(msgs, m)
			}
			if err := addInTx(s.DB, ob, msgs...); err != nil {
				t.Fatal(err)
			}
			var got []time.Time
			if err := s.DB.Select(&got, `SELECT available_at FROM mailroom_outbox ORDER BY seq`); err != nil {
				t.Fatal(err)
			}
			if len(got) != n {
				t.Fatalf("%d rows, want %d", len(got), n)
			}
			for i := range got {
				if !got[i].Equal(times[i]) {
					t.Errorf("%d message(s) in one Add: available_at %v, want %v", n, got[i].UTC(), times[i].UTC())
				}
			}
		}
	})
}

func TestCommitLeavesExactlyTheRows(t *testing.T) {
	t.Parallel()
	addPaths(t, testCommitLeavesExactlyTheRows)
}

func testCommitLeavesExactlyTheRows(t *testing.T, path string) {
	s, ob := pathSchema(t, path)
	ctx := context.Background()
	tx := s.DB.MustBeginTx(ctx, nil) // *sqlx.Tx
	id := outbox.NewID()
	later := time.Now().Add(time.Hour).Truncate(time.Microsecond)
	in := outbox.Message{
		ID: strings.ToUpper(id), Exchange: "orders", RoutingKey: "order.placed", Key: "order-7",
		Type: "order.placed", ContentType: "text/plain", Headers: map[string]string{"tenant": `a"b\c`},
		Payload: []byte("hello \x00 bytes"), AvailableAt: later,
	}
	if path != literals {
		for _, m := range []outbox.Message{in, msg(2)} {
			if err := ob.Add(ctx, tx, m); err != nil {
				t.Fatal(err)
			}
		}
		var n int // the statement is prepared on the transaction's session
		if err := tx.Get(&n, `SELECT count(*) FROM pg_prepared_statements WHERE statement ~ '^(PREPARE mailroom_add_[0-9]+ AS /\* mailroom: at commit \*/ )?INSERT INTO "mailroom_outbox"'`); err != nil || n != 1 {
			t.Fatalf("prepared statements for the insert on the transaction's session: %d, %v; want 1", n, err)
		}
	} else if err := ob.Add(ctx, tx, in, msg(2)); err != nil {
		t.Fatal(err)
	}
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}
	var rows []struct {
		ID          string    `db:"id"`
		Exchange    string    `db:"exchange"`
		RoutingKey  string    `db:"routing_key"`
		Key         string    `db:"key"`
		Type        string    `db:"type"`
		ContentType string    `db:"content_type"`
		Headers     *string   `db:"headers"`
		Payload     []byte    `db:"payload"`
		AvailableAt time.Time `db:"available_at"`
		CreatedAt   time.Time `db:"created_at"`
		Attempts    int       `db:"attempts"`
	}
	if err := s.DB.Select(&rows, `SELECT id, exchange, routing_key, key, type, content_type, headers::text AS headers, payload, available_at, created_at, attempts FROM mailroom_outbox ORDER BY seq`); err != nil {
		t.Fatal(err)
	}
	if len(rows) != 2 {
		t.Fatalf("%d rows, want 2", len(rows))
	}
	r := rows[0]
	if r.ID != id || r.Exchange != "orders" || r.RoutingKey != "order.placed" || r.Key != "order-7" || r.Type != "order.placed" ||
		r.ContentType != "text/plain" || string(r.Payload) != "hello \x00 bytes" || !r.AvailableAt.Equal(later) || r.Attempts != 0 {
		t.Fatalf("row 0 = %+v", r)
	}
	if r.Headers == nil || *r.Headers != `{"tenant": "a\"b\\c"}` {
		t.Fatalf("headers = %v", r.Headers)
	}
	if rows[1].ContentType != "application/json" || rows[1].Headers != nil || rows[1].Key != "" {
		t.Fatalf("row 1 defaults = %+v", rows[1])
	}
	if d := rows[1].AvailableAt.Sub(rows[1].CreatedAt); d != 0 {
		t.Fatalf("zero AvailableAt should mean now (created_at), differs by %s", d)
	}
	if _, err := uuid.Parse(string(rows[1].ID)); err != nil {
		t.Fatalf("generated id %q: %v", rows[1].ID, err)
	}
}

func TestThousandMessagesInOneAdd(t *testing.T) {
	t.Parallel()
	s := testenv.NewSchema(t)
	ob := newOutbox(t, outbox.Config{})
	ctx := context.Background()
	msgs := make([]outbox.Message, 1000)
	for i := range msgs {
		msgs[i] = msg(i)
	}
	tx := s.DB.MustBeginTx(ctx, nil)
	if err := ob.Add(ctx, tx, msgs...); err != nil {
		t.Fatal(err)
	}
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}
	var payloads []string
	if err := s.DB.Select(&payloads, `SELECT convert_from(payload, 'UTF8') FROM mailroom_outbox ORDER BY seq`); err != nil {
		t.Fatal(err)
	}
	if len(payloads) != 1000 {
		t.Fatalf("%d rows, want 1000", len(payloads))
	}
	for i, p := range payloads {
		if want := fmt.Sprintf(`{"n":%d}`, i); p != want {
			t.Fatalf("row %d payload %s, want %s (seq order must follow message order)", i, p, want)
		}
	}
}

func TestConcurrentAdds(t *testing.T) {
	t.Parallel()
	addPaths(t, testConcurrentAdds)
}

func testConcurrentAdds(t *testing.T, path string) {
	s, ob := pathSchema(t, path)
	ctx := context.Background()
	const writers, each = 16, 25
	var wg sync.WaitGroup
	errs := make(chan error, writers*each)
	for w := 0; w < writers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < each; i++ {
				tx, err := s.DB.BeginTxx(ctx, nil)
				if err != nil {
					errs <- err
					return
				}
				if err := ob.Add(ctx, tx, msg(i)); err != nil {
					tx.Rollback()
					errs <- err
					return
				}
				if err := tx.Commit(); err != nil {
					errs <- err
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if n := count(t, s); n != writers*each {
		t.Fatalf("%d rows, want %d", n, writers*each)
	}
}

func TestAddWithoutTransactionAndEmpty(t *testing.T) {
	t.Parallel()
	s := testenv.NewSchema(t)
	ob := newOutbox(t, outbox.Config{})
	ctx := context.Background()
	if err := ob.Add(ctx, s.DB); err != nil { // nothing to add: no statement at all
		t.Fatal(err)
	}
	conn, err := s.DB.Conn(ctx) // *sql.Conn
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if err := ob.Add(ctx, conn, msg(1)); err != nil {
		t.Fatal(err)
	}
	if err := ob.Add(ctx, s.DB.DB, msg(2)); err != nil { // *sql.DB
		t.Fatal(err)
	}
	withDB := newOutbox(t, outbox.Config{DB: s.DB.DB})
	if err := withDB.Add(ctx, s.DB.DB, msg(3)); err != nil { // Config.DB itself
		t.Fatal(err)
	}
	if err := withDB.Add(ctx, conn, msg(4)); err != nil { // no StmtContext: literals
		t.Fatal(err)
	}
	if n := count(t, s); n != 4 {
		t.Fatalf("%d rows, want 4", n)
	}
}

// A transaction of another database than Config.DB gets an error that
// says so, and nothing is written.
func TestPreparedOnAnotherDatabase(t *testing.T) {
	t.Parallel()
	s := testenv.NewSchema(t)
	other, err := sql.Open("postgres", s.URL)
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	ob := newOutbox(t, outbox.Config{DB: other})
	ctx := context.Background()
	tx, err := s.DB.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback()
	err = ob.Add(ctx, tx, msg(1))
	if err == nil || !strings.Contains(err.Error(), "Config.DB is not the database of this transaction") {
		t.Fatalf("Add with a transaction of another *sql.DB: %v", err)
	}
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}
	if n := count(t, s); n != 0 {
		t.Fatalf("%d rows, want 0", n)
	}
}

func TestValidationErrors(t *testing.T) {
	t.Parallel()
	s := testenv.NewSchema(t)
	ob := newOutbox(t, outbox.Config{MaxPayloadBytes: 64})
	long := strings.Repeat("k", 256)
	cases := []struct {
		name string
		m    outbox.Message
		want string
	}{
		{"malformed id", outbox.Message{ID: "not-a-uuid", Exchange: "x", Payload: []byte(`{}`)}, `ID: "not-a-uuid" is not a UUID`},
		{"no route", outbox.Message{Payload: []byte(`{}`)}, "RoutingKey: empty with the default exchange"},
		{"bad exchange", outbox.Message{Exchange: "a b", Payload: []byte(`{}`)}, `Exchange: "a b" has ' '`},
		{"long exchange", outbox.Message{Exchange: long, Payload: []byte(`{}`)}, "Exchange: 256 bytes is over the 255-byte limit"},
		{"long routing key", outbox.Message{Exchange: "x", RoutingKey: long, Payload: []byte(`{}`)}, "RoutingKey: 256 bytes"},
		{"long key", outbox.Message{Exchange: "x", Key: long, Payload: []byte(`{}`)}, "Key: 256 bytes"},
		{"nul in type", outbox.Message{Exchange: "x", Type: "a\x00", Payload: []byte(`{}`)}, "Type: contains a NUL byte"},
		{"latin-1 key", outbox.Message{Exchange: "x", Key: "caf\xe9", Payload: []byte(`{}`)}, `Key: "caf\xe9" is not valid UTF-8`},
		{"nul in header value", outbox.Message{Exchange: "x", Headers: map[string]string{"h": "a\x00"}, Payload: []byte(`{}`)}, `Headers: "h": contains a NUL byte`},
		{"latin-1 header value", outbox.Message{Exchange: "x", Headers: map[string]string{"h": "\xff"}, Payload: []byte(`{}`)}, `Headers: "h": "\xff" is not valid UTF-8`},
		{"reserved header", outbox.Message{Exchange: "x", Headers: map[string]string{"X-Mailroom-Key": "k"}, Payload: []byte(`{}`)}, `Headers: "X-Mailroom-Key": names starting with "x-mailroom-" are reserved`},
		{"empty header", outbox.Message{Exchange: "x", Headers: map[string]string{"": "v"}, Payload: []byte(`{}`)}, "Headers: empty header name"},
		{"headers over a frame", outbox.Message{Exchange: "x", Headers: map[string]string{"a": strings.Repeat("v", 40<<10), "b": strings.Repeat("v", 40<<10)}, Payload: []byte(`{}`)}, "Headers: 81934 bytes encoded is over the 65536-byte limit"},
		{"oversize payload", outbox.Message{Exchange: "x", ContentType: "text/plain", Payload: make([]byte, 65)}, "Payload: 65 bytes is over the 64-byte limit"},
		{"bad json", outbox.Message{Exchange: "x", Payload: []byte(`{"a":`)}, "Payload: not valid JSON"},
	}
	ctx := context.Background()
	for _, c := range cases {
		// The bad message is the second one: the index must say so, and the
		// good first message must not be written either.
		err := ob.Add(ctx, s.DB, msg(0), c.m)
		if !errors.Is(err, outbox.ErrInvalidMessage) {
			t.Errorf("%s: err = %v, want ErrInvalidMessage", c.name, err)
			continue
		}
		if !strings.Contains(err.Error(), "message 1: "+c.want) {
			t.Errorf("%s: error %q does not contain %q", c.name, err, "message 1: "+c.want)
		}
	}
	if n := count(t, s); n != 0 {
		t.Fatalf("invalid batches wrote %d rows", n)
	}
}

func TestConfigErrors(t *testing.T) {
	t.Parallel()
	for _, table := range []string{`x"; DROP TABLE users; --`, "a.b.c", "1abc", "bad name", `"quoted"`} {
		if _, err := outbox.New(outbox.Config{Table: table}); err == nil || !strings.Contains(err.Error(), "Config.Table") {
			t.Errorf("Table %q: err = %v, want a Config.Table error", table, err)
		}
	}
	// One way to name tables: Table, or Tables.Outbox (as the relay takes
	// them); both, differing, is an error naming both.
	if _, err := outbox.New(outbox.Config{Tables: mailroom.Tables{Outbox: "bad name"}}); err == nil || !strings.Contains(err.Error(), "Config.Tables.Outbox") {
		t.Errorf("bad Tables.Outbox: %v, want an error naming Config.Tables.Outbox", err)
	}
	if _, err := outbox.New(outbox.Config{Table: "a", Tables: mailroom.Tables{Outbox: "b"}}); err == nil || !strings.Contains(err.Error(), `Table "a" and Tables.Outbox "b" differ`) {
		t.Errorf("Table and Tables.Outbox differing: %v, want an error naming both", err)
	}
	if _, err := outbox.New(outbox.Config{Table: "a", Tables: mailroom.Tables{Outbox: "a"}}); err != nil {
		t.Errorf("Table and Tables.Outbox the same: %v", err)
	}
	if _, err := outbox.New(outbox.Config{MaxPayloadBytes: -1}); err == nil || !strings.Contains(err.Error(), "MaxPayloadBytes") {
		t.Errorf("negative MaxPayloadBytes: %v", err)
	}
	if _, err := outbox.New(outbox.Config{MaxPayloadBytes: 600 << 20}); err == nil {
		t.Error("MaxPayloadBytes over RabbitMQ's limit accepted")
	}
}

func TestSchemaQualifiedTable(t *testing.T) {
	t.Parallel()
	s := testenv.NewSchema(t)
	ob := newOutbox(t, outbox.Config{Table: s.Name + ".mailroom_outbox"})
	if err := ob.Add(context.Background(), s.DB, msg(1)); err != nil {
		t.Fatal(err)
	}
	if n := count(t, s); n != 1 {
		t.Fatalf("%d rows, want 1", n)
	}
}

func TestGeneratedIDsSortByCreationTime(t *testing.T) {
	t.Parallel()
	s := testenv.NewSchema(t)
	ob := newOutbox(t, outbox.Config{})
	ctx := context.Background()
	for i := 0; i < 50; i++ { // separate transactions: created_at strictly grows
		if err := ob.Add(ctx, s.DB, msg(i)); err != nil {
			t.Fatal(err)
		}
	}
	var ids []string
	if err := s.DB.Select(&ids, `SELECT id::text FROM mailroom_outbox ORDER BY created_at, seq`); err != nil {
		t.Fatal(err)
	}
	if !sort.StringsAreSorted(ids) {
		t.Fatalf("ids in creation order are not sorted: %v", ids)
	}
	for _, id := range ids {
		if u := uuid.MustParse(id); u.Version() != 7 {
			t.Fatalf("id %s is version %d, want 7", id, u.Version())
		}
	}
}

// Add sends the values as quoted literals (one round trip in lib/pq): every
// byte must come back as written, whatever quoting the session uses.
func TestHostileValuesRoundTrip(t *testing.T) {
	t.Parallel()
	addPaths(t, testHostileValuesRoundTrip)
}

func testHostileValuesRoundTrip(t *testing.T, path string) {
	s, ob := pathSchema(t, path)
	all := make([]byte, 256)
	for i := range all {
		all[i] = byte(i)
	}
	hostile := `'); DROP TABLE mailroom_outbox; -- \' \\ $$ E'\x41' ` + "ünï\u2028"
	in := outbox.Message{
		Exchange: "orders", RoutingKey: hostile, Key: hostile, Type: hostile, ContentType: "application/octet-stream",
		Headers: map[string]string{hostile: hostile, "tenant": `a"b\c`}, Payload: all,
	}
	for _, conforming := range []string{"on", "off"} {
		ctx := context.Background()
		tx := s.DB.MustBeginTx(ctx, nil)
		if _, err := tx.Exec(`SET LOCAL standard_conforming_strings = ` + conforming); err != nil {
			t.Fatal(err)
		}
		in.ID = outbox.NewID()
		if err := ob.Add(ctx, tx, in); err != nil {
			t.Fatalf("standard_conforming_strings=%s: %v", conforming, err)
		}
		if err := tx.Commit(); err != nil {
			t.Fatal(err)
		}
		var got struct {
			RoutingKey string `db:"routing_key"`
			Key        string `db:"key"`
			Type       string `db:"type"`
			Headers    string `db:"headers"`
			Payload    []byte `db:"payload"`
		}
		if err := s.DB.Get(&got, `SELECT routing_key, key, type, headers::text AS headers, payload FROM mailroom_outbox WHERE id = $1`, in.ID); err != nil {
			t.Fatalf("standard_conforming_strings=%s: %v", conforming, err)
		}
		var headers map[string]string
		if err := json.Unmarshal([]byte(got.Headers), &headers); err != nil {
			t.Fatal(err)
		}
		if got.RoutingKey != hostile || got.Key != hostile || got.Type != hostile || !bytes.Equal(got.Payload, all) ||
			headers[hostile] != hostile || headers["tenant"] != `a"b\c` {
			t.Fatalf("standard_conforming_strings=%s: read back %+v", conforming, got)
		}
	}
	if n := count(t, s); n != 2 {
		t.Fatalf("%d rows, want 2", n)
	}
}
