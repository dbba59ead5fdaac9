package inbox_test

import (
	"context"
	"fmt"
	"time"

	"github.com/jmoiron/sqlx"
	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/mailroom-go/mailroom/inbox"
	"github.com/mailroom-go/mailroom/internal/testenv"
)

// A message delivered twice (the broker redelivers, the relay published
// again after a crash) is applied once: the consumer records its id in the
// handler's transaction, and acks the copy without calling the handler.
func ExampleConsumer() {
	env := testenv.Example() // a fresh schema of the local database; yours: DATABASE_URL, AMQP_URL
	defer env.Done()
	ctx := context.Background()
	db := sqlx.MustOpen("postgres", env.DatabaseURL)
	defer db.Close()
	db.MustExec(`CREATE TABLE charges (order_id text, amount int)`)

	conn, err := amqp.Dial(env.AMQPURL)
	if err != nil {
		panic(err)
	}
	defer conn.Close()
	ch, _ := conn.Channel()
	topo := inbox.Topology{Queue: "payments-" + env.Suffix, Exchange: "orders-" + env.Suffix, BindingKeys: []string{"order.placed"}, Classic: true}
	if err := inbox.DeclareTopology(ch, topo); err != nil {
		panic(err)
	}
	defer deleteTopology(ch, topo) // the example's own names

	c, err := inbox.New(db, inbox.Config{
		URL: env.AMQPURL, Queue: topo.Queue, Consumer: "payments",
		Handler: func(ctx context.Context, tx *sqlx.Tx, m inbox.Message) error {
			fmt.Println("charging", m.Key)
			_, err := tx.ExecContext(ctx, `INSERT INTO charges VALUES ($1, 4200)`, m.Key)
			return err // an error: retried with backoff, then dead-lettered
		},
	})
	if err != nil {
		panic(err)
	}
	runCtx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- c.Run(runCtx) }()

	// The same message twice, as the relay publishes it (message_id set).
	for range 2 {
		err := ch.Publish(topo.Exchange, "order.placed", false, false, amqp.Publishing{
			MessageId: "0190c3a4-0000-7000-8000-000000000001", ContentType: "application/json",
			Headers: amqp.Table{"x-mailroom-key": "o-1"}, Body: []byte(`{"id":"o-1"}`),
		})
		if err != nil {
			panic(err)
		}
	}
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if s := c.Stats(); s.Handled+s.Duplicates == 2 {
			break
		}
	}
	stop()
	if err := <-done; err != nil {
		panic(err)
	}
	var n int
	if err := db.Get(&n, `SELECT count(*) FROM charges`); err != nil {
		panic(err)
	}
	fmt.Println("charges:", n, "duplicates acked unapplied:", c.Stats().Duplicates)
	// Output:
	// charging o-1
	// charges: 1 duplicates acked unapplied: 1
}

// deleteTopology deletes what DeclareTopology declared for topo.
func deleteTopology(ch *amqp.Channel, topo inbox.Topology) {
	for _, q := range []string{topo.Queue, inbox.RetryQueueName(topo.Queue), inbox.DeadLetterQueueName(topo.Queue)} {
		ch.QueueDelete(q, false, false, false)
	}
	for _, ex := range []string{topo.Exchange, inbox.DeadLetterExchangeName(topo.Queue)} {
		ch.ExchangeDelete(ex, false, false)
	}
}
