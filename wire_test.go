package mailroom_test

import (
	"context"
	"encoding/json"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jmoiron/sqlx"
	"github.com/lib/pq"
	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/mailroom-go/mailroom/inbox"
	"github.com/mailroom-go/mailroom/internal/testenv"
	"github.com/mailroom-go/mailroom/internal/wire"
	"github.com/mailroom-go/mailroom/outbox"
	"github.com/mailroom-go/mailroom/relay"
)

// wireWorld is one schema, one exchange bound to an inbox queue, a relay
// and a consumer that records what its handler sees.
type wireWorld struct {
	t     *testing.T
	s     *testenv.Schema
	b     *testenv.Broker
	ex    string
	queue string
	ob    *outbox.Outbox

	mu   sync.Mutex
	seen map[string]inbox.Message
}

const wireMaxSize = 4096

func newWireWorld(t *testing.T) *wireWorld {
	t.Helper()
	w := &wireWorld{t: t, s: testenv.NewSchema(t), b: testenv.NewBroker(t), seen: map[string]inbox.Message{}}
	w.ex = w.b.Exchange()
	w.queue = testenv.Unique("wire")
	w.b.CleanupQueues(w.queue, inbox.RetryQueueName(w.queue), inbox.DeadLetterQueueName(w.queue))
	w.b.CleanupExchanges(inbox.DeadLetterExchangeName(w.queue))
	if err := inbox.DeclareTopology(w.b.Channel(), inbox.Topology{Queue: w.queue, Exchange: w.ex, Classic: true}); err != nil {
		t.Fatal(err)
	}
	ob, err := outbox.New(outbox.Config{MaxPayloadBytes: wireMaxSize})
	if err != nil {
		t.Fatal(err)
	}
	w.ob = ob
	r, err := relay.New(w.s.DB.DB, relay.Config{
		URL: w.b.URL, DatabaseURL: w.s.URL, Name: testenv.Unique("wire"),
		PollInterval: 50 * time.Millisecond, MinBackoff: 10 * time.Millisecond, MaxBackoff: 50 * time.Millisecond,
		MaxAttempts: 1, MaxMessageSize: wireMaxSize,
	})
	if err != nil {
		t.Fatal(err)
	}
	c, err := inbox.New(w.s.DB, inbox.Config{
		URL: w.b.URL, Queue: w.queue, Consumer: "wire",
		Handler: func(_ context.Context, _ *sqlx.Tx, m inbox.Message) error {
			w.mu.Lock()
			defer w.mu.Unlock()
			w.seen[m.ID] = m
			return nil
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	for _, run := range []func(context.Context) error{r.Run, c.Run} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := run(ctx); err != nil {
				t.Errorf("Run: %v", err)
			}
		}()
	}
	t.Cleanup(func() { cancel(); wg.Wait() })
	return w
}

// handled waits for the handler to see id and returns what it saw.
func (w *wireWorld) handled(id string) inbox.Message {
	w.t.Helper()
	var m inbox.Message
	testenv.Eventually(w.t, 30*time.Second, "the handler to see "+id, func() bool {
		w.mu.Lock()
		defer w.mu.Unlock()
		var ok bool
		m, ok = w.seen[id]
		return ok
	})
	return m
}

// insertSQL writes m as a plain INSERT would, headers given as JSON text.
func (w *wireWorld) insertSQL(m outbox.Message, headers string) {
	w.t.Helper()
	var h any
	if headers != "" {
		h = headers
	}
	if _, err := w.s.DB.Exec(`INSERT INTO mailroom_outbox (id, exchange, routing_key, key, type, content_type, headers, payload)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)`, m.ID, m.Exchange, m.RoutingKey, m.Key, m.Type, m.ContentType, h, m.Payload); err != nil {
		w.t.Fatal(err)
	}
}

// insertCOPY writes m with COPY, as a bulk loader would.
func (w *wireWorld) insertCOPY(m outbox.Message, headers string) {
	w.t.Helper()
	tx, err := w.s.DB.Begin()
	if err != nil {
		w.t.Fatal(err)
	}
	defer tx.Rollback()
	st, err := tx.Prepare(pq.CopyIn("mailroom_outbox", "id", "exchange", "routing_key", "key", "type", "content_type", "headers", "payload"))
	if err != nil {
		w.t.Fatal(err)
	}
	if _, err := st.Exec(m.ID, m.Exchange, m.RoutingKey, m.Key, m.Type, m.ContentType, headers, m.Payload); err != nil {
		w.t.Fatal(err)
	}
	if _, err := st.Exec(); err != nil {
		w.t.Fatal(err)
	}
	if err := st.Close(); err != nil {
		w.t.Fatal(err)
	}
	if err := tx.Commit(); err != nil {
		w.t.Fatal(err)
	}
}

// deadError waits for the relay's dead letter of id and returns its error.
func (w *wireWorld) deadError(id string) string {
	w.t.Helper()
	var e string
	testenv.Eventually(w.t, 30*time.Second, "the relay's dead letter of "+id, func() bool {
		return w.s.DB.Get(&e, `SELECT last_error FROM mailroom_outbox_dead WHERE id = $1`, id) == nil
	})
	return e
}

// inboxDeadReason publishes d to the exchange as another publisher would,
// and waits for the consumer to dead-letter it; it returns the reason.
func (w *wireWorld) inboxDeadReason(p amqp.Publishing) string {
	w.t.Helper()
	ch := w.b.Channel()
	if err := ch.Publish(w.ex, "direct", true, false, p); err != nil {
		w.t.Fatal(err)
	}
	ds, err := ch.Consume(inbox.DeadLetterQueueName(w.queue), "", true, false, false, false, nil)
	if err != nil {
		w.t.Fatal(err)
	}
	select {
	case d := <-ds:
		r, _ := d.Headers[inbox.HeaderReason].(string)
		return r
	case <-time.After(30 * time.Second):
		w.t.Fatalf("message %s not dead-lettered by the consumer", p.MessageId)
		return ""
	}
}

// A message with every field set reaches the handler as it was written,
// field by field, whether it was written by outbox.Add, a plain INSERT or
// COPY.
func TestWireContractEveryField(t *testing.T) {
	t.Parallel()
	w := newWireWorld(t)
	headers := map[string]string{"tenant": "acme", "ünïcode": "välue ✓", "empty": "", "traceparent-like": "00-abc-01"}
	hjson, _ := json.Marshal(headers)
	full := func() outbox.Message {
		return outbox.Message{
			ID: outbox.NewID(), Exchange: w.ex, RoutingKey: "order.placed", Key: "order-42",
			Type: "order.placed.v1", ContentType: "application/cloudevents+json; charset=utf-8",
			Headers: headers, Payload: []byte(`{"id":42,"note":"ü"}`), AvailableAt: time.Now().Add(-time.Minute),
		}
	}
	byAdd, bySQL, byCOPY := full(), full(), full()
	if err := w.ob.Add(context.Background(), w.s.DB, byAdd); err != nil {
		t.Fatal(err)
	}
	w.insertSQL(bySQL, string(hjson))
	w.insertCOPY(byCOPY, string(hjson))
	for how, m := range map[string]outbox.Message{"Add": byAdd, "INSERT": bySQL, "COPY": byCOPY} {
		want := inbox.Message{ID: m.ID, Exchange: m.Exchange, RoutingKey: m.RoutingKey, Key: m.Key, Type: m.Type,
			ContentType: m.ContentType, Headers: m.Headers, Payload: m.Payload, Attempt: 1}
		if got := w.handled(m.ID); !reflect.DeepEqual(got, want) {
			t.Errorf("written by %s, the handler saw\n%+v\nwant\n%+v", how, got, want)
		}
	}
	// A row written by hand with header values that are not strings:
	// each is published as its JSON text.
	raw := outbox.Message{ID: outbox.NewID(), Exchange: w.ex, RoutingKey: "r", ContentType: "text/plain", Payload: []byte("hi")}
	w.insertSQL(raw, `{"n": 1, "ok": true, "nested": {"a": "b"}}`)
	if got := w.handled(raw.ID).Headers; !reflect.DeepEqual(got, map[string]string{"n": "1", "ok": "true", "nested": `{"a": "b"}`}) {
		t.Errorf("headers of a hand-written row: %q", got)
	}
}

// Each rule of the contract is the same at both ends: what outbox.Add
// refuses, the relay refuses in a row written by other means (it
// dead-letters it with the same words), and the inbox applies the
// payload rule to a message published by anyone else.
func TestWireContractRulesAtBothEnds(t *testing.T) {
	t.Parallel()
	w := newWireWorld(t)
	cases := []struct {
		name    string
		m       outbox.Message
		headers string // the headers column of the row written by SQL
		rule    string // the words both ends use
	}{
		{"JSON content type, not JSON",
			outbox.Message{Exchange: w.ex, RoutingKey: "r", ContentType: "application/cloudevents+json", Payload: []byte("not json")}, "",
			wire.CheckPayload("application/cloudevents+json", []byte("not json")).Error()},
		{"reserved header",
			outbox.Message{Exchange: w.ex, RoutingKey: "r", ContentType: "text/plain", Headers: map[string]string{"x-mailroom-key": "k"}, Payload: []byte("x")}, `{"x-mailroom-key": "k"}`,
			`Headers: "x-mailroom-key": names starting with "x-mailroom-" are reserved`},
		{"header name over 255 bytes",
			outbox.Message{Exchange: w.ex, RoutingKey: "r", ContentType: "text/plain", Headers: map[string]string{strings.Repeat("h", 256): "v"}, Payload: []byte("x")}, `{"` + strings.Repeat("h", 256) + `": "v"}`,
			"Headers: name: 256 bytes is over the 255-byte limit"},
		{"routing key over 255 bytes",
			outbox.Message{Exchange: w.ex, RoutingKey: strings.Repeat("r", 256), ContentType: "text/plain", Payload: []byte("x")}, "",
			"RoutingKey: 256 bytes is over the 255-byte limit"},
		{"payload over the size limit",
			outbox.Message{Exchange: w.ex, RoutingKey: "r", ContentType: "text/plain", Payload: make([]byte, wireMaxSize+1)}, "",
			"Payload: 4097 bytes is over the"},
	}
	for _, c := range cases {
		err := w.ob.Add(context.Background(), w.s.DB, c.m)
		if err == nil || !strings.Contains(err.Error(), c.rule) {
			t.Errorf("%s: Add returned %v, want an error with %q", c.name, err, c.rule)
		}
		c.m.ID = outbox.NewID()
		w.insertSQL(c.m, c.headers)
		if e := w.deadError(c.m.ID); !strings.Contains(e, c.rule) {
			t.Errorf("%s: the relay dead-lettered the row with %q, want %q", c.name, e, c.rule)
		}
	}
	// A headers column that is not an object can only come from SQL.
	bad := outbox.Message{ID: outbox.NewID(), Exchange: w.ex, RoutingKey: "r", ContentType: "text/plain", Payload: []byte("x")}
	w.insertSQL(bad, `["not", "an", "object"]`)
	if e := w.deadError(bad.ID); !strings.Contains(e, "Headers: the headers column is not a JSON object") {
		t.Errorf("headers not an object: dead letter's error %q", e)
	}

	// The inbox: the payload rule, the same words, for a message that did
	// not come through the relay.
	rule := cases[0].rule
	reason := w.inboxDeadReason(amqp.Publishing{MessageId: outbox.NewID(), ContentType: "application/cloudevents+json", Body: []byte("not json")})
	if !strings.Contains(reason, rule) {
		t.Errorf("the inbox dead-lettered with %q, want %q", reason, rule)
	}
	// And reserved headers never reach a handler, in any case.
	id := outbox.NewID()
	if err := w.b.Channel().Publish(w.ex, "direct", true, false, amqp.Publishing{MessageId: id, ContentType: "text/plain", Body: []byte("x"),
		Headers: amqp.Table{"X-Mailroom-Whatever": "v", "kept": "yes"}}); err != nil {
		t.Fatal(err)
	}
	if got := w.handled(id).Headers; !reflect.DeepEqual(got, map[string]string{"kept": "yes"}) {
		t.Errorf("headers the handler saw: %q, want only kept", got)
	}
}
