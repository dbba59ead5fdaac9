package outbox_test

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mailroom-go/mailroom/atcommit"
	"github.com/mailroom-go/mailroom/internal/locks"
	"github.com/mailroom-go/mailroom/internal/testenv"
	"github.com/mailroom-go/mailroom/outbox"
)

// BenchmarkWriteCost measures what Add adds to a minimal business
// transaction (BEGIN; INSERT one order row; COMMIT) at 1 and 8 concurrent
// clients, against the real database, with Config.DB opened by OpenDB
// (the insert sent with the COMMIT), with Config.DB (a prepared
// statement) and without (literals), while no relay sleeps (the usual
// case under load: writers only take the wake lock shared) and while one
// does (every commit sends a NOTIFY). The variants run one after another,
// so the machine's drift shows between them; `go run ./bench -run
// writecost` alternates them and compares medians:
//
//	go test ./outbox -run '^$' -bench WriteCost -benchtime 5s
func BenchmarkWriteCost(b *testing.B) {
	s := testenv.NewSchema(b)
	s.DB.SetMaxOpenConns(16)
	s.DB.SetMaxIdleConns(16)
	if _, err := s.DB.Exec(`CREATE TABLE orders (id bigserial PRIMARY KEY, customer text NOT NULL, amount_cents bigint NOT NULL, created_at timestamptz NOT NULL DEFAULT now())`); err != nil {
		b.Fatal(err)
	}
	literals, _ := outbox.New(outbox.Config{})
	prepared, _ := outbox.New(outbox.Config{DB: s.DB.DB})
	atDB, err := atcommit.OpenDB(s.URL)
	if err != nil {
		b.Fatal(err)
	}
	defer atDB.Close()
	atDB.SetMaxOpenConns(16)
	atDB.SetMaxIdleConns(16)
	atCommit, _ := outbox.New(outbox.Config{DB: atDB})
	variants := []struct {
		name   string
		ob     *outbox.Outbox
		asleep bool
	}{
		{"order-only", nil, false},
		{"order+outbox/at-commit", atCommit, false},
		{"order+outbox/prepared", prepared, false},
		{"order+outbox/literals", literals, false},
		{"order+outbox/prepared/relay-asleep", prepared, true},
	}
	for _, clients := range []int{1, 8} {
		for _, v := range variants {
			b.Run(fmt.Sprintf("clients=%d/%s", clients, v.name), func(b *testing.B) {
				ctx := context.Background()
				if v.asleep {
					relay, err := s.DB.Conn(ctx)
					if err != nil {
						b.Fatal(err)
					}
					lock := `SELECT pg_advisory_lock($1, to_regclass('mailroom_outbox')::oid::integer)`
					if _, err := relay.ExecContext(ctx, lock, locks.Wake); err != nil {
						b.Fatal(err)
					}
					defer func() {
						relay.ExecContext(ctx, `SELECT pg_advisory_unlock($1, to_regclass('mailroom_outbox')::oid::integer)`, locks.Wake)
						relay.Close()
					}()
				}
				payload := []byte(`{"order_id":"0190c1b2-7c1e-7d3a-9f1e-5b2d3c4e5f60","customer":"c-42","amount_cents":1999}`)
				var next atomic.Int64
				var wg sync.WaitGroup
				errs := make(chan error, clients)
				b.ResetTimer()
				start := time.Now()
				for c := 0; c < clients; c++ {
					wg.Add(1)
					go func() {
						defer wg.Done()
						for next.Add(1) <= int64(b.N) {
							db := s.DB.DB
							if v.ob == atCommit {
								db = atDB
							}
							tx, err := db.BeginTx(ctx, nil)
							if err != nil {
								errs <- err
								return
							}
							if _, err := tx.ExecContext(ctx, `INSERT INTO orders (customer, amount_cents) VALUES ($1, $2)`, "c-42", 1999); err != nil {
								errs <- err
								return
							}
							if v.ob != nil {
								if err := v.ob.Add(ctx, tx, outbox.Message{Exchange: "orders", RoutingKey: "order.placed", Key: "c-42", Type: "order.placed", Payload: payload}); err != nil {
									errs <- err
									return
								}
							}
							if err := tx.Commit(); err != nil {
								errs <- err
								return
							}
						}
					}()
				}
				wg.Wait()
				b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "tx/s")
				close(errs)
				for err := range errs {
					b.Fatal(err)
				}
			})
		}
	}
}
