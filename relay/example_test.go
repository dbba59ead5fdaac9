package relay_test

import (
	"context"
	"database/sql"
	"fmt"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/mailroom-go/mailroom/internal/testenv"
	"github.com/mailroom-go/mailroom/outbox"
	"github.com/mailroom-go/mailroom/relay"
)

// Run a relay in-process: it publishes what the outbox holds, with
// publisher confirms, and removes each row once the broker confirmed it.
// (Or run the mailroom-relay sidecar instead.)
func ExampleRelay_Run() {
	env := testenv.Example() // a fresh schema of the local database; yours: DATABASE_URL, AMQP_URL
	defer env.Done()
	ctx := context.Background()

	// The consumer's side, for the example: a queue bound to the exchange.
	conn, err := amqp.Dial(env.AMQPURL)
	if err != nil {
		panic(err)
	}
	defer conn.Close()
	ch, _ := conn.Channel()
	exchange := "orders-" + env.Suffix
	must(ch.ExchangeDeclare(exchange, "topic", false, true, false, false, nil))
	q, err := ch.QueueDeclare("", false, true, true, false, nil)
	must(err)
	must(ch.QueueBind(q.Name, "order.*", exchange, false, nil))
	deliveries, err := ch.Consume(q.Name, "", true, true, false, false, nil)
	must(err)

	db, err := sql.Open("postgres", env.DatabaseURL)
	must(err)
	defer db.Close()
	ob, _ := outbox.New(outbox.Config{})
	must(ob.Add(ctx, db, outbox.Message{Exchange: exchange, RoutingKey: "order.placed", Key: "o-1", Payload: []byte(`{"id":"o-1"}`)}))

	r, err := relay.New(db, relay.Config{URL: env.AMQPURL, DatabaseURL: env.DatabaseURL})
	must(err)
	runCtx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- r.Run(runCtx) }() // retries outages itself; returns at stop

	select {
	case d := <-deliveries:
		fmt.Println(d.RoutingKey, string(d.Body), "key", d.Headers["x-mailroom-key"])
	case <-time.After(30 * time.Second):
		fmt.Println("nothing published")
	}
	stop()
	must(<-done)
	fmt.Println("published and removed from the outbox:", r.Stats().Published)
	// Output:
	// order.placed {"id":"o-1"} key o-1
	// published and removed from the outbox: 1
}

func must(err error) {
	if err != nil {
		panic(err)
	}
}
