package relay

import (
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
	"time"

	"github.com/lib/pq"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"

	"github.com/mailroom-go/mailroom"
	"github.com/mailroom-go/mailroom/internal/locks"
	"github.com/mailroom-go/mailroom/internal/redact"
	"github.com/mailroom-go/mailroom/internal/wire"
)

// Config configures a Relay. Zero values take the documented defaults.
type Config struct {
	// URL is the AMQP URL, e.g. amqp://guest:guest@127.0.0.1:5672/, or the
	// URLs of a cluster's nodes separated by commas. Required unless URLs
	// is set.
	URL string
	// URLs are the nodes of one RabbitMQ cluster (instead of URL). The
	// relay connects to the first that answers, starting from a random
	// one so relays spread, and to another when its node goes away; what
	// was in flight there is released and published again.
	URLs []string
	// DatabaseURL is the lib/pq URL the relay LISTENs on for wake-ups,
	// holds the wake lock on while it sleeps, and shows itself to the other
	// relays of the table on (three sessions of its own).
	// Required unless DisableListen is set. Use the same database (and
	// search_path) as the *sql.DB given to New.
	DatabaseURL string
	// Tables names the outbox, dead-letter and published tables.
	// Default: mailroom_outbox, mailroom_outbox_dead, mailroom_outbox_published.
	Tables mailroom.Tables
	// Name identifies this relay instance in logs and in the AMQP connection
	// name ("mailroom-relay <Name>"). Default: hostname and pid.
	Name string

	// BatchSize is how many rows one claim takes, besides the later rows
	// of the keys it takes (their runs, up to ConfirmWindow rows in all).
	// Default DefaultBatchSize (500).
	BatchSize int
	// ConfirmWindow bounds the messages published but not yet confirmed by
	// the broker; at least BatchSize. Left at 0, it is 1024 (or BatchSize,
	// if larger) shared among the relays publishing on the table (512 each
	// for two, never below BatchSize): RabbitMQ does best with about 1024 unconfirmed in all,
	// beyond which messages wait in its queues and cost it more CPU each.
	// Relays count each other every second by advisory locks held on a
	// session of their own (not with DisableListen, which leaves the
	// window whole). Set it to fix the window; Stats reports the one in
	// effect.
	ConfirmWindow int
	// ActiveRelays is how many relays of the table publish at once; the
	// others stand by, and one takes over within about a second when a
	// publishing relay stops, dies or cannot reach the broker, and within
	// about 10 s when it freezes with its session open (see coordinate.go; run
	// the relays of a table as one database role). Default 1:
	// one relay already keeps RabbitMQ near its limit, and a second
	// publishing beside it only adds work for the broker and the database
	// (two relays delivered 0.91–0.97× what one did). Raise it when one
	// relay cannot keep up with your broker (a cluster, or one far away).
	// Relays with DisableListen take no slot and publish whenever no relay
	// publishes alone (a lone relay's rows carry no lease, so they claim
	// nothing meanwhile). At most 64; give the relays
	// of a table the same value.
	ActiveRelays int
	// ConfirmTimeout bounds the wait for one confirm. When it passes, the
	// channel is closed and every unconfirmed row is retried (the broker's
	// answer is unknown). Default 15s.
	ConfirmTimeout time.Duration
	// Lease is how long a claimed row belongs to this relay while other
	// relays publish on the table too. A relay that dies mid-batch loses
	// its rows to others when the lease expires. (A relay publishing alone
	// leases nothing, and hands a row back when it has held it Lease less
	// ConfirmTimeout, as a leasing relay does.) Default 60s; must exceed
	// 2×ConfirmTimeout.
	Lease time.Duration
	// PollInterval is how often the relay looks for due rows without being
	// woken: the latency of delayed and retried messages, and of everything
	// when notifications are off or lost. Default 500ms.
	PollInterval time.Duration
	// DisableListen turns off LISTEN (for PgBouncer in transaction mode);
	// the relay then finds new rows by polling only, and never takes the
	// wake lock, so writers never send a NOTIFY for it. It also keeps the
	// relay from preparing statements on the *sql.DB given to New, which it
	// otherwise does for its delete: if only that pool goes
	// through PgBouncer in transaction mode, use PgBouncer 1.21 or later
	// with max_prepared_statements set, or set DisableListen.
	DisableListen bool

	// MaxMessageSize is the largest payload the relay publishes, in bytes;
	// a larger row fails as an attempt without being sent (and is
	// dead-lettered after MaxAttempts). Default DefaultMaxMessageSize
	// (16 MiB, RabbitMQ 4's default max_message_size). Keep it at or below
	// the broker's limit: a message over that closes the channel, which the
	// relay also counts as an attempt of that row, but which hands back
	// every other unconfirmed message with it (published again). At most
	// 512 MiB, RabbitMQ's hard limit.
	MaxMessageSize int

	// MaxAttempts is how many failed publishes (nack, unroutable, missing
	// exchange, refused by the broker, too large) move a row to the
	// dead-letter table. A lost connection is not the message's fault and
	// does not count. Default DefaultMaxAttempts (20).
	MaxAttempts int
	// MinBackoff and MaxBackoff bound the exponential backoff (with jitter)
	// between attempts of one row. Defaults 1s and 5m.
	MinBackoff, MaxBackoff time.Duration

	// Retain keeps published rows in the published table for this long
	// (audit, replay) instead of deleting them. 0 (default) deletes at once.
	Retain time.Duration

	// Logger receives the relay's logs; nil discards them. Keys:
	// message_id, exchange, routing_key, key, attempt, error. Successful
	// publishes are not logged.
	Logger *slog.Logger

	// TracerProvider creates the producer span of each publish (see the
	// package doc). Default nil: the global provider (otel.GetTracerProvider).
	TracerProvider trace.TracerProvider
	// MeterProvider creates the relay's instruments (see the package doc
	// for their names). Default nil: the global provider.
	MeterProvider metric.MeterProvider
	// Propagator reads the trace context outbox.Add stored in the headers
	// and writes the publish span's context into the AMQP headers. Default
	// nil: the global propagator, looked up at each use.
	Propagator propagation.TextMapPropagator
	// CloudEvents, when set, publishes every message as a CloudEvent in
	// binary mode (see CloudEvents).
	CloudEvents *CloudEvents

	// BacklogInterval is how often at most the pending-rows and lag gauges
	// run Status, which scans the outbox and dead-letter tables; it runs
	// only when a metric reader collects. Default 5s; negative turns the
	// two gauges off (the sidecar, which exports its own, does that).
	BacklogInterval time.Duration
}

// CloudEvents publishes messages as CloudEvents 1.0 in binary mode over
// AMQP 0-9-1: the context attributes as headers named Prefix+attribute
// (specversion 1.0; id the message id; source Source; type the message's
// Type, or its routing key when it has none; time its creation time, RFC
// 3339; subject its Key, when set), the payload as the body and
// datacontenttype as the content_type property. The headers replace any of
// the same names the row carries. The inbox reads them back (any prefix).
type CloudEvents struct {
	// Source is the events' source attribute, a URI reference naming the
	// producer, e.g. "/orders" or "urn:acme:orders". Required.
	Source string
	// Prefix of the attribute headers: "cloudEvents_" (the default, as the
	// AMQP binding says), "cloudEvents:" or "ce-" (what some SDKs expect).
	Prefix string
}

// The defaults of Config's zero values.
const (
	DefaultBatchSize       = 500
	DefaultConfirmWindow   = 1024 // shared among the relays publishing (see ConfirmWindow)
	DefaultActiveRelays    = 1
	DefaultMaxAttempts     = 20
	DefaultConfirmTimeout  = 15 * time.Second
	DefaultLease           = 60 * time.Second
	DefaultPollInterval    = 500 * time.Millisecond
	DefaultMinBackoff      = time.Second
	DefaultMaxBackoff      = 5 * time.Minute
	DefaultBacklogInterval = 5 * time.Second
	// DefaultMaxMessageSize is 16 MiB, RabbitMQ 4's default
	// max_message_size.
	DefaultMaxMessageSize = wire.DefaultMaxMessageSize
)

func (c *Config) setDefaults() {
	if c.Name == "" {
		h, _ := os.Hostname()
		c.Name = fmt.Sprintf("%s-%d", h, os.Getpid())
	}
	def := func(v *int, d int) {
		if *v == 0 {
			*v = d
		}
	}
	defDur := func(v *time.Duration, d time.Duration) {
		if *v == 0 {
			*v = d
		}
	}
	def(&c.BatchSize, DefaultBatchSize)
	def(&c.ConfirmWindow, max(DefaultConfirmWindow, c.BatchSize))
	def(&c.ActiveRelays, DefaultActiveRelays)
	def(&c.MaxAttempts, DefaultMaxAttempts)
	def(&c.MaxMessageSize, DefaultMaxMessageSize)
	defDur(&c.ConfirmTimeout, DefaultConfirmTimeout)
	defDur(&c.Lease, DefaultLease)
	defDur(&c.PollInterval, DefaultPollInterval)
	defDur(&c.MinBackoff, DefaultMinBackoff)
	defDur(&c.MaxBackoff, DefaultMaxBackoff)
	defDur(&c.BacklogInterval, DefaultBacklogInterval)
	if c.Logger == nil {
		c.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
}

func (c *Config) validate() error {
	switch {
	case c.DatabaseURL == "" && !c.DisableListen:
		return fmt.Errorf("relay: Config.DatabaseURL is empty: set it (the relay LISTENs for wake-ups) or set DisableListen to rely on polling")
	case c.BatchSize < 1 || c.BatchSize > 10000:
		return fmt.Errorf("relay: Config.BatchSize %d: must be between 1 and 10000", c.BatchSize)
	case c.ConfirmWindow < c.BatchSize:
		return fmt.Errorf("relay: Config.ConfirmWindow %d cannot be smaller than Config.BatchSize (%d)", c.ConfirmWindow, c.BatchSize)
	case c.ActiveRelays < 1 || c.ActiveRelays > locks.MaxActive:
		return fmt.Errorf("relay: Config.ActiveRelays %d: must be between 1 and %d", c.ActiveRelays, locks.MaxActive)
	case c.CloudEvents != nil && c.CloudEvents.Source == "":
		return fmt.Errorf("relay: Config.CloudEvents.Source is empty: set the events' source, a URI reference such as /orders")
	case c.CloudEvents != nil && c.CloudEvents.Prefix != "" && !wire.ValidCloudEventsPrefix(c.CloudEvents.Prefix):
		return fmt.Errorf("relay: Config.CloudEvents.Prefix %q: use %s", c.CloudEvents.Prefix, strings.Join(wire.CloudEventsPrefixes, ", "))
	case c.ConfirmTimeout < 100*time.Millisecond:
		return fmt.Errorf("relay: Config.ConfirmTimeout %s: must be at least 100ms", c.ConfirmTimeout)
	case c.Lease/2 < c.ConfirmTimeout: // Lease < 2 × ConfirmTimeout, without overflow
		return fmt.Errorf("relay: Config.Lease %s must be at least twice ConfirmTimeout (%s), or rows are re-claimed while their confirms are still awaited", c.Lease, c.ConfirmTimeout)
	case c.PollInterval < 10*time.Millisecond:
		return fmt.Errorf("relay: Config.PollInterval %s: must be at least 10ms", c.PollInterval)
	case c.MaxMessageSize < 1 || c.MaxMessageSize > wire.MaxMessageSizeLimit:
		return fmt.Errorf("relay: Config.MaxMessageSize %d: must be between 1 and %d bytes (RabbitMQ's hard limit)", c.MaxMessageSize, wire.MaxMessageSizeLimit)
	case c.MaxAttempts < 1:
		return fmt.Errorf("relay: Config.MaxAttempts %d: must be at least 1", c.MaxAttempts)
	case c.MinBackoff < 0:
		return fmt.Errorf("relay: Config.MinBackoff %s: must be 0 (default 1s) or positive", c.MinBackoff)
	case c.MaxBackoff < c.MinBackoff:
		return fmt.Errorf("relay: Config.MaxBackoff %s cannot be shorter than MinBackoff (%s)", c.MaxBackoff, c.MinBackoff)
	case c.Retain < 0:
		return fmt.Errorf("relay: Config.Retain %s: must be 0 (delete) or positive", c.Retain)
	}
	if c.DatabaseURL != "" {
		// Checked here so no later error quotes a URL lib/pq cannot parse
		// (its parse errors quote it, password included); redacted here.
		if _, err := pq.NewConnector(c.DatabaseURL); err != nil {
			return fmt.Errorf("relay: Config.DatabaseURL: %w", redact.Error(err, c.DatabaseURL))
		}
	}
	return nil
}
