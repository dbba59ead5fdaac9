package telemetry_test

import (
	"context"
	"testing"

	amqp "github.com/rabbitmq/amqp091-go"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/propagation"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"

	"github.com/mailroom-go/mailroom/internal/telemetry"
)

// installed is set once the test below has installed a global provider:
// with -count > 1 it runs again in the same process, where the global
// provider cannot be taken back.
var installed bool

// Not parallel: it installs a global tracer provider, before the parallel
// tests (which pass their own providers) start.
func TestTracingEnabledFollowsTheGlobalProvider(t *testing.T) {
	first := !installed
	global := telemetry.NewTracing(nil, "test")
	// The global provider cannot be told apart before an SDK is installed
	// (no API for it; its type is another module's internals): the spans
	// it starts meanwhile do not record, which is what callers check.
	if _, span := global.Start(context.Background(), "s"); first && span.IsRecording() {
		t.Fatal("a span of the default global provider records before any SDK was installed")
	}
	if telemetry.NewTracing(noop.NewTracerProvider(), "test").Enabled() {
		t.Error("Enabled with the no-op provider")
	}
	tp := sdktrace.NewTracerProvider()
	defer func() { _ = tp.Shutdown(context.Background()) }()
	if !telemetry.NewTracing(tp, "test").Enabled() {
		t.Error("not Enabled with an SDK provider")
	}
	otel.SetTracerProvider(tp)
	installed = true
	if !global.Enabled() {
		t.Error("a Tracing made before otel.SetTracerProvider stays disabled after it")
	}
	if _, span := global.Start(context.Background(), "s"); first && !span.IsRecording() {
		t.Error("the tracer made before otel.SetTracerProvider does not record after it")
	}
}

func TestAMQPCarrierRoundTrip(t *testing.T) {
	t.Parallel()
	tp := sdktrace.NewTracerProvider()
	ctx, span := tp.Tracer("test").Start(context.Background(), "s")
	defer span.End()
	h := amqp.Table{"tenant": "acme", "n": int32(1), "raw": []byte("b")}
	propagation.TraceContext{}.Inject(ctx, telemetry.AMQPCarrier(h))
	if err := h.Validate(); err != nil {
		t.Fatalf("headers after Inject are not a valid AMQP table: %v", err)
	}
	got := trace.SpanContextFromContext(propagation.TraceContext{}.Extract(context.Background(), telemetry.AMQPCarrier(h)))
	if got.TraceID() != span.SpanContext().TraceID() || got.SpanID() != span.SpanContext().SpanID() {
		t.Errorf("extracted %v, want %v", got, span.SpanContext())
	}
	c := telemetry.AMQPCarrier(h)
	if c.Get("raw") != "b" || c.Get("n") != "" || len(c.Keys()) != 4 {
		t.Errorf("Get(raw)=%q Get(n)=%q Keys=%v", c.Get("raw"), c.Get("n"), c.Keys())
	}
}
