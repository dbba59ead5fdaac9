package inbox

import (
	"context"
	"testing"

	"github.com/jmoiron/sqlx"
	"go.opentelemetry.io/otel/propagation"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
)

// BenchmarkHandlerTelemetry measures the per-message cost of the inbox's
// tracing and metrics around a handler: extract the writer's context,
// start the consumer span with its attributes, end it, and record the
// handler duration. "bare" calls the handler only.
//
//	go test ./inbox -run '^$' -bench HandlerTelemetry -benchmem
func BenchmarkHandlerTelemetry(b *testing.B) {
	m := Message{
		ID: "0190c1b2-7c1e-7d3a-9f1e-5b2d3c4e5f60", Exchange: "orders", RoutingKey: "order.placed",
		Headers: map[string]string{"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "tenant": "acme"},
		Payload: []byte(`{}`), Attempt: 1,
	}
	base := Config{URL: "amqp://localhost/", Queue: "orders", Consumer: "payments",
		Handler: func(context.Context, *sqlx.Tx, Message) error { return nil }}
	sdk := base
	sdk.TracerProvider = sdktrace.NewTracerProvider(sdktrace.WithSampler(sdktrace.AlwaysSample()))
	sdk.MeterProvider = sdkmetric.NewMeterProvider(sdkmetric.WithReader(sdkmetric.NewManualReader()))
	sdk.Propagator = propagation.TraceContext{}
	for _, v := range []struct {
		name string
		cfg  Config
		bare bool
	}{{"bare", base, true}, {"noop", base, false}, {"sdk", sdk, false}} {
		b.Run(v.name, func(b *testing.B) {
			c, err := New(&sqlx.DB{}, v.cfg)
			if err != nil {
				b.Fatal(err)
			}
			ctx := context.Background()
			b.ReportAllocs()
			for b.Loop() {
				if v.bare {
					_ = c.cfg.Handler(ctx, nil, m)
					continue
				}
				hctx, span := c.startProcess(ctx, &m, nil)
				err := c.call(hctx, nil, m)
				endSpan(span, false, err)
			}
		})
	}
}
