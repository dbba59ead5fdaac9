package relay

import (
	"cmp"
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/propagation"
	semconv "go.opentelemetry.io/otel/semconv/v1.39.0"
	"go.opentelemetry.io/otel/trace"

	"github.com/mailroom-go/mailroom/internal/amqpx"
	"github.com/mailroom-go/mailroom/internal/telemetry"
)

// reason is why a publish failed; it labels the publish failures metric.
type reason uint8

const (
	noReason reason = iota
	reasonNack
	reasonUnroutable
	reasonNoExchange
	reasonTimeout
	reasonChannelClosed
	reasonUnpublishable
	numReasons
)

var reasonNames = [numReasons]string{"", telemetry.ReasonNack, telemetry.ReasonUnroutable, telemetry.ReasonNoExchange, telemetry.ReasonTimeout, telemetry.ReasonChannelClosed, telemetry.ReasonUnpublishable}

// counters are the relay's counts: Stats reads them, and the metric
// callbacks observe the same values, so the two cannot drift.
type counters struct {
	published, dead, released atomic.Int64
	failures                  [numReasons]atomic.Int64
	lastProgress              atomic.Int64 // unix nanos of the last successful claim
}

// failed is the number of failed attempts: the failures that count
// against MaxAttempts.
func (c *counters) failed() int64 {
	return c.failures[reasonNack].Load() + c.failures[reasonUnroutable].Load() + c.failures[reasonNoExchange].Load() + c.failures[reasonUnpublishable].Load()
}

// telemetry holds the relay's tracer and instruments. Counters are
// observable (read from counters at collection time), so the hot path
// pays nothing for them; histograms record with a precomputed attribute
// set.
type instruments struct {
	tracer     telemetry.Tracing
	propagator propagation.TextMapPropagator // nil: global, resolved per use
	spanStart  []trace.SpanStartOption
	meter      metric.Meter
	attrs      attribute.Set
	record     []metric.RecordOption // metric.WithAttributeSet(attrs)

	confirm, batch, claim metric.Float64Histogram
}

func newInstruments(cfg *Config, nodes *amqpx.Nodes, table string) (*instruments, error) {
	t := &instruments{
		tracer:     telemetry.NewTracing(cfg.TracerProvider, telemetry.ScopeRelay),
		propagator: cfg.Propagator,
		spanStart: []trace.SpanStartOption{trace.WithSpanKind(trace.SpanKindProducer), trace.WithAttributes(append([]attribute.KeyValue{
			semconv.MessagingSystemRabbitMQ, semconv.MessagingOperationTypeSend, semconv.MessagingOperationName("publish")},
			telemetry.ServerAttrs(nodes.Single())...)...)},
		meter: telemetry.MeterProvider(cfg.MeterProvider).Meter(telemetry.ScopeRelay),
		attrs: attribute.NewSet(telemetry.AttrTable.String(table)),
	}
	t.record = []metric.RecordOption{metric.WithAttributeSet(t.attrs)}
	hist := func(name, desc string) (metric.Float64Histogram, error) {
		h, err := t.meter.Float64Histogram(name, metric.WithUnit("s"), metric.WithDescription(desc),
			metric.WithExplicitBucketBoundaries(telemetry.DurationBuckets...))
		if err != nil {
			return nil, fmt.Errorf("relay: metric %s: %w", name, err)
		}
		return h, nil
	}
	var err error
	if t.confirm, err = hist(telemetry.RelayConfirmDuration, "Time from publish to the broker's confirm (ack, nack or return)."); err != nil {
		return nil, err
	}
	if t.batch, err = hist(telemetry.RelayBatchDuration, "Time from claiming a batch until every row of it is settled."); err != nil {
		return nil, err
	}
	if t.claim, err = hist(telemetry.RelayClaimDuration, "Time of one claim statement."); err != nil {
		return nil, err
	}
	return t, nil
}

// register adds the observable instruments: the counters, and the backlog
// gauges (pending rows, lag) when BacklogInterval is positive. The
// returned function unregisters them.
func (r *Relay) register() (unregister func(), err error) {
	m := r.tel.meter
	counter := func(name, desc string) (metric.Int64ObservableCounter, error) {
		c, err := m.Int64ObservableCounter(name, metric.WithUnit("{message}"), metric.WithDescription(desc))
		if err != nil {
			return nil, fmt.Errorf("relay: metric %s: %w", name, err)
		}
		return c, nil
	}
	published, err := counter(telemetry.RelayPublished, "Messages confirmed by the broker and removed from the outbox.")
	if err != nil {
		return nil, err
	}
	failures, err := counter(telemetry.RelayPublishFailures, "Failed publishes by reason: nack, unroutable, no_exchange and unpublishable count as attempts; timeout and channel_closed release the message.")
	if err != nil {
		return nil, err
	}
	dead, err := counter(telemetry.RelayDeadLettered, "Rows moved to the dead-letter table after MaxAttempts.")
	if err != nil {
		return nil, err
	}
	released, err := counter(telemetry.RelayReleased, "Rows handed back unpublished without counting an attempt.")
	if err != nil {
		return nil, err
	}
	window, err := m.Int64ObservableGauge(telemetry.RelayConfirmWindow, metric.WithUnit("{message}"),
		metric.WithDescription("The confirm window in effect: ConfirmWindow, or this relay's share of the default while several relays publish on the table."))
	if err != nil {
		return nil, fmt.Errorf("relay: metric %s: %w", telemetry.RelayConfirmWindow, err)
	}
	standby, err := m.Int64ObservableGauge(telemetry.RelayStandby,
		metric.WithDescription("1 while the relay stands by (other relays of the table publish, Config.ActiveRelays), else 0."))
	if err != nil {
		return nil, fmt.Errorf("relay: metric %s: %w", telemetry.RelayStandby, err)
	}
	held, err := m.Int64ObservableGauge(telemetry.RelayHeld, metric.WithUnit("{row}"),
		metric.WithDescription("Rows the relay has claimed and not yet finished (in flight)."))
	if err != nil {
		return nil, fmt.Errorf("relay: metric %s: %w", telemetry.RelayHeld, err)
	}
	insts := []metric.Observable{published, failures, dead, released, window, standby, held}
	var pending metric.Int64ObservableGauge
	var lag metric.Float64ObservableGauge
	if r.cfg.BacklogInterval > 0 {
		if pending, err = m.Int64ObservableGauge(telemetry.OutboxPending, metric.WithUnit("{row}"),
			metric.WithDescription("Rows in the outbox table: due, in flight, retrying or scheduled.")); err != nil {
			return nil, fmt.Errorf("relay: metric %s: %w", telemetry.OutboxPending, err)
		}
		if lag, err = m.Float64ObservableGauge(telemetry.OutboxOldestPendingAge, metric.WithUnit("s"),
			metric.WithDescription("Age of the oldest outbox row that is not scheduled for later: the relay's lag.")); err != nil {
			return nil, fmt.Errorf("relay: metric %s: %w", telemetry.OutboxOldestPendingAge, err)
		}
		insts = append(insts, pending, lag)
	}
	attrs := metric.WithAttributeSet(r.tel.attrs)
	reasonAttrs := make([]metric.ObserveOption, numReasons)
	for i := reason(1); i < numReasons; i++ {
		reasonAttrs[i] = metric.WithAttributes(telemetry.AttrTable.String(r.tables.Outbox.String()), telemetry.AttrReason.String(reasonNames[i]))
	}
	reg, err := m.RegisterCallback(func(ctx context.Context, o metric.Observer) error {
		c := &r.counters
		o.ObserveInt64(published, c.published.Load(), attrs)
		o.ObserveInt64(dead, c.dead.Load(), attrs)
		o.ObserveInt64(released, c.released.Load(), attrs)
		o.ObserveInt64(window, r.window.Load(), attrs)
		var sb int64
		if r.coord.standingBy() {
			sb = 1
		}
		o.ObserveInt64(standby, sb, attrs)
		o.ObserveInt64(held, int64(r.coord.held.size()), attrs)
		for i := reason(1); i < numReasons; i++ {
			o.ObserveInt64(failures, c.failures[i].Load(), reasonAttrs[i])
		}
		if pending != nil {
			if b, ok := r.backlog.read(ctx, r); ok {
				o.ObserveInt64(pending, b.Pending, attrs)
				o.ObserveFloat64(lag, b.OldestPendingAge.Seconds(), attrs)
			}
		}
		return nil
	}, insts...)
	if err != nil {
		return nil, fmt.Errorf("relay: register metric callback: %w", err)
	}
	return func() { _ = reg.Unregister() }, nil
}

// backlogCache runs Status (the same query as the sidecar's status
// command, so the gauges and the command cannot disagree) at most once per
// BacklogInterval, however often metrics are collected.
type backlogCache struct {
	mu   sync.Mutex
	at   time.Time
	last StatusReport
	ok   bool
}

func (c *backlogCache) read(ctx context.Context, r *Relay) (StatusReport, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.at.IsZero() && time.Since(c.at) < r.cfg.BacklogInterval {
		return c.last, c.ok
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	b, err := r.admin.Status(ctx)
	c.at, c.last, c.ok = time.Now(), b, err == nil
	if err != nil {
		r.log.Warn("backlog metrics: query failed; the pending and lag gauges are not reported until it succeeds", "error", err)
	}
	return b, c.ok
}

// startPublish starts the producer span of w, a child of the trace context
// stored with the message by outbox.Add. It returns nil, having done
// nothing, when no SDK is installed, and nil when the span is not
// recording (sampled out): then the stored trace headers are forwarded
// unchanged.
func (p *publisher) startPublish(w *row) trace.Span {
	t := p.r.tel
	if !t.tracer.Enabled() {
		return nil
	}
	ctx := context.Background()
	if len(w.headers) > 0 {
		ctx = telemetry.Propagator(t.propagator).Extract(ctx, propagation.MapCarrier(w.headers))
	}
	dest := w.exchange
	if dest == "" {
		dest = "amq.default"
	}
	name, ok := p.spanNames[dest]
	if !ok {
		name = "publish " + dest
		p.spanNames[dest] = name
	}
	_, span := t.tracer.Start(ctx, name, t.spanStart...)
	if !span.IsRecording() {
		return nil
	}
	span.SetAttributes(
		semconv.MessagingDestinationName(dest),
		semconv.MessagingRabbitMQDestinationRoutingKey(w.routingKey),
		semconv.MessagingMessageID(w.id),
		semconv.MessagingMessageBodySize(len(w.payload)),
	)
	return span
}

// injectSpan writes the publish span's context into the AMQP headers, so
// the consumer's span is its child.
func (p *publisher) injectSpan(span trace.Span, h map[string]any) {
	ctx := trace.ContextWithSpan(context.Background(), span)
	telemetry.Propagator(p.r.tel.propagator).Inject(ctx, telemetry.AMQPCarrier(h))
}

// settled records what an outcome means for telemetry: it ends the row's
// span and, with the last row of a batch, records the batch duration.
func (r *Relay) settled(o *outcome) {
	w := o.row
	if w.span != nil {
		switch { // a delivery leaves the status unset, as the conventions ask
		case o.kind == delivered:
		case o.err != nil:
			w.span.RecordError(o.err)
			w.span.SetStatus(codes.Error, o.err.Error())
			w.span.SetAttributes(semconv.ErrorTypeKey.String(cmp.Or(reasonNames[o.reason], "_OTHER")))
		default:
			w.span.SetAttributes(attribute.Bool("mailroom.released", true))
		}
		w.span.End()
		w.span = nil
	}
	if b := w.batch; b != nil && b.left.Add(-1) == 0 {
		r.tel.batch.Record(context.Background(), time.Since(b.claimed).Seconds(), r.tel.record...)
	}
}

// batchClock times one claimed batch until its last row is settled.
type batchClock struct {
	claimed time.Time
	left    atomic.Int32
}
