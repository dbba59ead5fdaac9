package inbox

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"testing"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/mailroom-go/mailroom/internal/amqpx"
	"github.com/mailroom-go/mailroom/internal/testenv"
)

// Returns nobody waits for (here mandatory publishes to a missing queue
// sent past publish on its channel; in a session, those of publishes that
// timed out) must not make the return of a later unroutable copy go
// missing: amqp091-go drops a return it cannot hand over within 5 s, and
// the copy's ack then passed for delivery. Before the fix publish read
// returns through a buffer of 8 that only it drained.
func TestPublishUnroutableAfterUnreadReturns(t *testing.T) {
	t.Parallel()
	conn, err := testenv.Dial(testenv.AMQPURL(), testenv.Unique("inbox-publish"))
	if err != nil {
		testenv.Unavailable(t, "RabbitMQ", err, "rabbitmq-server -detached")
	}
	var bg sync.WaitGroup
	defer bg.Wait()
	w := amqpx.NewWatch(conn, slog.New(slog.DiscardHandler), "test: ")
	defer w.Close()
	p, err := newPublisher(conn, &bg, w)
	if err != nil {
		t.Fatal(err)
	}
	missing := testenv.Unique("missing")
	for i := range 8 { // what the old buffer held
		if err := p.ch.Publish("", missing, true, false, amqp.Publishing{MessageId: fmt.Sprint("stray-", i)}); err != nil {
			t.Fatal(err)
		}
	}
	err = p.publish(context.Background(), missing, amqp.Publishing{MessageId: "copy"})
	if err == nil {
		t.Fatal("publish to a missing queue returned nil: an unroutable copy taken as delivered")
	}
	t.Log(err)
}
