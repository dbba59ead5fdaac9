package inbox

import (
	"context"
	"fmt"
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

// instruments are the consumer's tracer and metric instruments. The
// counters are observable: the callback reads the same atomics as Stats,
// so the hot path pays nothing for them and the two cannot drift.
type instruments struct {
	tracer     telemetry.Tracing
	propagator propagation.TextMapPropagator // nil: global, resolved per use
	spanName   string                        // "process <queue>"
	spanStart  []trace.SpanStartOption
	meter      metric.Meter
	attrs      attribute.Set
	handlerOK  []metric.RecordOption
	handlerErr []metric.RecordOption
	handler    metric.Float64Histogram
	purged     metric.Int64Counter
	purgedOpts []metric.AddOption
}

func newInstruments(cfg *Config, nodes *amqpx.Nodes) (*instruments, error) {
	t := &instruments{
		tracer:     telemetry.NewTracing(cfg.TracerProvider, telemetry.ScopeInbox),
		propagator: cfg.Propagator,
		spanName:   "process " + cfg.Queue,
		spanStart: []trace.SpanStartOption{trace.WithSpanKind(trace.SpanKindConsumer), trace.WithAttributes(append([]attribute.KeyValue{
			semconv.MessagingSystemRabbitMQ, semconv.MessagingOperationTypeProcess, semconv.MessagingOperationName("process"),
			semconv.MessagingConsumerGroupName(cfg.Consumer), semconv.MessagingDestinationSubscriptionName(cfg.Queue)},
			telemetry.ServerAttrs(nodes.Single())...)...)},
		meter: telemetry.MeterProvider(cfg.MeterProvider).Meter(telemetry.ScopeInbox),
		attrs: attribute.NewSet(telemetry.AttrConsumer.String(cfg.Consumer), telemetry.AttrQueue.String(cfg.Queue)),
	}
	withResult := func(r string) []metric.RecordOption {
		return []metric.RecordOption{metric.WithAttributes(telemetry.AttrConsumer.String(cfg.Consumer), telemetry.AttrQueue.String(cfg.Queue), telemetry.AttrResult.String(r))}
	}
	t.handlerOK, t.handlerErr = withResult("ok"), withResult("error")
	var err error
	t.handler, err = t.meter.Float64Histogram(telemetry.InboxHandlerDuration, metric.WithUnit("s"),
		metric.WithDescription("Handler run time, by result (ok or error)."),
		metric.WithExplicitBucketBoundaries(telemetry.DurationBuckets...))
	if err != nil {
		return nil, fmt.Errorf("inbox: metric %s: %w", telemetry.InboxHandlerDuration, err)
	}
	t.purged, err = t.meter.Int64Counter(telemetry.DedupePurged, metric.WithUnit("{id}"),
		metric.WithDescription("Message ids purged from the deduplication table after their retention."))
	if err != nil {
		return nil, fmt.Errorf("inbox: metric %s: %w", telemetry.DedupePurged, err)
	}
	t.purgedOpts = []metric.AddOption{metric.WithAttributes(telemetry.AttrTable.String(cfg.Table))}
	return t, nil
}

// register adds the observable counters for the time Run runs.
func (c *Consumer) register() (unregister func(), err error) {
	m := c.tel.meter
	type obs struct {
		name, desc string
		v          func() uint64
	}
	s := &c.stats
	list := []obs{
		{telemetry.InboxProcessed, "Messages applied and committed.", s.handled.Load},
		{telemetry.InboxDuplicates, "Deliveries acked without calling the handler: their id was already recorded.", s.duplicates.Load},
		{telemetry.InboxFailures, "Handler errors and panics.", s.failed.Load},
		{telemetry.InboxRetries, "Deliveries sent to the retry queue or retried in place.", s.retried.Load},
		{telemetry.InboxDeadLettered, "Deliveries sent to the dead-letter queue (or rejected).", s.dead.Load},
		{telemetry.InboxRequeued, "Deliveries returned to the queue after a database or broker failure.", s.requeued.Load},
	}
	insts := make([]metric.Int64ObservableCounter, len(list))
	obsv := make([]metric.Observable, len(list))
	for i, o := range list {
		if insts[i], err = m.Int64ObservableCounter(o.name, metric.WithUnit("{message}"), metric.WithDescription(o.desc)); err != nil {
			return nil, fmt.Errorf("inbox: metric %s: %w", o.name, err)
		}
		obsv[i] = insts[i]
	}
	attrs := metric.WithAttributeSet(c.tel.attrs)
	reg, err := m.RegisterCallback(func(_ context.Context, o metric.Observer) error {
		for i, l := range list {
			o.ObserveInt64(insts[i], int64(l.v()), attrs)
		}
		return nil
	}, obsv...)
	if err != nil {
		return nil, fmt.Errorf("inbox: register metric callback: %w", err)
	}
	return func() { _ = reg.Unregister() }, nil
}

// startProcess starts the consumer span of one message: a child of the
// trace context the message carries (written by outbox.Add and the relay's
// publish span), linked to the batch's span when there is one. The handler
// runs on the returned context. With no SDK installed it does nothing and
// returns ctx; span is nil then and when the span is not recording.
func (c *Consumer) startProcess(ctx context.Context, m *Message, batch trace.Span) (context.Context, trace.Span) {
	t := c.tel
	if !t.tracer.Enabled() {
		return ctx, nil
	}
	if len(m.Headers) > 0 {
		ctx = telemetry.Propagator(t.propagator).Extract(ctx, propagation.MapCarrier(m.Headers))
	}
	opts := t.spanStart
	if batch != nil {
		opts = append(opts[:len(opts):len(opts)], trace.WithLinks(trace.Link{SpanContext: batch.SpanContext()}))
	}
	ctx, span := t.tracer.Start(ctx, t.spanName, opts...)
	if !span.IsRecording() {
		return ctx, nil
	}
	dest := m.Exchange
	if dest == "" {
		dest = "amq.default"
	}
	span.SetAttributes(
		semconv.MessagingDestinationName(dest),
		semconv.MessagingRabbitMQDestinationRoutingKey(m.RoutingKey),
		semconv.MessagingMessageID(m.ID),
		semconv.MessagingMessageBodySize(len(m.Payload)),
		attribute.Int("mailroom.attempt", m.Attempt),
	)
	return ctx, span
}

// startBatch starts the span of a batched transaction, linked to the trace
// context of every message in it. span is nil when not recording.
func (c *Consumer) startBatch(ctx context.Context, items []item) (context.Context, trace.Span) {
	t := c.tel
	if !t.tracer.Enabled() {
		return ctx, nil
	}
	ctx, span := t.tracer.Start(ctx, t.spanName, t.spanStart...)
	if !span.IsRecording() {
		return ctx, nil
	}
	span.SetAttributes(semconv.MessagingBatchMessageCount(len(items)))
	p := telemetry.Propagator(t.propagator)
	for i := range items {
		if h := items[i].m.Headers; len(h) > 0 {
			if sc := trace.SpanContextFromContext(p.Extract(context.Background(), propagation.MapCarrier(h))); sc.IsValid() {
				span.AddLink(trace.Link{SpanContext: sc})
			}
		}
	}
	return ctx, span
}

// endSpan ends a span (nil is fine) with the attempt's result.
func endSpan(span trace.Span, dup bool, err error) {
	if span == nil {
		return
	}
	switch {
	case err != nil:
		span.RecordError(err)
		span.SetStatus(codes.Error, err.Error())
		span.SetAttributes(semconv.ErrorType(err))
	case dup:
		span.SetAttributes(attribute.Bool("mailroom.duplicate", true))
	}
	span.End()
}

// observeHandler records a handler's duration d.
func (c *Consumer) observeHandler(d time.Duration, err error) {
	opts := c.tel.handlerOK
	if err != nil {
		opts = c.tel.handlerErr
	}
	c.tel.handler.Record(context.Background(), d.Seconds(), opts...)
}
