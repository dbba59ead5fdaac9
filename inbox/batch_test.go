package inbox_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"

	"github.com/jmoiron/sqlx"
	amqp "github.com/rabbitmq/amqp091-go"
	"go.opentelemetry.io/otel/attribute"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"

	"github.com/mailroom-go/mailroom/atcommit"
	"github.com/mailroom-go/mailroom/inbox"
	"github.com/mailroom-go/mailroom/outbox"
)

// A batch runs without savepoints first; a failing handler rolls the whole
// transaction back and the batch is redone with savepoints. The failing
// handler is not called again by the redo, so calls, Stats and the handler
// metric count each failure once; the others are applied exactly once.
func TestBatchFailureRedoneWithSavepoints(t *testing.T) {
	t.Parallel()
	for _, ordered := range []bool{false, true} {
		t.Run(fmt.Sprint("ordered ", ordered), func(t *testing.T) {
			t.Parallel()
			e := newEnv(t, inbox.Topology{})
			var msgs []amqp.Publishing
			for i, id := range ids("redo", 40) {
				msgs = append(msgs, msg(id, fmt.Sprint("key", i%3), i))
			}
			e.publish(msgs...) // queued before the consumer starts, so batches fill
			const doomed = "redo-0025"
			var mu sync.Mutex
			calls := map[string]int{}
			cfg := e.config(func(ctx context.Context, tx *sqlx.Tx, m inbox.Message) error {
				mu.Lock()
				calls[m.ID]++
				mu.Unlock()
				if err := record(ctx, tx, m); err != nil {
					return err
				}
				if m.ID == doomed {
					return errors.New("always fails, after writing")
				}
				return nil
			})
			reader := sdkmetric.NewManualReader()
			mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
			t.Cleanup(func() { _ = mp.Shutdown(context.Background()) })
			cfg.MeterProvider = mp
			cfg.Concurrency, cfg.BatchSize, cfg.MaxAttempts, cfg.OrderedByKey = 1, 10, 3, ordered
			c, stop := e.start(cfg)
			e.deadLetters(1)
			got := e.waitEffects(39)
			if got[doomed] != 0 {
				t.Errorf("%s applied although its handler always fails", doomed)
			}
			largestTx(t, e)
			mu.Lock()
			if calls[doomed] != 3 {
				t.Errorf("failing handler called %d times, want MaxAttempts = 3 (the redo must not call it again)", calls[doomed])
			}
			redone := 0
			for _, n := range calls {
				redone += n - 1
			}
			mu.Unlock()
			if s := settled(c, stop); s.Handled != 39 || s.Failed != 3 || s.DeadLettered != 1 {
				t.Errorf("stats %+v, want 39 handled, 3 failed, 1 dead letter", s)
			}
			ok, failed := handlerRuns(t, reader)
			if ok != 39 || failed != 3 {
				t.Errorf("handler duration recorded %d ok and %d error, want 39 and 3 (rolled-back runs are not recorded)", ok, failed)
			}
			t.Logf("%d handler calls beyond the first of their message (redone batches and retries)", redone)
			if ordered {
				checkKeyOrder(t, e)
			}
		})
	}
}

// A handler that swallows a failed statement and returns nil leaves the
// transaction aborted: the next statement of the batch (another message's
// handler) or the commit fails, and the fast attempt cannot tell which
// message broke it. The redo with savepoints finds it: only that message
// fails (and is applied on attempt 2), the others once on attempt 1.
func TestBatchStatementFailureSwallowedByHandler(t *testing.T) {
	t.Parallel()
	for _, ordered := range []bool{false, true} {
		t.Run(fmt.Sprint("ordered ", ordered), func(t *testing.T) {
			t.Parallel()
			e := newEnv(t, inbox.Topology{})
			var msgs []amqp.Publishing
			swallows := map[string]bool{}
			for i, id := range ids("swallow", 60) {
				msgs = append(msgs, msg(id, fmt.Sprint("key", i%3), i))
				if i%7 == 3 { // at varying places in the batches
					swallows[id] = true
				}
			}
			e.publish(msgs...)
			cfg := e.config(func(ctx context.Context, tx *sqlx.Tx, m inbox.Message) error {
				if swallows[m.ID] && m.Attempt == 1 {
					_, _ = tx.ExecContext(ctx, `SELECT 1/0`) // error ignored: the transaction is now aborted
					return nil
				}
				return record(ctx, tx, m)
			})
			cfg.Concurrency, cfg.BatchSize, cfg.OrderedByKey = 1, 10, ordered
			c, stop := e.start(cfg)
			e.waitEffects(60)
			largestTx(t, e)
			var rows []struct {
				ID      string `db:"msg_id"`
				Attempt int    `db:"attempt"`
			}
			if err := e.db.Select(&rows, `SELECT msg_id, attempt FROM effects`); err != nil {
				t.Fatal(err)
			}
			for _, r := range rows {
				want := 1
				if swallows[r.ID] {
					want = 2
				}
				if r.Attempt != want {
					t.Errorf("%s applied on attempt %d, want %d", r.ID, r.Attempt, want)
				}
			}
			if s := settled(c, stop); s.Handled != 60 || s.Failed != uint64(len(swallows)) {
				t.Errorf("stats %+v, want 60 handled and %d failed", s, len(swallows))
			}
			if ordered {
				checkKeyOrder(t, e)
			}
		})
	}
}

// On a database of atcommit.OpenDB the insert of a handler's Add is sent
// with the transaction's next statement (another message's handler, or a
// savepoint) or with the COMMIT. When it fails, the batch is redone one
// message at a time and only the message whose handler added it fails:
// the next message's handler, whose statement reported it, and the batch
// whose commit carried it are not charged with it.
// atCommitEnv is an env whose database is opened by atcommit.OpenDB (Add's
// insert sent with the next statement or the COMMIT) and whose outbox
// refuses messages of type "bad" (a CHECK), with an Outbox on it.
func atCommitEnv(t *testing.T) (*env, *outbox.Outbox) {
	t.Helper()
	e := newEnv(t, inbox.Topology{})
	e.db.MustExec(`ALTER TABLE mailroom_outbox ADD CONSTRAINT no_bad_type CHECK (type <> 'bad')`)
	db, err := atcommit.OpenDB(e.url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	e.db = sqlx.NewDb(db, "postgres") // atcommit wraps lib/pq only
	ob, err := outbox.New(outbox.Config{DB: db})
	if err != nil {
		t.Fatal(err)
	}
	return e, ob
}

func TestBatchAddSentLaterFails(t *testing.T) {
	t.Parallel()
	e, ob := atCommitEnv(t)
	var msgs []amqp.Publishing
	doomed := map[string]bool{}
	for i, id := range ids("later", 40) {
		msgs = append(msgs, msg(id, "", i))
		if i%10 == 4 || i%10 == 9 { // mid-batch, and likely a batch's last
			doomed[id] = true
		}
	}
	e.publish(msgs...)
	cfg := e.config(func(ctx context.Context, tx *sqlx.Tx, m inbox.Message) error {
		if err := record(ctx, tx, m); err != nil {
			return err
		}
		typ := "ok"
		if doomed[m.ID] {
			typ = "bad"
		}
		return ob.Add(ctx, tx, outbox.Message{Exchange: "x", Type: typ, Payload: []byte(`{}`)})
	})
	cfg.Concurrency, cfg.BatchSize, cfg.MaxAttempts = 1, 10, 2
	c, stop := e.start(cfg)
	e.deadLetters(len(doomed))
	got := e.waitEffects(40 - len(doomed))
	largestTx(t, e)
	for id := range doomed {
		if got[id] != 0 {
			t.Errorf("%s applied although its outbox insert always fails", id)
		}
	}
	var attempts []int
	if err := e.db.Select(&attempts, `SELECT attempt FROM effects WHERE attempt <> 1`); err != nil {
		t.Fatal(err)
	}
	if len(attempts) != 0 {
		t.Errorf("%d messages applied on a later attempt: a failure was charged to a message that did not cause it", len(attempts))
	}
	var outboxRows int
	if err := e.db.Get(&outboxRows, `SELECT count(*) FROM mailroom_outbox`); err != nil || outboxRows != 40-len(doomed) {
		t.Errorf("%d outbox rows (%v), want one per applied message, %d", outboxRows, err, 40-len(doomed))
	}
	if s := settled(c, stop); s.Handled != uint64(40-len(doomed)) || s.Failed != uint64(2*len(doomed)) || s.DeadLettered != uint64(len(doomed)) {
		t.Errorf("stats %+v, want %d handled, %d failed, %d dead letters", s, 40-len(doomed), 2*len(doomed), len(doomed))
	}
}

// largestTx fails the test unless some transaction applied several
// messages (the batching these tests are about happened).
func largestTx(t *testing.T, e *env) {
	t.Helper()
	var largest int
	if err := e.db.Get(&largest, `SELECT max(n) FROM (SELECT count(*) AS n FROM effects GROUP BY txid) b`); err != nil {
		t.Fatal(err)
	}
	if largest < 2 {
		t.Errorf("largest transaction applied %d messages: batching did not happen", largest)
	}
}

// checkKeyOrder fails the test if two messages of one key were applied out
// of id order (ids are published in order).
func checkKeyOrder(t *testing.T, e *env) {
	t.Helper()
	var rows []struct {
		ID  string `db:"msg_id"`
		Key string `db:"key"`
	}
	if err := e.db.Select(&rows, `SELECT msg_id, key FROM effects ORDER BY seq`); err != nil {
		t.Fatal(err)
	}
	last := map[string]string{}
	for _, r := range rows {
		if r.ID < last[r.Key] {
			t.Errorf("key %s: %s applied after %s", r.Key, r.ID, last[r.Key])
		}
		last[r.Key] = r.ID
	}
}

// handlerRuns reads the handler duration histogram's counts by result.
func handlerRuns(t *testing.T, r *sdkmetric.ManualReader) (ok, failed uint64) {
	t.Helper()
	var rm metricdata.ResourceMetrics
	if err := r.Collect(context.Background(), &rm); err != nil {
		t.Fatal(err)
	}
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			h, isHist := m.Data.(metricdata.Histogram[float64])
			if !isHist || m.Name != "mailroom.inbox.handler.duration" {
				continue
			}
			for _, p := range h.DataPoints {
				switch v, _ := p.Attributes.Value(attribute.Key("result")); v.AsString() {
				case "ok":
					ok += p.Count
				case "error":
					failed += p.Count
				}
			}
		}
	}
	return ok, failed
}

// A handler that adds a message whose insert will fail (atcommit.OpenDB
// sends it later) and then returns an error: its savepoint's rollback
// undoes the insert without sending it, and only that message is charged.
// The messages are retries (attempt 2), so every batch goes straight to
// the savepoints.
func TestBatchHandlerFailsAfterAddSentLater(t *testing.T) {
	t.Parallel()
	e, ob := atCommitEnv(t)
	var msgs []amqp.Publishing
	doomed := map[string]bool{}
	for i, id := range ids("after-add", 20) {
		m := msg(id, "", i)
		m.Headers[inbox.HeaderAttempt] = int64(2)
		msgs = append(msgs, m)
		doomed[id] = i%10 == 3
	}
	e.publish(msgs...)
	cfg := e.config(func(ctx context.Context, tx *sqlx.Tx, m inbox.Message) error {
		if err := record(ctx, tx, m); err != nil {
			return err
		}
		if !doomed[m.ID] {
			return nil
		}
		if err := ob.Add(ctx, tx, outbox.Message{Exchange: "x", Type: "bad", Payload: []byte(`{}`)}); err != nil {
			return err
		}
		return errors.New("the handler fails after its Add")
	})
	cfg.Concurrency, cfg.BatchSize, cfg.MaxAttempts = 1, 10, 3
	c, stop := e.start(cfg)
	e.deadLetters(2)
	e.waitEffects(18)
	largestTx(t, e)
	if s := settled(c, stop); s.Handled != 18 || s.Failed != 4 || s.DeadLettered != 2 || s.DBErrors != 0 {
		t.Errorf("stats %+v, want 18 handled, 4 failed (attempts 2 and 3 of two), 2 dead letters, no database errors", s)
	}
}

// A batch whose COMMIT PostgreSQL refuses (here a deferred foreign key one
// handler breaks: savepoints do not check it) is applied one message at a
// time, so only that message is charged; none is requeued.
func TestBatchCommitRefused(t *testing.T) {
	t.Parallel()
	e := newEnv(t, inbox.Topology{})
	e.db.MustExec(`CREATE TABLE parents (id int PRIMARY KEY);
CREATE TABLE children (parent int REFERENCES parents DEFERRABLE INITIALLY DEFERRED)`)
	cfg := e.config(func(ctx context.Context, tx *sqlx.Tx, m inbox.Message) error {
		if err := record(ctx, tx, m); err != nil {
			return err
		}
		if m.ID == "refused-0004" {
			_, err := tx.ExecContext(ctx, `INSERT INTO children VALUES (1)`) // no such parent
			return err
		}
		return nil
	})
	var msgs []amqp.Publishing
	for i, id := range ids("refused", 20) {
		msgs = append(msgs, msg(id, "", i))
	}
	e.publish(msgs...)
	cfg.Concurrency, cfg.BatchSize, cfg.MaxAttempts = 1, 10, 2
	c, stop := e.start(cfg)
	dls := e.deadLetters(1)
	if dls[0].MessageId != "refused-0004" {
		t.Errorf("dead letter %s, want refused-0004", dls[0].MessageId)
	}
	e.waitEffects(19)
	if s := settled(c, stop); s.Handled != 19 || s.Failed != 2 || s.DeadLettered != 1 || s.Requeued != 0 {
		t.Errorf("stats %+v, want 19 handled, 2 failed, 1 dead letter, none requeued", s)
	}
}

// Under OrderedByKey a batch whose COMMIT fails is tried again in place,
// not requeued behind the later messages of its key: when PostgreSQL
// refuses it (a serialization failure), and when the session ends during
// it (the outcome unknown).
func TestBatchOrderedCommitFails(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct{ name, fail string }{
		{"refused", `RAISE EXCEPTION 'try again' USING ERRCODE = 'serialization_failure'`},
		{"session-ended", `PERFORM pg_terminate_backend(pg_backend_pid())`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t, inbox.Topology{})
			// The first two commits that write an effect fail: a
			// sequence counts them, whatever was rolled back.
			e.db.MustExec(`CREATE SEQUENCE commits;
CREATE FUNCTION fail_twice() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF nextval('commits') <= 2 THEN ` + tc.fail + `; END IF;
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER fail_twice AFTER INSERT ON effects DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION fail_twice()`)
			var msgs []amqp.Publishing
			for i, id := range ids("ord", 20) {
				msgs = append(msgs, msg(id, "k", i))
			}
			e.publish(msgs...)
			cfg := e.config(record)
			cfg.OrderedByKey, cfg.Concurrency, cfg.BatchSize = true, 1, 5
			c, stop := e.start(cfg)
			e.waitEffects(20)
			checkKeyOrder(t, e)
			if s := settled(c, stop); s.Handled != 20 || s.Requeued != 0 {
				t.Errorf("stats %+v, want 20 handled, none requeued", s)
			}
		})
	}
}

// A COMMIT PostgreSQL cancels (57014, here a deferred trigger cancelling
// its own statement; a statement timeout does the same) rolled back and
// the session lives on: it is the handler's failure, charged and
// dead-lettered after MaxAttempts, not an unknown outcome requeued
// forever.
func TestCommitCancelledIsCharged(t *testing.T) {
	t.Parallel()
	e := newEnv(t, inbox.Topology{})
	e.db.MustExec(`CREATE TABLE cancelled (n int);
CREATE FUNCTION cancel_commit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_cancel_backend(pg_backend_pid()); PERFORM pg_sleep(5); RETURN NULL; END $$;
CREATE CONSTRAINT TRIGGER cancel_commit AFTER INSERT ON cancelled DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION cancel_commit()`)
	cfg := e.config(func(ctx context.Context, tx *sqlx.Tx, m inbox.Message) error {
		if err := record(ctx, tx, m); err != nil {
			return err
		}
		if m.ID != "cancelled" {
			return nil
		}
		_, err := tx.ExecContext(ctx, `INSERT INTO cancelled VALUES (1)`)
		return err
	})
	cfg.MaxAttempts = 2
	c, stop := e.start(cfg)
	e.publish(msg("cancelled", "", 1), msg("fine", "", 2))
	if dls := e.deadLetters(1); dls[0].MessageId != "cancelled" {
		t.Fatalf("dead letter %s, want cancelled", dls[0].MessageId)
	}
	e.waitEffects(1)
	if s := settled(c, stop); s.Failed != 2 || s.Requeued != 0 {
		t.Errorf("stats %+v, want 2 failed, none requeued", s)
	}
}
