package outbox

import (
	"context"
	"testing"

	"go.opentelemetry.io/otel/propagation"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
)

// BenchmarkTraceHeaders measures what tracing adds to Add per call (one
// message): the propagator's Inject and the merged header map. "noop" is
// the global propagator with nothing set; "w3c" injects traceparent from a
// recording span.
//
//	go test ./outbox -run '^$' -bench TraceHeaders -benchmem
func BenchmarkTraceHeaders(b *testing.B) {
	user := map[string]string{"tenant": "acme"}
	tp := sdktrace.NewTracerProvider()
	ctx, span := tp.Tracer("bench").Start(context.Background(), "request")
	defer span.End()
	for _, v := range []struct {
		name string
		cfg  Config
		ctx  context.Context
	}{{"noop", Config{}, context.Background()}, {"w3c", Config{Propagator: propagation.TraceContext{}}, ctx}} {
		b.Run(v.name, func(b *testing.B) {
			o, err := New(v.cfg)
			if err != nil {
				b.Fatal(err)
			}
			b.ReportAllocs()
			for b.Loop() {
				_ = withTrace(user, o.traceHeaders(v.ctx))
			}
		})
	}
}
