package relay

import (
	"context"
	"fmt"
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

// fillOutbox writes n due rows in one statement (benchmark setup only).
func fillOutbox(b *testing.B, s *testenv.Schema, table string, n int) {
	b.Helper()
	_, err := s.DB.Exec(`INSERT INTO `+table+` (id, exchange, routing_key, payload)
SELECT gen_random_uuid(), 'bench', 'k', convert_to('{"order_id":"0190c1b2-7c1e-7d3a-9f1e-5b2d3c4e5f60","amount_cents":1999}', 'UTF8')
FROM generate_series(1, $1)`, n)
	if err == nil {
		_, err = s.DB.Exec(`VACUUM ANALYZE ` + table)
	}
	if err != nil {
		b.Fatal(err)
	}
}

// BenchmarkClaim is the relay's database cycle for one batch: claim (lease)
// and delete after the confirms. "1M-dead-and-retained" has a million rows
// in each of the dead-letter and published tables: the claim must not see
// them.
func BenchmarkClaim(b *testing.B) {
	for _, side := range []int{0, 1_000_000} {
		b.Run(fmt.Sprintf("dead-and-retained-%d", side), func(b *testing.B) {
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
			fillOutbox(b, s, "mailroom_outbox", b.N*benchBatch)
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
			ctx := context.Background()
			b.ReportAllocs()
			b.ResetTimer()
			start := time.Now()
			for range b.N {
				rows, err := r.claim(ctx)
				if err != nil {
					b.Fatal(err)
				}
				if len(rows) != benchBatch {
					b.Fatalf("claimed %d rows, want %d", len(rows), benchBatch)
				}
				done := make([]outcome, len(rows))
				for i, w := range rows {
					done[i] = outcome{row: w, kind: delivered}
				}
				if err := r.apply(done, nil, nil, nil); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(b.N*benchBatch)/time.Since(start).Seconds(), "rows/s")
		})
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
		for j := range batch {
			batch[j] = &row{seq: int64(i*benchBatch + j), id: fmt.Sprintf("m-%d-%d", i, j), exchange: ex, routingKey: "k",
				contentType: "application/json", payload: payload, createdAt: start}
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
