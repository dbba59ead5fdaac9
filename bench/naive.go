package main

import (
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"time"

	"github.com/lib/pq"
	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/mailroom-go/mailroom/outbox"
)

// benchNaive: the yardstick of issue #8, a naive but sound relay drawn as
// the issue describes it — claim 500 with SKIP LOCKED, publish them all
// with pipelined confirms, wait for every confirm, delete, commit — one
// step after another, on the same backlog and consumer as the drain.
func benchNaive() (float64, error) {
	w, err := setup()
	if err != nil {
		return 0, err
	}
	defer w.stop()
	if err := w.fillWithAdd(); err != nil {
		return 0, err
	}
	ch, err := w.conn.Channel()
	if err != nil {
		return 0, err
	}
	if err := ch.Confirm(false); err != nil {
		return 0, err
	}
	confirms := ch.NotifyPublish(make(chan amqp.Confirmation, 500))
	start := time.Now()
	for {
		n, err := naiveBatch(w.db, ch, confirms)
		if err != nil {
			return 0, err
		}
		if n == 0 {
			break
		}
	}
	if err := w.waitReceived(int64(*events), time.Minute); err != nil {
		return 0, err
	}
	return float64(*events) / time.Since(start).Seconds(), nil
}

func naiveBatch(db *sql.DB, ch *amqp.Channel, confirms <-chan amqp.Confirmation) (int, error) {
	ctx := context.Background()
	tx, err := db.Begin()
	if err != nil {
		return 0, err
	}
	defer tx.Rollback()
	rs, err := tx.Query(`SELECT seq, id, exchange, routing_key, content_type, headers, payload FROM mailroom_outbox
ORDER BY seq LIMIT 500 FOR UPDATE SKIP LOCKED`)
	if err != nil {
		return 0, err
	}
	var seqs []int64
	var msgs []amqp.Publishing
	var exchange, routingKey string
	for rs.Next() {
		var seq int64
		var m amqp.Publishing
		var headers []byte
		if err := rs.Scan(&seq, &m.MessageId, &exchange, &routingKey, &m.ContentType, &headers, &m.Body); err != nil {
			return 0, err
		}
		if err := json.Unmarshal(headers, &m.Headers); err != nil { // the soak's consumer reads its event numbers from them
			return 0, fmt.Errorf("headers of row %d: %w", seq, err)
		}
		m.DeliveryMode = amqp.Persistent
		seqs, msgs = append(seqs, seq), append(msgs, m)
	}
	if err := rs.Err(); err != nil {
		return 0, err
	}
	for _, m := range msgs {
		if err := ch.PublishWithContext(ctx, exchange, routingKey, true, false, m); err != nil {
			return 0, err
		}
	}
	for range msgs {
		if c := <-confirms; !c.Ack {
			return 0, fmt.Errorf("nack")
		}
	}
	if _, err := tx.Exec(`DELETE FROM mailroom_outbox WHERE seq = ANY($1)`, pq.Int64Array(seqs)); err != nil {
		return 0, err
	}
	return len(msgs), tx.Commit()
}

// fillWithAdd writes the backlog through outbox.Add, 1,000 per statement.
func (w *world) fillWithAdd() error {
	ob, _ := outbox.New(outbox.Config{})
	body := []byte(`{"order_id":"0190c1b2-7c1e-7d3a-9f1e-5b2d3c4e5f60","amount_cents":1999}`)
	for left := *events; left > 0; left -= 1000 {
		msgs := make([]outbox.Message, min(left, 1000))
		for i := range msgs {
			msgs[i] = outbox.Message{Exchange: w.exchange, RoutingKey: "k", Payload: body}
		}
		if err := ob.Add(context.Background(), w.db, msgs...); err != nil {
			return err
		}
	}
	_, err := w.db.Exec(`VACUUM ANALYZE mailroom_outbox`)
	return err
}
