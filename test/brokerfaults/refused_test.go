//go:build brokerfaults

package brokerfaults

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/mailroom-go/mailroom/internal/testenv"
	"github.com/mailroom-go/mailroom/outbox"
	"github.com/mailroom-go/mailroom/relay"
)

// A row larger than the broker's max_message_size (which closes the
// channel with 406 PRECONDITION_FAILED) counts attempts and is
// dead-lettered, with an error naming its size and the limit; the next
// row of its key follows, and unkeyed rows flow meanwhile. It used to be
// released without an attempt at every channel close, head the next claim
// again, and stop the whole outbox.
func TestRelayDeadLettersRowOverBrokerMaxSize(t *testing.T) {
	t.Cleanup(func() { ensureBrokerUp(t) })
	setRabbitEnv(t, "max_message_size", "1048576")
	s := testenv.NewSchema(t)
	b := testenv.NewBroker(t)
	ex := b.Exchange()
	q := b.Queue(ex, "#", nil)
	big := make([]byte, 2<<20)
	for i := range big {
		big[i] = 'x'
	}
	insert := func(id, key string, payload []byte) {
		t.Helper()
		if _, err := s.DB.Exec(`INSERT INTO mailroom_outbox (id, exchange, routing_key, key, content_type, payload) VALUES ($1, $2, 'k', $3, 'application/octet-stream', $4)`, id, ex, key, payload); err != nil {
			t.Fatal(err)
		}
	}
	bigID, nextID := outbox.NewID(), outbox.NewID()
	insert(bigID, "K", big)
	insert(nextID, "K", []byte("next"))
	unkeyed := map[string]bool{}
	for range 20 {
		id := outbox.NewID()
		unkeyed[id] = true
		insert(id, "", []byte("small"))
	}
	r, err := relay.New(s.DB.DB, relay.Config{
		URL: testenv.AMQPURL(), DatabaseURL: s.URL, Name: testenv.Unique("size"),
		PollInterval: 50 * time.Millisecond, MinBackoff: 10 * time.Millisecond, MaxBackoff: 50 * time.Millisecond,
		MaxAttempts: 3,
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	defer func() { cancel(); <-done }()

	got := readIDs(t, q, len(unkeyed))
	for id := range unkeyed {
		if !got[id] {
			t.Fatalf("unkeyed message %s not delivered: one row over the broker's limit stops the outbox", id)
		}
	}
	var lastError string
	var attempts int
	testenv.Eventually(t, 60*time.Second, "the 2 MiB row dead-lettered", func() bool {
		return s.DB.QueryRow(`SELECT last_error, attempts FROM mailroom_outbox_dead WHERE id = $1`, bigID).Scan(&lastError, &attempts) == nil
	})
	if attempts != 3 {
		t.Errorf("dead letter has %d attempts, want MaxAttempts (3)", attempts)
	}
	for _, s := range []string{"2097152", "1048576"} {
		if !strings.Contains(lastError, s) {
			t.Errorf("dead letter's error %q does not name %s (the size and the broker's limit)", lastError, s)
		}
	}
	if got := readIDs(t, q, 1); !got[nextID] {
		t.Errorf("the next row of the big row's key was not delivered after it was dead-lettered")
	}
}

// readIDs consumes q until it has seen n distinct message ids (or a
// deadline passes) and returns them.
func readIDs(t *testing.T, q string, n int) map[string]bool {
	t.Helper()
	conn, err := testenv.Dial(testenv.AMQPURL(), "brokerfaults-reader")
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	ds, err := ch.Consume(q, "", true, false, false, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	deadline := time.After(60 * time.Second)
	for len(seen) < n {
		select {
		case d := <-ds:
			seen[d.MessageId] = true
		case <-deadline:
			t.Errorf("queue %s holds %d of %d messages", q, len(seen), n)
			return seen
		}
	}
	return seen
}

// A relay that meets an exchange it has not checked yet while the broker
// blocks its connection (a resource alarm: the broker stops reading it)
// stops within ConfirmTimeout and a few seconds when asked, handing its
// rows back: the passive exchange check used to wait for an answer that
// comes only when the alarm clears.
func TestRelayStopsUnderMemoryAlarmAtANewExchange(t *testing.T) {
	f := newFlow(t, 0)
	b := testenv.NewBroker(t)
	other := b.Exchange()
	b.Queue(other, "#", nil)
	raiseMemoryAlarm(t)
	// One claim: the first publish blocks the connection, and the row
	// after it needs the check of a new exchange.
	ob, _ := outbox.New(outbox.Config{})
	msgs := []outbox.Message{{Exchange: f.ex, RoutingKey: "k", Payload: []byte(`{}`)}}
	for range 20 {
		msgs = append(msgs, outbox.Message{Exchange: other, RoutingKey: "k", Payload: []byte(`{}`)})
	}
	if err := ob.Add(context.Background(), f.s.DB, msgs...); err != nil {
		t.Fatal(err)
	}
	waitBlocked(t)
	start := time.Now()
	stopsWithin(t, 2*time.Second+5*time.Second, "the relay", f.stop)
	t.Logf("stopped in %s", time.Since(start))
	if n := f.pending(); n != len(msgs) {
		t.Errorf("%d of %d rows in the outbox after the stop, want all (none could be confirmed)", n, len(msgs))
	}
}
