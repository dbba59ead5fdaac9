package inbox_test

import (
	"fmt"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/mailroom-go/mailroom/inbox"
	"github.com/mailroom-go/mailroom/internal/testenv"
)

// BenchmarkConsume measures consumer throughput with deduplication and a
// handler that writes one row: 50,000 messages are queued (untimed), then
// the clock runs from Run's start until all are applied and acked. The
// connection pool keeps Concurrency + 1 idle connections, as the package
// doc advises. Reports msgs/s. Run it once per configuration:
//
//	go test -run '^$' -bench Consume -benchtime 1x ./inbox/
func BenchmarkConsume(b *testing.B) {
	n := 50_000
	if testing.Short() {
		n = 5_000
	}
	for _, tc := range []struct {
		name  string
		batch int
	}{{"tx-per-message", 1}, {"batch-32", 32}} {
		b.Run(tc.name, func(b *testing.B) {
			var total time.Duration
			for range b.N {
				b.StopTimer()
				e := newEnv(b, inbox.Topology{})
				msgs := make([]amqp.Publishing, n)
				for i := range msgs {
					msgs[i] = msg(fmt.Sprintf("bench-%06d", i), "", i)
				}
				e.publish(msgs...)
				cfg := e.config(record)
				cfg.Logger = nil
				cfg.BatchSize = tc.batch
				e.db.SetMaxIdleConns(inbox.DefaultConcurrency + 1)
				b.StartTimer()
				start := time.Now()
				c, stop := e.start(cfg)
				testenv.Eventually(b, 10*time.Minute, "all messages applied", func() bool { return c.Stats().Handled >= uint64(n) })
				total += time.Since(start)
				b.StopTimer()
				stop()
				if got := len(e.effects()); got != n {
					b.Fatalf("%d effects, want %d", got, n)
				}
			}
			b.ReportMetric(float64(n*b.N)/total.Seconds(), "msgs/s")
		})
	}
}
