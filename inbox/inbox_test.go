package inbox_test

import (
	"context"
	"errors"
	"fmt"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jmoiron/sqlx"
	amqp "github.com/rabbitmq/amqp091-go"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/metric/noop"

	"github.com/mailroom-go/mailroom/inbox"
	"github.com/mailroom-go/mailroom/internal/testenv"
)

func TestNewValidatesConfig(t *testing.T) {
	t.Parallel()
	h := func(context.Context, *sqlx.Tx, inbox.Message) error { return nil }
	ok := inbox.Config{URL: "amqp://localhost/", Queue: "q", Consumer: "c", Handler: h}
	db := &sqlx.DB{}
	for _, tc := range []struct {
		field string
		edit  func(*inbox.Config)
	}{
		{"URL", func(c *inbox.Config) { c.URL = "" }},
		{"URL", func(c *inbox.Config) { c.URL = "http://localhost" }},
		{"URL: node 2 of 2", func(c *inbox.Config) { c.URL = "amqp://a/,http://b" }},
		{"URL: node 2 of 3", func(c *inbox.Config) { c.URL = "amqp://a/,,amqp://c/" }},
		{"URLs: node 1 of 2", func(c *inbox.Config) { c.URL, c.URLs = "", []string{"localhost:5672", "amqp://b/"} }},
		{"URL and URLs", func(c *inbox.Config) { c.URLs = []string{"amqp://b/"} }},
		{"Queue", func(c *inbox.Config) { c.Queue = "" }},
		{"Consumer", func(c *inbox.Config) { c.Consumer = "" }},
		{"Consumer", func(c *inbox.Config) { c.Consumer = "pay\x00ments" }},
		{"Consumer", func(c *inbox.Config) { c.Consumer = "pay\xffments" }},
		{"Retention", func(c *inbox.Config) { c.MaxAttempts, c.MaxBackoff = 50_000_000, 5*time.Minute }}, // the product overflows
		{"Handler", func(c *inbox.Config) { c.Handler = nil }},
		{"RetryQueue", func(c *inbox.Config) { c.RetryQueue = "q" }},
		{"Concurrency", func(c *inbox.Config) { c.Concurrency = -1 }},
		{"BatchSize", func(c *inbox.Config) { c.BatchSize = 5000 }},
		{"Prefetch", func(c *inbox.Config) { c.Prefetch = 70000 }},
		{"MaxAttempts", func(c *inbox.Config) { c.MaxAttempts = -2 }},
		{"MinBackoff", func(c *inbox.Config) { c.MinBackoff = 1 }},
		{"MaxBackoff", func(c *inbox.Config) { c.MinBackoff, c.MaxBackoff = 2e9, 1e9 }},
		{"Retention", func(c *inbox.Config) { c.Retention = 1e9 }},
		{"Table", func(c *inbox.Config) { c.Table = "no-dashes" }},
		{"Tables.Inbox", func(c *inbox.Config) { c.Tables.Inbox = "no-dashes" }},
		{"Table", func(c *inbox.Config) { c.Table, c.Tables.Inbox = "a", "b" }}, // both, differing
		{"HoldLimit", func(c *inbox.Config) { c.HoldLimit = time.Millisecond }},
		{"Queue", func(c *inbox.Config) { c.Queue = strings.Repeat("q", 256) }},
		{"RetryQueue", func(c *inbox.Config) { c.Queue = strings.Repeat("q", 250) }}, // its default retry queue is 256 bytes
	} {
		cfg := ok
		tc.edit(&cfg)
		_, err := inbox.New(db, cfg)
		if err == nil || !strings.Contains(err.Error(), "Config."+tc.field) {
			t.Errorf("%s: New = %v, want an error naming Config.%s", tc.field, err, tc.field)
		}
	}
	if _, err := inbox.New(db, ok); err != nil {
		t.Fatalf("valid config: %v", err)
	}
	cluster := ok
	cluster.URL, cluster.URLs = "", []string{"amqp://a/", "amqps://b/"}
	if _, err := inbox.New(db, cluster); err != nil {
		t.Fatalf("valid config with URLs: %v", err)
	}
}

// Every message published twice: one effect each, the copies acked as
// duplicates without calling the handler.
func TestEachMessageTwiceOneEffect(t *testing.T) {
	t.Parallel()
	e := newEnv(t, inbox.Topology{})
	var calls atomic.Int64
	c, _ := e.start(e.config(func(ctx context.Context, tx *sqlx.Tx, m inbox.Message) error {
		calls.Add(1)
		return record(ctx, tx, m)
	}))
	var msgs []amqp.Publishing
	for i, id := range ids("twice", 50) {
		msgs = append(msgs, msg(id, "", i), msg(id, "", i))
	}
	e.publish(msgs...)
	e.waitEffects(50)
	testenv.Eventually(t, wait, "all 100 deliveries settled", func() bool {
		s := c.Stats()
		return s.Handled+s.Duplicates == 100
	})
	if s := c.Stats(); s.Handled != 50 || s.Duplicates != 50 || calls.Load() != 50 {
		t.Fatalf("stats %+v, handler calls %d; want 50 handled, 50 duplicates, 50 calls", s, calls.Load())
	}
}

// Two consumer processes on one queue, each message published twice and
// handled concurrently: still one effect per message.
func TestTwoConsumersConcurrentDuplicates(t *testing.T) {
	t.Parallel()
	e := newEnv(t, inbox.Topology{})
	cfg := e.config(record)
	cfg.Concurrency = 8
	c1, _ := e.start(cfg)
	cfg.ConnectionName = testenv.Unique("inbox-test-2")
	c2, _ := e.start(cfg)
	var msgs []amqp.Publishing
	for i, id := range ids("pair", 200) {
		msgs = append(msgs, msg(id, "", i), msg(id, "", i))
	}
	e.publish(msgs...)
	e.waitEffects(200)
	testenv.Eventually(t, wait, "all deliveries settled", func() bool {
		s1, s2 := c1.Stats(), c2.Stats()
		return s1.Handled+s1.Duplicates+s2.Handled+s2.Duplicates == 400
	})
	s1, s2 := c1.Stats(), c2.Stats()
	if s1.Handled+s2.Handled != 200 {
		t.Fatalf("handled %d + %d, want 200 in all", s1.Handled, s2.Handled)
	}
	t.Logf("consumer 1 %+v; consumer 2 %+v", s1, s2)
}

// The connection dies after the commit and before the ack: the broker
// redelivers, and the redelivery is recognised as a duplicate.
func TestConnectionLostBetweenCommitAndAck(t *testing.T) {
	t.Parallel()
	e := newEnv(t, inbox.Topology{})
	cfg := e.config(record)
	cfg.Concurrency = 1
	c, err := inbox.New(e.db, cfg)
	if err != nil {
		t.Fatal(err)
	}
	committed := make(chan string)
	resume := make(chan struct{})
	var once sync.Once
	inbox.SetAfterCommit(c, func(m inbox.Message) {
		once.Do(func() {
			committed <- m.ID
			<-resume
		})
	})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	}()

	e.publish(msg("lost-ack", "", 1))
	id := <-committed
	if n := testenv.CloseConnection(t, cfg.ConnectionName); n != 1 {
		t.Fatalf("closed %d connections named %q, want 1", n, cfg.ConnectionName)
	}
	close(resume) // the ack now goes to a dead connection
	testenv.Eventually(t, wait, "the redelivery acked as a duplicate", func() bool { return c.Stats().Duplicates == 1 })
	if got := e.effects(); got[id] != 1 || len(got) != 1 {
		t.Fatalf("effects %v, want exactly one for %s", got, id)
	}
	if s := c.Stats(); s.Sessions < 2 || s.Handled != 1 {
		t.Fatalf("stats %+v: want a reconnect and one handled", s)
	}
}

// A handler that fails the first k times (by error or panic) is applied
// once, on attempt k+1: through the retry queue, or in place when ordered.
func TestHandlerFailsFirstKTimes(t *testing.T) {
	t.Parallel()
	const k = 2
	for _, tc := range []struct {
		name    string
		topo    inbox.Topology
		ordered bool
		batch   int
	}{
		{"quorum retry queue", inbox.Topology{}, false, 1},
		{"classic retry queue", inbox.Topology{Classic: true}, false, 1},
		{"ordered in place", inbox.Topology{}, true, 1},
		{"batched", inbox.Topology{}, false, 8},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t, tc.topo)
			var mu sync.Mutex
			seen := map[string]int{}
			cfg := e.config(func(ctx context.Context, tx *sqlx.Tx, m inbox.Message) error {
				mu.Lock()
				seen[m.ID]++
				n := seen[m.ID]
				mu.Unlock()
				if n != m.Attempt {
					t.Errorf("%s: call %d has Attempt %d", m.ID, n, m.Attempt)
				}
				if n == 1 {
					panic("first attempt panics")
				}
				if n <= k {
					return fmt.Errorf("attempt %d fails", n)
				}
				return record(ctx, tx, m)
			})
			cfg.OrderedByKey, cfg.BatchSize = tc.ordered, tc.batch
			c, stop := e.start(cfg)
			var msgs []amqp.Publishing
			for i, id := range ids("flaky", 10) {
				msgs = append(msgs, msg(id, fmt.Sprint("key", i%3), i))
			}
			e.publish(msgs...)
			e.waitEffects(10)
			var attempts []int
			e.db.Select(&attempts, `SELECT DISTINCT attempt FROM effects`)
			if len(attempts) != 1 || attempts[0] != k+1 {
				t.Errorf("applied on attempts %v, want all on %d", attempts, k+1)
			}
			if s := settled(c, stop); s.Failed != 10*k || s.DeadLettered != 0 {
				t.Errorf("stats %+v, want %d failures and no dead letters", s, 10*k)
			}
		})
	}
}

// A handler that always fails: after MaxAttempts the message is in the
// dead-letter queue with the error text, and was never applied.
func TestAlwaysFailingGoesToDeadLetters(t *testing.T) {
	t.Parallel()
	e := newEnv(t, inbox.Topology{})
	var calls atomic.Int64
	cfg := e.config(func(ctx context.Context, tx *sqlx.Tx, m inbox.Message) error {
		calls.Add(1)
		if err := record(ctx, tx, m); err != nil { // rolled back
			return err
		}
		return errors.New("card declined")
	})
	cfg.MaxAttempts = 3
	c, stop := e.start(cfg)
	e.publish(msg("doomed", "k", 1))
	dl := e.deadLetters(1)[0]
	reason, _ := dl.Headers[inbox.HeaderReason].(string)
	if !strings.Contains(reason, "card declined") || !strings.Contains(reason, "3 times") {
		t.Errorf("reason %q: want the error text and the attempt count", reason)
	}
	if dl.MessageId != "doomed" || string(dl.Body) != `{"n":1}` || dl.Headers["tenant"] != "acme" || dl.Headers[inbox.HeaderQueue] != e.queue {
		t.Errorf("dead letter lost its content: %+v", dl)
	}
	if n := calls.Load(); n != 3 {
		t.Errorf("handler called %d times, want MaxAttempts = 3", n)
	}
	if got := e.effects(); len(got) != 0 {
		t.Errorf("effects %v, want none (every attempt rolled back)", got)
	}
	// Moved back to the work queue, headers and all (as the management
	// UI's "Move messages" does), it gets MaxAttempts attempts again.
	if _, ok := dl.Headers[inbox.HeaderAttempt]; ok {
		t.Errorf("dead letter carries %s = %v", inbox.HeaderAttempt, dl.Headers[inbox.HeaderAttempt])
	}
	e.publish(amqp.Publishing{
		MessageId: dl.MessageId, Type: dl.Type, ContentType: dl.ContentType, DeliveryMode: amqp.Persistent,
		Timestamp: dl.Timestamp, Headers: dl.Headers, Body: dl.Body,
	})
	e.deadLetters(1)
	if n := calls.Load(); n != 6 {
		t.Errorf("handler called %d times, want MaxAttempts = 3 before and 3 after the move", n)
	}
	if s := settled(c, stop); s.DeadLettered != 2 {
		t.Errorf("stats %+v, want 2 dead letters", s)
	}
}

// Poison deliveries (no message_id, or one PostgreSQL cannot store;
// invalid JSON) go to the dead-letter queue with a reason, and the
// consumer keeps going.
func TestPoisonGoesToDeadLettersConsumerLives(t *testing.T) {
	t.Parallel()
	e := newEnv(t, inbox.Topology{})
	var calls atomic.Int64
	e.start(e.config(func(ctx context.Context, tx *sqlx.Tx, m inbox.Message) error {
		calls.Add(1)
		return record(ctx, tx, m)
	}))
	noID := msg("", "", 1)
	badJSON := msg("bad-json", "", 2)
	badJSON.Body = []byte(`{"n":`)
	nulID, notUTF8ID := msg("nul\x00id", "", 5), msg("bad\xffid", "", 6) // PostgreSQL text holds neither
	e.publish(noID, badJSON, nulID, notUTF8ID, msg("good", "", 3))
	dls := e.deadLetters(4)
	reasons := map[string]string{}
	for _, d := range dls {
		reasons[d.MessageId], _ = d.Headers[inbox.HeaderReason].(string)
	}
	if !strings.Contains(reasons[""], "no message_id") || !strings.Contains(reasons["bad-json"], "not valid JSON") ||
		!strings.Contains(reasons["nul\x00id"], "not text PostgreSQL can store") || !strings.Contains(reasons["bad\xffid"], "not text PostgreSQL can store") {
		t.Errorf("reasons %q", reasons)
	}
	e.waitEffects(1)
	e.publish(msg("after", "", 4))
	e.waitEffects(2)
	if calls.Load() != 2 {
		t.Errorf("handler called %d times, want 2 (never for poison)", calls.Load())
	}
}

// Stopping a consumer mid-stream and starting another: every message is
// applied exactly once.
func TestRestartMidStream(t *testing.T) {
	t.Parallel()
	e := newEnv(t, inbox.Topology{})
	var msgs []amqp.Publishing
	for i, id := range ids("restart", 300) {
		msgs = append(msgs, msg(id, "", i))
	}
	e.publish(msgs...)
	c1, stop1 := e.start(e.config(record))
	testenv.Eventually(t, wait, "some messages applied", func() bool { return c1.Stats().Handled >= 50 })
	stop1()
	first := c1.Stats().Handled
	e.start(e.config(record))
	e.waitEffects(300)
	if first >= 300 {
		t.Logf("first consumer finished everything (%d) before the stop", first)
	}
}

// A batch with one failing handler: the others commit together, the failed
// one is retried and applied once.
func TestBatchWithOneFailingHandler(t *testing.T) {
	t.Parallel()
	e := newEnv(t, inbox.Topology{})
	var msgs []amqp.Publishing
	for i, id := range ids("batch", 40) {
		msgs = append(msgs, msg(id, "", i))
	}
	e.publish(msgs...) // queued before the consumer starts, so batches fill
	var failedOnce atomic.Bool
	cfg := e.config(func(ctx context.Context, tx *sqlx.Tx, m inbox.Message) error {
		if err := record(ctx, tx, m); err != nil {
			return err
		}
		if m.ID == "batch-0005" && failedOnce.CompareAndSwap(false, true) {
			return errors.New("fails once, after writing (the savepoint undoes the write)")
		}
		return nil
	})
	cfg.Concurrency, cfg.BatchSize = 1, 10
	c, stop := e.start(cfg)
	e.waitEffects(40)
	var largest int
	e.db.Get(&largest, `SELECT max(n) FROM (SELECT count(*) AS n FROM effects GROUP BY txid) b`)
	if largest < 2 {
		t.Errorf("largest transaction applied %d messages: batching did not happen", largest)
	}
	var attempt int
	e.db.Get(&attempt, `SELECT attempt FROM effects WHERE msg_id = 'batch-0005'`)
	if attempt != 2 || !failedOnce.Load() {
		t.Errorf("batch-0005 applied on attempt %d, want 2", attempt)
	}
	if s := settled(c, stop); s.Handled != 40 || s.Failed != 1 {
		t.Errorf("stats %+v", s)
	}
}

// OrderedByKey: messages of one key are applied in publish order, even when
// one of them fails first; different keys interleave.
func TestOrderedByKey(t *testing.T) {
	t.Parallel()
	for _, batch := range []int{1, 5} {
		t.Run(fmt.Sprint("batch ", batch), func(t *testing.T) {
			t.Parallel()
			e := newEnv(t, inbox.Topology{})
			var msgs []amqp.Publishing
			for i := range 100 {
				msgs = append(msgs, msg(fmt.Sprintf("o-%03d", i), fmt.Sprint("key", i%5), i))
			}
			e.publish(msgs...)
			var failed atomic.Bool
			cfg := e.config(func(ctx context.Context, tx *sqlx.Tx, m inbox.Message) error {
				if m.ID == "o-042" && failed.CompareAndSwap(false, true) {
					return errors.New("once")
				}
				return record(ctx, tx, m)
			})
			cfg.OrderedByKey, cfg.Concurrency, cfg.BatchSize = true, 4, batch
			e.start(cfg)
			e.waitEffects(100)
			checkKeyOrder(t, e)
		})
	}
}

// Run returns nil on cancel after the running handler finished and its
// message was acked.
func TestRunFinishesInFlightWorkOnCancel(t *testing.T) {
	t.Parallel()
	e := newEnv(t, inbox.Topology{})
	entered := make(chan struct{})
	release := make(chan struct{})
	cfg := e.config(func(ctx context.Context, tx *sqlx.Tx, m inbox.Message) error {
		close(entered)
		<-release
		return record(ctx, tx, m)
	})
	c, stop := e.start(cfg)
	e.publish(msg("inflight", "", 1))
	<-entered
	stopped := make(chan struct{})
	go func() { stop(); close(stopped) }()
	close(release)
	<-stopped
	if s := c.Stats(); s.Handled != 1 {
		t.Fatalf("stats %+v: the in-flight message should have been finished", s)
	}
	e.waitEffects(1)
	// It was acked: a new consumer finds nothing to do.
	var calls atomic.Int64
	c2, _ := e.start(e.config(func(context.Context, *sqlx.Tx, inbox.Message) error { calls.Add(1); return nil }))
	e.publish(msg("marker", "", 2))
	testenv.Eventually(t, wait, "marker handled", func() bool { return c2.Stats().Handled == 1 })
	if calls.Load() != 1 || c2.Stats().Duplicates != 0 {
		t.Fatalf("the in-flight message was redelivered: %+v", c2.Stats())
	}
}

// The broker cancels the consumer (queue deleted): the consumer keeps
// trying to consume and resumes once the queue is back.
func TestConsumerCancelledByBroker(t *testing.T) {
	t.Parallel()
	e := newEnv(t, inbox.Topology{})
	c, _ := e.start(e.config(record))
	e.publish(msg("before", "", 1))
	e.waitEffects(1)
	if _, err := e.b.Channel().QueueDelete(e.queue, false, false, false); err != nil {
		t.Fatal(err)
	}
	// A quorum queue's deletion completes (and cancels) asynchronously;
	// re-declaring before that would race with it.
	testenv.Eventually(t, wait, "the cancel noticed", func() bool { return c.Stats().Sessions >= 2 })
	if err := inbox.DeclareTopology(e.b.Channel(), inbox.Topology{Queue: e.queue}); err != nil {
		t.Fatal(err)
	}
	e.publish(msg("after", "", 2))
	e.waitEffects(2)
}

// Run works on a plain queue without retry and dead-letter queues: it
// declares them.
func TestPlainQueueWithoutTopology(t *testing.T) {
	t.Parallel()
	s := testenv.NewSchema(t)
	b := testenv.NewBroker(t)
	q := b.Queue("", "", nil)
	b.CleanupQueues(inbox.RetryQueueName(q), inbox.DeadLetterQueueName(q))
	s.DB.MustExec(`CREATE TABLE effects (seq bigserial PRIMARY KEY, msg_id text NOT NULL, key text NOT NULL DEFAULT '', attempt int NOT NULL, txid bigint NOT NULL DEFAULT txid_current())`)
	e := &env{t: t, db: s.DB, b: b, queue: q}
	var failed atomic.Bool
	c, _ := e.start(e.config(func(ctx context.Context, tx *sqlx.Tx, m inbox.Message) error {
		if failed.CompareAndSwap(false, true) {
			return errors.New("once")
		}
		return record(ctx, tx, m)
	}))
	e.publish(msg("plain", "", 1), msg("", "", 2))
	e.waitEffects(1)
	testenv.Eventually(t, wait, "poison rejected", func() bool { return c.Stats().DeadLettered == 1 })
	e.deadLetters(1) // in the dead-letter queue Run declared, not dropped
}

// A database error before the commit (here: the dedupe table is missing)
// is retried in place after a delay: no requeue, no attempt counted, and
// the message is applied once the database is back.
func TestDatabaseErrorRetriedInPlace(t *testing.T) {
	t.Parallel()
	for _, batch := range []int{1, 4} {
		t.Run(fmt.Sprint("batch ", batch), func(t *testing.T) {
			t.Parallel()
			e := newEnv(t, inbox.Topology{})
			e.db.MustExec(`ALTER TABLE mailroom_inbox RENAME TO mailroom_inbox_away`)
			cfg := e.config(record)
			cfg.BatchSize = batch
			c, _ := e.start(cfg)
			e.publish(msg("db-1", "", 1), msg("db-2", "", 2))
			testenv.Eventually(t, wait, "database errors", func() bool { return c.Stats().DBErrors >= 2 })
			e.db.MustExec(`ALTER TABLE mailroom_inbox_away RENAME TO mailroom_inbox`)
			e.waitEffects(2)
			var attempts []int
			e.db.Select(&attempts, `SELECT attempt FROM effects`)
			if s := c.Stats(); s.Requeued != 0 || s.Failed != 0 || fmt.Sprint(attempts) != "[1 1]" {
				t.Errorf("stats %+v, attempts %v: want no requeue, no failure, attempt 1", s, attempts)
			}
		})
	}
}

// Run purges remembered ids older than Retention every PurgeInterval.
func TestRunPurgesOldIDs(t *testing.T) {
	t.Parallel()
	e := newEnv(t, inbox.Topology{})
	e.db.MustExec(`INSERT INTO mailroom_inbox (scope, id, recorded_at) VALUES ('test', 'old', now() - interval '2 hours'), ('test', 'new', now())`)
	cfg := e.config(record)
	cfg.Retention, cfg.PurgeInterval = time.Hour, 20*time.Millisecond
	e.start(cfg)
	testenv.Eventually(t, wait, "old id purged", func() bool {
		var ids []string
		e.db.Select(&ids, `SELECT id FROM mailroom_inbox ORDER BY id`)
		return fmt.Sprint(ids) == "[new]"
	})
}

// A handler still running ShutdownTimeout after Run's context ended has its
// context cancelled; Run returns and the message is redelivered later.
func TestShutdownTimeoutCancelsHandlers(t *testing.T) {
	t.Parallel()
	e := newEnv(t, inbox.Topology{})
	entered := make(chan struct{}, 1)
	cfg := e.config(func(ctx context.Context, tx *sqlx.Tx, m inbox.Message) error {
		entered <- struct{}{}
		<-ctx.Done() // a handler stuck until cancelled
		return ctx.Err()
	})
	cfg.ShutdownTimeout = 100 * time.Millisecond
	c, stop := e.start(cfg)
	e.publish(msg("slow", "", 1))
	<-entered
	stop() // fails the test unless Run returns nil promptly
	if s := c.Stats(); s.Handled != 0 || s.Retried != 0 || s.DeadLettered != 0 {
		t.Fatalf("stats %+v: a handler cancelled by shutdown is neither handled nor counted as a failure", s)
	}
	e.start(e.config(record))
	e.waitEffects(1)
}

// OrderedByKey: a message left unacked because the consumer stops (here
// while it waits to retry in place) is not overtaken by the later
// messages of its key that are already delivered to the consumer. Eight
// consumers; before the fix about half applied a later message.
func TestOrderedByKeyStopKeepsOrder(t *testing.T) {
	t.Parallel()
	for run := range 8 {
		t.Run(fmt.Sprint("run ", run), func(t *testing.T) {
			t.Parallel()
			e := newEnv(t, inbox.Topology{})
			cfg := e.config(func(ctx context.Context, tx *sqlx.Tx, m inbox.Message) error {
				if strings.HasSuffix(m.ID, "-0000") {
					return errors.New("fails until redelivered elsewhere")
				}
				return record(ctx, tx, m)
			})
			cfg.OrderedByKey, cfg.Concurrency, cfg.Prefetch = true, 1, 10
			cfg.MinBackoff, cfg.MaxBackoff = time.Minute, time.Minute
			var msgs []amqp.Publishing
			for i, id := range ids("stop", 5) {
				msgs = append(msgs, msg(id, "K", i))
			}
			e.publish(msgs...)
			c, stop := e.start(cfg)
			ch := e.b.Channel()
			testenv.Eventually(t, wait, "the first message waiting to retry, the others delivered", func() bool {
				q, err := ch.QueueDeclarePassive(e.queue, true, false, false, false, nil)
				return err == nil && q.Messages == 0 && c.Stats().Failed == 1
			})
			stop()
			if got := e.effects(); len(got) != 0 {
				t.Errorf("applied %v after stop while stop-0000, earlier in key K, was not", got)
			}
		})
	}
}

// heldConsumer publishes 20 messages of one key (prefix-0000…) and runs a
// consumer (Concurrency 1, Prefetch 5) whose first handler waits: it
// returns once that handler waits. stop ends Run's context, lets the
// handler go on, and returns once Run has.
func (e *env) heldConsumer(prefix string, ordered bool) (c *inbox.Consumer, stop func()) {
	e.t.Helper()
	var msgs []amqp.Publishing
	for i, id := range ids(prefix, 20) {
		msgs = append(msgs, msg(id, "K", i))
	}
	e.publish(msgs...)
	entered, proceed := make(chan struct{}), make(chan struct{})
	var once sync.Once
	cfg := e.config(func(ctx context.Context, tx *sqlx.Tx, m inbox.Message) error {
		once.Do(func() { close(entered); <-proceed })
		return record(ctx, tx, m)
	})
	cfg.Concurrency, cfg.Prefetch, cfg.OrderedByKey = 1, 5, ordered
	c, stop = e.run(cfg, func() { close(proceed) })
	<-entered
	return c, stop
}

// Run's stop handles what the broker already delivered instead of handing
// it back: on a quorum queue every return counts in x-delivery-count, so
// each deploy would cost those messages an attempt.
func TestStopFinishesDelivered(t *testing.T) {
	t.Parallel()
	e := newEnv(t, inbox.Topology{}) // a quorum queue
	c, stop := e.heldConsumer("stop", false)
	// Run stops while the first handler runs, once the broker has sent the
	// prefetch (5): the other four arrived with the first.
	ch := e.b.Channel()
	testenv.Eventually(t, wait, "the prefetch sent", func() bool {
		q, err := ch.QueueDeclarePassive(e.queue, true, false, false, false, nil)
		return err == nil && q.Messages == 15
	})
	stop()
	if s := c.Stats(); s.Handled != 5 {
		t.Errorf("handled %d before Run returned, want the 5 delivered", s.Handled)
	}
	var mu sync.Mutex
	attempts := map[string]int{}
	e.start(e.config(func(ctx context.Context, tx *sqlx.Tx, m inbox.Message) error {
		mu.Lock()
		attempts[m.ID] = m.Attempt
		mu.Unlock()
		return record(ctx, tx, m)
	}))
	e.waitEffects(20)
	mu.Lock()
	defer mu.Unlock()
	for id, n := range attempts {
		if n != 1 {
			t.Errorf("%s on attempt %d after a clean stop, want 1", id, n)
		}
	}
}

// Under OrderedByKey with a single active consumer on a quorum queue, a
// stopping consumer passes the queue to the next one without reordering a
// key: the next one starts with the messages the first one held.
func TestSingleActiveHandoverKeepsOrder(t *testing.T) {
	t.Parallel()
	e := newEnv(t, inbox.Topology{SingleActiveConsumer: true})
	_, stop := e.heldConsumer("handover", true)
	// The next consumer registers (not active while this one runs), then
	// this one stops.
	next := e.config(record)
	next.OrderedByKey = true
	e.start(next)
	testenv.Eventually(t, wait, "the next consumer registered", func() bool {
		out, err := exec.Command("rabbitmqctl", "-q", "list_consumers", "queue_name").CombinedOutput()
		if err != nil {
			t.Fatalf("rabbitmqctl list_consumers: %v: %s", err, out)
		}
		n := 0
		for _, q := range strings.Fields(string(out)) {
			if q == e.queue {
				n++
			}
		}
		return n == 2
	})
	stop()
	e.waitEffects(20)
	var order []string
	if err := e.db.Select(&order, `SELECT msg_id FROM effects ORDER BY seq`); err != nil {
		t.Fatal(err)
	}
	if want := ids("handover", 20); fmt.Sprint(order) != fmt.Sprint(want) {
		t.Errorf("applied in the order %v, want %v", order, want)
	}
}

// A retried or dead-lettered message keeps the exchange and routing key it
// was published with: handlers that route on them see the same on every
// attempt, and a dead letter says where it came from.
func TestRetryKeepsExchangeAndRoutingKey(t *testing.T) {
	t.Parallel()
	ex := testenv.Unique("ex")
	e := newEnv(t, inbox.Topology{Exchange: ex, BindingKeys: []string{"order.*"}})
	e.b.CleanupExchanges(ex)
	type seen struct{ exchange, routingKey string }
	var mu sync.Mutex
	var got []seen
	cfg := e.config(func(ctx context.Context, tx *sqlx.Tx, m inbox.Message) error {
		mu.Lock()
		got = append(got, seen{m.Exchange, m.RoutingKey})
		mu.Unlock()
		return errors.New("always")
	})
	cfg.MaxAttempts = 2
	e.start(cfg)
	ch := e.b.Channel()
	if err := ch.Publish(ex, "order.placed", true, false, msg("routed", "", 1)); err != nil {
		t.Fatal(err)
	}
	dl := e.deadLetters(1)[0]
	mu.Lock()
	defer mu.Unlock()
	want := seen{ex, "order.placed"}
	if len(got) != 2 || got[0] != want || got[1] != want {
		t.Errorf("handler saw %+v, want %+v on both attempts", got, want)
	}
	if dl.Headers[inbox.HeaderExchange] != ex || dl.Headers[inbox.HeaderRoutingKey] != "order.placed" {
		t.Errorf("dead letter headers %v: want where it was published", dl.Headers)
	}
}

// refusingMeter is a MeterProvider whose meters refuse callbacks.
type refusingMeter struct{ noop.MeterProvider }

func (refusingMeter) Meter(string, ...metric.MeterOption) metric.Meter { return refusingMeterOf{} }

type refusingMeterOf struct{ noop.Meter }

func (refusingMeterOf) RegisterCallback(metric.Callback, ...metric.Observable) (metric.Registration, error) {
	return nil, errors.New("meter refuses callbacks")
}

// Run returns a setup error at once, not when its context ends.
func TestRunReturnsSetupErrorAtOnce(t *testing.T) {
	t.Parallel()
	e := newEnv(t, inbox.Topology{})
	cfg := e.config(record)
	cfg.MeterProvider = refusingMeter{}
	c, err := inbox.New(e.db, cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	select {
	case err := <-done:
		if err == nil || !strings.Contains(err.Error(), "refuses callbacks") {
			t.Errorf("Run = %v, want the meter's error", err)
		}
	case <-time.After(wait):
		cancel()
		<-done
		t.Fatal("Run kept its setup error until its context ended")
	}
}

// A ConnectionName longer than an AMQP short string still consumes: the
// consumer tag made from it is cut to fit.
func TestLongConnectionNameConsumes(t *testing.T) {
	t.Parallel()
	e := newEnv(t, inbox.Topology{})
	cfg := e.config(record)
	cfg.ConnectionName = strings.Repeat("n", 300)
	e.start(cfg)
	e.publish(msg("long-name", "", 1))
	e.waitEffects(1)
}
