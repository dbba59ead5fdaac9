package amqpx

import (
	"log/slog"
	"testing"
	"time"

	"github.com/mailroom-go/mailroom/internal/testenv"
)

// watched dials the local broker and watches the connection.
func watched(t *testing.T) *Watch {
	w, _ := watchedNamed(t)
	return w
}

// watchedNamed is watched, returning the connection's name too.
func watchedNamed(t *testing.T) (*Watch, string) {
	t.Helper()
	name := testenv.Unique("amqpx-watch")
	conn, err := Dial(testenv.AMQPURL(), name)
	if err != nil {
		testenv.Unavailable(t, "RabbitMQ", err, "rabbitmq-server -detached")
	}
	w := NewWatch(conn, slog.New(slog.DiscardHandler), "test: ")
	t.Cleanup(w.Close)
	return w, name
}

func waitBroken(t *testing.T, w *Watch, what string) {
	t.Helper()
	select {
	case <-w.Broken():
	case <-time.After(10 * time.Second):
		t.Fatalf("%s: the session is not broken after 10 s", what)
	}
}

// A watched channel that the broker closes (a passive declare of a missing
// queue: 404) ends the session; the connection stays open until Close.
func TestWatchChannelClosed(t *testing.T) {
	t.Parallel()
	w := watched(t)
	ch, err := w.Conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	w.Channel(ch, "probe")
	if w.IsBroken() {
		t.Fatal("broken before anything happened")
	}
	if _, err := ch.QueueDeclarePassive(testenv.Unique("missing"), false, false, false, false, nil); err == nil {
		t.Fatal("passive declare of a missing queue succeeded")
	}
	waitBroken(t, w, "channel closed by the broker")
	if w.Conn.IsClosed() {
		t.Fatal("the connection closed with the channel")
	}
	w.Close()
	if !w.Conn.IsClosed() {
		t.Fatal("Close left the connection open")
	}
	w.Close() // again: a no-op
}

// The broker cancelling a consumer (its queue deleted) ends the session.
func TestWatchConsumerCancelled(t *testing.T) {
	t.Parallel()
	w := watched(t)
	ch, err := w.Conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	q, err := ch.QueueDeclare(testenv.Unique("amqpx-watch"), false, true, false, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	w.Channel(ch, "consuming channel")
	if _, err := ch.Consume(q.Name, "", false, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	other, err := w.Conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := other.QueueDelete(q.Name, false, false, false); err != nil {
		t.Fatal(err)
	}
	waitBroken(t, w, "consumer cancelled")
}

// The broker closing the connection (rabbitmqctl close_connection, this
// test's connection only) ends the session.
func TestWatchConnectionClosed(t *testing.T) {
	t.Parallel()
	w, name := watchedNamed(t)
	if n := testenv.CloseConnection(t, name); n != 1 {
		t.Fatalf("closed %d connections named %s, want 1", n, name)
	}
	waitBroken(t, w, "connection closed by the broker")
	if w.Blocked() {
		t.Fatal("blocked without an alarm")
	}
}
