package outbox

import (
	"context"
	"database/sql"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/uuid"
	"github.com/lib/pq"
	"go.opentelemetry.io/otel/propagation"

	"github.com/mailroom-go/mailroom"
	"github.com/mailroom-go/mailroom/atcommit"
	"github.com/mailroom-go/mailroom/internal/sqlident"
	"github.com/mailroom-go/mailroom/internal/tablenames"
	"github.com/mailroom-go/mailroom/internal/telemetry"
	"github.com/mailroom-go/mailroom/internal/wire"
)

// Message is one event to publish. Only Payload and a route (Exchange and/or
// RoutingKey) are required.
type Message struct {
	ID          string            // UUID string; Add generates a time-ordered UUID (v7) when empty
	Exchange    string            // RabbitMQ exchange ("" = default exchange, which routes to the queue named RoutingKey)
	RoutingKey  string            // at most 255 bytes
	Key         string            // ordering key (e.g. aggregate id); "" = no ordering constraint; at most 255 bytes
	Type        string            // event type, becomes the AMQP `type` property
	ContentType string            // default "application/json" (with it, or any …+json, Payload must be valid JSON)
	Headers     map[string]string // become AMQP headers; names starting with "x-mailroom-" are reserved
	Payload     []byte            // at most Config.MaxPayloadBytes
	AvailableAt time.Time         // zero = now; later = delayed delivery
}

// Execer is satisfied by *sql.Tx, *sqlx.Tx, *sql.DB, *sqlx.DB, *sql.Conn.
// Pass the transaction of the business change: the message then exists if
// and only if that transaction commits.
type Execer interface {
	ExecContext(ctx context.Context, query string, args ...any) (sql.Result, error)
}

// ErrInvalidMessage is wrapped by every validation error of Add; the error
// text names the message index, the field and what to do.
var ErrInvalidMessage = errors.New("outbox: invalid message")

// MaxHeaderBytes bounds a message's headers as AMQP encodes them (names,
// values and 6 bytes each): AMQP carries every header in one frame, and a
// larger one makes the broker close the relay's connection.
const MaxHeaderBytes = wire.MaxHeaderBytes

// DefaultMaxPayloadBytes is the default payload limit: 1 MiB. RabbitMQ
// accepts more (max_message_size: 16 MiB by default on RabbitMQ 4, and the
// relay's MaxMessageSize is the same), but large payloads in a queue table
// and on a confirm channel hurt every other message; store big blobs
// elsewhere and send a reference.
const DefaultMaxPayloadBytes = 1 << 20

// ReservedHeaderPrefix marks headers mailroom sets itself (x-mailroom-key).
const ReservedHeaderPrefix = wire.ReservedPrefix

// Config configures an Outbox. The zero value is valid.
type Config struct {
	// Table is the outbox table, "table" or "schema.table".
	// Default "mailroom_outbox" (resolved through search_path).
	Table string
	// Tables names the installation's tables, as the relay and
	// mailroom.Migrate take them; the outbox is Tables.Outbox. Set Table
	// or Tables (one value then names the tables everywhere).
	Tables mailroom.Tables
	// MaxPayloadBytes rejects larger payloads. Default DefaultMaxPayloadBytes;
	// at most 512 MiB (RabbitMQ's hard limit). The relay publishes at most
	// its own MaxMessageSize (default 16 MiB) and dead-letters larger rows.
	MaxPayloadBytes int
	// Propagator writes the trace context of Add's ctx (the current span,
	// and baggage if the propagator carries it) into each message's
	// Headers, so the relay's publish span and the consumer's span join the
	// writer's trace. Headers the caller set are never overwritten.
	// Default nil: the global propagator (otel.GetTextMapPropagator, a
	// no-op until the application sets one, e.g. to
	// propagation.TraceContext{} for W3C traceparent/tracestate).
	Propagator propagation.TextMapPropagator
	// DB, when set, is the database whose transactions Add is given (with
	// sqlx, its embedded *sql.DB). Add of one message through a *sql.Tx
	// or *sqlx.Tx of DB (or through DB itself) then runs a statement
	// prepared once per connection: one round trip with no parsing or
	// planning, about a quarter of Add's cost in a short transaction.
	// Without it, or for several messages, Add sends one statement with
	// the values as literals (also one round trip). Leave it nil behind
	// PgBouncer in transaction mode before 1.21 (no prepared statements).
	//
	// When DB was opened with OpenDB or NewConnector, Add in a
	// transaction of DB sends nothing: the inserts travel with the
	// transaction's COMMIT (or its next statement), in the same message,
	// and an insert that fails makes Commit fail (see NewConnector).
	DB *sql.DB
}

// Outbox writes messages into the outbox table inside the caller's
// transaction. It is safe for concurrent use.
type Outbox struct {
	table      sqlident.Name
	maxPayload int
	insert     string                        // the statement up to its VALUES list
	propagator propagation.TextMapPropagator // nil: the global one, looked up at each Add

	db             *sql.DB
	atCommit       bool                     // db was opened with atcommit.NewConnector
	insertOne      string                   // the statement prepared on db
	insertDeferred string                   // insertOne marked for the connections of atcommit
	prepared       atomic.Pointer[sql.Stmt] // nil until the first Add that uses it
	prepareMu      sync.Mutex               // one Prepare at a time
}

// stmtTx is satisfied by *sql.Tx and *sqlx.Tx: transactions that can run
// a statement prepared on their database.
type stmtTx interface {
	StmtContext(ctx context.Context, stmt *sql.Stmt) *sql.Stmt
}

// New validates cfg and prepares the insert statement.
func New(cfg Config) (*Outbox, error) {
	table, err := tablenames.Parse(cfg.Table, "Outbox", cfg.Tables.Outbox, mailroom.DefaultOutboxTable)
	if err != nil {
		return nil, fmt.Errorf("outbox: Config.%w", err)
	}
	switch {
	case cfg.MaxPayloadBytes == 0:
		cfg.MaxPayloadBytes = DefaultMaxPayloadBytes
	case cfg.MaxPayloadBytes < 0 || cfg.MaxPayloadBytes > wire.MaxMessageSizeLimit:
		return nil, fmt.Errorf("outbox: Config.MaxPayloadBytes %d: must be between 1 and %d (512 MiB, RabbitMQ's hard limit); 0 means the 1 MiB default", cfg.MaxPayloadBytes, wire.MaxMessageSizeLimit)
	}
	insert := `INSERT INTO ` + table.Quoted() + ` (id, exchange, routing_key, key, type, content_type, headers, payload, available_at) VALUES `
	insertOne := insert + `($1, $2, $3, $4, $5, $6, $7, $8, coalesce($9, now()))`
	return &Outbox{
		table:          table,
		maxPayload:     cfg.MaxPayloadBytes,
		insert:         insert,
		propagator:     cfg.Propagator,
		db:             cfg.DB,
		atCommit:       cfg.DB != nil && atcommit.Enabled(cfg.DB),
		insertOne:      insertOne,
		insertDeferred: atcommit.Deferred(insertOne),
	}, nil
}

// Add validates msgs and inserts them with one statement through tx. It
// never begins or commits a transaction: pass the transaction that holds the
// business change. Nothing is written when any message is invalid.
func (o *Outbox) Add(ctx context.Context, tx Execer, msgs ...Message) error {
	if len(msgs) == 0 {
		return nil
	}
	n := len(msgs)
	vals := make([]values, n)
	trace := o.traceHeaders(ctx)
	for i := range msgs {
		if err := o.values(i, msgs[i], trace, &vals[i]); err != nil {
			return err
		}
	}
	if o.atCommit {
		if _, inTx := tx.(stmtTx); inTx || n == 1 {
			return o.addAtCommit(ctx, tx, vals)
		}
	}
	if n == 1 && o.db != nil {
		if done, err := o.addPrepared(ctx, tx, &vals[0]); done {
			return err
		}
	}
	// The values travel as quoted literals, not parameters: lib/pq sends a
	// statement without parameters in one round trip (simple query), one
	// with parameters in two (parse and describe, then bind and execute).
	// In a short business transaction that round trip is most of Add's
	// cost. Every value is quoted (pq.QuoteLiteral, hex for the payload);
	// ids are validated UUIDs.
	var q strings.Builder
	q.Grow(len(o.insert) + n*256)
	q.WriteString(o.insert)
	for i, v := range vals {
		if i > 0 {
			q.WriteString(", ")
		}
		q.WriteString("('" + v.id + "', ")
		for _, s := range []string{v.m.Exchange, v.m.RoutingKey, v.m.Key, v.m.Type, v.m.ContentType} {
			q.WriteString(pq.QuoteLiteral(s))
			q.WriteString(", ")
		}
		if v.headers == nil {
			q.WriteString("NULL")
		} else {
			q.WriteString(pq.QuoteLiteral(*v.headers))
		}
		q.WriteString(`, E'\\x`)
		q.WriteString(hex.EncodeToString(v.m.Payload))
		q.WriteString("', ")
		if v.m.AvailableAt.IsZero() {
			q.WriteString("DEFAULT")
		} else {
			q.WriteString(timeLiteral(v.m.AvailableAt))
		}
		q.WriteString(")")
	}
	if _, err := tx.ExecContext(ctx, q.String()); err != nil {
		return fmt.Errorf("outbox: insert %d message(s) into %s: %w", n, o.table, err)
	}
	return nil
}

// values is one validated message, ready for the statement.
type values struct {
	m       Message
	id      string  // canonical UUID
	headers *string // JSON object; nil: none
}

func (o *Outbox) values(i int, m Message, trace map[string]string, v *values) error {
	id, err := o.validate(i, &m)
	if err != nil {
		return err
	}
	m.Headers = withTrace(m.Headers, trace)
	v.m, v.id = m, id
	if len(m.Headers) > 0 {
		b, err := json.Marshal(m.Headers)
		if err != nil {
			return fmt.Errorf("%w: message %d: Headers: %v", ErrInvalidMessage, i, err)
		}
		h := string(b)
		v.headers = &h
	}
	return nil
}

// addPrepared inserts v with the statement prepared on Config.DB, when tx
// can run it; done is false when it cannot (Add then sends literals).
func (o *Outbox) addPrepared(ctx context.Context, tx Execer, v *values) (done bool, err error) {
	var run func(*sql.Stmt) *sql.Stmt
	switch t := tx.(type) {
	case stmtTx:
		run = func(st *sql.Stmt) *sql.Stmt { return t.StmtContext(ctx, st) }
	case *sql.DB:
		if t != o.db {
			return false, nil
		}
		run = func(st *sql.Stmt) *sql.Stmt { return st }
	default:
		return false, nil
	}
	st := o.prepared.Load()
	if st == nil {
		if st, err = o.prepare(ctx); err != nil {
			return true, fmt.Errorf("outbox: prepare the insert into %s on Config.DB: %w", o.table, err)
		}
	}
	_, err = run(st).ExecContext(ctx, v.args()...)
	if err != nil && strings.Contains(err.Error(), "statement from different database") {
		return true, otherDatabase(err)
	}
	if err != nil {
		return true, fmt.Errorf("outbox: insert 1 message into %s: %w", o.table, err)
	}
	return true, nil
}

// addAtCommit gives the messages' inserts, in one call (all or none kept),
// to the connection of a database opened with NewConnector, which sends
// them with the COMMIT (one EXECUTE per message, all in that one message).
// Only in a transaction, or for one message: outside one, separate
// statements would not be all or nothing.
func (o *Outbox) addAtCommit(ctx context.Context, tx Execer, vals []values) error {
	args := make([]any, 0, len(vals)*9)
	for i := range vals {
		args = append(args, vals[i].args()...)
	}
	_, err := tx.ExecContext(ctx, o.insertDeferred, args...)
	if err != nil && (strings.Contains(err.Error(), "parameters but the statement requires") || // lib/pq
		strings.Contains(err.Error(), "mismatched param and argument count")) { // pgx
		return otherDatabase(err) // a connection of another database ran the statement as it is
	}
	if err != nil {
		return fmt.Errorf("outbox: insert %d message(s) into %s: %w", len(vals), o.table, err)
	}
	return nil
}

// otherDatabase is the error of an Add whose transaction is not of
// Config.DB, which the statement's failure (err) gave away.
func otherDatabase(err error) error {
	return fmt.Errorf("outbox: Config.DB is not the database of this transaction: set it to the *sql.DB the transaction came from (with sqlx, its .DB), or leave it nil: %w", err)
}

// args are v's values for the parameters of insertOne.
func (v *values) args() []any {
	var available any
	if !v.m.AvailableAt.IsZero() {
		available = v.m.AvailableAt
	}
	var headers any
	if v.headers != nil {
		headers = *v.headers
	}
	return []any{v.id, v.m.Exchange, v.m.RoutingKey, v.m.Key, v.m.Type, v.m.ContentType, headers, v.m.Payload, available}
}

func (o *Outbox) prepare(ctx context.Context) (*sql.Stmt, error) {
	o.prepareMu.Lock()
	defer o.prepareMu.Unlock()
	if st := o.prepared.Load(); st != nil {
		return st, nil
	}
	st, err := o.db.PrepareContext(ctx, o.insertOne)
	if err != nil {
		return nil, err
	}
	o.prepared.Store(st)
	return st, nil
}

// traceHeaders returns the headers the propagator derives from ctx (W3C
// traceparent and tracestate with propagation.TraceContext), or nil.
func (o *Outbox) traceHeaders(ctx context.Context) propagation.MapCarrier {
	var c lazyCarrier
	telemetry.Propagator(o.propagator).Inject(ctx, &c)
	return c.m
}

// withTrace returns h plus the trace headers it does not already have,
// without modifying h (it belongs to the caller).
func withTrace(h, trace map[string]string) map[string]string {
	if len(trace) == 0 {
		return h
	}
	out := make(map[string]string, len(h)+len(trace))
	for k, v := range trace {
		out[k] = v
	}
	for k, v := range h { // the caller's headers win
		out[k] = v
	}
	return out
}

// lazyCarrier allocates its map only when the propagator writes to it, so
// Add allocates nothing for tracing when there is nothing to propagate.
type lazyCarrier struct{ m propagation.MapCarrier }

func (c *lazyCarrier) Get(key string) string { return c.m[key] }
func (c *lazyCarrier) Keys() []string        { return c.m.Keys() }
func (c *lazyCarrier) Set(key, value string) {
	if c.m == nil {
		c.m = make(propagation.MapCarrier, 2)
	}
	c.m[key] = value
}

// NewID returns a new time-ordered (v7) message id, for callers that want to
// know the id before Add.
func NewID() string { return uuid.Must(uuid.NewV7()).String() }

// validate checks m, fills its defaults and returns its canonical id.
func (o *Outbox) validate(i int, m *Message) (string, error) {
	bad := func(field, format string, args ...any) error {
		return fmt.Errorf("%w: message %d: %s: %s", ErrInvalidMessage, i, field, fmt.Sprintf(format, args...))
	}
	id := NewID()
	if m.ID != "" {
		u, err := uuid.Parse(m.ID)
		if err != nil {
			return "", bad("ID", "%q is not a UUID (leave it empty and Add generates a UUIDv7)", m.ID)
		}
		id = u.String()
	}
	if m.Exchange == "" && m.RoutingKey == "" {
		return "", bad("RoutingKey", "empty with the default exchange, which routes by queue name: set Exchange, or RoutingKey to the target queue")
	}
	if err := wire.ShortString(m.Exchange); err != nil {
		return "", bad("Exchange", "%v", err)
	}
	for _, c := range m.Exchange {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.ContainsRune("-_.:", c)) {
			return "", bad("Exchange", "%q has %q; AMQP exchange names use letters, digits, '-', '_', '.' and ':'", m.Exchange, c)
		}
	}
	// The key travels as a header value, but is indexed: the same limit.
	if err := wire.ShortString(m.Key); err != nil {
		return "", bad("Key", "%v", err)
	}
	if m.ContentType == "" {
		m.ContentType = wire.DefaultContentType
	}
	if len(m.Payload) > o.maxPayload {
		return "", bad("Payload", "%d bytes is over the %d-byte limit (Config.MaxPayloadBytes); store large data elsewhere and send a reference", len(m.Payload), o.maxPayload)
	}
	if err := wire.Check(wire.Message{Exchange: m.Exchange, RoutingKey: m.RoutingKey, Type: m.Type, ContentType: m.ContentType, Headers: m.Headers, Payload: m.Payload}); err != nil {
		return "", fmt.Errorf("%w: message %d: %w", ErrInvalidMessage, i, err)
	}
	return id, nil
}

// timeLiteral is t as an SQL literal, as lib/pq sends a time parameter:
// offsets with seconds (local mean time before 1900) and years before 1
// (BC) included.
func timeLiteral(t time.Time) string { return "'" + string(pq.FormatTimestamp(t)) + "'" }
