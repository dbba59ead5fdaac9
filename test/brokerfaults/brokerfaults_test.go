//go:build brokerfaults

package brokerfaults

import (
	"context"
	"fmt"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jmoiron/sqlx"
	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/mailroom-go/mailroom/inbox"
	"github.com/mailroom-go/mailroom/internal/testenv"
	"github.com/mailroom-go/mailroom/internal/testenv/cluster"
	"github.com/mailroom-go/mailroom/outbox"
	"github.com/mailroom-go/mailroom/relay"
)

// These tests never run in parallel: each faults the whole broker, a
// private node of their own (see TestMain).

// TestMain runs the package on a private RabbitMQ node: stopping,
// restarting and alarming it, and changing its settings, touch no other
// user of the machine's broker.
func TestMain(m *testing.M) {
	testenv.SkipWithoutServices(true)
	_, stop := cluster.Private(1)
	code := m.Run()
	stop()
	os.Exit(code)
}

func rabbitmqctl(t *testing.T, args ...string) {
	t.Helper()
	out, err := testenv.Ctl(args...)
	if err != nil {
		t.Fatalf("rabbitmqctl %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

// ensureBrokerUp is every test's cleanup: the app started and no alarm, so
// the next test (and CI) finds the broker as it was.
func ensureBrokerUp(t *testing.T) {
	testenv.Ctl("start_app")
	testenv.Ctl("set_vm_memory_high_watermark", "0.4")
	testenv.Ctl("await_startup")
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		if c, err := testenv.Dial(testenv.AMQPURL(), "brokerfaults-check"); err == nil {
			c.Close()
			return
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Errorf("broker did not come back within 60s after the fault test")
}

// raiseMemoryAlarm blocks publishing connections until the test ends or
// clears it. Its cleanup clears it before the flow's relay stops (cleanups
// run last-registered first), so the relay's close is answered rather than
// cut off at its bound (amqpx.CloseTimeout).
func raiseMemoryAlarm(t *testing.T) {
	t.Cleanup(func() { testenv.Ctl("set_vm_memory_high_watermark", "0.4") })
	rabbitmqctl(t, "set_vm_memory_high_watermark", "0.000001")
	// The memory monitor raises the alarm on its own time: publishes sent
	// before it would go through.
	testenv.Eventually(t, 30*time.Second, "the memory alarm in effect", func() bool {
		out, _ := testenv.Ctl("-q", "eval", "rabbit_alarm:get_alarms().")
		return strings.Contains(string(out), "resource_limit,memory")
	})
}

// waitBlocked waits until the broker blocks a connection (under the alarm,
// once it publishes).
func waitBlocked(t *testing.T) {
	t.Helper()
	testenv.Eventually(t, 30*time.Second, "a connection blocked by the alarm", func() bool {
		out, _ := testenv.Ctl("list_connections", "state", "-q")
		return strings.Contains(string(out), "blocked")
	})
}

// inboxQueue declares a work queue with its retry and dead-letter queues,
// removed when the test ends.
func inboxQueue(t *testing.T, b *testenv.Broker) string {
	t.Helper()
	queue := testenv.Unique("q")
	if err := inbox.DeclareTopology(b.Channel(), inbox.Topology{Queue: queue}); err != nil {
		t.Fatal(err)
	}
	b.CleanupQueues(queue, inbox.RetryQueueName(queue), inbox.DeadLetterQueueName(queue))
	b.CleanupExchanges(inbox.DeadLetterExchangeName(queue))
	return queue
}

// runConsumer runs c until the returned stop, which returns Run's error.
func runConsumer(c *inbox.Consumer) (stop func() error) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	return func() error { cancel(); return <-done }
}

type flow struct {
	t     *testing.T
	s     *testenv.Schema
	ex, q string
	ids   map[string]bool
	r     *relay.Relay
	stop  func()
}

// newFlow writes n events to a fresh outbox and starts one relay on it.
func newFlow(t *testing.T, n int) *flow {
	t.Helper()
	t.Cleanup(func() { ensureBrokerUp(t) }) // registered first: runs last
	s := testenv.NewSchema(t)
	b := testenv.NewBroker(t)
	f := &flow{t: t, s: s, ex: b.Exchange(), ids: map[string]bool{}}
	f.q = b.Queue(f.ex, "#", nil)
	f.add(n)
	r, err := relay.New(s.DB.DB, relay.Config{
		URL: testenv.AMQPURL(), DatabaseURL: s.URL, Name: testenv.Unique("faults"),
		BatchSize: 100, ConfirmWindow: 200, ConfirmTimeout: 2 * time.Second, Lease: 5 * time.Second,
		PollInterval: 50 * time.Millisecond, MinBackoff: 10 * time.Millisecond, MaxBackoff: 100 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	var once sync.Once
	f.r = r
	f.stop = func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				t.Errorf("Run: %v", err)
			}
		})
	}
	t.Cleanup(f.stop)
	return f
}

// add writes n events to the outbox in one transaction.
func (f *flow) add(n int) {
	f.t.Helper()
	if n == 0 {
		return
	}
	ob, _ := outbox.New(outbox.Config{})
	msgs := make([]outbox.Message, n)
	for i := range msgs {
		id := outbox.NewID()
		f.ids[id] = true
		msgs[i] = outbox.Message{ID: id, Exchange: f.ex, RoutingKey: "k", Payload: []byte(fmt.Sprintf(`{"n":%d}`, i))}
	}
	if err := ob.Add(context.Background(), f.s.DB, msgs...); err != nil {
		f.t.Fatal(err)
	}
}

func (f *flow) pending() int {
	var n int
	f.s.DB.Get(&n, `SELECT count(*) FROM mailroom_outbox`)
	return n
}

// checkAllQueued drains the outbox, then reads the queue on a fresh
// connection: every event must be there at least once.
func (f *flow) checkAllQueued() {
	f.t.Helper()
	testenv.Eventually(f.t, 90*time.Second, "outbox drained", func() bool { return f.pending() == 0 })
	conn, err := testenv.Dial(testenv.AMQPURL(), "brokerfaults-reader")
	if err != nil {
		f.t.Fatal(err)
	}
	defer conn.Close()
	ch, _ := conn.Channel()
	ds, err := ch.Consume(f.q, "", true, false, false, false, nil)
	if err != nil {
		f.t.Fatal(err)
	}
	seen := map[string]bool{}
	deadline := time.After(60 * time.Second)
	for len(seen) < len(f.ids) {
		select {
		case d := <-ds:
			seen[d.MessageId] = true
		case <-deadline:
			f.t.Fatalf("queue holds %d of %d events: lost", len(seen), len(f.ids))
		}
	}
}

func TestRelaySurvivesCloseAllConnections(t *testing.T) {
	f := newFlow(t, 5000)
	testenv.Eventually(t, 30*time.Second, "relay mid-run", func() bool { return f.pending() < 4800 })
	rabbitmqctl(t, "close_all_connections", "brokerfaults test")
	f.checkAllQueued()
}

func TestRelaySurvivesBrokerRestart(t *testing.T) {
	f := newFlow(t, 5000)
	testenv.Eventually(t, 30*time.Second, "relay mid-run", func() bool { return f.pending() < 4800 })
	rabbitmqctl(t, "stop_app")
	rabbitmqctl(t, "start_app")
	rabbitmqctl(t, "await_startup")
	f.checkAllQueued()
}

// Under a memory alarm the broker blocks publishing connections; a publish
// then would block forever. The relay pauses, and resumes when the alarm
// clears, losing nothing.
func TestRelayPausesUnderMemoryAlarm(t *testing.T) {
	f := newFlow(t, 0)
	raiseMemoryAlarm(t)
	f.add(200)
	waitBlocked(t)
	rabbitmqctl(t, "set_vm_memory_high_watermark", "0.4")
	f.checkAllQueued()
}

// Rows held under a memory alarm until their lease nears its end (Lease
// minus ConfirmTimeout: 3 s here) are handed back rather than published
// late, when another relay could have claimed them; once the alarm
// clears, every event is published.
func TestRelayHandsBackRowsHeldPastTheirLease(t *testing.T) {
	f := newFlow(t, 0)
	raiseMemoryAlarm(t)
	f.add(200)
	testenv.Eventually(t, 30*time.Second, "held rows handed back", func() bool { return f.r.Stats().Released > 0 })
	rabbitmqctl(t, "set_vm_memory_high_watermark", "0.4")
	f.checkAllQueued()
}

// The inbox consumer reconnects after close_all_connections and a broker
// restart, and applies every message exactly once.
func TestConsumerSurvivesBrokerFaults(t *testing.T) {
	t.Cleanup(func() { ensureBrokerUp(t) })
	s := testenv.NewSchema(t)
	b := testenv.NewBroker(t)
	queue := inboxQueue(t, b)
	if _, err := s.DB.Exec(`CREATE TABLE effects (id text PRIMARY KEY)`); err != nil {
		t.Fatal(err)
	}
	c, err := inbox.New(s.DB, inbox.Config{
		URL: testenv.AMQPURL(), Queue: queue, Consumer: "faults",
		Handler: func(ctx context.Context, tx *sqlx.Tx, m inbox.Message) error {
			_, err := tx.ExecContext(ctx, `INSERT INTO effects (id) VALUES ($1)`, m.ID)
			return err // a second effect would fail the primary key: dedupe must stop it first
		},
		ReconnectMaxWait: time.Second,
	})
	if err != nil {
		t.Fatal(err)
	}
	defer runConsumer(c)() // the effects below say whether it worked

	publish := func(n int) {
		conn, err := testenv.Dial(testenv.AMQPURL(), "brokerfaults-publisher")
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		pch, _ := conn.Channel()
		pch.Confirm(false)
		for i := 0; i < n; i++ {
			dc, err := pch.PublishWithDeferredConfirmWithContext(context.Background(), "", queue, true, false,
				amqp.Publishing{MessageId: outbox.NewID(), DeliveryMode: amqp.Persistent, ContentType: "application/json", Body: []byte(`{}`)})
			if err != nil {
				t.Fatal(err)
			}
			if ok, err := dc.WaitContext(context.Background()); err != nil || !ok {
				t.Fatalf("publish not confirmed: %v", err)
			}
		}
	}
	effects := func() int {
		var n int
		s.DB.Get(&n, `SELECT count(*) FROM effects`)
		return n
	}
	publish(300)
	testenv.Eventually(t, 30*time.Second, "first effects", func() bool { return effects() > 0 })
	rabbitmqctl(t, "close_all_connections", "brokerfaults test")
	publish(300)
	rabbitmqctl(t, "stop_app")
	rabbitmqctl(t, "start_app")
	rabbitmqctl(t, "await_startup")
	publish(300)
	testenv.Eventually(t, 90*time.Second, "900 effects", func() bool { return effects() >= 900 })
	var claims int
	s.DB.Get(&claims, `SELECT count(*) FROM mailroom_inbox WHERE scope = 'faults'`)
	if n := effects(); n != 900 || claims != 900 {
		t.Fatalf("effects %d, inbox claims %d; want exactly 900 each", n, claims)
	}
}

// stopsWithin calls stop and fails the test unless it returns within d.
// (When it does not, the alarm's cleanup clears the alarm, and stop then
// returns.)
func stopsWithin(t *testing.T, d time.Duration, what string, stop func()) {
	t.Helper()
	done := make(chan struct{})
	go func() { defer close(done); stop() }()
	select {
	case <-done:
	case <-time.After(d):
		t.Errorf("%s did not stop within %s under a memory alarm: closing a blocked connection waited for the broker", what, d)
	}
}

// A relay stops under a memory alarm: the broker does not read a blocked
// connection, so the close is bounded; the rows it held stay in the
// outbox.
func TestRelayStopsUnderMemoryAlarm(t *testing.T) {
	f := newFlow(t, 0)
	raiseMemoryAlarm(t)
	f.add(200)
	waitBlocked(t)
	stopsWithin(t, 30*time.Second, "the relay", f.stop)
	if n := f.pending(); n != 200 {
		t.Errorf("%d of 200 rows in the outbox after the stop, want all (none could be confirmed)", n)
	}
}

// An inbox consumer stops under a memory alarm after it published a retry
// (which blocks its connection); the message is redelivered afterwards.
func TestConsumerStopsUnderMemoryAlarm(t *testing.T) {
	t.Cleanup(func() { ensureBrokerUp(t) })
	s := testenv.NewSchema(t)
	b := testenv.NewBroker(t)
	queue := inboxQueue(t, b)
	if err := b.Channel().Publish("", queue, true, false, amqp.Publishing{MessageId: outbox.NewID(), DeliveryMode: amqp.Persistent, Body: []byte(`{}`)}); err != nil {
		t.Fatal(err)
	}
	raiseMemoryAlarm(t)
	var calls atomic.Int64
	c, err := inbox.New(s.DB, inbox.Config{
		URL: testenv.AMQPURL(), Queue: queue, Consumer: "alarm", ConnectionName: testenv.Unique("alarm"),
		Handler: func(context.Context, *sqlx.Tx, inbox.Message) error {
			calls.Add(1)
			return fmt.Errorf("fails: the retry's publish blocks the connection")
		},
		ShutdownTimeout: time.Second,
	})
	if err != nil {
		t.Fatal(err)
	}
	stop := runConsumer(c)
	testenv.Eventually(t, 30*time.Second, "the handler called", func() bool { return calls.Load() > 0 })
	waitBlocked(t)
	stopsWithin(t, 30*time.Second, "the consumer", func() {
		if err := stop(); err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	rabbitmqctl(t, "set_vm_memory_high_watermark", "0.4")
	ch := b.Channel()
	testenv.Eventually(t, 30*time.Second, "the message back in the work or the retry queue", func() bool {
		n := 0
		for _, q := range []string{queue, inbox.RetryQueueName(queue)} {
			if qi, err := ch.QueueDeclarePassive(q, true, false, false, false, nil); err == nil {
				n += qi.Messages
			}
		}
		return n >= 1
	})
}
