package relay_test

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/mailroom-go/mailroom"
	"github.com/mailroom-go/mailroom/internal/locks"
	"github.com/mailroom-go/mailroom/internal/testenv"
	"github.com/mailroom-go/mailroom/outbox"
	"github.com/mailroom-go/mailroom/relay"
)

func batch(ex string, n int) ([]outbox.Message, map[string]bool) {
	msgs := make([]outbox.Message, n)
	ids := map[string]bool{}
	for i := range msgs {
		id := outbox.NewID()
		msgs[i] = outbox.Message{ID: id, Exchange: ex, RoutingKey: "k", Payload: []byte(fmt.Sprintf(`{"n":%d}`, i))}
		ids[id] = true
	}
	return msgs, ids
}

// consumeAll collects deliveries from queue until every id in want was seen
// (duplicates allowed: at-least-once) or the deadline passes.
func (e *env) consumeAll(queue string, want map[string]bool, timeout time.Duration) (dups int) {
	e.t.Helper()
	ch := e.b.Channel()
	defer ch.Close() // cancel the consumer
	ds, err := ch.Consume(queue, "", true, false, false, false, nil)
	if err != nil {
		e.t.Fatal(err)
	}
	seen := map[string]bool{}
	deadline := time.After(timeout)
	for len(seen) < len(want) {
		select {
		case d := <-ds:
			if !want[d.MessageId] {
				e.t.Fatalf("unexpected message %s", d.MessageId)
			}
			if seen[d.MessageId] {
				dups++
			}
			seen[d.MessageId] = true
		case <-deadline:
			e.t.Fatalf("received %d of %d distinct messages within %s: lost messages", len(seen), len(want), timeout)
		}
	}
	return dups
}

func TestAMQPConnectionClosedMidBatchLosesNothing(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	msgs, ids := batch(e.ex, 3000)
	e.add(msgs...)
	cfg := e.config()
	cfg.BatchSize = 100
	cfg.ConfirmWindow = 200
	e.start(cfg)
	// Close the relay's connection (only ours, by its name) while it works.
	closed := 0
	testenv.Eventually(t, 20*time.Second, "relay connection to close", func() bool {
		closed += testenv.CloseConnection(t, "mailroom-relay "+e.appTag)
		return closed > 0
	})
	dups := e.consumeAll(e.queue, ids, 60*time.Second)
	e.waitDrained()
	t.Logf("closed %d connection(s); %d duplicate deliveries (at-least-once)", closed, dups)
}

func TestDatabaseSessionsKilledMidRun(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	cfg := e.config()
	cfg.BatchSize = 50
	e.start(cfg)
	want := map[string]bool{}
	killed := 0
	for round := 0; round < 5; round++ {
		msgs, ids := batch(e.ex, 200)
		for id := range ids {
			want[id] = true
		}
		e.add(msgs...)
		killed += testenv.TerminateBackends(t, e.appTag)
	}
	e.consumeAll(e.queue, want, 60*time.Second)
	e.waitDrained()
	if killed == 0 {
		t.Fatal("no relay database session was terminated: the test proved nothing")
	}
	t.Logf("terminated %d relay database sessions", killed)
}

func TestNackIsRetried(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	// A queue that holds one message and nacks further publishes.
	q := e.b.Queue("", "", amqp.Table{"x-max-length": 1, "x-overflow": "reject-publish"})
	ex := e.b.Exchange()
	if err := e.b.Channel().QueueBind(q, "#", ex, false, nil); err != nil {
		t.Fatal(err)
	}
	cfg := e.config()
	cfg.MaxAttempts = 1000
	e.start(cfg)
	msgs, ids := batch(ex, 5)
	e.add(msgs...)
	testenv.Eventually(t, 20*time.Second, "a nacked attempt recorded", func() bool {
		var n int
		e.s.DB.Get(&n, `SELECT count(*) FROM mailroom_outbox WHERE last_error LIKE '%nacked%'`)
		return n > 0
	})
	e.consumeAll(q, ids, 60*time.Second)
	e.waitDrained()
}

// Returns and acks arrive on different Go channels: interleave routable and
// unroutable messages and check that exactly the routable ones are deleted
// as delivered and exactly the unroutable ones are dead-lettered.
func TestReturnsAndAcksCorrelate(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	lonely := e.b.Exchange() // no queue bound
	var msgs []outbox.Message
	routable, unroutable := map[string]bool{}, map[string]bool{}
	for i := 0; i < 400; i++ {
		id := outbox.NewID()
		ex := e.ex
		if i%3 == 0 {
			ex = lonely
			unroutable[id] = true
		} else {
			routable[id] = true
		}
		msgs = append(msgs, outbox.Message{ID: id, Exchange: ex, RoutingKey: "k", Payload: []byte(`{}`)})
	}
	e.add(msgs...)
	cfg := e.config()
	cfg.MaxAttempts = 1
	e.start(cfg)
	e.consumeAll(e.queue, routable, 30*time.Second)
	e.waitDrained()
	var dead []string
	if err := e.s.DB.Select(&dead, `SELECT id::text FROM mailroom_outbox_dead WHERE last_error LIKE '%unroutable%'`); err != nil {
		t.Fatal(err)
	}
	if len(dead) != len(unroutable) {
		t.Fatalf("%d dead letters, want %d", len(dead), len(unroutable))
	}
	for _, id := range dead {
		if !unroutable[id] {
			t.Fatalf("routable message %s was dead-lettered as unroutable", id)
		}
	}
}

// Bigserial ids become visible out of commit order. A relay that read with
// an "id > last seen" cursor would skip the earlier id forever.
func TestOutOfCommitOrderRowIsPublished(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.start(e.config())
	ctx := context.Background()
	early, err := e.s.DB.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer early.Rollback()
	idA, idB := outbox.NewID(), outbox.NewID()
	if err := e.ob.Add(ctx, early, outbox.Message{ID: idA, Exchange: e.ex, RoutingKey: "a", Payload: []byte(`{}`)}); err != nil {
		t.Fatal(err)
	}
	e.add(outbox.Message{ID: idB, Exchange: e.ex, RoutingKey: "b", Payload: []byte(`{}`)}) // higher seq, commits first
	if d := e.receive(e.queue, 1, 30*time.Second)[0]; d.MessageId != idB {
		t.Fatalf("first delivery %s, want %s", d.MessageId, idB)
	}
	if err := early.Commit(); err != nil {
		t.Fatal(err)
	}
	if d := e.receive(e.queue, 1, 30*time.Second)[0]; d.MessageId != idA {
		t.Fatalf("second delivery %s, want %s", d.MessageId, idA)
	}
	e.waitDrained()
}

func TestNotifyWakesRelay(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	cfg := e.config()
	cfg.PollInterval = time.Hour // only a NOTIFY can wake it in time
	e.start(cfg)
	e.waitAsleep(1)
	for i := 0; i < 3; i++ {
		e.add(outbox.Message{Exchange: e.ex, RoutingKey: "k", Payload: []byte(`{}`)})
		e.receive(e.queue, 1, 30*time.Second)
	}
}

// A custom, schema-qualified outbox gets its own wake-up and lock: its
// relay is woken as well (and Add goes through the prepared statement).
func TestNotifyWakesRelayOfCustomTable(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	table := e.s.Name + ".events"
	if err := mailroom.Migrate(context.Background(), e.s.DB.DB, mailroom.Tables{Outbox: table}); err != nil {
		t.Fatal(err)
	}
	ob, err := outbox.New(outbox.Config{Table: table, DB: e.s.DB.DB})
	if err != nil {
		t.Fatal(err)
	}
	cfg := e.config()
	cfg.Tables = mailroom.Tables{Outbox: table}
	cfg.PollInterval = time.Hour
	e.start(cfg)
	testenv.Eventually(t, 30*time.Second, "the relay asleep holding the events table's wake lock", func() bool {
		var n int
		e.s.DB.Get(&n, `SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = $1
  AND objid = to_regclass($2)::oid AND objsubid = 2 AND mode = 'ExclusiveLock' AND granted`, locks.Wake, table)
		return n == 1
	})
	for i := 0; i < 3; i++ {
		id := outbox.NewID()
		if err := ob.Add(context.Background(), e.s.DB.DB, outbox.Message{ID: id, Exchange: e.ex, RoutingKey: "k", Payload: []byte(`{}`)}); err != nil {
			t.Fatal(err)
		}
		if d := e.receive(e.queue, 1, 30*time.Second)[0]; d.MessageId != id {
			t.Fatalf("delivery %s, want %s", d.MessageId, id)
		}
	}
}

// wakeLockHolders lists the sessions holding this table's wake lock
// exclusively: sleeping relays.
func (e *env) wakeLockHolders() []int {
	var pids []int
	if err := e.s.DB.Select(&pids, `SELECT pid FROM pg_locks
WHERE locktype = 'advisory' AND classid = $1 AND objid = to_regclass('mailroom_outbox')::oid
  AND objsubid = 2 AND mode = 'ExclusiveLock' AND granted`, locks.Wake); err != nil {
		e.t.Fatal(err)
	}
	return pids
}

// waitAsleep waits until n relays sleep holding the wake lock (one at most:
// it is exclusive) and returns the holder's pid.
func (e *env) waitAsleep(n int) (pid int) {
	e.t.Helper()
	testenv.Eventually(e.t, 30*time.Second, fmt.Sprintf("%d relay(s) asleep holding the wake lock", n), func() bool {
		pids := e.wakeLockHolders()
		if len(pids) == n && n > 0 {
			pid = pids[0]
		}
		return len(pids) == n
	})
	return pid
}

// A writer's transaction that stays open after Add holds the wake lock
// shared and keeps the relay from taking it. The relay must then keep
// looking by itself: other writers' commits are published promptly, not
// at the next poll.
func TestOpenWriterDoesNotStallWakeUps(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ctx := context.Background()
	long, err := e.s.DB.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer long.Rollback()
	longID := outbox.NewID()
	if err := e.ob.Add(ctx, long, outbox.Message{ID: longID, Exchange: e.ex, RoutingKey: "k", Payload: []byte(`{}`)}); err != nil {
		t.Fatal(err)
	}
	cfg := e.config()
	cfg.PollInterval = time.Hour // only a NOTIFY, or the relay's own looking, can publish in time
	e.start(cfg)
	for i := 0; i < 3; i++ {
		id := outbox.NewID()
		e.add(outbox.Message{ID: id, Exchange: e.ex, RoutingKey: "k", Payload: []byte(`{}`)})
		if d := e.receive(e.queue, 1, 30*time.Second)[0]; d.MessageId != id {
			t.Fatalf("delivery %s, want %s", d.MessageId, id)
		}
		if pids := e.wakeLockHolders(); len(pids) != 0 {
			t.Fatalf("a relay holds the wake lock (sessions %v) while a writer's transaction holds it shared", pids)
		}
	}
	if err := long.Commit(); err != nil {
		t.Fatal(err)
	}
	if d := e.receive(e.queue, 1, 30*time.Second)[0]; d.MessageId != longID {
		t.Fatalf("delivery %s, want the long transaction's %s", d.MessageId, longID)
	}
	e.waitAsleep(1)
}

// Two idle relays: one sleeps holding the wake lock, the other sleeps
// without it; both are woken by the same NOTIFY.
func TestTwoSleepingRelaysWakeUp(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	for _, name := range []string{"-a", "-b"} {
		cfg := e.config()
		cfg.Name += name
		cfg.PollInterval = time.Hour
		cfg.ActiveRelays = 2 // both publish, neither stands by
		e.start(cfg)
	}
	for i := 0; i < 3; i++ {
		e.waitAsleep(1)
		e.add(outbox.Message{Exchange: e.ex, RoutingKey: "k", Payload: []byte(`{}`)})
		e.receive(e.queue, 1, 30*time.Second)
	}
}

// When the wake lock's session dies (here: terminated), the lock goes with
// it and writers stop notifying; the relay notices at its next poll, takes
// the lock again on a new session, and NOTIFYs wake it as before.
func TestWakeLockSessionLost(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	cfg := e.config()
	cfg.PollInterval = 200 * time.Millisecond
	e.start(cfg)
	pid := e.waitAsleep(1)
	if _, err := e.s.DB.Exec(`SELECT pg_terminate_backend($1)`, pid); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, 30*time.Second, "the wake lock taken again by a new session", func() bool {
		pids := e.wakeLockHolders()
		return len(pids) == 1 && pids[0] != pid
	})
	e.add(outbox.Message{Exchange: e.ex, RoutingKey: "k", Payload: []byte(`{}`)})
	e.receive(e.queue, 1, 30*time.Second)
}

func TestPollOnlyMode(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	cfg := e.config()
	cfg.DisableListen = true
	cfg.DatabaseURL = ""
	cfg.PollInterval = 20 * time.Millisecond
	e.start(cfg)
	msgs, ids := batch(e.ex, 50)
	e.add(msgs...)
	e.consumeAll(e.queue, ids, 20*time.Second)
	e.waitDrained()
	if pids := e.wakeLockHolders(); len(pids) != 0 {
		t.Fatalf("a relay without LISTEN holds the wake lock (sessions %v): writers would NOTIFY for nothing", pids)
	}
}

// A clean stop releases the rows the relay leased. (A relay publishing
// alone leases none; one polling without LISTEN, and so without the
// coordination, always does.)
func TestCleanStopLeavesNoLease(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	msgs, _ := batch(e.ex, 3000)
	e.add(msgs...)
	cfg := e.config()
	cfg.BatchSize = 100
	cfg.DisableListen = true
	stop := e.start(cfg)
	testenv.Eventually(t, 20*time.Second, "some progress", func() bool { return e.pending() < 3000 })
	stop()
	var leased int
	if err := e.s.DB.Get(&leased, `SELECT count(*) FROM mailroom_outbox WHERE lease IS NOT NULL`); err != nil {
		t.Fatal(err)
	}
	if leased != 0 {
		t.Fatalf("%d rows still leased after a clean stop; they should have been released", leased)
	}
	var queued int
	qi, err := e.b.Channel().QueueDeclarePassive(e.queue, true, false, false, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	queued = qi.Messages
	if queued+e.pending() < 3000 {
		t.Fatalf("queued %d + pending %d < 3000: lost messages", queued, e.pending())
	}
}

// startSidecar runs `mailroom-relay run` on the test's schema and broker
// with flags, until the test ends; its stderr is logged if the test fails.
func (e *env) startSidecar(name string, flags ...string) *exec.Cmd {
	e.t.Helper()
	bin := testenv.BuildBinary(e.t, "github.com/mailroom-go/mailroom/cmd/mailroom-relay")
	cmd := exec.Command(bin, append([]string{"run", "--name", name, "--http", "127.0.0.1:0"}, flags...)...)
	cmd.Env = append(os.Environ(), "DATABASE_URL="+e.s.URL, "AMQP_URL="+e.b.URL)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		if e.t.Failed() {
			e.t.Logf("%s stderr:\n%s", name, stderr.String())
		}
	})
	return cmd
}

// TestRelayProcessKilled runs the sidecar binary, SIGKILLs it mid-batch and
// lets a second process finish: nothing is lost. The first published
// alone, so it claimed without leases and left none to wait for.
func TestRelayProcessKilled(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	msgs, ids := batch(e.ex, 5000)
	e.add(msgs...)
	start := func(name string) *exec.Cmd {
		return e.startSidecar(name, "--batch-size", "100", "--lease", "2s", "--confirm-timeout", "1s", "--poll-interval", "50ms")
	}
	first := start(e.appTag + "-a")
	testenv.Eventually(t, 30*time.Second, "first relay mid-run", func() bool { return e.pending() < 4500 })
	if err := first.Process.Kill(); err != nil { // SIGKILL: no cleanup at all
		t.Fatal(err)
	}
	first.Wait()
	var leased int
	if err := e.s.DB.Get(&leased, `SELECT count(*) FROM mailroom_outbox WHERE lease IS NOT NULL`); err != nil || leased != 0 {
		t.Errorf("%d rows leased by the relay that published alone (%v), want none", leased, err)
	}
	start(e.appTag + "-b")
	dups := e.consumeAll(e.queue, ids, 90*time.Second)
	e.waitDrained()
	t.Logf("%d duplicate deliveries", dups)
}

// startAsleepThenAdd starts a relay (batches of 100), waits until it sleeps
// holding the wake lock, and adds a backlog of n messages.
func startAsleepThenAdd(t *testing.T, n int) *env {
	e := newEnv(t)
	cfg := e.config()
	cfg.BatchSize = 100
	e.start(cfg)
	e.waitAsleep(1)
	msgs, _ := batch(e.ex, n)
	e.add(msgs...)
	return e
}

// The relay sleeps holding the wake lock while it waits (so writers NOTIFY
// it), releases it while it keeps finding work (so writers do not pay for
// NOTIFYs), and takes it again when the work is done.
func TestWakeLockFollowsLoad(t *testing.T) {
	t.Parallel()
	e := startAsleepThenAdd(t, 6000)
	testenv.Eventually(t, 30*time.Second, "wake lock released under load", func() bool { return len(e.wakeLockHolders()) == 0 })
	e.waitDrained()
	e.waitAsleep(1)
}

// A relay woken for good by a backlog goes back to sleep (holding the wake
// lock, so writers notify it again) once the backlog is gone, although a
// trickle of messages goes on.
func TestAwakeRelaySleepsAtATrickle(t *testing.T) {
	t.Parallel()
	// A backlog wakes the relay for good (it releases the wake lock), and
	// one message every 4 ms follows it.
	e := startAsleepThenAdd(t, 3000)
	stop := make(chan struct{})
	trickled := make(chan struct{})
	go func() {
		defer close(trickled)
		tick := time.NewTicker(4 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
				one, _ := batch(e.ex, 1)
				if err := e.ob.Add(context.Background(), e.s.DB, one...); err != nil {
					t.Error(err)
					return
				}
			}
		}
	}()
	defer func() { close(stop); <-trickled }()
	testenv.Eventually(t, 30*time.Second, "wake lock released under load", func() bool { return len(e.wakeLockHolders()) == 0 })
	testenv.Eventually(t, 30*time.Second, "the backlog drained", func() bool { return e.pending() < 20 })
	testenv.Eventually(t, 30*time.Second, "the relay asleep again during the trickle", func() bool { return len(e.wakeLockHolders()) == 1 })
}

// Two rows with one message id in flight at once, one routable and one not
// (Add does not make ids unique): the unroutable one is never taken for
// delivered. The routable copy may count as returned too (a needless
// retry), but the unroutable one is always dead-lettered, never deleted.
func TestReturnOfADuplicateIdLosesNothing(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	lonely := e.b.Exchange() // no queue bound
	var msgs []outbox.Message
	for i := 0; i < 50; i++ {
		id := outbox.NewID()
		msgs = append(msgs,
			outbox.Message{ID: id, Exchange: e.ex, RoutingKey: "k", Payload: []byte(`{}`)},
			outbox.Message{ID: id, Exchange: lonely, RoutingKey: "k", Payload: []byte(`{}`)})
	}
	e.add(msgs...)
	cfg := e.config()
	cfg.MaxAttempts = 1
	e.start(cfg)
	e.waitDrained()
	var unroutableDead int
	if err := e.s.DB.Get(&unroutableDead, `SELECT count(*) FROM mailroom_outbox_dead WHERE exchange = $1`, lonely); err != nil {
		t.Fatal(err)
	}
	if unroutableDead != 50 {
		t.Fatalf("%d of the 50 unroutable rows dead-lettered, want all: the others were deleted as delivered", unroutableDead)
	}
}

// A row the broker cannot take as it is, written by plain SQL (Add refuses
// both): a routing key over 255 bytes, and headers larger than a frame.
// Each fails as an attempt and is dead-lettered; the rows beside them are
// published.
func TestUnpublishableRowsAreDeadLettered(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	big := `{"h":"` + strings.Repeat("x", 200<<10) + `"}`
	e.s.DB.MustExec(`INSERT INTO mailroom_outbox (id, exchange, routing_key, payload) VALUES (gen_random_uuid(), $1, $2, '{}')`, e.ex, strings.Repeat("k", 300))
	e.s.DB.MustExec(`INSERT INTO mailroom_outbox (id, exchange, routing_key, headers, payload) VALUES (gen_random_uuid(), $1, 'k', $2, '{}')`, e.ex, big)
	var fine []outbox.Message
	want := map[string]bool{}
	for i := 0; i < 5; i++ {
		id := outbox.NewID()
		want[id] = true
		fine = append(fine, outbox.Message{ID: id, Exchange: e.ex, RoutingKey: "fine", Payload: []byte(`{}`)})
	}
	e.add(fine...)
	cfg := e.config()
	cfg.MaxAttempts, cfg.BatchSize = 2, 3
	stop := e.start(cfg)
	e.consumeAll(e.queue, want, 30*time.Second)
	e.waitDrained()
	var errs []string
	if err := e.s.DB.Select(&errs, `SELECT last_error FROM mailroom_outbox_dead ORDER BY seq`); err != nil {
		t.Fatal(err)
	}
	if len(errs) != 2 || !strings.Contains(errs[0], "RoutingKey: 300 bytes is over the 255-byte limit") || !strings.Contains(errs[1], "frame") {
		t.Fatalf("dead letters %q, want the two rows, failed for their routing key and their headers", errs)
	}
	letters, err := relay.ListDead(context.Background(), e.s.DB.DB, mailroom.Tables{}, 0)
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range letters {
		if !errors.Is(d.Err(), relay.ErrUnpublishable) {
			t.Errorf("DeadLetter.Err() = %v, want ErrUnpublishable", d.Err())
		}
	}
	stop() // the counters are bumped just after the commit waitDrained saw
	if s := e.relays[0].Stats(); s.Failed != 4 || s.Released != 0 {
		t.Errorf("stats %+v, want 4 failed attempts and nothing released", s)
	}
}

// Publishing to an exchange the broker refuses (here an internal one:
// 403 ACCESS_REFUSED, which closes the channel) fails as an attempt once
// the refusal is known, instead of releasing the row and its batch-mates
// at every claim; the rows beside it are published.
func TestRefusedExchangeIsDeadLettered(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	internal := testenv.Unique("internal")
	e.b.CleanupExchanges(internal)
	if err := e.b.Channel().ExchangeDeclare(internal, "topic", false, true, true, false, nil); err != nil {
		t.Fatal(err)
	}
	id := outbox.NewID()
	msgs := []outbox.Message{{ID: id, Exchange: internal, RoutingKey: "k", Payload: []byte(`{}`)}}
	want := map[string]bool{}
	for i := 0; i < 5; i++ {
		fine := outbox.NewID()
		want[fine] = true
		msgs = append(msgs, outbox.Message{ID: fine, Exchange: e.ex, RoutingKey: "fine", Payload: []byte(`{}`)})
	}
	e.add(msgs...)
	cfg := e.config()
	cfg.MaxAttempts = 2
	stop := e.start(cfg)
	e.consumeAll(e.queue, want, 30*time.Second)
	e.waitDrained()
	var lastError string
	if err := e.s.DB.Get(&lastError, `SELECT last_error FROM mailroom_outbox_dead WHERE id = $1`, id); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(lastError, "refuses publishing to exchange") || !strings.Contains(lastError, internal) {
		t.Fatalf("dead letter's error %q, want the broker's refusal of %s", lastError, internal)
	}
	stop() // the counters are bumped just after the commit waitDrained saw
	if s := e.relays[0].Stats(); s.Failed != 2 || s.DeadLettered != 1 {
		t.Errorf("stats %+v, want 2 failed attempts and 1 dead letter", s)
	}
}

// A relay whose LISTEN session cannot connect (here a closed port; in
// production a connection limit or a wrong DatabaseURL) publishes by
// polling, and still stops when asked: Run used to wait forever for the
// listener's first connection.
func TestUnreachableListenSessionStillStops(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	cfg := e.config()
	cfg.DatabaseURL = "postgres://root@127.0.0.1:1/test?sslmode=disable&connect_timeout=1"
	db, err := sql.Open("postgres", testenv.WithAppName(e.s.URL, e.appTag))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	r, err := relay.New(db, cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	e.add(outbox.Message{Exchange: e.ex, RoutingKey: "k", Payload: []byte(`{}`)})
	e.receive(e.queue, 1, 30*time.Second)
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Run = %v, want nil", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("Run did not return within 30s of cancel: the listener's wait for a connection held it")
	}
}

// When every session of a sleeping relay drops (a database restart), the
// wake lock goes with them; the relay takes it again as soon as its
// listener is back, not at its next poll, so writers notify it again.
func TestWakeLockRetakenAfterAllSessionsDrop(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	cfg := e.config()
	cfg.PollInterval = time.Hour
	e.start(cfg)
	pid := e.waitAsleep(1)
	if n := testenv.TerminateBackends(t, e.appTag); n == 0 {
		t.Fatal("terminated no session of the relay")
	}
	testenv.Eventually(t, 20*time.Second, "the wake lock taken again by a new session", func() bool {
		pids := e.wakeLockHolders()
		return len(pids) == 1 && pids[0] != pid
	})
	e.add(outbox.Message{Exchange: e.ex, RoutingKey: "k", Payload: []byte(`{}`)})
	e.receive(e.queue, 1, 30*time.Second)
}

// logTap collects a relay's log lines, and passes them on to the test log.
type logTap struct {
	mu    sync.Mutex
	lines strings.Builder
	t     *testing.T
}

func (l *logTap) Write(p []byte) (int, error) {
	l.mu.Lock()
	l.lines.Write(p)
	l.mu.Unlock()
	return testWriter{l.t}.Write(p)
}

func (l *logTap) count(s string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Count(l.lines.String(), s)
}

// A session left over from a relay holds the wake lock (one still ending
// after it was terminated, or discarded): the relay, finding the lock
// taken, tries again within a second rather than at its next poll, so it
// takes the lock once that session is gone, and writers notify it.
func TestWakeLockHeldByALeftoverSession(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ctx := context.Background()
	ghost, err := e.s.DB.Conn(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer ghost.Close()
	if _, err := ghost.ExecContext(ctx, `SELECT pg_advisory_lock($1, 'mailroom_outbox'::regclass::oid::integer)`, locks.Wake); err != nil {
		t.Fatal(err)
	}
	tap := &logTap{t: t}
	cfg := e.config()
	cfg.PollInterval = time.Hour // only a NOTIFY, or the relay's own looking, can publish in time
	cfg.Logger = slog.New(slog.NewTextHandler(tap, &slog.HandlerOptions{Level: slog.LevelDebug}))
	e.start(cfg)
	const elsewhere = "another session holds the wake lock"
	testenv.Eventually(t, 30*time.Second, "the relay to find the wake lock held", func() bool { return tap.count(elsewhere) > 0 })
	if _, err := ghost.ExecContext(ctx, `SELECT pg_advisory_unlock($1, 'mailroom_outbox'::regclass::oid::integer)`, locks.Wake); err != nil {
		t.Fatal(err)
	}
	e.waitAsleep(1) // the relay took the lock: writers notify it
	id := outbox.NewID()
	e.add(outbox.Message{ID: id, Exchange: e.ex, RoutingKey: "k", Payload: []byte(`{}`)})
	if d := e.receive(e.queue, 1, 30*time.Second)[0]; d.MessageId != id {
		t.Fatalf("delivery %s, want %s", d.MessageId, id)
	}
}
