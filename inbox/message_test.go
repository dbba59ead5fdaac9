package inbox

import (
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	amqp "github.com/rabbitmq/amqp091-go"
)

func TestDecodeMapsHeadersToStrings(t *testing.T) {
	t.Parallel()
	ts := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	d := amqp.Delivery{
		MessageId: "m1", Exchange: "ex", RoutingKey: "rk", Type: "t", ContentType: "text/plain",
		Body: []byte("not json, and that is fine"),
		Headers: amqp.Table{
			"s": "str", "b": []byte("bytes"), "i": int32(-7), "u": uint8(200), "f": 1.5, "ok": true,
			"ts": ts, "nil": nil, "tbl": amqp.Table{"a": int64(1)},
			HeaderKey: "order-9", HeaderAttempt: int64(3), "x-delivery-count": int64(2),
			"x-death": []any{amqp.Table{}}, "x-first-death-queue": "q", "x-mailroom-other": "hidden",
		},
	}
	m, err := decode(&d)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{"s": "str", "b": "bytes", "i": "-7", "u": "200", "f": "1.5", "ok": "true",
		"ts": "2026-01-02T03:04:05Z", "nil": "", "tbl": "map[a:1]"}
	if len(m.Headers) != len(want) {
		t.Errorf("headers %v, want %v", m.Headers, want)
	}
	for k, v := range want {
		if m.Headers[k] != v {
			t.Errorf("header %s = %q, want %q", k, m.Headers[k], v)
		}
	}
	if m.Key != "order-9" || m.Attempt != 5 || m.ID != "m1" || m.Exchange != "ex" || m.RoutingKey != "rk" || m.Type != "t" {
		t.Errorf("decoded %+v", m)
	}
}

func TestDecodeRejectsPoison(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		d    amqp.Delivery
		want string
	}{
		{amqp.Delivery{Body: []byte("{}")}, "no message_id"},
		{amqp.Delivery{MessageId: "x", ContentType: "application/json", Body: []byte("{")}, "not valid JSON"},
		{amqp.Delivery{MessageId: "x", ContentType: "application/cloudevents+json; charset=utf-8", Body: []byte("nope")}, "not valid JSON"},
		{amqp.Delivery{MessageId: "x", Headers: amqp.Table{HeaderAttempt: "zero"}}, HeaderAttempt},
		{amqp.Delivery{MessageId: "a\x00b"}, "not text PostgreSQL can store"},
		{amqp.Delivery{MessageId: "a\xffb"}, "not text PostgreSQL can store"},
	} {
		if _, err := decode(&tc.d); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("decode(%+v) = %v, want %q", tc.d, err, tc.want)
		}
	}
}

func TestRepublishDropsBrokerBookkeeping(t *testing.T) {
	t.Parallel()
	d := amqp.Delivery{MessageId: "m", UserId: "someone", Exchange: "orders", RoutingKey: "order.placed", Headers: amqp.Table{"x-death": 1, "x-delivery-count": 2, "keep": "v"}}
	p := republish(&d, amqp.Table{HeaderAttempt: int64(2)})
	if _, ok := p.Headers["x-death"]; ok || p.Headers["keep"] != "v" || p.Headers[HeaderAttempt] != int64(2) || p.UserId != "" || p.DeliveryMode != amqp.Persistent {
		t.Errorf("republished %+v", p)
	}
	// A retry's delivery comes from the default exchange: the first
	// publish's exchange and routing key, in its headers, win.
	retry := amqp.Delivery{MessageId: "m", Exchange: "", RoutingKey: "q", Headers: p.Headers}
	again := republish(&retry, nil)
	m, err := decode(&amqp.Delivery{MessageId: "m", Exchange: "", RoutingKey: "q.retry", Headers: again.Headers})
	if err != nil || m.Exchange != "orders" || m.RoutingKey != "order.placed" || len(m.Headers) != 1 {
		t.Errorf("decoded %+v, %v: want exchange orders, routing key order.placed, headers without mailroom's", m, err)
	}
}

// A delivery through a named exchange is what it is: headers naming
// another origin are neither believed nor passed on.
func TestOriginHeadersOnlyThroughDefaultExchange(t *testing.T) {
	t.Parallel()
	d := amqp.Delivery{MessageId: "m", Exchange: "orders", RoutingKey: "order.placed",
		Headers: amqp.Table{HeaderExchange: "payments.internal", HeaderRoutingKey: "refund.approved"}}
	m, err := decode(&d)
	if err != nil || m.Exchange != "orders" || m.RoutingKey != "order.placed" {
		t.Errorf("decoded %+v, %v: want the delivery's own exchange and routing key", m, err)
	}
	p := republish(&d, nil)
	if p.Headers[HeaderExchange] != "orders" || p.Headers[HeaderRoutingKey] != "order.placed" {
		t.Errorf("republished headers %v: want the delivery's own exchange and routing key", p.Headers)
	}
}

func TestConsumerTagFits(t *testing.T) {
	t.Parallel()
	for _, name := range []string{"inbox", strings.Repeat("é", 200)} {
		tag := consumerTag(name)
		if len(tag) > 255 || !utf8.ValidString(tag) || !strings.HasPrefix(name, strings.TrimRight(tag[:len(tag)-9], " ")) {
			t.Errorf("consumerTag(%d bytes) = %q (%d bytes): want valid UTF-8 of at most 255, the name's beginning", len(name), tag, len(tag))
		}
	}
}

func TestDelayGrowsAndIsCapped(t *testing.T) {
	t.Parallel()
	c := &Consumer{cfg: Config{MinBackoff: 100 * time.Millisecond, MaxBackoff: time.Second}}
	if d := c.delay(1); d < 80*time.Millisecond || d > 120*time.Millisecond {
		t.Errorf("delay(1) = %s, want 100ms ± 20%%", d)
	}
	if d := c.delay(3); d < 320*time.Millisecond || d > 480*time.Millisecond {
		t.Errorf("delay(3) = %s, want 400ms ± 20%%", d)
	}
	if d := c.delay(50); d > time.Second {
		t.Errorf("delay(50) = %s, want at most MaxBackoff", d)
	}
}
