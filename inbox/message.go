package inbox

import (
	"cmp"
	"fmt"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/mailroom-go/mailroom/internal/wire"
)

// Headers mailroom reads and writes (docs/wire.md). Names starting with
// "x-mailroom-" are reserved: they never appear in Message.Headers.
const (
	// HeaderKey carries the ordering key (outbox Message.Key).
	HeaderKey = wire.HeaderKey
	// HeaderAttempt is the attempt number of a redelivery through the retry
	// queue (absent = 1).
	HeaderAttempt = wire.HeaderAttempt
	// HeaderReason, on a dead letter, says why it was dead-lettered: the
	// handler's last error, or what made the delivery undecodable.
	HeaderReason = wire.HeaderReason
	// HeaderQueue and HeaderConsumer, on a dead letter, say where it failed.
	HeaderQueue    = wire.HeaderQueue
	HeaderConsumer = wire.HeaderConsumer
	// HeaderExchange and HeaderRoutingKey, on a retry or a dead letter,
	// keep where the message was first published: retries and dead
	// letters travel through the default exchange. They are read only on
	// deliveries through the default exchange.
	HeaderExchange   = wire.HeaderExchange
	HeaderRoutingKey = wire.HeaderRoutingKey
)

// Message is one delivery as the handler sees it.
type Message struct {
	ID          string // AMQP message_id: the outbox id, the deduplication key
	Exchange    string // exchange it was published to, the same on every attempt
	RoutingKey  string // routing key it was published with, the same on every attempt
	Key         string // ordering key (x-mailroom-key header); "" when none
	Type        string // AMQP type
	ContentType string // AMQP content_type
	// Headers are the AMQP headers as strings, without mailroom's own
	// (x-mailroom-*) and the broker's bookkeeping (x-death, x-first-death-*,
	// x-last-death-*, x-delivery-count). Strings and byte arrays are taken
	// as they are, numbers and booleans in Go's decimal form, timestamps in
	// RFC 3339, anything else (tables, arrays, decimals) through fmt.Sprint.
	Headers map[string]string
	Payload []byte
	Attempt int // 1 on first delivery

	// Source and Time are a CloudEvent's source and time attributes, when
	// the message is one (binary mode: cloudEvents_*, cloudEvents:* or ce-*
	// headers; structured mode: an application/cloudevents+json body).
	// A CloudEvent also fills ID (when message_id is absent) and Type
	// (when the AMQP property is empty); in binary mode ContentType too.
	// In structured mode Payload stays the event as written (its data
	// inside).
	Source string
	Time   time.Time
}

// fromCloudEvent fills m from the CloudEvent d carries, if any: binary
// mode (attribute headers) or structured mode (the whole event as the
// body, which stays the Payload as written: a handler sees what was sent).
// A body of content type application/cloudevents+json without a
// specversion is no event, and passes as it is.
func fromCloudEvent(d *amqp.Delivery, m *Message) error {
	var e wire.CloudEvent
	if wire.IsStructuredCloudEvent(d.ContentType) {
		if err := wire.CheckPayload(d.ContentType, d.Body); err != nil {
			return err // the wire contract's own words
		}
		var ok bool
		var err error
		if e, ok, err = wire.CloudEventFromJSON(d.Body); err != nil || !ok {
			return err
		}
	} else {
		var ok bool
		var err error
		e, ok, err = wire.CloudEventFromHeaders(func(name string) (string, bool) {
			v, found := d.Headers[name]
			return headerString(v), found
		})
		if err != nil || !ok {
			return err
		}
		if m.ContentType == "" {
			m.ContentType = e.DataContentType
		}
	}
	m.ID = cmp.Or(m.ID, e.ID)
	m.Type = cmp.Or(m.Type, e.Type)
	m.Source, m.Time = e.Source, e.Time
	return nil
}

// poison is a delivery that never reaches a handler.
type poison struct{ reason string }

func (p poison) Error() string { return p.reason }

// decode turns a delivery into a Message, or says why it cannot.
func decode(d *amqp.Delivery) (Message, error) {
	m := Message{
		ID: d.MessageId, Type: d.Type, ContentType: d.ContentType, Payload: d.Body, Attempt: 1,
	}
	m.Exchange, m.RoutingKey = origin(d)
	if err := fromCloudEvent(d, &m); err != nil {
		return m, poison{err.Error()}
	}
	if m.ID == "" {
		return m, poison{"no message_id: mailroom deduplicates by message_id, so a delivery without one cannot be handled safely (publish through the outbox, or set message_id)"}
	}
	if strings.IndexByte(m.ID, 0) >= 0 || !utf8.ValidString(m.ID) {
		return m, poison{fmt.Sprintf("message_id %q is not text PostgreSQL can store (a NUL byte or invalid UTF-8), so it cannot be deduplicated", m.ID)}
	}
	redelivered := 0
	for k, v := range d.Headers {
		switch {
		case k == HeaderKey:
			m.Key = headerString(v)
		case k == HeaderAttempt:
			n, err := strconv.Atoi(headerString(v))
			if err != nil || n < 1 {
				return m, poison{fmt.Sprintf("header %s = %v is not a positive integer", HeaderAttempt, v)}
			}
			m.Attempt = n
		case k == "x-delivery-count":
			// Quorum queues count returns to the queue (consumer crash,
			// lost connection, requeue): each was an attempt too.
			if n, err := strconv.Atoi(headerString(v)); err == nil && n > 0 {
				redelivered = n
			}
		case wire.BrokerHeader(k) || wire.Reserved(k):
		default:
			if m.Headers == nil {
				m.Headers = make(map[string]string, len(d.Headers))
			}
			m.Headers[k] = headerString(v)
		}
	}
	m.Attempt += redelivered
	if err := wire.CheckPayload(m.ContentType, m.Payload); err != nil {
		return m, poison{err.Error()}
	}
	return m, nil
}

// headerString formats an AMQP field value (see Message.Headers).
func headerString(v any) string {
	switch x := v.(type) {
	case nil:
		return ""
	case string:
		return x
	case []byte:
		return string(x)
	case bool:
		return strconv.FormatBool(x)
	case int8, int16, int32, int64, int, uint8, uint16, uint32, uint64, uint:
		return fmt.Sprint(x)
	case float32:
		return strconv.FormatFloat(float64(x), 'g', -1, 32)
	case float64:
		return strconv.FormatFloat(x, 'g', -1, 64)
	case time.Time:
		return x.UTC().Format(time.RFC3339Nano)
	default:
		return fmt.Sprint(x)
	}
}

// origin is where d was first published: its own exchange and routing
// key, or, for a delivery through the default exchange (as retries come
// back), those its HeaderExchange and HeaderRoutingKey carry. A publisher
// cannot make a delivery through a named exchange claim another.
func origin(d *amqp.Delivery) (exchange, routingKey string) {
	if d.Exchange == "" {
		if ex, ok := d.Headers[HeaderExchange]; ok {
			return headerString(ex), headerString(d.Headers[HeaderRoutingKey])
		}
	}
	return d.Exchange, d.RoutingKey
}

// republish copies d for the retry or dead-letter queue: same properties and
// body, broker bookkeeping dropped, where it was first published kept
// (origin, in HeaderExchange and HeaderRoutingKey), extra headers set.
func republish(d *amqp.Delivery, extra amqp.Table) amqp.Publishing {
	h := make(amqp.Table, len(d.Headers)+len(extra)+2)
	for k, v := range d.Headers {
		if !wire.BrokerHeader(k) {
			h[k] = v
		}
	}
	ex, rk := origin(d)
	h[HeaderExchange], h[HeaderRoutingKey] = ex, rk
	for k, v := range extra {
		h[k] = v
	}
	return amqp.Publishing{
		Headers: h, ContentType: d.ContentType, ContentEncoding: d.ContentEncoding,
		DeliveryMode: amqp.Persistent, Priority: d.Priority, CorrelationId: d.CorrelationId,
		ReplyTo: d.ReplyTo, MessageId: d.MessageId, Timestamp: d.Timestamp, Type: d.Type,
		AppId: d.AppId, Body: d.Body, // not UserId: the broker rejects one that is not ours
	}
}
