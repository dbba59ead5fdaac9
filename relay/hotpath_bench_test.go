package relay

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mailroom-go/mailroom/internal/testenv"
)

// The relay's hot paths against the real services, with allocations:
//
//	go test ./relay -run '^$' -bench 'Claim|PublishBatch' -benchmem
//
// One op is one batch of benchBatch rows; rows/s and msgs/s are the rates.

const benchBatch = 500

// fillOutbox writes n due rows in one statement (benchmark setup only),
// spread round-robin over keys ordering keys (0: no key).
func fillOutbox(b testing.TB, s *testenv.Schema, table string, n, keys int) {
	b.Helper()
	_, err := s.DB.Exec(`INSERT INTO `+table+` (id, exchange, routing_key, key, payload)
SELECT gen_random_uuid(), 'bench', 'k', CASE WHEN $2 > 0 THEN 'key-' || (g % $2) ELSE '' END,
       convert_to('{"order_id":"0190c1b2-7c1e-7d3a-9f1e-5b2d3c4e5f60","amount_cents":1999}', 'UTF8')
FROM generate_series(1, $1) g`, n, keys)
	if err == nil {
		_, err = s.DB.Exec(`VACUUM ANALYZE ` + table)
	}
	if err != nil {
		b.Fatal(err)
	}
}

// claimAndDelete is the relay's database cycle for one batch: claim, then
// delete the rows as if the broker confirmed them all. It returns how many
// rows the claim took.
func claimAndDelete(ctx context.Context, r *Relay) (int, error) {
	rows, err := r.claim(ctx)
	if err != nil || len(rows) == 0 {
		return 0, err
	}
	done := make([]outcome, len(rows))
	for i, w := range rows {
		done[i] = outcome{row: w, kind: delivered}
	}
	if _, _, err := r.apply(done, nil, nil, nil); err != nil {
		return 0, err
	}
	r.coord.held.drop(done)
	return len(rows), nil
}

// claimCycles times b.N claim-and-delete cycles of batch rows each and
// reports rows/s.
func claimCycles(b *testing.B, r *Relay, batch int) {
	ctx := context.Background()
	b.ReportAllocs()
	b.ResetTimer()
	start := time.Now()
	for range b.N {
		n, err := claimAndDelete(ctx, r)
		if err != nil {
			b.Fatal(err)
		}
		if n != batch {
			b.Fatalf("claimed %d rows, want %d", n, batch)
		}
	}
	b.ReportMetric(float64(b.N*batch)/time.Since(start).Seconds(), "rows/s")
}

// BenchmarkClaim is the relay's database cycle for one batch: claim (lease)
// and delete after the confirms. "1M-dead-and-retained" has a million rows
// in each of the dead-letter and published tables: the claim must not see
// them. "keys-10000" spreads the rows over 10,000 ordering keys: every
// candidate is checked for an earlier row of its key. "in-flight-3000"
// first leases the 3,000 oldest rows for an hour, as relays awaiting
// confirms would: every claim steps over them in the index.
func BenchmarkClaim(b *testing.B) {
	for _, c := range []struct {
		name                 string
		side, keys, inFlight int
	}{{"dead-and-retained-0", 0, 0, 0}, {"dead-and-retained-1000000", 1_000_000, 0, 0}, {"keys-10000", 0, 10_000, 0}, {"in-flight-3000", 0, 0, 3000}} {
		side := c.side
		b.Run(c.name, func(b *testing.B) {
			s := testenv.NewSchema(b)
			if side > 0 {
				for _, q := range []string{
					`INSERT INTO mailroom_outbox_dead (seq, id, exchange, routing_key, payload, created_at, attempts, last_error)
SELECT g, gen_random_uuid(), 'bench', 'k', '\x00', now(), 20, 'unroutable' FROM generate_series(1, $1) g`,
					`INSERT INTO mailroom_outbox_published (seq, id, exchange, routing_key, payload, created_at, attempts)
SELECT g, gen_random_uuid(), 'bench', 'k', '\x00', now(), 0 FROM generate_series(1, $1) g`,
				} {
					if _, err := s.DB.Exec(q, side); err != nil {
						b.Fatal(err)
					}
				}
			}
			fillOutbox(b, s, "mailroom_outbox", b.N*benchBatch+c.inFlight, c.keys)
			if c.inFlight > 0 {
				if _, err := s.DB.Exec(`UPDATE mailroom_outbox SET lease = gen_random_uuid(), leased_until = now() + interval '1 hour'
WHERE seq IN (SELECT seq FROM mailroom_outbox ORDER BY available_at LIMIT $1)`, c.inFlight); err != nil {
					b.Fatal(err)
				}
			}
			// Settle the bulk loads first (autovacuum of the new tables,
			// their dirty pages): the figure is the claim's, not theirs.
			if _, err := s.DB.Exec(`VACUUM ANALYZE mailroom_outbox_dead, mailroom_outbox_published`); err != nil {
				b.Fatal(err)
			}
			if _, err := s.DB.Exec(`CHECKPOINT`); err != nil {
				b.Fatal(err)
			}
			r, err := New(s.DB.DB, Config{URL: testenv.AMQPURL(), DisableListen: true, BatchSize: benchBatch})
			if err != nil {
				b.Fatal(err)
			}
			claimCycles(b, r, benchBatch)
		})
	}
}

// BenchmarkClaimCycle compares the claim of a relay publishing alone on
// its table (no claim lock, no lease) with the claim of relays taking
// turns (the claim lock and the leasing claim in one message), for full
// batches and for the small ones of a steady 5,000 events/s (about 30 rows
// a claim). The delete after the confirms is the same prepared statement
// in both.
func BenchmarkClaimCycle(b *testing.B) {
	for _, batch := range []int{30, benchBatch} {
		for _, alone := range []bool{true, false} {
			name := fmt.Sprintf("batch-%d/taking-turns", batch)
			if alone {
				name = fmt.Sprintf("batch-%d/alone", batch)
			}
			b.Run(name, func(b *testing.B) {
				s := testenv.NewSchema(b)
				fillOutbox(b, s, "mailroom_outbox", b.N*batch, 0)
				if _, err := s.DB.Exec(`CHECKPOINT`); err != nil {
					b.Fatal(err)
				}
				r, err := New(s.DB.DB, Config{URL: testenv.AMQPURL(), DatabaseURL: s.URL, BatchSize: batch, ConfirmWindow: benchBatch})
				if err != nil {
					b.Fatal(err)
				}
				r.coord.alone.Store(alone)
				defer r.stmts.close()
				claimCycles(b, r, batch)
			})
		}
	}
}

// BenchmarkPublishBatch publishes one batch on a confirm channel and waits
// for every confirm: the publisher's per-message cost and its held writes.
func BenchmarkPublishBatch(b *testing.B) {
	s := testenv.NewSchema(b)
	br := testenv.NewBroker(b)
	ex := br.Exchange()
	q := br.Queue(ex, "#", nil)
	r, err := New(s.DB.DB, Config{URL: br.URL, Name: testenv.Unique("bench"), DisableListen: true, BatchSize: benchBatch})
	if err != nil {
		b.Fatal(err)
	}
	outcomes := make(chan outcome, 4*r.cfg.ConfirmWindow)
	p := newPublisher(r, outcomes)
	defer p.close()
	ctx := context.Background()
	payload := []byte(`{"order_id":"0190c1b2-7c1e-7d3a-9f1e-5b2d3c4e5f60","amount_cents":1999}`)
	batch := make([]*row, benchBatch)
	purge := br.Channel()
	b.ReportAllocs()
	b.ResetTimer()
	start := time.Now()
	for i := range b.N {
		clock := &batchClock{claimed: time.Now()}
		for j := range batch {
			batch[j] = &row{seq: int64(i*benchBatch + j), id: fmt.Sprintf("m-%d-%d", i, j), exchange: ex, routingKey: "k",
				contentType: "application/json", payload: payload, createdAt: start, batch: clock}
		}
		for _, w := range batch {
			p.publish(ctx, w)
		}
		p.flush()
		for range batch {
			if o := <-outcomes; o.kind != delivered {
				b.Fatalf("outcome %v: %v", o.kind, o.err)
			}
		}
		if i%20 == 19 { // keep the queue short, as a consumer would
			if _, err := purge.QueuePurge(q, false); err != nil {
				b.Fatal(err)
			}
		}
	}
	b.ReportMetric(float64(b.N*benchBatch)/time.Since(start).Seconds(), "msgs/s")
}

// BenchmarkClaimTwoRelays is BenchmarkClaim's cycle run by two relays side
// by side on one table over 10,000 keys (or none): what a second relay costs
// the database, without the broker.
func BenchmarkClaimTwoRelays(b *testing.B) {
	for _, keys := range []int{0, 10_000} {
		b.Run(fmt.Sprintf("keys-%d", keys), func(b *testing.B) {
			s := testenv.NewSchema(b)
			fillOutbox(b, s, "mailroom_outbox", 2*b.N*benchBatch, keys)
			if _, err := s.DB.Exec(`CHECKPOINT`); err != nil {
				b.Fatal(err)
			}
			ctx := context.Background()
			b.ReportAllocs()
			b.ResetTimer()
			start := time.Now()
			var wg sync.WaitGroup
			var total atomic.Int64
			for range 2 {
				r, err := New(s.DB.DB, Config{URL: testenv.AMQPURL(), DisableListen: true, BatchSize: benchBatch})
				if err != nil {
					b.Fatal(err)
				}
				wg.Add(1)
				go func() {
					defer wg.Done()
					for {
						n, err := claimAndDelete(ctx, r)
						if err != nil {
							b.Error(err)
							return
						}
						if n == 0 {
							return
						}
						total.Add(int64(n))
					}
				}()
			}
			wg.Wait()
			if total.Load() != int64(2*b.N*benchBatch) {
				b.Fatalf("claimed %d rows, want %d", total.Load(), 2*b.N*benchBatch)
			}
			b.ReportMetric(float64(total.Load())/time.Since(start).Seconds(), "rows/s")
		})
	}
}
