package inbox_test

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"testing"

	"github.com/jmoiron/sqlx"
	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/mailroom-go/mailroom/inbox"
	"github.com/mailroom-go/mailroom/internal/testenv"
)

// Under OrderedByKey a commit of unknown outcome is tried again in place,
// and once a message had MaxAttempts of them the session hands every
// delivery back in order: the later messages of its key never overtake
// it. Database errors before earlier commits (a flapping database) do not
// count against its in-place attempts. Before the fix the worker requeued
// the message alone and went on with the later ones it held.
func TestOrderedUnknownCommitKeepsOrder(t *testing.T) {
	t.Parallel()
	const maxAttempts = 3
	for _, tc := range []struct {
		name     string
		unknown  int  // commits of the first message that end their session
		flapping bool // database errors before its first commit
	}{
		{"flapping database", 1, true},
		{"unknown past MaxAttempts", maxAttempts + 1, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t, inbox.Topology{})
			first := testenv.Unique("ord") + "-0000"
			e.db.MustExec(fmt.Sprintf(`CREATE SEQUENCE commits;
CREATE FUNCTION end_session() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.msg_id = '%s' AND nextval('commits') <= %d THEN PERFORM pg_terminate_backend(pg_backend_pid()); END IF;
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER end_session AFTER INSERT ON effects DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION end_session()`, first, tc.unknown))
			if tc.flapping {
				e.db.MustExec(`ALTER TABLE mailroom_inbox RENAME TO mailroom_inbox_away`)
			}
			var msgs []amqp.Publishing
			prefix := first[:len(first)-len("-0000")]
			for i, id := range ids(prefix, 10) {
				msgs = append(msgs, msg(id, "K", i))
			}
			e.publish(msgs...)
			cfg := e.config(record)
			cfg.OrderedByKey, cfg.Concurrency, cfg.Prefetch, cfg.MaxAttempts = true, 1, 10, maxAttempts
			c, stop := e.start(cfg)
			if tc.flapping {
				testenv.Eventually(t, wait, "database errors past MaxAttempts", func() bool { return c.Stats().DBErrors >= maxAttempts })
				e.db.MustExec(`ALTER TABLE mailroom_inbox_away RENAME TO mailroom_inbox`)
			}
			e.waitEffects(10)
			checkKeyOrder(t, e)
			s := settled(c, stop)
			if s.Requeued != 0 {
				t.Errorf("stats %+v: a delivery was requeued alone under OrderedByKey", s)
			}
			if tc.unknown > maxAttempts && s.Sessions < 2 {
				t.Errorf("stats %+v: want the deliveries handed back (a new session) after %d unknown outcomes", s, maxAttempts)
			}
		})
	}
}

// Under OrderedByKey a dead letter whose publish fails is tried again in
// place, holding the later messages of its key: before the fix it was
// requeued and they overtook it (and here it was applied after them on
// its redelivery).
func TestOrderedDeadLetterPublishFailsKeepsOrder(t *testing.T) {
	t.Parallel()
	e := newEnv(t, inbox.Topology{})
	logger, logs := captureLog(t)
	entered, deleted := make(chan struct{}), make(chan struct{})
	var calls atomic.Int64
	cfg := e.config(func(ctx context.Context, tx *sqlx.Tx, m inbox.Message) error {
		if m.ID == "dl-0000" && calls.Add(1) == 1 {
			close(entered)
			<-deleted
			return errors.New("fails once: the dead-letter queue is gone by now")
		}
		return record(ctx, tx, m)
	})
	cfg.OrderedByKey, cfg.Concurrency, cfg.Prefetch, cfg.MaxAttempts, cfg.Logger = true, 1, 10, 1, logger
	var msgs []amqp.Publishing
	for i, id := range ids("dl", 5) {
		msgs = append(msgs, msg(id, "K", i))
	}
	e.publish(msgs...)
	e.start(cfg)
	<-entered
	if _, err := e.b.Channel().QueueDelete(inbox.DeadLetterQueueName(e.queue), false, false, false); err != nil {
		t.Fatal(err)
	}
	close(deleted)
	testenv.Eventually(t, wait, "a dead letter refused", func() bool { return logs.has("send to dead-letter queue") })
	if err := inbox.DeclareTopology(e.b.Channel(), inbox.Topology{Queue: e.queue}); err != nil {
		t.Fatal(err)
	}
	if dl := e.deadLetters(1)[0]; dl.MessageId != "dl-0000" {
		t.Errorf("dead letter %s, want dl-0000", dl.MessageId)
	}
	got := e.waitEffects(4)
	if got["dl-0000"] != 0 {
		t.Errorf("dl-0000 applied after the later messages of its key")
	}
	checkKeyOrder(t, e)
}
