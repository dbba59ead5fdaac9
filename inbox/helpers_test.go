package inbox_test

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/jmoiron/sqlx"
	amqp "github.com/rabbitmq/amqp091-go"
	"go.uber.org/goleak"

	"github.com/mailroom-go/mailroom/inbox"
	"github.com/mailroom-go/mailroom/internal/testenv"
)

// TestMain skips the package when a service is down (fails it with
// CI=true: a runnable example cannot skip itself), and fails it if any
// goroutine (Run's workers, notification drainers, purger, amqp091
// readers) outlives the tests.
func TestMain(m *testing.M) {
	testenv.SkipWithoutServices(true)
	goleak.VerifyTestMain(m,
		// database/sql's opener goroutine ends asynchronously after Close.
		goleak.IgnoreTopFunction("database/sql.(*DB).connectionOpener"),
	)
}

const wait = 60 * time.Second

// env is a test's own schema, broker connection and topology.
type env struct {
	t     testing.TB
	url   string // the schema's database
	db    *sqlx.DB
	b     *testenv.Broker
	queue string
}

func newEnv(t testing.TB, topo inbox.Topology) *env {
	t.Helper()
	s := testenv.NewSchema(t)
	b := testenv.NewBroker(t)
	topo.Queue = testenv.Unique("q")
	b.CleanupQueues(topo.Queue, inbox.RetryQueueName(topo.Queue), inbox.DeadLetterQueueName(topo.Queue))
	b.CleanupExchanges(inbox.DeadLetterExchangeName(topo.Queue))
	if err := inbox.DeclareTopology(b.Channel(), topo); err != nil {
		t.Fatal(err)
	}
	s.DB.MustExec(`CREATE TABLE effects (seq bigserial PRIMARY KEY, msg_id text NOT NULL, key text NOT NULL DEFAULT '', attempt int NOT NULL, txid bigint NOT NULL DEFAULT txid_current())`)
	return &env{t: t, url: s.URL, db: s.DB, b: b, queue: topo.Queue}
}

// record is a handler that writes one effect row per call.
func record(ctx context.Context, tx *sqlx.Tx, m inbox.Message) error {
	_, err := tx.ExecContext(ctx, `INSERT INTO effects (msg_id, key, attempt) VALUES ($1, $2, $3)`, m.ID, m.Key, m.Attempt)
	return err
}

func (e *env) config(h inbox.Handler) inbox.Config {
	return inbox.Config{
		URL: testenv.AMQPURL(), Queue: e.queue, Consumer: "test", Handler: h,
		ConnectionName: testenv.Unique("inbox-test"),
		MinBackoff:     10 * time.Millisecond, MaxBackoff: 50 * time.Millisecond,
		ReconnectMaxWait: 200 * time.Millisecond,
		Logger:           testLogger(e.t),
	}
}

// start runs a consumer until the returned stop is called (or the test
// ends); stop fails the test unless Run returns nil promptly.
func (e *env) start(cfg inbox.Config) (*inbox.Consumer, func()) {
	e.t.Helper()
	return e.run(cfg, func() {})
}

// run is start with afterCancel called by stop between ending Run's
// context and waiting for Run.
func (e *env) run(cfg inbox.Config, afterCancel func()) (*inbox.Consumer, func()) {
	e.t.Helper()
	c, err := inbox.New(e.db, cfg)
	if err != nil {
		e.t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	var once sync.Once
	stop := func() {
		once.Do(func() {
			cancel()
			afterCancel()
			select {
			case err := <-done:
				if err != nil {
					e.t.Errorf("Run returned %v, want nil after cancel", err)
				}
			case <-time.After(wait):
				e.t.Errorf("Run did not return within %s of cancel", wait)
			}
		})
	}
	e.t.Cleanup(stop)
	return c, stop
}

// msg is a message as the relay publishes it.
func msg(id, key string, n int) amqp.Publishing {
	p := amqp.Publishing{
		MessageId: id, Type: "test.event", ContentType: "application/json",
		DeliveryMode: amqp.Persistent, Timestamp: time.Now(),
		Headers: amqp.Table{"tenant": "acme"},
		Body:    []byte(fmt.Sprintf(`{"n":%d}`, n)),
	}
	if key != "" {
		p.Headers[inbox.HeaderKey] = key
	}
	return p
}

// publish sends msgs to the work queue and waits for the broker's confirms.
func (e *env) publish(msgs ...amqp.Publishing) {
	e.t.Helper()
	ch := e.b.Channel()
	if err := ch.Confirm(false); err != nil {
		e.t.Fatal(err)
	}
	var dcs []*amqp.DeferredConfirmation
	for _, m := range msgs {
		dc, err := ch.PublishWithDeferredConfirm("", e.queue, true, false, m)
		if err != nil {
			e.t.Fatal(err)
		}
		dcs = append(dcs, dc)
	}
	for _, dc := range dcs {
		if !dc.Wait() {
			e.t.Fatal("publish nacked")
		}
	}
}

// effects counts effect rows per message id.
func (e *env) effects() map[string]int {
	e.t.Helper()
	var rows []struct {
		ID string `db:"msg_id"`
		N  int    `db:"n"`
	}
	if err := e.db.Select(&rows, `SELECT msg_id, count(*) AS n FROM effects GROUP BY msg_id`); err != nil {
		e.t.Fatal(err)
	}
	out := make(map[string]int, len(rows))
	for _, r := range rows {
		out[r.ID] = r.N
	}
	return out
}

// waitEffects waits until n distinct messages have an effect, then checks
// that none has more than one.
func (e *env) waitEffects(n int) map[string]int {
	e.t.Helper()
	var got map[string]int
	testenv.Eventually(e.t, wait, fmt.Sprintf("%d messages applied", n), func() bool {
		got = e.effects()
		return len(got) >= n
	})
	for id, k := range got {
		if k != 1 {
			e.t.Errorf("message %s applied %d times", id, k)
		}
	}
	if len(got) != n {
		e.t.Errorf("%d messages applied, want %d", len(got), n)
	}
	return got
}

// deadLetters waits for n messages in the dead-letter queue and returns them.
func (e *env) deadLetters(n int) []amqp.Delivery {
	e.t.Helper()
	ch := e.b.Channel()
	var out []amqp.Delivery
	testenv.Eventually(e.t, wait, fmt.Sprintf("%d dead letters", n), func() bool {
		d, ok, err := ch.Get(inbox.DeadLetterQueueName(e.queue), true)
		if err != nil {
			e.t.Fatal(err)
		}
		if ok {
			out = append(out, d)
		}
		return len(out) >= n
	})
	return out
}

func ids(prefix string, n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = fmt.Sprintf("%s-%04d", prefix, i)
	}
	return out
}

// settled stops the consumer and returns its final counters: they are
// bumped just after the commit, ack or confirm a test waits on, so exact
// figures are read only once Run has returned.
func settled(c *inbox.Consumer, stop func()) inbox.Stats {
	stop()
	return c.Stats()
}
