package main

import (
	"context"
	"os"

	"go.opentelemetry.io/contrib/exporters/autoexport"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	semconv "go.opentelemetry.io/otel/semconv/v1.39.0"
	"go.opentelemetry.io/otel/trace"
)

// tracing builds the sidecar's tracer provider from the standard
// OpenTelemetry environment (autoexport: OTEL_TRACES_EXPORTER otlp, console
// or none; OTEL_EXPORTER_OTLP_ENDPOINT, _PROTOCOL, _HEADERS, …;
// OTEL_SERVICE_NAME, default "mailroom-relay"; OTEL_RESOURCE_ATTRIBUTES).
// Tracing is on when OTEL_TRACES_EXPORTER or an OTLP endpoint is set, and
// off (nil provider: nothing exported) otherwise. The propagator is W3C
// trace context and baggage, as outbox.Add writes them. shutdown flushes
// the spans still batched.
func tracing(ctx context.Context) (tp trace.TracerProvider, prop propagation.TextMapPropagator, shutdown func(context.Context) error, err error) {
	nothing := func(context.Context) error { return nil }
	if os.Getenv("OTEL_TRACES_EXPORTER") == "" && os.Getenv("OTEL_EXPORTER_OTLP_ENDPOINT") == "" && os.Getenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") == "" {
		return nil, nil, nothing, nil
	}
	exp, err := autoexport.NewSpanExporter(ctx)
	if err != nil {
		return nil, nil, nothing, usageErr("OTEL_TRACES_EXPORTER / OTEL_EXPORTER_OTLP_*: %v", err)
	}
	if autoexport.IsNoneSpanExporter(exp) {
		return nil, nil, nothing, nil
	}
	res, err := resource.New(ctx,
		resource.WithAttributes(semconv.ServiceName("mailroom-relay")),
		resource.WithFromEnv(), // OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES win
		resource.WithTelemetrySDK())
	if err != nil {
		return nil, nil, nothing, usageErr("OTEL_RESOURCE_ATTRIBUTES: %v", err)
	}
	p := sdktrace.NewTracerProvider(sdktrace.WithBatcher(exp), sdktrace.WithResource(res))
	return p, propagation.NewCompositeTextMapPropagator(propagation.TraceContext{}, propagation.Baggage{}), p.Shutdown, nil
}
