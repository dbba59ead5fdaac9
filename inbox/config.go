package inbox

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/jmoiron/sqlx"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"

	"github.com/mailroom-go/mailroom"
	"github.com/mailroom-go/mailroom/internal/amqpx"
	"github.com/mailroom-go/mailroom/internal/tablenames"
)

// Handler applies one message inside tx, the transaction that also records
// the message id. Return nil to commit (then the delivery is acked); return
// an error, or panic, to roll back and retry later. Do not commit or roll
// back tx yourself. A handler may be called again for the same message
// after an error (its own, or in a batch another message's: see
// Config.BatchSize), so it must not have effects outside tx that cannot be
// repeated (or must make those idempotent by m.ID).
type Handler func(ctx context.Context, tx *sqlx.Tx, m Message) error

// Defaults for Config.
const (
	DefaultConcurrency      = 4
	DefaultMaxAttempts      = 10
	DefaultMinBackoff       = time.Second
	DefaultMaxBackoff       = 5 * time.Minute
	DefaultShutdownTimeout  = 20 * time.Second
	DefaultReconnectMaxWait = 30 * time.Second
	DefaultPurgeInterval    = time.Hour
	DefaultRetention        = 7 * 24 * time.Hour
	DefaultHoldLimit        = 25 * time.Minute
	maxBatchSize            = 1000
)

// Config configures a Consumer. URL, Queue, Consumer and Handler are
// required; every other field has a default.
type Config struct {
	// URL is the AMQP URL, e.g. amqp://guest:guest@127.0.0.1:5672/, or the
	// URLs of a cluster's nodes separated by commas. Required unless URLs
	// is set.
	URL string
	// URLs are the nodes of one RabbitMQ cluster (instead of URL). The
	// consumer connects to the first that answers, starting from a random
	// one so consumers spread, and to another when its node goes away;
	// what it held unacked there is redelivered and deduplicated.
	URLs []string
	// Queue is the queue to consume. It must exist; DeclareTopology creates
	// it with its retry and dead-letter queues.
	Queue string
	// Consumer names the consumer and scopes deduplication: two consumers
	// with different names each apply a message once. Keep it stable.
	Consumer string
	// Handler applies each message. Required.
	Handler Handler

	// ConnectionName is the AMQP connection_name, shown by the management
	// UI and `rabbitmqctl list_connections client_properties`.
	// Default "mailroom-inbox " + Consumer.
	ConnectionName string
	// RetryQueue receives failed messages with a per-message TTL; when the
	// TTL expires the broker dead-letters them back to Queue.
	// Default Queue + ".retry". Run declares it when it does not exist
	// (see NoDeclare).
	RetryQueue string
	// DeadLetterQueue receives undecodable messages and messages that failed
	// MaxAttempts times, with the reason in the x-mailroom-reason header.
	// Default Queue + ".dead". Run declares it when it does not exist (see
	// NoDeclare).
	DeadLetterQueue string
	// NoDeclare stops Run from declaring RetryQueue and DeadLetterQueue
	// when they do not exist. By default Run declares a missing one as
	// DeclareTopology would (a durable quorum queue; the retry queue
	// dead-letters to Queue through the default exchange, which works
	// whatever Queue's arguments) and leaves Queue as it is. Set it when
	// you manage the topology yourself: Run then returns an error wrapping
	// ErrQueueNotFound that names the missing queue.
	NoDeclare bool

	// Concurrency is the number of workers, each with its own transaction.
	// Default DefaultConcurrency (4). Let db keep at least Concurrency + 1
	// idle connections (db.SetMaxIdleConns): database/sql keeps 2 by
	// default and closes any other connection after its transaction, so
	// the workers would open a new PostgreSQL connection for most
	// transactions (half the throughput of a transaction per message).
	Concurrency int
	// Prefetch is the channel's QoS prefetch count, the most unacked
	// deliveries held at once. Default 2 × Concurrency × BatchSize.
	Prefetch int
	// BatchSize > 1 lets a worker apply up to that many deliveries already
	// waiting for it in one transaction, committed once and then acked.
	// The handlers run one after the other without savepoints; when one
	// fails, the whole transaction is rolled back and the batch is redone
	// with a savepoint per message, so a failing handler undoes only its
	// own message. The redo calls the handlers before the failing one
	// again (with the same Message.Attempt); the failing one is not called
	// again. A batch holding a retried message goes straight to
	// savepoints. Default 1 (a transaction per message); at most 1000.
	// Keep it at 64 or below: each savepoint that writes takes a
	// subtransaction id, and past 64 in one transaction PostgreSQL's
	// subtransaction cache overflows, which slows snapshots server-wide.
	BatchSize int
	// OrderedByKey handles messages that share an x-mailroom-key header one
	// at a time in delivery order, while different keys run in parallel on
	// Concurrency workers (by a hash of the key). A failing message is then
	// retried in place, holding back the later messages of its worker, and
	// not through the retry queue. Messages without a key run in parallel.
	// A worker's backlog is bounded (Prefetch / Concurrency); when one
	// worker is slow the others wait for room too. Order holds within one
	// consumer process: with several, declare the queue with
	// Topology.SingleActiveConsumer.
	OrderedByKey bool

	// MaxAttempts is how many times a message is tried before it is
	// dead-lettered. Default DefaultMaxAttempts (10).
	MaxAttempts int
	// MinBackoff and MaxBackoff bound the exponential, jittered delay
	// before a retry: MinBackoff after the first failure, doubling up to
	// MaxBackoff. Defaults 1s and 5m.
	MinBackoff, MaxBackoff time.Duration

	// ShutdownTimeout bounds how long Run, after its context ends, handles
	// the deliveries its workers already hold (not under OrderedByKey) and
	// waits for running handlers; then their context is cancelled.
	// Deliveries not handled by then are left unacked and the broker
	// redelivers them. Closing the connection may take up to 5s more:
	// keep the two below the stop grace period of your platform (30s by
	// default on Kubernetes). Default 20s.
	ShutdownTimeout time.Duration
	// ReconnectMaxWait caps the backoff between reconnection attempts.
	// Default 30s.
	ReconnectMaxWait time.Duration
	// HoldLimit bounds how long a delivery stays unacked here (held
	// through a database outage, a retry in place under OrderedByKey, a
	// slow handler). Past it Run hands every delivery back to the queue,
	// in order, by closing its connection, and consumes again once the
	// database answers. Otherwise RabbitMQ's consumer_timeout (30 min by
	// default, checked once a minute) would close the channel and return
	// them with their delivery count raised: a quorum queue dead-letters a
	// message past its delivery limit, without a reason. Keep it a few
	// minutes under the broker's timeout, and above the longest handler.
	// Default DefaultHoldLimit (25 min); negative disables it.
	HoldLimit time.Duration

	// Table is the deduplication table (see package dedupe).
	// Default "mailroom_inbox".
	Table string
	// Tables names the installation's tables, as the relay and
	// mailroom.Migrate take them; the deduplication table is Tables.Inbox.
	// Set Table or Tables.
	Tables mailroom.Tables
	// Retention is how long message ids are remembered; it must be longer
	// than any message can stay queued or retrying. Default 7 days.
	Retention time.Duration
	// PurgeInterval is how often Run purges this consumer's ids (scope
	// Consumer) older than Retention; other consumers' ids on the table are
	// theirs to purge (every running instance of this consumer does it;
	// concurrent purges share the work). Default 1h; negative disables
	// purging (then run dedupe.Store.Purge(ctx, db, Consumer, Retention)
	// yourself, or name the consumer in mailroom-relay's --purge-inbox).
	PurgeInterval time.Duration

	// Logger receives warnings and errors (and Debug lines per message;
	// nothing per successful message above Debug). Keys: consumer, queue,
	// message_id, exchange, routing_key, key, attempt, error, retry_in.
	// Nil discards.
	Logger *slog.Logger

	// TracerProvider creates the consumer span around each handler call
	// (see the package doc). Default nil: the global provider
	// (otel.GetTracerProvider).
	TracerProvider trace.TracerProvider
	// MeterProvider creates the consumer's instruments (see the package
	// doc for their names). Default nil: the global provider.
	MeterProvider metric.MeterProvider
	// Propagator reads the writer's trace context from the message
	// headers. Default nil: the global propagator, looked up at each use.
	Propagator propagation.TextMapPropagator
}

// withDefaults validates cfg and fills its defaults. Every error names the
// field.
func (cfg Config) withDefaults() (Config, error) {
	bad := func(field, format string, args ...any) (Config, error) {
		return cfg, fmt.Errorf("inbox: Config.%s: %s", field, fmt.Sprintf(format, args...))
	}
	if _, err := amqpx.ParseNodes(cfg.URL, cfg.URLs); err != nil {
		return cfg, fmt.Errorf("inbox: Config.%w", err)
	}
	if cfg.Queue == "" {
		return bad("Queue", "required: the queue to consume (see DeclareTopology)")
	}
	if cfg.Consumer == "" {
		return bad("Consumer", "required: a stable name that scopes deduplication, e.g. \"payments\"")
	}
	if strings.IndexByte(cfg.Consumer, 0) >= 0 || !utf8.ValidString(cfg.Consumer) || len(cfg.Consumer) > 200 {
		return bad("Consumer", "%q: must be UTF-8 text without NUL bytes, at most 200 bytes (it is stored with every message id)", cfg.Consumer)
	}
	if cfg.Handler == nil {
		return bad("Handler", "required")
	}
	table, err := tablenames.Parse(cfg.Table, "Inbox", cfg.Tables.Inbox, mailroom.DefaultInboxTable)
	if err != nil {
		return cfg, fmt.Errorf("inbox: Config.%w", err)
	}
	cfg.Table = table.String()
	if cfg.ConnectionName == "" {
		cfg.ConnectionName = "mailroom-inbox " + cfg.Consumer
	}
	if cfg.RetryQueue == "" {
		cfg.RetryQueue = RetryQueueName(cfg.Queue)
	}
	if cfg.DeadLetterQueue == "" {
		cfg.DeadLetterQueue = DeadLetterQueueName(cfg.Queue)
	}
	for _, q := range []struct{ field, name string }{{"Queue", cfg.Queue}, {"RetryQueue", cfg.RetryQueue}, {"DeadLetterQueue", cfg.DeadLetterQueue}} {
		if len(q.name) > 255 {
			return bad(q.field, "%d bytes: AMQP queue names are at most 255 (the retry and dead-letter queues default to Queue's name plus %q and %q)", len(q.name), ".retry", ".dead")
		}
	}
	if cfg.RetryQueue == cfg.Queue || cfg.DeadLetterQueue == cfg.Queue || cfg.RetryQueue == cfg.DeadLetterQueue {
		return bad("RetryQueue", "Queue, RetryQueue and DeadLetterQueue must be three different queues")
	}
	if cfg.Concurrency == 0 {
		cfg.Concurrency = DefaultConcurrency
	} else if cfg.Concurrency < 0 || cfg.Concurrency > 1000 {
		return bad("Concurrency", "%d: must be between 1 and 1000", cfg.Concurrency)
	}
	if cfg.BatchSize == 0 {
		cfg.BatchSize = 1
	} else if cfg.BatchSize < 0 || cfg.BatchSize > maxBatchSize {
		return bad("BatchSize", "%d: must be between 1 and %d", cfg.BatchSize, maxBatchSize)
	}
	if cfg.Prefetch == 0 {
		cfg.Prefetch = min(2*cfg.Concurrency*cfg.BatchSize, 65535)
	} else if cfg.Prefetch < 0 || cfg.Prefetch > 65535 {
		return bad("Prefetch", "%d: must be between 1 and 65535", cfg.Prefetch)
	}
	if cfg.MaxAttempts == 0 {
		cfg.MaxAttempts = DefaultMaxAttempts
	} else if cfg.MaxAttempts < 0 {
		return bad("MaxAttempts", "%d: must be at least 1", cfg.MaxAttempts)
	}
	if cfg.MinBackoff == 0 {
		cfg.MinBackoff = DefaultMinBackoff
	}
	if cfg.MaxBackoff == 0 {
		cfg.MaxBackoff = max(DefaultMaxBackoff, cfg.MinBackoff)
	}
	if cfg.MinBackoff < time.Millisecond {
		return bad("MinBackoff", "%s: must be at least 1ms (a retry without delay hot-loops)", cfg.MinBackoff)
	}
	if cfg.MaxBackoff < cfg.MinBackoff {
		return bad("MaxBackoff", "%s is shorter than MinBackoff (%s)", cfg.MaxBackoff, cfg.MinBackoff)
	}
	if cfg.ShutdownTimeout == 0 {
		cfg.ShutdownTimeout = DefaultShutdownTimeout
	} else if cfg.ShutdownTimeout < 0 {
		return bad("ShutdownTimeout", "%s: must be positive", cfg.ShutdownTimeout)
	}
	if cfg.ReconnectMaxWait == 0 {
		cfg.ReconnectMaxWait = DefaultReconnectMaxWait
	} else if cfg.ReconnectMaxWait < 10*time.Millisecond {
		return bad("ReconnectMaxWait", "%s: must be at least 10ms", cfg.ReconnectMaxWait)
	}
	if cfg.HoldLimit == 0 {
		cfg.HoldLimit = DefaultHoldLimit
	} else if cfg.HoldLimit > 0 && cfg.HoldLimit < time.Second {
		return bad("HoldLimit", "%s: must be at least 1s (or negative to disable it)", cfg.HoldLimit)
	}
	if cfg.Retention == 0 {
		cfg.Retention = DefaultRetention
	}
	if cfg.Retention/2/cfg.MaxBackoff < time.Duration(cfg.MaxAttempts) { // Retention < 2 × MaxAttempts × MaxBackoff, without overflow
		return bad("Retention", "%s is shorter than twice the longest retry span (MaxAttempts × MaxBackoff = %d × %s): ids would be forgotten while their message may still be redelivered", cfg.Retention, cfg.MaxAttempts, cfg.MaxBackoff)
	}
	if cfg.PurgeInterval == 0 {
		cfg.PurgeInterval = DefaultPurgeInterval
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	return cfg, nil
}
