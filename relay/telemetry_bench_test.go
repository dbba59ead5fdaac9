package relay

import (
	"context"
	"testing"
	"time"

	"go.opentelemetry.io/otel/propagation"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"

	amqp "github.com/rabbitmq/amqp091-go"
)

// sink keeps the built message alive in every variant alike.
var sink amqp.Publishing

// BenchmarkPublishTelemetry measures the per-message cost of the relay's
// tracing and metrics on the publish path: the publish span (extract the
// stored context, start, attributes, inject, end), the confirm latency
// histogram and the settle bookkeeping. "bare" builds the AMQP message
// and hands over the outcome, the work done with or without telemetry; the
// difference is the overhead.
//
//	go test ./relay -run '^$' -bench PublishTelemetry -benchmem
func BenchmarkPublishTelemetry(b *testing.B) {
	headers := map[string]string{
		"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
		"tenant":      "acme",
	}
	sdk := func() Config {
		return Config{
			TracerProvider: sdktrace.NewTracerProvider(sdktrace.WithSampler(sdktrace.AlwaysSample())),
			MeterProvider:  sdkmetric.NewMeterProvider(sdkmetric.WithReader(sdkmetric.NewManualReader())),
			Propagator:     propagation.TraceContext{},
		}
	}
	for _, v := range []struct {
		name string
		cfg  Config
		bare bool
	}{
		{"bare", Config{}, true},
		{"noop", Config{}, false}, // nil providers: the global no-op ones
		{"sdk", sdk(), false},
	} {
		b.Run(v.name, func(b *testing.B) {
			cfg := v.cfg
			cfg.URL, cfg.DisableListen = "amqp://guest:guest@127.0.0.1:5672/", true
			r, err := New(nil, cfg)
			if err != nil {
				b.Fatal(err)
			}
			outcomes := make(chan outcome, 1)
			p := newPublisher(r, outcomes)
			sent := time.Now()
			b.ReportAllocs()
			for b.Loop() {
				w := &row{id: "0190c1b2-7c1e-7d3a-9f1e-5b2d3c4e5f60", exchange: "orders", routingKey: "order.placed", headers: headers, payload: []byte(`{}`)}
				if v.bare {
					sink = message(w, false, nil)
					outcomes <- outcome{row: w, kind: delivered}
					<-outcomes
					continue
				}
				w.span = p.startPublish(w)
				msg := message(w, w.span != nil, nil)
				if w.span != nil {
					p.injectSpan(w.span, msg.Headers)
				}
				sink = msg
				r.tel.confirm.Record(context.Background(), time.Since(sent).Seconds(), r.tel.record...)
				p.emit(outcome{row: w, kind: delivered})
				<-outcomes
			}
		})
	}
}
