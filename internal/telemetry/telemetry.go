// Package telemetry holds what the relay, the inbox and the outbox share for
// OpenTelemetry: the instrument names (which the sidecar's Prometheus
// exporter renders unchanged, see Names), the attribute keys, the
// providers' nil-means-global resolution and an AMQP header carrier for
// trace propagation.
//
// Library packages use the OpenTelemetry API only; an SDK is wired by the
// application (or a test).
package telemetry

import (
	"net/url"
	"strconv"

	amqp "github.com/rabbitmq/amqp091-go"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/propagation"
	semconv "go.opentelemetry.io/otel/semconv/v1.39.0"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"
)

// Instrumentation scope names: the import path of the instrumented package.
const (
	ScopeRelay  = "github.com/mailroom-go/mailroom/relay"
	ScopeInbox  = "github.com/mailroom-go/mailroom/inbox"
	ScopeOutbox = "github.com/mailroom-go/mailroom/outbox"
)

// Instrument names. The OpenTelemetry Prometheus exporter turns dots into
// underscores, appends the unit ("_seconds") and, for counters, "_total":
// the Prometheus name is in each comment.
const (
	// RelayPublished counts messages confirmed by the broker and removed
	// from the outbox. mailroom_relay_published_total{table}
	RelayPublished = "mailroom.relay.published"
	// RelayPublishFailures counts failed publishes by reason (see Reason*).
	// mailroom_relay_publish_failures_total{table,reason}
	RelayPublishFailures = "mailroom.relay.publish.failures"
	// RelayDeadLettered counts rows moved to the dead-letter table.
	// mailroom_relay_dead_lettered_total{table}
	RelayDeadLettered = "mailroom.relay.dead_lettered"
	// RelayReleased counts rows handed back unpublished without counting an
	// attempt (shutdown, lost channel, confirm timeout).
	// mailroom_relay_released_total{table}
	RelayReleased = "mailroom.relay.released"
	// RelayConfirmDuration is the time from publish to the broker's
	// confirm (ack, nack or return), in seconds.
	// mailroom_relay_confirm_duration_seconds{table}
	RelayConfirmDuration = "mailroom.relay.confirm.duration"
	// RelayBatchDuration is the time from claiming a batch until every row
	// of it is settled (confirmed, failed or released), in seconds.
	// mailroom_relay_batch_duration_seconds{table}
	RelayBatchDuration = "mailroom.relay.batch.duration"
	// RelayConfirmWindow is the confirm window in effect: ConfirmWindow, or
	// the relay's share of the default while several relays publish on
	// the table. mailroom_relay_confirm_window{table}
	RelayConfirmWindow = "mailroom.relay.confirm_window"
	// RelayStandby is 1 while the relay stands by (other relays of the
	// table hold the publishing slots, Config.ActiveRelays), else 0.
	// mailroom_relay_standby{table}
	RelayStandby = "mailroom.relay.standby"
	// RelayHeld counts the rows the relay has claimed and not yet
	// finished: in flight. A relay publishing alone leases none, so the
	// table's leased rows (Status.InFlight) do not show them.
	// mailroom_relay_held_rows{table}
	RelayHeld = "mailroom.relay.held_rows"
	// RelayClaimDuration is the time of one claim statement, in seconds.
	// mailroom_relay_claim_duration_seconds{table}
	RelayClaimDuration = "mailroom.relay.claim.duration"
	// OutboxPending is the number of rows in the outbox table (due,
	// in flight, backing off or delayed). mailroom_outbox_pending_rows{table}
	OutboxPending = "mailroom.outbox.pending_rows"
	// OutboxOldestPendingAge is the lag: the age in seconds of the oldest
	// row that is due, in flight or retrying (0 when none).
	// mailroom_outbox_oldest_pending_age_seconds{table}
	OutboxOldestPendingAge = "mailroom.outbox.oldest_pending_age"

	// InboxProcessed counts messages applied and committed.
	// mailroom_inbox_processed_total{consumer,queue}
	InboxProcessed = "mailroom.inbox.processed"
	// InboxDuplicates counts deliveries acked without calling the handler
	// because their id was already recorded.
	// mailroom_inbox_duplicates_total{consumer,queue}
	InboxDuplicates = "mailroom.inbox.duplicates"
	// InboxFailures counts handler errors and panics.
	// mailroom_inbox_failures_total{consumer,queue}
	InboxFailures = "mailroom.inbox.failures"
	// InboxRetries counts deliveries sent to the retry queue or retried in
	// place. mailroom_inbox_retries_total{consumer,queue}
	InboxRetries = "mailroom.inbox.retries"
	// InboxDeadLettered counts deliveries sent to the dead-letter queue (or
	// rejected). mailroom_inbox_dead_lettered_total{consumer,queue}
	InboxDeadLettered = "mailroom.inbox.dead_lettered"
	// InboxRequeued counts deliveries returned to the queue after a
	// database or broker failure. mailroom_inbox_requeued_total{consumer,queue}
	InboxRequeued = "mailroom.inbox.requeued"
	// InboxHandlerDuration is the handler's run time in seconds, by
	// result (ok or error).
	// mailroom_inbox_handler_duration_seconds{consumer,queue,result}
	InboxHandlerDuration = "mailroom.inbox.handler.duration"
	// DedupePurged counts message ids purged after their retention.
	// mailroom_dedupe_purged_total{table}
	DedupePurged = "mailroom.dedupe.purged"
)

// Attribute keys (all low cardinality: never a message id).
const (
	AttrTable    = attribute.Key("table")
	AttrReason   = attribute.Key("reason")
	AttrConsumer = attribute.Key("consumer")
	AttrQueue    = attribute.Key("queue")
	AttrResult   = attribute.Key("result")
)

// Values of AttrReason on RelayPublishFailures. nack, unroutable,
// no_exchange and unpublishable count as attempts of the message; timeout
// and channel_closed are not the message's fault and release it instead.
const (
	ReasonNack          = "nack"
	ReasonUnroutable    = "unroutable"
	ReasonNoExchange    = "no_exchange"
	ReasonTimeout       = "timeout"
	ReasonChannelClosed = "channel_closed"
	// ReasonUnpublishable: the broker cannot take the message as it is (a
	// name over 255 bytes, headers larger than a frame); counts as an
	// attempt.
	ReasonUnpublishable = "unpublishable"
)

// DurationBuckets are the histogram boundaries, in seconds, of every
// duration instrument: 1ms to 30s. (The SDK's default boundaries are meant
// for milliseconds and would put every publish in the first bucket.)
var DurationBuckets = []float64{0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30}

// TracerProvider returns tp, or the global provider when tp is nil.
func TracerProvider(tp trace.TracerProvider) trace.TracerProvider {
	if tp == nil {
		return otel.GetTracerProvider()
	}
	return tp
}

// MeterProvider returns mp, or the global provider when mp is nil.
func MeterProvider(mp metric.MeterProvider) metric.MeterProvider {
	if mp == nil {
		return otel.GetMeterProvider()
	}
	return mp
}

// Propagator returns p, or the global propagator when p is nil. The global
// one is resolved at each call, so a propagator set after New still counts.
func Propagator(p propagation.TextMapPropagator) propagation.TextMapPropagator {
	if p == nil {
		return otel.GetTextMapPropagator()
	}
	return p
}

// AMQPCarrier lets a propagator read and write AMQP headers. Get returns
// only string (and []byte) values.
type AMQPCarrier amqp.Table

var _ propagation.TextMapCarrier = AMQPCarrier(nil)

// Get returns the header key as a string, or "".
func (c AMQPCarrier) Get(key string) string {
	switch v := c[key].(type) {
	case string:
		return v
	case []byte:
		return string(v)
	}
	return ""
}

// Set sets the header key.
func (c AMQPCarrier) Set(key, value string) { c[key] = value }

// Keys lists the header names.
func (c AMQPCarrier) Keys() []string {
	keys := make([]string, 0, len(c))
	for k := range c {
		keys = append(keys, k)
	}
	return keys
}

// Tracing is a package's tracer plus a cheap test of whether spans can be
// recorded at all, so the message path skips extracting contexts and
// starting spans when tracing is configured off.
type Tracing struct {
	trace.Tracer
	off bool // a no-op provider was configured
}

// NewTracing returns the tracer of scope from tp (nil: the global
// provider, which may be replaced later).
func NewTracing(tp trace.TracerProvider, scope string) Tracing {
	return Tracing{Tracer: TracerProvider(tp).Tracer(scope), off: isNoop(tp)}
}

// Enabled reports whether a span started now might record: false only for
// a configured no-op provider. With the global provider it cannot tell
// (the API offers no test, and guessing from its type would read another
// module's internals): spans are started, and callers check
// span.IsRecording, which is false until an SDK is installed.
func (t Tracing) Enabled() bool { return !t.off }

func isNoop(tp trace.TracerProvider) bool {
	switch tp.(type) {
	case noop.TracerProvider, *noop.TracerProvider:
		return true
	}
	return false
}

// ServerAttrs are the server.address and server.port of the broker at
// amqpURL, as the messaging semantic conventions put on every span (the
// scheme's port when the URL names none: 5672, 5671 for amqps). None when
// the URL is empty (a cluster: which node serves is known per connection)
// or does not parse (configs validate it first).
func ServerAttrs(amqpURL string) []attribute.KeyValue {
	u, err := url.Parse(amqpURL)
	if err != nil || u.Hostname() == "" {
		return nil
	}
	port, err := strconv.Atoi(u.Port())
	if err != nil {
		port = 5672
		if u.Scheme == "amqps" {
			port = 5671
		}
	}
	return []attribute.KeyValue{semconv.ServerAddress(u.Hostname()), semconv.ServerPort(port)}
}
