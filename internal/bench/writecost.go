package main

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/mailroom-go/mailroom/outbox"
)

// benchWriteCost: business transactions per second at 8 clients — BEGIN,
// INSERT one order row, COMMIT — alone and with outbox.Add of one message,
// with and without the wake-up check. The variants take turns, rounds
// times, so drift on this shared machine hits them alike; medians are
// compared.
func benchWriteCost(rounds int, each time.Duration) (orderOnly, withAdd, withNotify float64, err error) {
	w, err := setup()
	if err != nil {
		return 0, 0, 0, err
	}
	defer w.stop()
	if _, err := w.db.Exec(`CREATE TABLE orders (id bigserial PRIMARY KEY, customer text NOT NULL, amount_cents bigint NOT NULL, created_at timestamptz NOT NULL DEFAULT now())`); err != nil {
		return 0, 0, 0, err
	}
	quiet, _ := outbox.New(outbox.Config{DisableNotify: true})
	notify, _ := outbox.New(outbox.Config{})
	variants := []*outbox.Outbox{nil, quiet, notify}
	rates := make([][]float64, len(variants))
	for r := 0; r < rounds; r++ {
		for i, ob := range variants {
			tps, err := w.businessTx(ob, 8, each)
			if err != nil {
				return 0, 0, 0, err
			}
			rates[i] = append(rates[i], tps)
		}
	}
	return median(rates[0]), median(rates[1]), median(rates[2]), nil
}

// businessTx runs the minimal business transaction (with Add when ob is
// set) on clients connections for d and returns transactions/s.
func (w *world) businessTx(ob *outbox.Outbox, clients int, d time.Duration) (float64, error) {
	ctx := context.Background()
	payload := []byte(`{"order_id":"0190c1b2-7c1e-7d3a-9f1e-5b2d3c4e5f60","customer":"c-42","amount_cents":1999}`)
	var n atomic.Int64
	var wg sync.WaitGroup
	var firstErr atomic.Value
	deadline := time.Now().Add(d)
	start := time.Now()
	for c := 0; c < clients; c++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Now().Before(deadline) {
				err := func() error {
					tx, err := w.db.BeginTx(ctx, nil)
					if err != nil {
						return err
					}
					defer tx.Rollback()
					if _, err := tx.ExecContext(ctx, `INSERT INTO orders (customer, amount_cents) VALUES ($1, $2)`, "c-42", 1999); err != nil {
						return err
					}
					if ob != nil {
						if err := ob.Add(ctx, tx, outbox.Message{Exchange: "orders", RoutingKey: "order.placed", Key: "c-42", Type: "order.placed", Payload: payload}); err != nil {
							return err
						}
					}
					return tx.Commit()
				}()
				if err != nil {
					firstErr.CompareAndSwap(nil, fmt.Errorf("business transaction: %w", err))
					return
				}
				n.Add(1)
			}
		}()
	}
	wg.Wait()
	if err, _ := firstErr.Load().(error); err != nil {
		return 0, err
	}
	return float64(n.Load()) / time.Since(start).Seconds(), nil
}
