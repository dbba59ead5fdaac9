package main

import (
	"context"
	"database/sql"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/mailroom-go/mailroom/internal/wakeup"
	"github.com/mailroom-go/mailroom/outbox"
)

// writeCost is what benchWriteCost measures: the order-only transaction
// rate (tx/s, median) and the cost of each Add variant, as the median over
// rounds of order-only tx/s ÷ the variant's tx/s in the same round (pairs
// taken a moment apart cancel most of this machine's drift).
type writeCost struct{ orderOnly, prepared, literals, asleep float64 }

// benchWriteCost: business transactions per second at 8 clients — BEGIN,
// INSERT one order row, COMMIT — alone and with outbox.Add of one message:
// with Config.DB (a prepared statement) and without (literals), with no
// relay asleep (under load the relay is awake: the outbox insert takes the
// wake lock shared and sends nothing), and with Config.DB while a relay
// sleeps holding the wake lock (every commit sends a NOTIFY). The variants
// take turns, rounds times, so drift on this shared machine hits them
// alike; medians are compared.
func benchWriteCost(rounds int, each time.Duration) (writeCost, error) {
	w, err := setup()
	if err != nil {
		return writeCost{}, err
	}
	defer w.stop()
	if _, err := w.db.Exec(`CREATE TABLE orders (id bigserial PRIMARY KEY, customer text NOT NULL, amount_cents bigint NOT NULL, created_at timestamptz NOT NULL DEFAULT now())`); err != nil {
		return writeCost{}, err
	}
	prepared, _ := outbox.New(outbox.Config{DB: w.db})
	literals, _ := outbox.New(outbox.Config{})
	ctx := context.Background()
	sleeper, err := w.db.Conn(ctx) // stands in for a sleeping relay
	if err != nil {
		return writeCost{}, err
	}
	defer sleeper.Close()
	lock := func(fn string) error {
		_, err := sleeper.ExecContext(ctx, `SELECT `+fn+`($1, to_regclass('mailroom_outbox')::oid::integer)`, wakeup.LockKey)
		return err
	}
	variants := []struct {
		ob     *outbox.Outbox
		asleep bool
	}{{nil, false}, {prepared, false}, {literals, false}, {prepared, true}}
	rates := make([][]float64, len(variants))
	for r := 0; r < rounds; r++ {
		for i, v := range variants {
			if v.asleep {
				if err := lock("pg_advisory_lock"); err != nil {
					return writeCost{}, err
				}
			}
			tps, err := w.businessTx(v.ob, 8, each)
			if err != nil {
				return writeCost{}, err
			}
			if v.asleep {
				if err := lock("pg_advisory_unlock"); err != nil {
					return writeCost{}, err
				}
			}
			rates[i] = append(rates[i], tps)
		}
	}

	cost := func(i int) float64 {
		ratios := make([]float64, rounds)
		for r := range ratios {
			ratios[r] = rates[0][r] / rates[i][r]
		}
		return median(ratios)
	}
	return writeCost{median(rates[0]), cost(1), cost(2), cost(3)}, nil
}

// businessTx runs the minimal business transaction (with Add when ob is
// set) on clients connections for d and returns transactions/s.
func (w *world) businessTx(ob *outbox.Outbox, clients int, d time.Duration) (float64, error) {
	payload := []byte(`{"order_id":"0190c1b2-7c1e-7d3a-9f1e-5b2d3c4e5f60","customer":"c-42","amount_cents":1999}`)
	var f func(context.Context, *sql.Tx) error
	if ob != nil {
		f = func(ctx context.Context, tx *sql.Tx) error {
			return ob.Add(ctx, tx, outbox.Message{Exchange: "orders", RoutingKey: "order.placed", Key: "c-42", Type: "order.placed", Payload: payload})
		}
	}
	return w.businessTxF(f, clients, d)
}

func (w *world) businessTxF(extra func(context.Context, *sql.Tx) error, clients int, d time.Duration) (float64, error) {
	ctx := context.Background()
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
					if extra != nil {
						if err := extra(ctx, tx); err != nil {
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
