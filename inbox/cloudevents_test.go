package inbox

import (
	"encoding/json"
	"testing"
	"time"

	cloudevents "github.com/cloudevents/sdk-go/v2"
	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/mailroom-go/mailroom/internal/wire"
)

// A binary-mode CloudEvent (any of the three header prefixes) fills the
// Message's ID, Type, ContentType, Source and Time.
func TestDecodeBinaryCloudEvent(t *testing.T) {
	t.Parallel()
	for _, prefix := range []string{"cloudEvents_", "cloudEvents:", "ce-"} {
		d := amqp.Delivery{
			Body: []byte(`{"id":"o-1"}`),
			Headers: amqp.Table{
				prefix + "specversion": "1.0", prefix + "id": "evt-1", prefix + "source": "/orders",
				prefix + "type": "order.placed", prefix + "time": "2026-12-06T03:04:05.123Z", prefix + "datacontenttype": "application/json",
			},
		}
		m, err := decode(&d)
		if err != nil {
			t.Fatalf("%s: %v", prefix, err)
		}
		if m.ID != "evt-1" || m.Type != "order.placed" || m.Source != "/orders" || m.ContentType != "application/json" ||
			!m.Time.Equal(time.Date(2026, 12, 6, 3, 4, 5, 123e6, time.UTC)) || string(m.Payload) != `{"id":"o-1"}` {
			t.Errorf("%s: %+v", prefix, m)
		}
	}
	// The AMQP properties win over the attributes; a bad time or spec
	// version never reaches a handler.
	d := amqp.Delivery{MessageId: "m-1", Type: "t", Body: []byte(`{}`), Headers: amqp.Table{"cloudEvents_specversion": "1.0", "cloudEvents_id": "evt", "cloudEvents_type": "ce-type", "cloudEvents_source": "/s"}}
	if m, err := decode(&d); err != nil || m.ID != "m-1" || m.Type != "t" || m.Source != "/s" {
		t.Errorf("properties and attributes: %+v, %v", m, err)
	}
	for _, h := range []amqp.Table{{"ce-specversion": "0.3", "ce-id": "x"}, {"ce-specversion": "1.0", "ce-id": "x", "ce-time": "yesterday"}} {
		if _, err := decode(&amqp.Delivery{Body: []byte(`{}`), Headers: h}); err == nil {
			t.Errorf("%v: decoded, want a poison message", h)
		}
	}
}

// A structured-mode event as the CloudEvents Go SDK writes it fills the
// attributes; the payload stays the event as written, whose data is the
// SDK's (a JSON body of that content type without specversion is no event
// and passes as it is; one that is not JSON breaks the wire contract).
func TestDecodeStructuredCloudEventOfTheSDK(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		contentType string
		data        any
		payload     string
	}{
		{cloudevents.ApplicationJSON, map[string]int{"amount": 1299}, `{"amount":1299}`},
		{"text/plain", "plain text", "plain text"},
		{"application/octet-stream", []byte{0, 1, 2, 255}, "\x00\x01\x02\xff"},
	} {
		e := cloudevents.NewEvent()
		e.SetID("evt-9")
		e.SetSource("urn:acme:orders")
		e.SetType("order.paid")
		e.SetTime(time.Date(2026, 12, 6, 1, 2, 3, 0, time.UTC))
		if err := e.SetData(c.contentType, c.data); err != nil {
			t.Fatal(err)
		}
		body, err := json.Marshal(e)
		if err != nil {
			t.Fatal(err)
		}
		m, err := decode(&amqp.Delivery{ContentType: "application/cloudevents+json; charset=utf-8", Body: body})
		if err != nil {
			t.Fatalf("%s: %v\n%s", c.contentType, err, body)
		}
		if m.ID != "evt-9" || m.Type != "order.paid" || m.Source != "urn:acme:orders" || m.ContentType != "application/cloudevents+json; charset=utf-8" ||
			string(m.Payload) != string(body) || !m.Time.Equal(e.Time()) {
			t.Errorf("%s: decoded %+v (payload %q) from %s", c.contentType, m, m.Payload, body)
		}
		// The data inside is the SDK's, in its content type.
		got, ok, err := wire.CloudEventFromJSON(m.Payload)
		if err != nil || !ok || string(got.Data) != c.payload || got.DataContentType != c.contentType {
			t.Errorf("%s: data %q (%s), %v, %v; want %q", c.contentType, got.Data, got.DataContentType, ok, err, c.payload)
		}
	}
	if m, err := decode(&amqp.Delivery{MessageId: "m", ContentType: "application/cloudevents+json", Body: []byte(`{"id":42}`)}); err != nil || m.Source != "" || string(m.Payload) != `{"id":42}` {
		t.Errorf("a JSON body without specversion: %+v, %v; want it as it is", m, err)
	}
	if _, err := decode(&amqp.Delivery{MessageId: "m", ContentType: "application/cloudevents+json", Body: []byte(`{"specversion":"0.3"}`)}); err == nil {
		t.Error("specversion 0.3 decoded, want a poison message")
	}
}
