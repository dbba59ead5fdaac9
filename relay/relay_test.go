package relay_test

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
	"go.uber.org/goleak"

	"github.com/mailroom-go/mailroom"
	"github.com/mailroom-go/mailroom/internal/testenv"
	"github.com/mailroom-go/mailroom/outbox"
	"github.com/mailroom-go/mailroom/relay"
)

// TestMain skips the package when a service is down (fails it with
// CI=true: a runnable example cannot skip itself), and fails it if a
// goroutine outlives the tests.
func TestMain(m *testing.M) {
	testenv.SkipWithoutServices(true)
	goleak.VerifyTestMain(m,
		// lib/pq's Listener and database/sql keep helper goroutines that
		// end asynchronously after Close.
		goleak.IgnoreTopFunction("database/sql.(*DB).connectionOpener"),
	)
}

// env is one test's schema, broker names and relay settings.
type env struct {
	t      *testing.T
	s      *testenv.Schema
	b      *testenv.Broker
	ob     *outbox.Outbox
	ex     string
	queue  string
	appTag string
	relays []*relay.Relay
}

func newEnv(t *testing.T) *env {
	t.Helper()
	s := testenv.NewSchema(t)
	b := testenv.NewBroker(t)
	ex := b.Exchange()
	q := b.Queue(ex, "#", nil)
	ob, err := outbox.New(outbox.Config{})
	if err != nil {
		t.Fatal(err)
	}
	return &env{t: t, s: s, b: b, ob: ob, ex: ex, queue: q, appTag: testenv.Unique("relay")}
}

func (e *env) config() relay.Config {
	return relay.Config{
		URL:          e.b.URL,
		DatabaseURL:  testenv.WithAppName(e.s.URL, e.appTag),
		Name:         e.appTag,
		PollInterval: 50 * time.Millisecond,
		MinBackoff:   10 * time.Millisecond,
		MaxBackoff:   50 * time.Millisecond,
		Logger:       testLogger(e.t),
	}
}

// start runs a relay until the test ends (or stop is called) and checks
// that Run returns nil.
func (e *env) start(cfg relay.Config) (stop func()) {
	e.t.Helper()
	// The relay's own sessions carry application_name, so fault tests can
	// terminate exactly them.
	dbURL := cfg.DatabaseURL
	if dbURL == "" { // poll-only relays have no listen URL
		dbURL = testenv.WithAppName(e.s.URL, e.appTag)
	}
	db, err := sql.Open("postgres", dbURL)
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { db.Close() })
	r, err := relay.New(db, cfg)
	if err != nil {
		e.t.Fatal(err)
	}
	e.relays = append(e.relays, r)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			select {
			case err := <-done:
				if err != nil {
					e.t.Errorf("Run returned %v, want nil", err)
				}
			case <-time.After(30 * time.Second):
				e.t.Errorf("Run did not return within 30s of cancel")
			}
		})
	}
	e.t.Cleanup(stop)
	return stop
}

func (e *env) add(msgs ...outbox.Message) {
	e.t.Helper()
	if err := e.ob.Add(context.Background(), e.s.DB, msgs...); err != nil {
		e.t.Fatal(err)
	}
}

// receive consumes n messages from queue, or fails at the deadline.
func (e *env) receive(queue string, n int, timeout time.Duration) []amqp.Delivery {
	e.t.Helper()
	// Manual acks, and the channel closed on return: deliveries pushed to
	// this consumer beyond n are requeued for the next receive.
	ch := e.b.Channel()
	defer ch.Close()
	ds, err := ch.Consume(queue, "", false, false, false, false, nil)
	if err != nil {
		e.t.Fatal(err)
	}
	var got []amqp.Delivery
	deadline := time.After(timeout)
	for len(got) < n {
		select {
		case d := <-ds:
			if err := d.Ack(false); err != nil {
				e.t.Fatal(err)
			}
			got = append(got, d)
		case <-deadline:
			e.t.Fatalf("received %d of %d messages within %s", len(got), n, timeout)
		}
	}
	return got
}

func (e *env) pending() int {
	e.t.Helper()
	var n int
	if err := e.s.DB.Get(&n, `SELECT count(*) FROM mailroom_outbox`); err != nil {
		e.t.Fatal(err)
	}
	return n
}

func (e *env) waitDrained() {
	e.t.Helper()
	testenv.Eventually(e.t, 30*time.Second, "outbox drained", func() bool { return e.pending() == 0 })
}

func TestPublishesWithProperties(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.start(e.config())
	id := outbox.NewID()
	e.add(outbox.Message{
		ID: id, Exchange: e.ex, RoutingKey: "order.placed", Key: "order-1", Type: "order.placed",
		Headers: map[string]string{"tenant": "acme"}, Payload: []byte(`{"order":1}`),
	})
	d := e.receive(e.queue, 1, 30*time.Second)[0]
	if d.MessageId != id || d.Type != "order.placed" || d.ContentType != "application/json" ||
		d.DeliveryMode != amqp.Persistent || d.RoutingKey != "order.placed" || d.Exchange != e.ex ||
		string(d.Body) != `{"order":1}` {
		t.Fatalf("delivery = %+v", d)
	}
	if d.Headers["tenant"] != "acme" || d.Headers["x-mailroom-key"] != "order-1" {
		t.Fatalf("headers = %v", d.Headers)
	}
	if time.Since(d.Timestamp) > time.Minute || d.Timestamp.IsZero() {
		t.Fatalf("timestamp %v is not the creation time", d.Timestamp)
	}
	e.waitDrained()
}

func TestDrainsBacklogAcrossBatches(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	const n = 2500
	msgs := make([]outbox.Message, n)
	for i := range msgs {
		msgs[i] = outbox.Message{Exchange: e.ex, RoutingKey: "k", Payload: []byte(fmt.Sprintf(`{"n":%d}`, i))}
	}
	e.add(msgs...)
	cfg := e.config()
	cfg.BatchSize = 200
	cfg.ConfirmWindow = 300
	e.start(cfg)
	got := e.receive(e.queue, n, 60*time.Second)
	seen := map[string]bool{}
	for _, d := range got {
		seen[d.MessageId] = true
	}
	if len(seen) != n {
		t.Fatalf("%d distinct messages, want %d", len(seen), n)
	}
	e.waitDrained()
}

func TestDelayedMessageNotPublishedEarly(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.start(e.config())
	at := time.Now().Add(1500 * time.Millisecond)
	e.add(outbox.Message{Exchange: e.ex, RoutingKey: "later", Payload: []byte(`1`), AvailableAt: at},
		outbox.Message{Exchange: e.ex, RoutingKey: "now", Payload: []byte(`2`)})
	got := e.receive(e.queue, 2, 15*time.Second)
	if got[0].RoutingKey != "now" || got[1].RoutingKey != "later" {
		t.Fatalf("order %s, %s", got[0].RoutingKey, got[1].RoutingKey)
	}
	// The delivery of the delayed message happened after its time; allow
	// clock granularity between this process and the database.
	if time.Now().Before(at.Add(-50 * time.Millisecond)) {
		t.Fatalf("delayed message delivered before its AvailableAt")
	}
}

func TestUnroutableIsRetriedThenDeadLettered(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	cfg := e.config()
	cfg.MaxAttempts = 3
	e.start(cfg)
	id := outbox.NewID()
	// Bound: pattern "#" matches everything on e.ex, so use an exchange
	// with no bindings.
	lonely := e.b.Exchange()
	e.add(outbox.Message{ID: id, Exchange: lonely, RoutingKey: "nobody", Payload: []byte(`{}`)},
		outbox.Message{Exchange: e.ex, RoutingKey: "fine", Payload: []byte(`{}`)})
	// The poison row does not block the other.
	if d := e.receive(e.queue, 1, 30*time.Second)[0]; d.RoutingKey != "fine" {
		t.Fatalf("got %s", d.RoutingKey)
	}
	var dead struct {
		Attempts  int    `db:"attempts"`
		LastError string `db:"last_error"`
	}
	testenv.Eventually(t, 20*time.Second, "dead letter", func() bool {
		return e.s.DB.Get(&dead, `SELECT attempts, last_error FROM mailroom_outbox_dead WHERE id = $1`, id) == nil
	})
	if dead.Attempts != 3 || !strings.Contains(dead.LastError, "unroutable") || !strings.Contains(dead.LastError, lonely) {
		t.Fatalf("dead letter = %+v", dead)
	}
	// The failure's kind is reachable from the public dead-letter API.
	a, err := relay.NewAdmin(e.s.DB.DB, mailroom.Tables{})
	if err != nil {
		t.Fatal(err)
	}
	letters, err := a.ListDead(context.Background(), 0)
	if err != nil || len(letters) != 1 {
		t.Fatalf("ListDead: %v, %v; want the one dead letter", letters, err)
	}
	if err := letters[0].Err(); !errors.Is(err, relay.ErrUnroutable) || errors.Is(err, relay.ErrNacked) || err.Error() != letters[0].LastError {
		t.Fatalf("DeadLetter.Err() = %v, want ErrUnroutable reading as LastError", err)
	}
	e.waitDrained()
}

func TestMissingExchangeKeepsRowAndOthersFlow(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.start(e.config())
	missing := testenv.Unique("nope")
	e.add(outbox.Message{Exchange: missing, RoutingKey: "x", Payload: []byte(`{}`)})
	for i := 0; i < 20; i++ {
		e.add(outbox.Message{Exchange: e.ex, RoutingKey: "fine", Payload: []byte(`{}`)})
	}
	e.receive(e.queue, 20, 15*time.Second)
	var lastError string
	testenv.Eventually(t, 30*time.Second, "failed attempt recorded", func() bool {
		return e.s.DB.Get(&lastError, `SELECT last_error FROM mailroom_outbox WHERE exchange = $1 AND attempts > 0`, missing) == nil
	})
	if !strings.Contains(lastError, "exchange does not exist") || !strings.Contains(lastError, missing) {
		t.Fatalf("last_error = %q", lastError)
	}
	// Create the exchange and a queue: the row goes out.
	q := e.b.Queue("", "", nil)
	ch := e.b.Channel()
	if err := ch.ExchangeDeclare(missing, "topic", true, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ch.ExchangeDelete(missing, false, false) })
	if err := ch.QueueBind(q, "#", missing, false, nil); err != nil {
		t.Fatal(err)
	}
	e.receive(q, 1, 20*time.Second)
	e.waitDrained()
}

func TestPerKeyOrderWithSeveralRelays(t *testing.T) {
	t.Parallel()
	for _, relays := range []int{2, 4} {
		t.Run(fmt.Sprintf("relays=%d", relays), func(t *testing.T) {
			t.Parallel()
			e := newEnv(t)
			for i := 0; i < relays; i++ {
				cfg := e.config()
				cfg.Name = fmt.Sprintf("%s-%d", e.appTag, i)
				cfg.BatchSize = 50
				cfg.ConfirmWindow = 100
				cfg.ActiveRelays = relays // all publish at once
				e.start(cfg)
			}
			// Interleaved writers: each key is written by one writer in
			// consecutive transactions, keys interleave across writers.
			const writers, keysPerWriter, perKey = 4, 5, 40
			var wg sync.WaitGroup
			for w := 0; w < writers; w++ {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for i := 0; i < perKey; i++ {
						for k := 0; k < keysPerWriter; k++ {
							key := fmt.Sprintf("w%d-k%d", w, k)
							body, _ := json.Marshal(map[string]any{"key": key, "n": i})
							if err := e.ob.Add(context.Background(), e.s.DB, outbox.Message{Exchange: e.ex, RoutingKey: "o", Key: key, Payload: body}); err != nil {
								t.Error(err)
								return
							}
						}
					}
				}()
			}
			wg.Wait()
			got := e.receive(e.queue, writers*keysPerWriter*perKey, 90*time.Second)
			next := map[string]int{}
			for _, d := range got {
				var m struct {
					Key string
					N   int
				}
				if err := json.Unmarshal(d.Body, &m); err != nil {
					t.Fatal(err)
				}
				if m.N != next[m.Key] {
					t.Fatalf("key %s: got n=%d, want %d (out of order or duplicated)", m.Key, m.N, next[m.Key])
				}
				next[m.Key]++
			}
			e.waitDrained()
		})
	}
}

// Relays publishing on one table share the default confirm window (each
// counts the others by their publishing locks); a relay with ConfirmWindow set keeps it
// but counts as one of them. When relays stop, the others take their share
// back, and the tokens they held for it are returned: a backlog larger than
// any window still drains.
func TestRelaysShareTheDefaultWindow(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	start := func(i, window int) (*relay.Relay, func()) {
		cfg := e.config()
		cfg.Name = fmt.Sprintf("%s-%d", e.appTag, i)
		cfg.BatchSize = 100
		cfg.ConfirmWindow = window
		cfg.ActiveRelays = 3
		stop := e.start(cfg)
		return e.relays[len(e.relays)-1], stop
	}
	windows := func(want ...int) {
		t.Helper()
		testenv.Eventually(t, 30*time.Second, fmt.Sprintf("confirm windows %v", want), func() bool {
			for i, r := range e.relays[:len(want)] {
				if r.Stats().ConfirmWindow != want[i] {
					return false
				}
			}
			return true
		})
	}
	a, _ := start(0, 0)
	_, stopB := start(1, 0)
	windows(512, 512)
	if st, err := relay.Status(context.Background(), e.s.DB.DB, mailroom.Tables{}); err != nil || st.Relays != 2 || st.Publishing != 2 {
		t.Errorf("Status: %+v, %v; want 2 relays running, both publishing", st, err)
	}
	// Sessions killed: each relay takes its locks again.
	if testenv.TerminateBackends(t, e.appTag) == 0 {
		t.Fatal("no relay session terminated")
	}
	testenv.Eventually(t, 30*time.Second, "two relays running and publishing again", func() bool {
		st, err := relay.Status(context.Background(), e.s.DB.DB, mailroom.Tables{})
		return err == nil && st.Relays == 2 && st.Publishing == 2
	})
	windows(512, 512)
	_, stopC := start(2, 300)
	windows(341, 341, 300)
	stopC()
	stopB()
	windows(1024)
	msgs, want := batch(e.ex, 3000)
	e.add(msgs...)
	if dups := e.consumeAll(e.queue, want, 60*time.Second); dups != 0 {
		t.Errorf("%d duplicates", dups)
	}
	// The consumer can have every message before the relay has deleted
	// the last confirmed rows, which is when it counts them.
	testenv.Eventually(t, 30*time.Second, "relay a to count 3000 published", func() bool { return a.Stats().Published == 3000 })
}

// testLogger sends the relay's logs to the test log (shown on failure or -v).
func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

// A row whose seq is already in the dead-letter table (one shared by two
// outboxes, or seqs reused) is not dropped when it is buried, nor does it
// stop the relay: it stays in the outbox, scheduled again after MaxBackoff,
// and the other rows flow.
func TestBuryOntoATakenSeqKeepsTheRow(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	lonely := e.b.Exchange() // no queue bound: unroutable
	id := outbox.NewID()
	e.add(outbox.Message{ID: id, Exchange: lonely, RoutingKey: "k", Payload: []byte(`{}`)})
	e.s.DB.MustExec(`INSERT INTO mailroom_outbox_dead (seq, id, exchange, routing_key, payload, created_at, attempts, last_error)
SELECT seq, gen_random_uuid(), 'older', 'k', '{}', now(), 1, 'an older dead letter' FROM mailroom_outbox`)
	cfg := e.config()
	cfg.MaxAttempts, cfg.MaxBackoff = 1, time.Hour
	e.start(cfg)
	var lastError string
	testenv.Eventually(t, 20*time.Second, "the row scheduled again", func() bool {
		return e.s.DB.Get(&lastError, `SELECT last_error FROM mailroom_outbox WHERE id = $1 AND available_at > now() + interval '30 minutes'`, id) == nil
	})
	if !strings.Contains(lastError, "is there already") {
		t.Errorf("last_error %q, want it to say the seq is taken", lastError)
	}
	fine := outbox.NewID()
	e.add(outbox.Message{ID: fine, Exchange: e.ex, RoutingKey: "fine", Payload: []byte(`{}`)})
	if d := e.receive(e.queue, 1, 30*time.Second)[0]; d.MessageId != fine {
		t.Fatalf("got %s, want the next row", d.MessageId)
	}
	var dead int
	if err := e.s.DB.Get(&dead, `SELECT count(*) FROM mailroom_outbox_dead`); err != nil || dead != 1 {
		t.Errorf("%d dead letters (%v), want only the older one", dead, err)
	}
	if s := e.relays[0].Stats(); s.DeadLettered != 0 {
		t.Errorf("stats %+v, want no dead letter counted", s)
	}
}
