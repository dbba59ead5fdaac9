package relay_test

import (
	"encoding/json"
	"fmt"
	"os/exec"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/mailroom-go/mailroom/internal/testenv"
	"github.com/mailroom-go/mailroom/outbox"
)

// keyed is n messages of key, each carrying its key and place.
func keyed(exchange, routingKey, key string, n int) []outbox.Message {
	msgs := make([]outbox.Message, n)
	for i := range msgs {
		body, _ := json.Marshal(map[string]any{"key": key, "n": i})
		msgs[i] = outbox.Message{Exchange: exchange, RoutingKey: routingKey, Key: key, Payload: body}
	}
	return msgs
}

// place reads the key and place a keyed message carries.
func place(t *testing.T, d amqp.Delivery) (key string, n int) {
	t.Helper()
	var m struct {
		Key string
		N   int
	}
	if err := json.Unmarshal(d.Body, &m); err != nil {
		t.Fatal(err)
	}
	return m.Key, m.N
}

// A transaction's ten events of one key go out one after the other as
// each is confirmed, without waiting for a poll: here the relay polls once
// an hour, and it is woken once (by the NOTIFY of the commit). It used to
// publish one message of a key per claim, so the last came ~5 s later at
// the default poll.
func TestKeyRunFlowsWithoutPolling(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	cfg := e.config()
	cfg.PollInterval = time.Hour
	e.start(cfg)
	e.waitAsleep(1)
	e.add(keyed(e.ex, "k", "order-1", 10)...)
	for i, d := range e.receive(e.queue, 10, 30*time.Second) {
		if _, n := place(t, d); n != i {
			t.Fatalf("delivery %d is message %d: out of order", i, n)
		}
	}
	e.waitDrained()
}

// A backlog of one key drains by runs (each claim takes a run, and the
// last row delivered wakes the claim loop for the next), in order, with
// the poll out of the way.
func TestKeyBacklogDrainsInRuns(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.add(keyed(e.ex, "k", "hot", 700)...)
	cfg := e.config()
	cfg.PollInterval, cfg.BatchSize = time.Hour, 100
	e.start(cfg)
	for i, d := range e.receive(e.queue, 700, 60*time.Second) {
		if _, n := place(t, d); n != i {
			t.Fatalf("delivery %d is message %d: out of order", i, n)
		}
	}
	e.waitDrained()
}

// A message of a run the broker returns (unroutable) holds the rest of its
// key: they are not published until it is settled (here dead-lettered
// after MaxAttempts), though they came in the same claim; the next
// message is published only after the returned one left the outbox.
func TestReturnMidRunHoldsTheRestOfItsKey(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ex := e.b.Exchange()
	q := e.b.Queue(ex, "ok.#", nil)
	msgs := keyed(ex, "ok.x", "K", 10)
	msgs[2].RoutingKey = "nobody"
	returned := outbox.NewID()
	msgs[2].ID = returned
	e.add(msgs...)
	cfg := e.config()
	cfg.MaxAttempts = 3
	e.start(cfg)
	ch := e.b.Channel()
	ds, err := ch.Consume(q, "", true, false, false, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []int{0, 1, 3, 4, 5, 6, 7, 8, 9} {
		select {
		case d := <-ds:
			if _, n := place(t, d); n != want {
				t.Fatalf("got message %d, want %d", n, want)
			}
			if want == 3 {
				var dead int
				e.s.DB.Get(&dead, `SELECT count(*) FROM mailroom_outbox_dead WHERE id = $1`, returned)
				if dead != 1 {
					t.Fatal("message 3 was published before message 2, returned by the broker, was settled")
				}
			}
		case <-time.After(30 * time.Second):
			t.Fatalf("message %d not delivered", want)
		}
	}
	e.waitDrained()
}

// A message of a run the broker nacks (its queue is full and rejects
// publishes) holds the rest of its key: the queue receives the key's
// messages in order, each once, as room is made.
func TestNackMidRunHoldsTheRestOfItsKey(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	q := e.b.Queue("", "", amqp.Table{"x-max-length": 1, "x-overflow": "reject-publish"})
	ex := e.b.Exchange()
	if err := e.b.Channel().QueueBind(q, "#", ex, false, nil); err != nil {
		t.Fatal(err)
	}
	e.add(keyed(ex, "k", "K", 10)...)
	cfg := e.config()
	cfg.MaxAttempts = 1000
	e.start(cfg)
	testenv.Eventually(t, 20*time.Second, "a nacked attempt of message 1", func() bool {
		var n int
		e.s.DB.Get(&n, `SELECT count(*) FROM mailroom_outbox WHERE last_error LIKE '%nacked%' AND payload = '{"key":"K","n":1}'`)
		return n > 0
	})
	var later int
	e.s.DB.Get(&later, `SELECT count(*) FROM mailroom_outbox WHERE attempts > 0 AND payload <> '{"key":"K","n":1}'`)
	if later != 0 {
		t.Fatalf("%d messages after the nacked one were tried: the rest of its key must wait", later)
	}
	for i, d := range e.receive(q, 10, 60*time.Second) {
		if _, n := place(t, d); n != i {
			t.Fatalf("delivery %d is message %d: out of order or twice", i, n)
		}
	}
	e.waitDrained()
}

// The sidecar SIGKILLed in the middle of its keys' runs, and a second one
// finishing them: nothing lost, and each key's messages first arrive in
// order (a message confirmed but not yet deleted is published again: a
// duplicate of one already seen, which the inbox absorbs).
func TestRelayKilledMidKeyRun(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	const keys, perKey = 4, 1000
	for k := range keys {
		e.add(keyed(e.ex, "k", fmt.Sprintf("key-%d", k), perKey)...)
	}
	start := func(name string) *exec.Cmd { return e.startSidecar(name, "--lease", "2s", "--confirm-timeout", "1s") }
	first := start(e.appTag + "-a")
	testenv.Eventually(t, 30*time.Second, "first relay mid-run", func() bool { return e.pending() < keys*perKey*3/4 })
	if err := first.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	first.Wait()
	start(e.appTag + "-b")
	ch := e.b.Channel()
	ds, err := ch.Consume(e.queue, "", true, false, false, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	next := map[string]int{}
	dups, seen := 0, 0
	deadline := time.After(90 * time.Second)
	for seen < keys*perKey {
		select {
		case d := <-ds:
			key, n := place(t, d)
			switch {
			case n == next[key]:
				next[key]++
				seen++
			case n < next[key]:
				dups++
			default:
				t.Fatalf("key %s: message %d arrived before %d", key, n, next[key])
			}
		case <-deadline:
			t.Fatalf("received %d of %d messages: lost", seen, keys*perKey)
		}
	}
	e.waitDrained()
	t.Logf("%d duplicate deliveries", dups)
}
