package pipeline_test

import (
	"context"
	"database/sql"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jmoiron/sqlx"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/propagation"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"
	"go.uber.org/goleak"

	"github.com/mailroom-go/mailroom"
	"github.com/mailroom-go/mailroom/inbox"
	"github.com/mailroom-go/mailroom/internal/telemetry"
	"github.com/mailroom-go/mailroom/internal/testenv"
	"github.com/mailroom-go/mailroom/outbox"
	"github.com/mailroom-go/mailroom/relay"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m, goleak.IgnoreTopFunction("database/sql.(*DB).connectionOpener"))
}

const wait = 60 * time.Second

// pipeline is one test's outbox, relay and inbox on its own schema,
// exchange and queues.
type pipeline struct {
	t     *testing.T
	logs  *logSink
	s     *testenv.Schema
	b     *testenv.Broker
	ex    string
	queue string
	ob    *outbox.Outbox
}

func newPipeline(t *testing.T, bindingKeys ...string) *pipeline {
	t.Helper()
	s := testenv.NewSchema(t)
	b := testenv.NewBroker(t)
	p := &pipeline{t: t, s: s, b: b, ex: testenv.Unique("ex"), queue: testenv.Unique("q"), logs: &logSink{t: t}}
	b.CleanupExchanges(p.ex, inbox.DeadLetterExchangeName(p.queue))
	b.CleanupQueues(p.queue, inbox.RetryQueueName(p.queue), inbox.DeadLetterQueueName(p.queue))
	if err := inbox.DeclareTopology(b.Channel(), inbox.Topology{Queue: p.queue, Exchange: p.ex, BindingKeys: bindingKeys, Classic: true}); err != nil {
		t.Fatal(err)
	}
	ob, err := outbox.New(outbox.Config{Propagator: propagation.TraceContext{}})
	if err != nil {
		t.Fatal(err)
	}
	p.ob = ob
	return p
}

// add writes msgs in one transaction under ctx.
func (p *pipeline) add(ctx context.Context, msgs ...outbox.Message) {
	p.t.Helper()
	tx, err := p.s.DB.BeginTx(ctx, nil)
	if err != nil {
		p.t.Fatal(err)
	}
	if err := p.ob.Add(ctx, tx, msgs...); err != nil {
		p.t.Fatal(err)
	}
	if err := tx.Commit(); err != nil {
		p.t.Fatal(err)
	}
}

// runRelay runs a relay until the test ends.
func (p *pipeline) runRelay(cfg relay.Config) *relay.Relay {
	p.t.Helper()
	db, err := sql.Open("postgres", p.s.URL)
	if err != nil {
		p.t.Fatal(err)
	}
	cfg.URL, cfg.DisableListen, cfg.PollInterval = p.b.URL, true, 20*time.Millisecond
	cfg.Name, cfg.Logger = testenv.Unique("relay"), slog.New(&logHandler{sink: p.logs})
	r, err := relay.New(db, cfg)
	if err != nil {
		p.t.Fatal(err)
	}
	p.background(r.Run)
	p.t.Cleanup(func() { db.Close() }) // after Run returned (cleanups run last-in first-out)
	return r
}

// runInbox runs a consumer until the test ends.
func (p *pipeline) runInbox(cfg inbox.Config) *inbox.Consumer {
	p.t.Helper()
	cfg.URL, cfg.Queue, cfg.Consumer = testenv.AMQPURL(), p.queue, "telemetry-test"
	cfg.ConnectionName, cfg.Logger = testenv.Unique("inbox"), slog.New(&logHandler{sink: p.logs})
	cfg.MinBackoff, cfg.MaxBackoff = 10*time.Millisecond, 50*time.Millisecond
	c, err := inbox.New(p.s.DB, cfg)
	if err != nil {
		p.t.Fatal(err)
	}
	p.background(c.Run)
	return c
}

// background runs run until the test ends and checks it returns nil.
func (p *pipeline) background(run func(context.Context) error) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- run(ctx) }()
	p.t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				p.t.Errorf("Run returned %v, want nil", err)
			}
		case <-time.After(wait):
			p.t.Errorf("Run did not return within %s of cancel", wait)
		}
	})
}

// The trace started before outbox.Add continues through a real relay and a
// real broker into the handler: publish span child of the writer's span,
// consumer span child of the publish span, handler ctx in the consumer span.
func TestTraceFromAddToHandler(t *testing.T) {
	t.Parallel()
	p := newPipeline(t)
	rec := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(rec))
	t.Cleanup(func() { _ = tp.Shutdown(context.Background()) })
	prop := propagation.TraceContext{}

	ctx, root := tp.Tracer("test").Start(context.Background(), "POST /orders")
	p.add(ctx, outbox.Message{Exchange: p.ex, RoutingKey: "order.placed", Type: "order.placed", Payload: []byte(`{}`),
		Headers: map[string]string{"tenant": "acme"}})
	root.End()

	p.runRelay(relay.Config{TracerProvider: tp, Propagator: prop})
	got := make(chan trace.SpanContext, 1)
	p.runInbox(inbox.Config{TracerProvider: tp, Propagator: prop, Handler: func(ctx context.Context, _ *sqlx.Tx, m inbox.Message) error {
		if m.Headers["tenant"] != "acme" {
			t.Errorf("headers %v: the user's header is missing", m.Headers)
		}
		got <- trace.SpanContextFromContext(ctx)
		return nil
	}})
	var hsc trace.SpanContext
	select {
	case hsc = <-got:
	case <-time.After(wait):
		t.Fatal("handler not called")
	}
	if hsc.TraceID() != root.SpanContext().TraceID() {
		t.Fatalf("handler trace id %s, want the writer's %s", hsc.TraceID(), root.SpanContext().TraceID())
	}
	var publish, process sdktrace.ReadOnlySpan
	testenv.Eventually(t, wait, "publish and process spans ended", func() bool {
		for _, s := range rec.Ended() {
			switch {
			case s.SpanKind() == trace.SpanKindProducer:
				publish = s
			case s.SpanKind() == trace.SpanKindConsumer:
				process = s
			}
		}
		return publish != nil && process != nil
	})
	if publish.Name() != "publish "+p.ex || publish.Parent().SpanID() != root.SpanContext().SpanID() {
		t.Errorf("publish span %q with parent %s; want %q, child of the writer's span %s", publish.Name(), publish.Parent().SpanID(), "publish "+p.ex, root.SpanContext().SpanID())
	}
	if !publish.Parent().IsRemote() {
		t.Errorf("publish span's parent is not the remote (propagated) context")
	}
	if process.Name() != "process "+p.queue || process.Parent().SpanID() != publish.SpanContext().SpanID() || !process.Parent().IsRemote() {
		t.Errorf("process span %q with parent %s (remote %v); want %q, child of the propagated publish span %s",
			process.Name(), process.Parent().SpanID(), process.Parent().IsRemote(), "process "+p.queue, publish.SpanContext().SpanID())
	}
	if process.SpanContext().SpanID() != hsc.SpanID() {
		t.Errorf("handler runs in span %s, want the process span %s", hsc.SpanID(), process.SpanContext().SpanID())
	}
	wantAttrs := map[attribute.Key]string{
		"messaging.system": "rabbitmq", "messaging.destination.name": p.ex,
		"messaging.rabbitmq.destination.routing_key": "order.placed", "messaging.operation.type": "send",
	}
	for k, v := range wantAttrs {
		if got := attr(publish.Attributes(), k); got != v {
			t.Errorf("publish span %s = %q, want %q", k, got, v)
		}
	}
	if id := attr(publish.Attributes(), "messaging.message.id"); id == "" || id != attr(process.Attributes(), "messaging.message.id") {
		t.Errorf("message id on publish %q and process %q spans: want the same, non-empty", id, attr(process.Attributes(), "messaging.message.id"))
	}
	if got := attr(process.Attributes(), "messaging.operation.type"); got != "process" {
		t.Errorf("process span messaging.operation.type = %q", got)
	}
}

// In a batched transaction each handler call runs in its own message's
// trace, and the batch span links every message's context.
func TestTraceBatchLinksEveryMessage(t *testing.T) {
	t.Parallel()
	p := newPipeline(t)
	rec := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(rec))
	t.Cleanup(func() { _ = tp.Shutdown(context.Background()) })
	prop := propagation.TraceContext{}

	const n = 20
	roots := map[trace.TraceID]bool{}
	for i := range n {
		ctx, root := tp.Tracer("test").Start(context.Background(), fmt.Sprintf("request %d", i))
		p.add(ctx, outbox.Message{Exchange: p.ex, RoutingKey: "k", Payload: []byte(`{}`)})
		root.End()
		roots[root.SpanContext().TraceID()] = true
	}
	var mu sync.Mutex
	seen := map[trace.TraceID]bool{}
	// The consumer starts only once all n messages are queued, so its one
	// worker finds them waiting and takes them as one batch.
	r := p.runRelay(relay.Config{TracerProvider: tp, Propagator: prop})
	testenv.Eventually(t, wait, "all published", func() bool { return r.Stats().Published == n })
	p.runInbox(inbox.Config{TracerProvider: tp, Propagator: prop, Concurrency: 1, BatchSize: n, Handler: func(ctx context.Context, _ *sqlx.Tx, _ inbox.Message) error {
		mu.Lock()
		defer mu.Unlock()
		seen[trace.SpanContextFromContext(ctx).TraceID()] = true
		return nil
	}})
	testenv.Eventually(t, wait, "all handled", func() bool { mu.Lock(); defer mu.Unlock(); return len(seen) == n })
	for id := range seen {
		if !roots[id] {
			t.Errorf("a handler ran in trace %s, which is none of the writers' traces", id)
		}
	}
	// Deliveries reach the worker one by one, so the first may run alone;
	// the rest are waiting by then. Every message is either linked from a
	// batch span or ran alone, and each batch span links all its messages.
	covered := map[trace.TraceID]bool{}
	batches := 0
	testenv.Eventually(t, wait, "every message's trace covered by an ended consumer span", func() bool {
		clear(covered)
		batches = 0
		for _, s := range rec.Ended() {
			if s.SpanKind() != trace.SpanKindConsumer {
				continue
			}
			size := attr(s.Attributes(), "messaging.batch.message_count")
			switch {
			case size != "":
				batches++
				if fmt.Sprint(len(s.Links())) != size {
					t.Fatalf("batch span of %s messages has %d links", size, len(s.Links()))
				}
				for _, l := range s.Links() {
					covered[l.SpanContext.TraceID()] = true
				}
			case len(s.Links()) == 0: // a message handled alone
				covered[s.SpanContext().TraceID()] = true
			}
		}
		return len(covered) == n
	})
	for id := range covered {
		if !roots[id] {
			t.Errorf("consumer span linked to trace %s, none of the writers'", id)
		}
	}
	if batches == 0 {
		t.Errorf("no batched transaction ran (%d messages, BatchSize %d)", n, n)
	}
}

// After a run with duplicates, retries and dead letters on both sides, the
// metrics read through a manual reader show the expected counts and agree
// with Stats.
func TestMetricsAfterDuplicatesRetriesAndDeadLetters(t *testing.T) {
	t.Parallel()
	p := newPipeline(t, "ok")
	reader := sdkmetric.NewManualReader()
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
	t.Cleanup(func() { _ = mp.Shutdown(context.Background()) })

	ok := func(id string) outbox.Message {
		return outbox.Message{ID: id, Exchange: p.ex, RoutingKey: "ok", Payload: []byte(`{}`)}
	}
	a, b, c, flaky, poison := outbox.NewID(), outbox.NewID(), outbox.NewID(), outbox.NewID(), outbox.NewID()
	p.add(context.Background(),
		ok(a), ok(a), // a duplicate the relay publishes twice
		ok(b), ok(b),
		ok(c), ok(flaky), ok(poison),
		outbox.Message{Exchange: p.ex, RoutingKey: "nowhere", Payload: []byte(`{}`)},                 // unroutable
		outbox.Message{Exchange: testenv.Unique("missing"), RoutingKey: "ok", Payload: []byte(`{}`)}, // no exchange
	)
	r := p.runRelay(relay.Config{MeterProvider: mp, MaxAttempts: 2, MinBackoff: time.Millisecond, MaxBackoff: 5 * time.Millisecond})
	var mu sync.Mutex
	calls := map[string]int{}
	in := p.runInbox(inbox.Config{MeterProvider: mp, MaxAttempts: 2, Handler: func(_ context.Context, _ *sqlx.Tx, m inbox.Message) error {
		mu.Lock()
		defer mu.Unlock()
		calls[m.ID]++
		switch {
		case m.ID == poison, m.ID == flaky && calls[m.ID] == 1:
			return fmt.Errorf("attempt %d fails", m.Attempt)
		}
		return nil
	}})
	testenv.Eventually(t, wait, "relay done: 7 published, 2 dead-lettered", func() bool {
		s := r.Stats()
		return s.Published == 7 && s.DeadLettered == 2
	})
	testenv.Eventually(t, wait, "inbox done: 4 processed, 2 duplicates, 1 dead letter", func() bool {
		s := in.Stats()
		return s.Handled == 4 && s.Duplicates == 2 && s.DeadLettered == 1
	})

	m := collect(t, reader)
	rs, is := r.Stats(), in.Stats()
	for _, c := range []struct {
		name  string
		attrs []attribute.KeyValue
		want  int64
	}{
		{telemetry.RelayPublished, nil, 7},
		{telemetry.RelayPublishFailures, []attribute.KeyValue{telemetry.AttrReason.String("unroutable")}, 2},
		{telemetry.RelayPublishFailures, []attribute.KeyValue{telemetry.AttrReason.String("no_exchange")}, 2},
		{telemetry.RelayPublishFailures, []attribute.KeyValue{telemetry.AttrReason.String("nack")}, 0},
		{telemetry.RelayDeadLettered, nil, 2},
		{telemetry.RelayReleased, nil, rs.Released},
		{telemetry.RelayConfirmWindow, nil, 1024}, // the default, one relay
		{telemetry.RelayStandby, nil, 0},          // the only relay publishes
		{telemetry.RelayHeld, nil, 0},             // nothing left to publish
		{telemetry.InboxProcessed, nil, 4},
		{telemetry.InboxDuplicates, nil, 2},
		{telemetry.InboxFailures, nil, 3}, // flaky once, poison twice
		{telemetry.InboxRetries, nil, 2},  // flaky and poison once each
		{telemetry.InboxDeadLettered, nil, 1},
		{telemetry.InboxRequeued, nil, int64(is.Requeued)},
	} {
		if got := m.sum(t, c.name, c.attrs...); got != c.want {
			t.Errorf("%s%v = %d, want %d", c.name, c.attrs, got, c.want)
		}
	}
	if rs.Failed != 4 || is.Failed != 3 || is.Retried != 2 {
		t.Errorf("Stats disagree with the metrics: relay %+v, inbox %+v", rs, is)
	}
	if got := m.sum(t, telemetry.RelayPublished, telemetry.AttrTable.String("mailroom_outbox")); got != 7 {
		t.Errorf("published{table=mailroom_outbox} = %d, want 7", got)
	}
	if got := m.sum(t, telemetry.InboxProcessed, telemetry.AttrConsumer.String("telemetry-test"), telemetry.AttrQueue.String(p.queue)); got != 4 {
		t.Errorf("processed{consumer,queue} = %d, want 4", got)
	}
	// 7 acks and 2 returns (a returned message is acked too) were confirmed.
	if got := m.count(t, telemetry.RelayConfirmDuration); got != 9 {
		t.Errorf("confirm latency observations = %d, want 9", got)
	}
	if m.count(t, telemetry.RelayBatchDuration) < 1 || m.count(t, telemetry.RelayClaimDuration) < 1 {
		t.Errorf("no batch or claim duration recorded")
	}
	// Handler calls: a, b, c, flaky twice, poison twice.
	if ok, bad := m.count(t, telemetry.InboxHandlerDuration, telemetry.AttrResult.String("ok")), m.count(t, telemetry.InboxHandlerDuration, telemetry.AttrResult.String("error")); ok != 4 || bad != 3 {
		t.Errorf("handler duration observations ok=%d error=%d, want 4 and 3", ok, bad)
	}
	// Everything left the outbox (published or dead-lettered).
	if got := m.sum(t, telemetry.OutboxPending); got != 0 {
		t.Errorf("pending = %d, want 0", got)
	}

	// The failures were logged with the shared keys.
	recs := p.logs.all()
	checkLogs(t, recs)
	want := map[string]bool{} // message id → logged as failing
	for _, r := range recs {
		if r.level >= slog.LevelWarn && r.attrs["message_id"] != "" {
			want[r.attrs["message_id"]] = true
			if r.attrs["consumer"] == "" && r.attrs["relay"] == "" {
				t.Errorf("log %q about a message names neither the consumer nor the relay: %v", r.msg, r.attrs)
			}
		}
	}
	if !want[flaky] || !want[poison] {
		t.Errorf("the flaky and poison messages' failures are not logged with message_id (logged: %v)", want)
	}
	for _, id := range []string{a, b, c} {
		if want[id] {
			t.Errorf("message %s succeeded but was logged at Warn or above", id)
		}
	}
}

// The pending gauge counts every row; the lag ignores rows scheduled for
// later and reports the oldest row that is retrying.
func TestBacklogGauges(t *testing.T) {
	t.Parallel()
	p := newPipeline(t)
	reader := sdkmetric.NewManualReader()
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
	t.Cleanup(func() { _ = mp.Shutdown(context.Background()) })
	later := time.Now().Add(time.Hour)
	p.add(context.Background(),
		outbox.Message{Exchange: p.ex, RoutingKey: "k", Payload: []byte(`{}`), AvailableAt: later},
		outbox.Message{Exchange: p.ex, RoutingKey: "k", Payload: []byte(`{}`), AvailableAt: later},
	)
	start := time.Now()
	p.add(context.Background(), outbox.Message{Exchange: testenv.Unique("missing"), RoutingKey: "k", Payload: []byte(`{}`)})
	// The missing exchange fails once, then backs off for an hour.
	r := p.runRelay(relay.Config{MeterProvider: mp, MinBackoff: time.Hour, MaxBackoff: time.Hour, BacklogInterval: time.Millisecond})
	testenv.Eventually(t, wait, "one failed attempt", func() bool { return r.Stats().Failed == 1 })
	var pending int64
	var lag float64
	testenv.Eventually(t, wait, "the gauges report the three rows", func() bool {
		m := collect(t, reader)
		pending, lag = m.sum(t, telemetry.OutboxPending), m.gauge(t, telemetry.OutboxOldestPendingAge)
		return pending == 3
	})
	if max := time.Since(start).Seconds() + 1; lag <= 0 || lag > max {
		t.Errorf("lag %.3fs, want the age of the retrying row: above 0 and at most %.3fs (the scheduled rows are not lag)", lag, max)
	}
	db, err := sql.Open("postgres", p.s.URL)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	st, err := relay.Status(context.Background(), db, mailroom.Tables{})
	if err != nil || st.Pending != 3 || st.OldestPendingAge <= 0 {
		t.Errorf("Status = %+v, %v; want what the gauges say: 3 pending, a positive lag", st, err)
	}
}

func attr(kvs []attribute.KeyValue, k attribute.Key) string {
	for _, kv := range kvs {
		if kv.Key == k {
			return kv.Value.Emit()
		}
	}
	return ""
}

// metrics is one collection.
type metrics struct{ rm metricdata.ResourceMetrics }

func collect(t *testing.T, r *sdkmetric.ManualReader) metrics {
	t.Helper()
	var m metrics
	if err := r.Collect(context.Background(), &m.rm); err != nil {
		t.Fatal(err)
	}
	return m
}

func (m metrics) find(t *testing.T, name string) metricdata.Aggregation {
	t.Helper()
	for _, sm := range m.rm.ScopeMetrics {
		for _, x := range sm.Metrics {
			if x.Name == name {
				return x.Data
			}
		}
	}
	t.Fatalf("metric %s not collected", name)
	return nil
}

func matches(set attribute.Set, want []attribute.KeyValue) bool {
	for _, kv := range want {
		if v, ok := set.Value(kv.Key); !ok || v != kv.Value {
			return false
		}
	}
	return true
}

// sum adds the points of a counter or int gauge whose attributes include attrs.
func (m metrics) sum(t *testing.T, name string, attrs ...attribute.KeyValue) int64 {
	t.Helper()
	var n int64
	switch d := m.find(t, name).(type) {
	case metricdata.Sum[int64]:
		for _, p := range d.DataPoints {
			if matches(p.Attributes, attrs) {
				n += p.Value
			}
		}
	case metricdata.Gauge[int64]:
		for _, p := range d.DataPoints {
			if matches(p.Attributes, attrs) {
				n += p.Value
			}
		}
	default:
		t.Fatalf("%s is a %T", name, d)
	}
	return n
}

func (m metrics) gauge(t *testing.T, name string) float64 {
	t.Helper()
	d, ok := m.find(t, name).(metricdata.Gauge[float64])
	if !ok || len(d.DataPoints) != 1 {
		t.Fatalf("%s: %#v, want one float gauge point", name, d)
	}
	return d.DataPoints[0].Value
}

// count is the number of observations of a histogram.
func (m metrics) count(t *testing.T, name string, attrs ...attribute.KeyValue) uint64 {
	t.Helper()
	d, ok := m.find(t, name).(metricdata.Histogram[float64])
	if !ok {
		t.Fatalf("%s is not a float histogram", name)
	}
	var n uint64
	for _, p := range d.DataPoints {
		if matches(p.Attributes, attrs) {
			n += p.Count
		}
	}
	return n
}

// logSink keeps the relay's and the inbox's log records (and shows them
// with t.Log) so tests can check their keys.
type logSink struct {
	t       *testing.T
	mu      sync.Mutex
	records []logRecord
}

type logRecord struct {
	level slog.Level
	msg   string
	attrs map[string]string
}

func (s *logSink) all() []logRecord {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]logRecord(nil), s.records...)
}

type logHandler struct {
	sink  *logSink
	attrs []slog.Attr
}

func (h *logHandler) Enabled(context.Context, slog.Level) bool { return true }
func (h *logHandler) Handle(_ context.Context, r slog.Record) error {
	rec := logRecord{level: r.Level, msg: r.Message, attrs: map[string]string{}}
	for _, a := range h.attrs {
		rec.attrs[a.Key] = a.Value.String()
	}
	r.Attrs(func(a slog.Attr) bool { rec.attrs[a.Key] = a.Value.String(); return true })
	h.sink.mu.Lock()
	h.sink.records = append(h.sink.records, rec)
	h.sink.mu.Unlock()
	func() {
		defer func() { _ = recover() }() // a log line after the test ended
		h.sink.t.Log(rec.level, rec.msg, rec.attrs)
	}()
	return nil
}
func (h *logHandler) WithAttrs(as []slog.Attr) slog.Handler {
	return &logHandler{sink: h.sink, attrs: append(append([]slog.Attr{}, h.attrs...), as...)}
}
func (h *logHandler) WithGroup(string) slog.Handler { return h }

// checkLogs asserts the house rules on every record: the shared keys
// (message_id, not id; error, not err), nothing about a single message at
// Info or below Warn unless Debug, and no password.
func checkLogs(t *testing.T, recs []logRecord) {
	t.Helper()
	for _, r := range recs {
		for _, bad := range []string{"id", "err", "wait"} {
			if _, ok := r.attrs[bad]; ok {
				t.Errorf("log %q uses key %q; the shared keys are message_id, error, retry_in", r.msg, bad)
			}
		}
		if _, ok := r.attrs["message_id"]; ok && r.level == slog.LevelInfo {
			t.Errorf("log %q: a line about one message at Info", r.msg)
		}
		for k, v := range r.attrs {
			if strings.Contains(v, ":guest@") {
				t.Errorf("log %q: %s contains the broker password: %s", r.msg, k, v)
			}
		}
	}
}
