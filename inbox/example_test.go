package inbox_test

import (
	"context"
	"encoding/json"
	"log"
	"log/slog"
	"os"
	"os/signal"

	"github.com/jmoiron/sqlx"
	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/mailroom-go/mailroom/inbox"
)

// A payments worker: charge each placed order exactly once.
func ExampleConsumer_Run() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	db := sqlx.MustOpen("postgres", os.Getenv("DATABASE_URL"))
	db.SetMaxIdleConns(inbox.DefaultConcurrency + 1) // a connection per worker, kept
	amqpURL := os.Getenv("AMQP_URL")

	// Once, at deploy time or start-up: the work queue bound to the
	// "orders" exchange, with its retry and dead-letter queues.
	conn, err := amqp.Dial(amqpURL)
	if err != nil {
		log.Fatal(err)
	}
	ch, _ := conn.Channel()
	err = inbox.DeclareTopology(ch, inbox.Topology{Queue: "payments", Exchange: "orders", BindingKeys: []string{"order.placed"}})
	conn.Close()
	if err != nil {
		log.Fatal(err)
	}

	c, err := inbox.New(db, inbox.Config{
		URL: amqpURL, Queue: "payments", Consumer: "payments",
		OrderedByKey: true, // one order's events in order
		Logger:       slog.Default(),
		Handler: func(ctx context.Context, tx *sqlx.Tx, m inbox.Message) error {
			var order struct {
				ID     string `json:"id"`
				Amount int64  `json:"amount"`
			}
			if err := json.Unmarshal(m.Payload, &order); err != nil {
				return err // retried, then dead-lettered with this error
			}
			_, err := tx.ExecContext(ctx, `INSERT INTO charges (order_id, amount) VALUES ($1, $2)`, order.ID, order.Amount)
			return err
		},
	})
	if err != nil {
		log.Fatal(err)
	}
	if err := c.Run(ctx); err != nil {
		log.Fatal(err)
	}
}
