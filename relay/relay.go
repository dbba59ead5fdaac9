package relay

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"go.opentelemetry.io/otel/trace"

	"github.com/mailroom-go/mailroom/internal/amqpx"
	"github.com/mailroom-go/mailroom/internal/tablenames"
)

// The kinds of publish failure. A failed attempt is recorded in the row's
// last_error, logged, and on the dead letter the row becomes:
// DeadLetter.Err wraps the kind (errors.Is).

// ErrUnroutable is the failure of a message the broker returned (mandatory
// flag): no queue is bound for its exchange and routing key. The row is
// retried and, after MaxAttempts, dead-lettered; never silently dropped.
var ErrUnroutable = errors.New("relay: unroutable: no queue bound for exchange and routing key")

// ErrNacked is the failure of a message the broker refused (basic.nack).
var ErrNacked = errors.New("relay: nacked by the broker")

// ErrUnpublishable is the failure of a message that breaks the wire
// contract (a name over 255 bytes, headers larger than a frame, reserved
// headers, a payload that is not the JSON its content type says: only a
// row written by other means than outbox.Add can be one), is larger than
// MaxMessageSize, or that the broker refuses (its max_message_size, the
// relay user's permissions).
var ErrUnpublishable = errors.New("relay: message cannot be published as it is")

// ErrNoExchange is the failure of a message whose exchange does not exist.
var ErrNoExchange = errors.New("relay: exchange does not exist")

// Relay moves rows from the outbox table to RabbitMQ. Run it in-process or
// through the mailroom-relay sidecar; any number may run on one table.
type Relay struct {
	db     *sql.DB
	cfg    Config
	nodes  *amqpx.Nodes
	q      queries
	tables tablenames.Resolved
	admin  *Admin // the backlog gauges' Status
	log    *slog.Logger

	counters    counters
	tel         *instruments
	backlog     backlogCache
	turnSkipped atomic.Int64 // unix nanos of the last claim lock timeout; 0: never
	turnInTx    atomic.Bool  // the driver takes one command per statement (see claimInTurn)

	shareDefault bool          // ConfirmWindow was left at its default: share it (coordinate.go)
	window       atomic.Int64  // the confirm window in effect
	frozenAfter  time.Duration // see coordinate.go; tests shorten it
	coord        coordination  // what the claim and finish loops and the coordinator share

	// wake wakes the claim loop: a NOTIFY, or the last row of a key's run
	// delivered (more of the key may be due; see finish).
	wake chan struct{}

	// keyCursor is the key the last claim's walk of keys ended at (see
	// found in sql.go); the claim loop's alone.
	keyCursor string

	// The delete's and the lone claim's prepared statements (not with
	// DisableListen, which may mean PgBouncer in transaction mode; a relay
	// claims alone only with LISTEN on): prepared on first use and closed
	// when Run returns.
	stmts statements
}

// Stats are counters since the relay was created. The metrics (see the
// package doc) observe the same counters.
type Stats struct {
	Published    int64     // confirmed and removed from the outbox
	Failed       int64     // failed attempts (nack, unroutable, missing exchange)
	DeadLettered int64     // moved to the dead-letter table
	Released     int64     // handed back unpublished (shutdown, lost connection)
	LastProgress time.Time // last successful claim query: the loop is alive

	// Held counts the rows this relay has claimed and not yet finished
	// (published and deleted, scheduled again, dead-lettered or handed
	// back).
	Held int

	// ConfirmWindow is the confirm window in effect: Config.ConfirmWindow,
	// or this relay's share of the default while several relays publish
	// on the table.
	ConfirmWindow int
	// Standby is true while the relay waits for a publishing slot that
	// other relays of the table hold (Config.ActiveRelays).
	Standby bool
}

// Stats returns the relay's counters.
func (r *Relay) Stats() Stats {
	c := &r.counters
	return Stats{
		Published: c.published.Load(), Failed: c.failed(), DeadLettered: c.dead.Load(),
		Released: c.released.Load(), LastProgress: time.Unix(0, c.lastProgress.Load()),
		Held:          r.coord.held.size(),
		ConfirmWindow: int(r.window.Load()), Standby: r.coord.standingBy(),
	}
}

// New validates cfg. db must reach the outbox table (same search_path as
// Config.DatabaseURL).
func New(db *sql.DB, cfg Config) (*Relay, error) {
	shareDefault := cfg.ConfirmWindow == 0
	cfg.setDefaults()
	nodes, err := amqpx.ParseNodes(cfg.URL, cfg.URLs)
	if err != nil {
		return nil, fmt.Errorf("relay: Config.%w", err)
	}
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	t, err := tablenames.Resolve(tablenames.Names(cfg.Tables))
	if err != nil {
		return nil, fmt.Errorf("relay: Config.%w", err)
	}
	tel, err := newInstruments(&cfg, nodes, t.Outbox.String())
	if err != nil {
		return nil, err
	}
	r := &Relay{
		db: db, cfg: cfg, nodes: nodes, q: newQueries(t), tables: t, stmts: statements{db: db},
		admin: &Admin{db: db, tables: t, q: newAdminQueries(t)},
		log:   cfg.Logger.With("relay", cfg.Name),
		tel:   tel, shareDefault: shareDefault,
	}
	r.window.Store(int64(cfg.ConfirmWindow))
	r.coord.drained = make(chan struct{}, 1)
	r.wake = make(chan struct{}, 1)
	r.coord.standby.Store(!cfg.DisableListen) // until Run takes a publishing slot (coordinate.go)
	r.frozenAfter = frozenAfter
	return r, nil
}

// row is one claimed outbox row.
type row struct {
	seq         int64
	lease       string
	id          string
	exchange    string
	routingKey  string
	key         string
	typ         string
	contentType string
	headers     map[string]string
	badHeaders  error // the headers column is not a JSON object
	payload     []byte
	createdAt   time.Time
	attempts    int
	// rn is the row's place in its key's run in this claim (0: the head,
	// or an unkeyed row); see runs in sql.go and chains.go.
	rn int
	// prev is, for a head of a key (rn 0), the row of its key before it,
	// held by this relay (not yet finished): the head continues that
	// row's run (chains.go). 0: no row of its key is before it.
	prev int64
	// wake: when this row is delivered, its key may have more rows due
	// (its run was cut by the claim's room): the claim loop looks again at
	// once instead of at its next poll.
	wake bool

	span  trace.Span  // the publish span while it is recording, else nil
	batch *batchClock // times the batch the row was claimed in
}

type outcomeKind int

// The zero outcomeKind is none of these: an outcome built without a kind
// is retried as a failure, never taken for a delivery (which deletes).
const (
	delivered outcomeKind = iota + 1
	failed                // counts as an attempt
	released              // handed back, no attempt counted
)

type outcome struct {
	row    *row
	kind   outcomeKind
	err    error
	reason reason // labels the publish failures metric; noReason for a delivery or a plain release
}

// Run claims, publishes and finishes rows until ctx ends, then stops
// claiming, waits (bounded by ConfirmTimeout) for outstanding confirms,
// hands back unpublished rows and returns nil. Database and broker outages
// are retried with backoff, never returned.
func (r *Relay) Run(ctx context.Context) error {
	unregister, err := r.register()
	if err != nil {
		return err
	}
	defer unregister()
	wake := r.wake
	batches := make(chan []*row)                          // unbuffered: at most one batch claimed ahead
	outcomes := make(chan outcome, 4*r.cfg.ConfirmWindow) // confirms never wait on the database

	var wg sync.WaitGroup
	stopListen := func() {}
	var lock *wakeLock // nil: nobody notifies us, we poll
	if !r.cfg.DisableListen {
		if lock, err = newWakeLock(r.cfg.DatabaseURL); err != nil {
			return fmt.Errorf("relay: Config.DatabaseURL: %w", err)
		}
		stopListen = r.listen(wake, lock)
	}
	pub := newPublisher(r, outcomes)
	// The coordinator keeps this relay's publishing slot until the rows it
	// holds are finished: a relay taking the slot over claims without
	// leases, and would publish them again.
	coordCtx, stopCoordinating := context.WithCancel(context.WithoutCancel(ctx))
	defer stopCoordinating()
	if !r.cfg.DisableListen { // a session of its own: not through PgBouncer
		wg.Add(1)
		go func() { defer wg.Done(); r.coordinate(coordCtx, pub, r.shareDefault, wake) }()
	} else {
		wg.Add(1)
		go func() { defer wg.Done(); r.heartbeat(coordCtx) }()
	}
	wg.Add(2)
	go func() { defer wg.Done(); defer lock.close(); r.claimLoop(ctx, wake, batches, lock) }()
	go func() { defer wg.Done(); pub.run(ctx, batches); close(outcomes) }()
	r.finishLoop(ctx, outcomes) // returns when outcomes is closed and flushed
	stopCoordinating()
	wg.Wait()
	stopListen()
	r.stmts.close()
	return nil
}
