package relay_test

import (
	"bytes"
	"context"
	"io"
	"net/http"
	"testing"
	"time"

	"github.com/cloudevents/sdk-go/v2/binding"
	cehttp "github.com/cloudevents/sdk-go/v2/protocol/http"

	"github.com/mailroom-go/mailroom/outbox"
	"github.com/mailroom-go/mailroom/relay"
)

// With Config.CloudEvents the relay publishes CloudEvents 1.0 in binary
// mode. With the "ce-" prefix the headers are exactly what the CloudEvents
// Go SDK reads (its HTTP binding, which uses that spelling: the SDK has no
// AMQP 0-9-1 binding): the event it reads is valid and carries the
// message's id, source, type, time, subject and data.
func TestCloudEventsBinaryModeReadByTheSDK(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	cfg := e.config()
	cfg.CloudEvents = &relay.CloudEvents{Source: "/orders", Prefix: "ce-"}
	e.start(cfg)
	id := outbox.NewID()
	e.add(outbox.Message{ID: id, Exchange: e.ex, RoutingKey: "order.placed", Key: "o-1", Type: "order.placed", Payload: []byte(`{"id":"o-1"}`)})
	d := e.receive(e.queue, 1, 30*time.Second)[0]

	h := http.Header{"Content-Type": {d.ContentType}}
	for k, v := range d.Headers {
		if s, ok := v.(string); ok {
			h.Set(k, s)
		}
	}
	ev, err := binding.ToEvent(context.Background(), cehttp.NewMessage(h, io.NopCloser(bytes.NewReader(d.Body))))
	if err != nil {
		t.Fatalf("the SDK cannot read the message: %v (headers %v)", err, d.Headers)
	}
	if err := ev.Validate(); err != nil {
		t.Fatalf("the SDK finds the event invalid: %v", err)
	}
	if ev.ID() != id || ev.Source() != "/orders" || ev.Type() != "order.placed" || ev.Subject() != "o-1" ||
		ev.DataContentType() != "application/json" || string(ev.Data()) != `{"id":"o-1"}` || ev.Time().IsZero() || time.Since(ev.Time()) > time.Minute {
		t.Fatalf("event %s", ev)
	}
}

// The default prefix is the AMQP binding's cloudEvents_; a row without a
// type takes its routing key as the event type; a bad configuration names
// the field.
func TestCloudEventsDefaultPrefixAndConfig(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	cfg := e.config()
	cfg.CloudEvents = &relay.CloudEvents{Source: "urn:acme:orders"}
	e.start(cfg)
	e.add(outbox.Message{Exchange: e.ex, RoutingKey: "order.shipped", Payload: []byte(`{}`)})
	d := e.receive(e.queue, 1, 30*time.Second)[0]
	for k, want := range map[string]string{"cloudEvents_specversion": "1.0", "cloudEvents_id": d.MessageId, "cloudEvents_source": "urn:acme:orders", "cloudEvents_type": "order.shipped"} {
		if got, _ := d.Headers[k].(string); got != want {
			t.Errorf("header %s = %q, want %q (all: %v)", k, got, want, d.Headers)
		}
	}
	if _, err := time.Parse(time.RFC3339Nano, d.Headers["cloudEvents_time"].(string)); err != nil {
		t.Errorf("cloudEvents_time: %v", err)
	}
	for _, c := range []*relay.CloudEvents{{}, {Source: "/x", Prefix: "ce_"}} {
		bad := e.config()
		bad.CloudEvents = c
		if _, err := relay.New(e.s.DB.DB, bad); err == nil {
			t.Errorf("CloudEvents %+v accepted", c)
		}
	}
}
