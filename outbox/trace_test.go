package outbox_test

import (
	"context"
	"encoding/json"
	"errors"
	"testing"

	"go.opentelemetry.io/otel/propagation"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"

	"github.com/mailroom-go/mailroom/internal/testenv"
	"github.com/mailroom-go/mailroom/outbox"
)

// Add stores the W3C trace context of its ctx in each message's headers,
// keeps a header the caller set explicitly, and leaves the caller's map as
// it was.
func TestAddInjectsTraceContext(t *testing.T) {
	t.Parallel()
	s := testenv.NewSchema(t)
	ob := newOutbox(t, outbox.Config{Propagator: propagation.TraceContext{}})
	tp := sdktrace.NewTracerProvider()
	ctx, span := tp.Tracer("test").Start(context.Background(), "request")
	defer span.End()

	mine := map[string]string{"tracestate": "vendor=explicit", "tenant": "acme"}
	plain, explicit := msg(1), msg(2)
	explicit.Headers = mine
	tx, err := s.DB.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := ob.Add(ctx, tx, plain, explicit); err != nil {
		t.Fatal(err)
	}
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}
	if len(mine) != 2 {
		t.Errorf("Add modified the caller's header map: %v", mine)
	}
	var raw []string
	if err := s.DB.Select(&raw, `SELECT headers::text FROM mailroom_outbox ORDER BY seq`); err != nil {
		t.Fatal(err)
	}
	want := "00-" + span.SpanContext().TraceID().String() + "-" + span.SpanContext().SpanID().String() + "-01"
	for i, r := range raw {
		var h map[string]string
		if err := json.Unmarshal([]byte(r), &h); err != nil {
			t.Fatal(err)
		}
		if h["traceparent"] != want {
			t.Errorf("message %d: traceparent %q, want %q", i, h["traceparent"], want)
		}
		if i == 1 && (h["tracestate"] != "vendor=explicit" || h["tenant"] != "acme") {
			t.Errorf("message %d: headers %v; the caller's tracestate and tenant must be kept", i, h)
		}
	}
}

// Without a span in ctx (or with the default no-op propagator) nothing is
// added, and the reserved-header check still applies.
func TestAddWithoutTraceAddsNothing(t *testing.T) {
	t.Parallel()
	s := testenv.NewSchema(t)
	ctx := context.Background()
	for _, ob := range []*outbox.Outbox{newOutbox(t, outbox.Config{}), newOutbox(t, outbox.Config{Propagator: propagation.TraceContext{}})} {
		if err := ob.Add(ctx, s.DB, msg(1)); err != nil {
			t.Fatal(err)
		}
		bad := msg(2)
		bad.Headers = map[string]string{"x-mailroom-key": "k"}
		if err := ob.Add(ctx, s.DB, bad); !errors.Is(err, outbox.ErrInvalidMessage) {
			t.Errorf("reserved header: Add = %v, want ErrInvalidMessage", err)
		}
	}
	var n int
	if err := s.DB.Get(&n, `SELECT count(*) FROM mailroom_outbox WHERE headers IS NULL`); err != nil || n != 2 {
		t.Errorf("%d rows without headers (err %v), want 2", n, err)
	}
}
