package main

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	semconv "go.opentelemetry.io/otel/semconv/v1.39.0"

	"github.com/mailroom-go/mailroom/outbox"
	"github.com/mailroom-go/mailroom/relay"
)

// latencies pairs each message's start (commit, or publish for the broker
// alone) with its arrival at the consumer, whichever is noted first.
type latencies struct {
	mu    sync.Mutex
	first map[string]time.Time // noted on one side, awaiting the other
	lat   []time.Duration

	alsoArrived func(id string, t time.Time) // set before messages flow; see publishSplit
}

func newLatencies() *latencies { return &latencies{first: map[string]time.Time{}} }

// started notes that id was committed or published at t.
func (l *latencies) started(id string, t time.Time) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if got, ok := l.first[id]; ok { // the consumer was first
		l.lat = append(l.lat, got.Sub(t)) // ≤ 0: counts as immediate
		delete(l.first, id)
		return
	}
	l.first[id] = t
}

// arrived notes that the consumer got id at t.
func (l *latencies) arrived(id string, t time.Time) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.alsoArrived != nil {
		l.alsoArrived(id, t)
	}
	if s, ok := l.first[id]; ok {
		l.lat = append(l.lat, t.Sub(s))
		delete(l.first, id)
		return
	}
	l.first[id] = t
}

func (l *latencies) percentiles() (p50, p99 time.Duration, n int, err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.lat) == 0 {
		return 0, 0, 0, fmt.Errorf("no latency samples")
	}
	sort.Slice(l.lat, func(i, j int) bool { return l.lat[i] < l.lat[j] })
	return l.lat[len(l.lat)/2], l.lat[len(l.lat)*99/100], len(l.lat), nil
}

// paced calls send total times, once per tick of a rate/k per second
// ticker, on 16 goroutines (so a slow call does not hold up the pace), and
// returns the rate achieved in events per second.
func paced(rate, k, total int, send func() error) (achieved float64, err error) {
	tick := time.NewTicker(time.Second * time.Duration(k) / time.Duration(rate))
	defer tick.Stop()
	jobs := make(chan struct{}, 1024)
	var wg sync.WaitGroup
	var firstErr atomic.Value
	for c := 0; c < 16; c++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range jobs {
				if err := send(); err != nil {
					firstErr.CompareAndSwap(nil, err)
				}
			}
		}()
	}
	start := time.Now()
	for i := 0; i < total; i++ {
		<-tick.C
		jobs <- struct{}{}
	}
	close(jobs)
	wg.Wait()
	if err, _ := firstErr.Load().(error); err != nil {
		return 0, err
	}
	return float64(total*k) / time.Since(start).Seconds(), nil
}

// measureLatency runs one latency figure on a fresh world whose consumer
// notes each arrival: prepare returns what sends k messages (noting when
// each started), which runs perTx(rate) messages at a time at rate; the
// percentiles are taken once the consumer has every message. cleanup runs
// before the world stops.
func measureLatency(rate int, prepare func(w *world, l *latencies) (send func(k int) error, cleanup func(), err error)) (f latencyFigure, err error) {
	return measureLatencyOf(rate, perTx(rate), prepare)
}

// measureLatencyOf is measureLatency with k messages a transaction.
func measureLatencyOf(rate, k int, prepare func(w *world, l *latencies) (send func(k int) error, cleanup func(), err error)) (f latencyFigure, err error) {
	w, err := setup()
	if err != nil {
		return f, err
	}
	defer w.stop()
	l := newLatencies()
	w.onMsg = func(d amqp.Delivery) { l.arrived(d.MessageId, time.Now()) }
	send, cleanup, err := prepare(w, l)
	if err != nil {
		return f, err
	}
	defer cleanup()
	total := int(float64(rate)*duration.Seconds()) / k
	before, start := readCPU(), time.Now()
	if f.achieved, err = paced(rate, k, total, func() error { return send(k) }); err != nil {
		return f, err
	}
	if err := w.waitReceived(int64(total*k), time.Minute); err != nil {
		return f, err
	}
	f.cpu, f.elapsed = readCPU().since(before), time.Since(start)
	f.p50, f.p99, f.n, err = l.percentiles()
	return f, err
}

// latencyFigure is one latency measurement, with the CPU the machine spent
// meanwhile: near two cores busy, every process queues for a core and the
// tail grows.
type latencyFigure struct {
	p50, p99 time.Duration
	n        int
	achieved float64
	cpu      cpuUse
	elapsed  time.Duration
}

func (f latencyFigure) print(rate int, unit, per, what string) {
	fmt.Printf("latency  %5d %s target (%.0f achieved, %d %s, %d per %s), %s:  p50 %6.2f ms  p99 %6.2f ms\n", rate, unit, f.achieved, f.n, strings.TrimSuffix(unit, "/s"), perTx(rate), per, what, ms(f.p50), ms(f.p99))
	c := func(d time.Duration) float64 { return d.Seconds() / f.elapsed.Seconds() }
	fmt.Printf("         cores busy: PostgreSQL %.2f, RabbitMQ %.2f, bench process %.2f (of 2)\n", c(f.cpu.postgres), c(f.cpu.rabbitmq), c(f.cpu.self))
}

var latencyBody = []byte(`{"order_id":"0190c1b2-7c1e-7d3a-9f1e-5b2d3c4e5f60","amount_cents":1999}`)

// benchLatency: commit→consumer latency at a steady event rate (NOTIFY on,
// the default), measured from each transaction's commit to the consumer.
// Writers commit perTx(rate) events per transaction.
func benchLatency(rate int) (latencyFigure, error) {
	return measureLatency(rate, func(w *world, l *latencies) (func(int) error, func(), error) {
		var split *publishSplit
		r, err := newRelay(w, "bench", func(c *relay.Config) {
			if *splitFlag {
				split = newPublishSplit(l)
				c.TracerProvider = sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(split))
			}
		})
		if err != nil {
			return nil, nil, err
		}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- r.Run(ctx) }()
		ob, _ := outbox.New(outbox.Config{})
		send := func(k int) error {
			msgs, err := w.writeEvents(ob, k)
			if err != nil {
				return err
			}
			now := time.Now()
			for _, m := range msgs {
				l.started(m.ID, now)
				if split != nil {
					split.toPublish.started(m.ID, now)
				}
			}
			return nil
		}
		return send, func() {
			cancel()
			<-done // every publish span has ended
			if split != nil {
				split.print(rate)
			}
		}, nil
	})
}

// writeEvents commits k events to the outbox in one transaction, as the
// latency figure's writers do, and returns them.
func (w *world) writeEvents(ob *outbox.Outbox, k int) ([]outbox.Message, error) {
	msgs := make([]outbox.Message, k)
	for i := range msgs {
		msgs[i] = outbox.Message{ID: outbox.NewID(), Exchange: w.exchange, RoutingKey: "k", Payload: latencyBody}
	}
	tx, err := w.db.Begin()
	if err != nil {
		return nil, err
	}
	defer tx.Rollback()
	if err := ob.Add(context.Background(), tx, msgs...); err != nil {
		return nil, err
	}
	return msgs, tx.Commit()
}

// publishSplit splits commit→consumer at each message's publish: the start
// of its producer span, when the relay's publisher takes the row (before it
// waits for a window slot). commit→publish is the relay's claim and its
// wait for the window; publish→consumer is the broker's and the
// consumer's. The spans cost the relay some CPU: the split figures come
// from a run of their own (-split), not from the one the targets use.
type publishSplit struct {
	toPublish, toConsumer *latencies
}

func newPublishSplit(l *latencies) *publishSplit {
	s := &publishSplit{toPublish: newLatencies(), toConsumer: newLatencies()}
	l.mu.Lock()
	l.alsoArrived = s.toConsumer.arrived
	l.mu.Unlock()
	return s
}

func (s *publishSplit) OnEnd(span sdktrace.ReadOnlySpan) {
	for _, a := range span.Attributes() {
		if a.Key == semconv.MessagingMessageIDKey {
			s.toPublish.arrived(a.Value.AsString(), span.StartTime())
			s.toConsumer.started(a.Value.AsString(), span.StartTime())
		}
	}
}

func (*publishSplit) OnStart(context.Context, sdktrace.ReadWriteSpan) {}
func (*publishSplit) Shutdown(context.Context) error                  { return nil }
func (*publishSplit) ForceFlush(context.Context) error                { return nil }

func (s *publishSplit) print(rate int) {
	p50a, p99a, _, errA := s.toPublish.percentiles()
	p50b, p99b, _, errB := s.toConsumer.percentiles()
	if errA != nil || errB != nil {
		fmt.Printf("latency  %5d events/s split at the publish: no samples\n", rate)
		return
	}
	fmt.Printf("latency  %5d events/s split at the publish: commit→publish p50 %6.2f ms p99 %6.2f ms; publish→consumer p50 %6.2f ms p99 %6.2f ms\n",
		rate, ms(p50a), ms(p99a), ms(p50b), ms(p99b))
}

// benchBrokerLatency is the yardstick for benchLatency: RabbitMQ alone,
// publish→consumer at the same rate and pace (perTx(rate) persistent
// messages per tick on one confirm-mode channel, confirms not awaited), to
// the same queue and consumer. With dbLoad, each tick also commits its
// messages to the outbox first, as benchLatency's writers do, with no
// relay reading them: the broker then shares the machine with the same
// database work.
func benchBrokerLatency(rate int, dbLoad bool) (latencyFigure, error) {
	return measureLatency(rate, func(w *world, l *latencies) (func(int) error, func(), error) {
		ch, err := w.conn.Channel()
		if err != nil {
			return nil, nil, err
		}
		if err := ch.Confirm(false); err != nil {
			ch.Close()
			return nil, nil, err
		}
		confirms := ch.NotifyPublish(make(chan amqp.Confirmation, 1024))
		go func() {
			for range confirms { // keep the channel's confirm delivery flowing
			}
		}()
		var mu sync.Mutex // one channel: publishes in turn
		ob, _ := outbox.New(outbox.Config{})
		send := func(k int) error {
			if dbLoad {
				if _, err := w.writeEvents(ob, k); err != nil {
					return err
				}
			}
			mu.Lock()
			defer mu.Unlock()
			for i := 0; i < k; i++ {
				id := outbox.NewID()
				l.started(id, time.Now())
				if err := ch.PublishWithContext(context.Background(), w.exchange, "k", true, false, amqp.Publishing{MessageId: id, DeliveryMode: amqp.Persistent, Body: latencyBody}); err != nil {
					return err
				}
			}
			return nil
		}
		return send, func() { ch.Close() }, nil
	})
}
