package inbox_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/jmoiron/sqlx"
	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/mailroom-go/mailroom/inbox"
	"github.com/mailroom-go/mailroom/internal/testenv"
)

// plainEnv is an env on a plain durable queue (no retry or dead-letter
// queue, no dead-letter exchange), as a user's own topology may be. The
// retry and dead-letter queues a consumer declares are removed when the
// test ends.
func plainEnv(t *testing.T) *env {
	t.Helper()
	s := testenv.NewSchema(t)
	b := testenv.NewBroker(t)
	q := b.Queue("", "", nil)
	b.CleanupQueues(inbox.RetryQueueName(q), inbox.DeadLetterQueueName(q))
	s.DB.MustExec(`CREATE TABLE effects (seq bigserial PRIMARY KEY, msg_id text NOT NULL, key text NOT NULL DEFAULT '', attempt int NOT NULL, txid bigint NOT NULL DEFAULT txid_current())`)
	return &env{t: t, url: s.URL, db: s.DB, b: b, queue: q}
}

// queued is the number of messages ready in queue, or -1 when it does not
// exist.
func (e *env) queued(queue string) int {
	ch, err := e.b.Conn.Channel()
	if err != nil {
		e.t.Fatal(err)
	}
	defer ch.Close()
	q, err := ch.QueueDeclarePassive(queue, true, false, false, false, nil)
	if err != nil {
		return -1
	}
	return q.Messages
}

// On a plain queue with the default config a failed message goes to the
// retry queue (which the consumer declares) and never holds its worker:
// with a backoff of an hour, the messages behind it on the same (single)
// worker are all handled. Before the fix the worker held the failed
// delivery for the whole backoff.
func TestFailedMessageDoesNotBlockWorkerOnPlainQueue(t *testing.T) {
	t.Parallel()
	e := plainEnv(t)
	cfg := e.config(func(ctx context.Context, tx *sqlx.Tx, m inbox.Message) error {
		if m.ID == "fails" {
			return errors.New("fails")
		}
		return record(ctx, tx, m)
	})
	cfg.Concurrency, cfg.MinBackoff, cfg.MaxBackoff = 1, time.Hour, time.Hour
	msgs := []amqp.Publishing{msg("fails", "", 0)}
	for i, id := range ids("behind", 20) {
		msgs = append(msgs, msg(id, "", i))
	}
	e.publish(msgs...)
	c, stop := e.start(cfg)
	e.waitEffects(20)
	testenv.Eventually(t, wait, "the failed message in the retry queue", func() bool { return e.queued(inbox.RetryQueueName(e.queue)) == 1 })
	if s := settled(c, stop); s.Failed != 1 || s.Retried != 1 || s.Handled != 20 {
		t.Errorf("stats %+v, want 1 failed and retried, 20 handled", s)
	}
}

// With NoDeclare, a missing retry or dead-letter queue is an error at
// start that names it, and nothing is declared.
func TestNoDeclareMissingQueueFailsAtStart(t *testing.T) {
	t.Parallel()
	for _, missing := range []string{"retry", "dead"} {
		t.Run(missing, func(t *testing.T) {
			t.Parallel()
			e := plainEnv(t)
			cfg := e.config(record)
			cfg.NoDeclare = true
			name := inbox.RetryQueueName(e.queue)
			if missing == "dead" {
				if _, err := e.b.Channel().QueueDeclare(name, true, false, false, false, nil); err != nil {
					t.Fatal(err)
				}
				name = inbox.DeadLetterQueueName(e.queue)
			}
			c, err := inbox.New(e.db, cfg)
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), wait)
			defer cancel()
			err = c.Run(ctx)
			if ctx.Err() != nil {
				t.Fatalf("Run returned only when its context ended: %v", err)
			}
			if !errors.Is(err, inbox.ErrQueueNotFound) || !errContains(err, fmt.Sprintf("%q", name), "DeclareTopology") {
				t.Fatalf("Run = %v, want ErrQueueNotFound naming %q and what to do", err, name)
			}
			if n := e.queued(name); n != -1 {
				t.Errorf("%s declared although NoDeclare is set", name)
			}
		})
	}
}

func errContains(err error, subs ...string) bool {
	if err == nil {
		return false
	}
	for _, s := range subs {
		if !strings.Contains(err.Error(), s) {
			return false
		}
	}
	return true
}

// A check of the dead-letter queue that fails with anything but NOT_FOUND
// (here RESOURCE_LOCKED: another connection holds an exclusive queue of
// that name) is retried, not taken as "missing" for the session: the
// poison message waits and then reaches the dead-letter queue with its
// reason. Before the fix it was rejected without requeue, and dropped.
func TestQueueCheckErrorIsRetried(t *testing.T) {
	t.Parallel()
	e := plainEnv(t)
	holder, err := testenv.Dial(testenv.AMQPURL(), testenv.Unique("holder"))
	if err != nil {
		t.Fatal(err)
	}
	defer holder.Close()
	hch, err := holder.Channel()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := hch.QueueDeclare(inbox.DeadLetterQueueName(e.queue), false, false, true, false, nil); err != nil {
		t.Fatal(err)
	}
	e.publish(msg("", "", 1)) // no message_id: poison
	c, _ := e.start(e.config(record))
	testenv.Eventually(t, wait, "the consumer checked its queues", func() bool {
		s := c.Stats()
		return s.Sessions >= 2 || s.DeadLettered >= 1
	})
	holder.Close() // the exclusive queue goes with it
	dead := inbox.DeadLetterQueueName(e.queue)
	testenv.Eventually(t, wait, "the poison message in the dead-letter queue", func() bool { return e.queued(dead) == 1 })
	dl := e.deadLetters(1)[0]
	if reason, _ := dl.Headers[inbox.HeaderReason].(string); !strings.Contains(reason, "no message_id") {
		t.Errorf("dead letter reason %q", reason)
	}
}
