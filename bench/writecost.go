package main

import (
	"context"
	"database/sql"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/mailroom-go/mailroom/atcommit"
	"github.com/mailroom-go/mailroom/internal/locks"
	"github.com/mailroom-go/mailroom/outbox"
)

// writeVariant is one transaction benchWriteCost measures, and what it
// measured: tx/s in each round, CPU time and transactions over all rounds.
type writeVariant struct {
	name   string
	db     *sql.DB
	ob     *outbox.Outbox // nil: the order alone
	asleep bool           // a relay sleeps (holds the wake lock) meanwhile
	rates  []float64
	used   cpuUse
	txs    int64
}

// cost is the variant's cost against base: the median over rounds of
// base's tx/s ÷ the variant's in the same round (pairs taken a moment
// apart cancel most of this machine's drift).
func (v *writeVariant) cost(base *writeVariant) float64 {
	ratios := make([]float64, len(v.rates))
	for r := range ratios {
		ratios[r] = base.rates[r] / v.rates[r]
	}
	return median(ratios)
}

// perTx is the CPU time one transaction cost, PostgreSQL's and this
// process's (the clients'), on average over all rounds.
func (v *writeVariant) perTx() (postgres, client time.Duration) {
	if v.txs == 0 {
		return 0, 0
	}
	return v.used.postgres / time.Duration(v.txs), v.used.self / time.Duration(v.txs)
}

// benchWriteCost: business transactions per second at 8 clients — BEGIN,
// INSERT one order row, COMMIT — alone and with outbox.Add of one message:
// with Config.DB opened by atcommit.OpenDB (the insert sent with the
// COMMIT), with Config.DB (a prepared statement) and without (literals),
// with no relay asleep (under load the relay is awake: the outbox insert
// takes the wake lock shared and sends nothing); the order alone on the
// database of atcommit.OpenDB (what its connector costs other statements);
// and with Config.DB while a relay sleeps holding the wake lock (every
// commit sends a NOTIFY). The variants take turns, rounds times, so drift
// on this shared machine hits them alike; medians are compared. The
// NOTIFY-per-commit variant slows what runs right after it, so an
// unrecorded second of the order alone follows it.
func benchWriteCost(rounds int, each time.Duration) ([]*writeVariant, error) {
	w, err := setup()
	if err != nil {
		return nil, err
	}
	defer w.stop()
	if _, err := w.db.Exec(`CREATE TABLE orders (id bigserial PRIMARY KEY, customer text NOT NULL, amount_cents bigint NOT NULL, created_at timestamptz NOT NULL DEFAULT now())`); err != nil {
		return nil, err
	}
	atDB, err := openAtCommit(w.dbURL)
	if err != nil {
		return nil, err
	}
	defer atDB.Close()
	atCommit, _ := outbox.New(outbox.Config{DB: atDB})
	prepared, _ := outbox.New(outbox.Config{DB: w.db})
	literals, _ := outbox.New(outbox.Config{})
	ctx := context.Background()
	sleeper, err := w.db.Conn(ctx) // stands in for a sleeping relay
	if err != nil {
		return nil, err
	}
	defer sleeper.Close()
	lock := func(fn string) error {
		_, err := sleeper.ExecContext(ctx, `SELECT `+fn+`($1, to_regclass('mailroom_outbox')::oid::integer)`, locks.Wake)
		return err
	}
	variants := []*writeVariant{
		{name: "order only", db: w.db},
		{name: "+ Add, atcommit.OpenDB", db: atDB, ob: atCommit},
		{name: "+ Add, Config.DB (prepared)", db: w.db, ob: prepared},
		{name: "+ Add, literals", db: w.db, ob: literals},
		{name: "order only, atcommit.OpenDB", db: atDB},
		{name: "+ Add, a relay asleep", db: w.db, ob: prepared, asleep: true},
	}
	for r := 0; r < rounds; r++ {
		for _, v := range variants {
			if v.asleep {
				if err := lock("pg_advisory_lock"); err != nil {
					return nil, err
				}
			}
			before := readCPU()
			tps, n, err := businessTx(v.db, v.ob, 8, each)
			if err != nil {
				return nil, err
			}
			u := readCPU().since(before)
			v.rates = append(v.rates, tps)
			v.used.postgres += u.postgres
			v.used.self += u.self
			v.txs += n
			if v.asleep {
				if err := lock("pg_advisory_unlock"); err != nil {
					return nil, err
				}
				if _, _, err := businessTx(w.db, nil, 8, each); err != nil { // settle
					return nil, err
				}
			}
		}
	}
	return variants, nil
}

// openAtCommit opens the database of url as atcommit.OpenDB does, with the
// pool of setup.
func openAtCommit(url string) (*sql.DB, error) {
	db, err := atcommit.OpenDB(url)
	if err != nil {
		return nil, err
	}
	db.SetMaxOpenConns(32)
	db.SetMaxIdleConns(32)
	return db, nil
}

// businessTx runs the minimal business transaction (with Add when ob is
// set) on clients connections of db for d and returns transactions/s and
// how many.
func businessTx(db *sql.DB, ob *outbox.Outbox, clients int, d time.Duration) (tps float64, count int64, err error) {
	payload := []byte(`{"order_id":"0190c1b2-7c1e-7d3a-9f1e-5b2d3c4e5f60","customer":"c-42","amount_cents":1999}`)
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
					tx, err := db.BeginTx(ctx, nil)
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
		return 0, 0, err
	}
	return float64(n.Load()) / time.Since(start).Seconds(), n.Load(), nil
}
