// Package wire is mailroom's wire contract in one place: the headers it
// reserves, what an outbox row becomes as an AMQP message, and the rules
// both ends apply to a message (outbox.Add before it writes a row, the
// relay to every row it publishes, whoever wrote it, and the inbox to
// every delivery). docs/wire.md is its page for users; wire_test.go at the
// module root checks it end to end.
package wire

import (
	"bytes"
	"encoding/json"
	"fmt"
	"hash/fnv"
	"mime"
	"strconv"
	"strings"
	"unicode/utf8"
)

// Headers mailroom reads and writes. Names starting with ReservedPrefix
// are mailroom's, and HeaderBucket: Add refuses them, the relay refuses a
// row that has them, and the inbox never shows them to a handler.
const (
	ReservedPrefix = "x-mailroom-"
	// HeaderKey carries the ordering key (the row's key column).
	HeaderKey = "x-mailroom-key"
	// HeaderBucket carries Bucket(key) beside HeaderKey: partitioned
	// consumption routes on it (inbox.DeclarePartitions) through a headers
	// exchange, which ignores every name starting with "x-" — hence the
	// one reserved name without that prefix.
	HeaderBucket = "mailroom-bucket"
	// HeaderAttempt is the attempt number of a redelivery through the
	// retry queue (absent = 1).
	HeaderAttempt = "x-mailroom-attempt"
	// HeaderReason, on a dead letter, says why it was dead-lettered.
	HeaderReason = "x-mailroom-reason"
	// HeaderQueue and HeaderConsumer, on a dead letter, say where it failed.
	HeaderQueue    = "x-mailroom-queue"
	HeaderConsumer = "x-mailroom-consumer"
	// HeaderExchange and HeaderRoutingKey, on a retry or a dead letter,
	// keep where the message was first published.
	HeaderExchange   = "x-mailroom-exchange"
	HeaderRoutingKey = "x-mailroom-routing-key"
)

// Limits of the contract.
const (
	// MaxShortString is AMQP's limit on exchange, routing key, type,
	// content type and header names.
	MaxShortString = 255
	// MaxHeaderBytes bounds a message's headers as AMQP encodes them
	// (HeaderBytes): AMQP carries every header in one frame (RabbitMQ's
	// is 128 KiB), and a larger one closes the connection.
	MaxHeaderBytes = 64 << 10
	// DefaultMaxMessageSize is the largest payload the relay publishes by
	// default: 16 MiB, RabbitMQ 4's default max_message_size.
	DefaultMaxMessageSize = 16 << 20
	// MaxMessageSizeLimit is RabbitMQ's hard limit on max_message_size.
	MaxMessageSizeLimit = 512 << 20
	// DefaultContentType is the content type of a message that names none.
	DefaultContentType = "application/json"
)

// Buckets is how many buckets Bucket spreads keys over.
const Buckets = 64

// Bucket is the bucket of an ordering key, in decimal: FNV-1a (32-bit) of
// its bytes modulo Buckets. It is part of the wire contract and never
// changes: a key's bucket decides its partition, and a key that moved to
// another partition could be applied there before its earlier messages.
func Bucket(key string) string {
	h := fnv.New32a()
	h.Write([]byte(key))
	return strconv.Itoa(int(h.Sum32() % Buckets))
}

// Reserved reports whether a header name is mailroom's (any case).
func Reserved(name string) bool {
	return (len(name) >= len(ReservedPrefix) && strings.EqualFold(name[:len(ReservedPrefix)], ReservedPrefix)) ||
		strings.EqualFold(name, HeaderBucket)
}

// BrokerHeader reports whether a header is the broker's bookkeeping
// (dead-lettering and quorum-queue delivery counts), not the publisher's.
func BrokerHeader(name string) bool {
	return name == "x-death" || name == "x-delivery-count" ||
		strings.HasPrefix(name, "x-first-death-") || strings.HasPrefix(name, "x-last-death-")
}

// IsJSON reports whether a content type says JSON: application/json or
// any …+json (application/cloudevents+json), parameters allowed.
func IsJSON(contentType string) bool {
	if contentType == "" {
		return false
	}
	mt, _, err := mime.ParseMediaType(contentType)
	return err == nil && (mt == "application/json" || strings.HasSuffix(mt, "+json"))
}

// HeaderBytes is the size of headers as AMQP encodes a table of strings:
// per entry a name length byte, the name, a type byte, a value length and
// the value.
func HeaderBytes(h map[string]string) int {
	n := 0
	for k, v := range h {
		n += 6 + len(k) + len(v)
	}
	return n
}

// Violation is a message breaking one rule of the contract: Field says
// which part, Problem what is wrong and what to do.
type Violation struct {
	Field, Problem string
}

func (v *Violation) Error() string { return v.Field + ": " + v.Problem }

func violation(field, format string, args ...any) *Violation {
	return &Violation{field, fmt.Sprintf(format, args...)}
}

// Message is what the rules look at.
type Message struct {
	Exchange, RoutingKey, Type, ContentType string
	Headers                                 map[string]string
	Payload                                 []byte
}

// Check applies the rules of the contract to m and returns the first it
// breaks, or nil: the AMQP limits, headers that are text and not
// reserved, and a payload that is JSON when the content type says so.
func Check(m Message) error {
	for _, f := range [...]struct{ name, v string }{{"Exchange", m.Exchange}, {"RoutingKey", m.RoutingKey}, {"Type", m.Type}, {"ContentType", m.ContentType}} {
		if err := ShortString(f.v); err != nil {
			return violation(f.name, "%v", err)
		}
	}
	for name, v := range m.Headers {
		switch {
		case name == "":
			return violation("Headers", "empty header name")
		case strings.EqualFold(name, HeaderBucket):
			return violation("Headers", "%q is reserved by mailroom: the relay sets it from Message.Key", name)
		case Reserved(name):
			return violation("Headers", "%q: names starting with %q are reserved by mailroom (use Message.Key for the ordering key)", name, ReservedPrefix)
		}
		if err := ShortString(name); err != nil {
			return violation("Headers", "name: %v", err)
		}
		if err := Text(v); err != nil {
			return violation("Headers", "%q: %v", name, err)
		}
	}
	if n := HeaderBytes(m.Headers); n > MaxHeaderBytes {
		return violation("Headers", "%d bytes encoded is over the %d-byte limit: AMQP sends all headers in one frame; put large data in the payload", n, MaxHeaderBytes)
	}
	return CheckPayload(m.ContentType, m.Payload)
}

// CheckPayload is the payload's rule: JSON when the content type says so.
// The inbox applies it to every delivery, whoever published it.
func CheckPayload(contentType string, payload []byte) error {
	if IsJSON(contentType) && !json.Valid(payload) {
		return violation("Payload", "not valid JSON, but ContentType is %q; fix the payload or set ContentType", contentType)
	}
	return nil
}

// ShortString enforces AMQP's 255-byte short string limit, on text.
func ShortString(s string) error {
	if len(s) > MaxShortString {
		return fmt.Errorf("%d bytes is over the %d-byte limit", len(s), MaxShortString)
	}
	return Text(s)
}

// Text enforces what PostgreSQL's text columns and jsonb accept (and AMQP
// strings require): UTF-8 without NUL bytes.
func Text(s string) error {
	if strings.IndexByte(s, 0) >= 0 {
		return fmt.Errorf("contains a NUL byte")
	}
	if !utf8.ValidString(s) {
		return fmt.Errorf("%q is not valid UTF-8", s)
	}
	return nil
}

// ParseHeaders reads the headers column (jsonb): a JSON object whose
// string values are taken as they are, and any other value (a number, a
// boolean, null, an object or array) as its JSON text, so a row written
// by hand with {"n": 1} is published with the header n = "1".
func ParseHeaders(raw []byte) (map[string]string, error) {
	if len(raw) == 0 || bytes.Equal(raw, []byte("null")) {
		return nil, nil
	}
	var obj map[string]json.RawMessage
	if err := json.Unmarshal(raw, &obj); err != nil {
		return nil, violation("Headers", "the headers column is not a JSON object (%v): write headers as an object of strings, e.g. {\"tenant\": \"acme\"}", err)
	}
	h := make(map[string]string, len(obj))
	for k, v := range obj {
		var s string
		if json.Unmarshal(v, &s) == nil {
			h[k] = s
		} else {
			h[k] = string(v)
		}
	}
	return h, nil
}
