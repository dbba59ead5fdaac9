package main

import (
	"context"
	"flag"
	"io"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/exporters/stdout/stdouttrace"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	semconv "go.opentelemetry.io/otel/semconv/v1.39.0"
)

// traceFlag is the --trace flag of demo and serve.
func traceFlag(fs *flag.FlagSet) *bool {
	return fs.Bool("trace", false, "print every span (OpenTelemetry, JSON) to stderr")
}

// startTracing prints spans to w when on; the returned func flushes them.
func startTracing(on bool, w io.Writer) (stop func(), err error) {
	if !on {
		return func() {}, nil
	}
	return printSpans(w)
}

// printSpans installs a tracer provider that writes every span as JSON to w,
// and the W3C propagator. The mailroom packages use the global providers by
// default, so this is all the wiring a trace needs: one order shows as one
// trace — POST /orders → publish → process (payments) → publish → process
// (orders). The returned func flushes the last spans.
func printSpans(w io.Writer) (shutdown func(), err error) {
	exp, err := stdouttrace.New(stdouttrace.WithWriter(w))
	if err != nil {
		return nil, err
	}
	tp := sdktrace.NewTracerProvider(sdktrace.WithBatcher(exp),
		sdktrace.WithResource(resource.NewSchemaless(semconv.ServiceName("orderservice"))))
	otel.SetTracerProvider(tp)
	otel.SetTextMapPropagator(propagation.TraceContext{})
	return func() { tp.Shutdown(context.Background()) }, nil
}
