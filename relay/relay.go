package relay

import (
	"cmp"
	"context"
	"database/sql"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cenkalti/backoff/v4"
	"github.com/google/uuid"
	"github.com/lib/pq"
	"go.opentelemetry.io/otel/trace"

	"github.com/mailroom-go/mailroom"
	"github.com/mailroom-go/mailroom/internal/wakeup"
	"github.com/mailroom-go/mailroom/internal/wire"
)

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
	q      queries
	tables mailroom.Resolved
	log    *slog.Logger

	counters    counters
	tel         *instruments
	backlog     backlogCache
	turnSkipped atomic.Int64 // unix nanos of the last claim lock timeout; 0: never

	shareDefault bool          // ConfirmWindow was left at its default: share it (share.go)
	window       atomic.Int64  // the confirm window in effect
	standby      atomic.Bool   // another relay publishes in this one's place (share.go)
	held         holding       // rows claimed and not finished
	frozenAfter  time.Duration // see share.go; tests shorten it

	// alone: the relay holds the alone lock (share.go) and claims without
	// turn or lease. A claim counts itself in claiming before it reads
	// alone, until its rows are held; the coordinator clears alone before
	// it reads claiming: once it has cleared alone and seen no claim
	// counted, none without a lease is running or can start.
	alone    atomic.Bool
	claiming atomic.Int32
	// leaving: the coordinator waits for the rows claimed without a
	// lease to be finished before it gives the alone lock up; finish
	// tells it on drained when the last one is.
	leaving atomic.Bool
	drained chan struct{}

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
	stmtMu         sync.Mutex
	deleteStmt     *sql.Stmt
	claimAloneStmt *sql.Stmt
}

// holding is the set of rows a relay has claimed and not finished. Its
// claims skip them: a relay publishing alone claims without leases, and
// only this set keeps it from claiming its own rows again.
type holding struct {
	mu       sync.Mutex
	seqs     map[int64]bool // seq → claimed without a lease
	unleased int
}

func (h *holding) add(rows []*row) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.seqs == nil {
		h.seqs = map[int64]bool{}
	}
	for _, w := range rows {
		h.seqs[w.seq] = w.lease == ""
		if w.lease == "" {
			h.unleased++
		}
	}
}

// leaseless counts the rows held that were claimed without a lease.
func (h *holding) leaseless() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.unleased
}

// drop forgets rows once their outcome is recorded (or given up on).
func (h *holding) drop(os []outcome) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, o := range os {
		if unleased, ok := h.seqs[o.row.seq]; ok {
			delete(h.seqs, o.row.seq)
			if unleased {
				h.unleased--
			}
		}
	}
}

func (h *holding) size() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.seqs)
}

func (h *holding) list() []int64 {
	h.mu.Lock()
	defer h.mu.Unlock()
	seqs := make([]int64, 0, len(h.seqs))
	for seq := range h.seqs {
		seqs = append(seqs, seq)
	}
	return seqs
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
		Held:          r.held.size(),
		ConfirmWindow: int(r.window.Load()), Standby: r.standby.Load(),
	}
}

// New validates cfg. db must reach the outbox table (same search_path as
// Config.DatabaseURL).
func New(db *sql.DB, cfg Config) (*Relay, error) {
	shareDefault := cfg.ConfirmWindow == 0
	cfg.setDefaults()
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	t, err := cfg.Tables.Resolve()
	if err != nil {
		return nil, fmt.Errorf("relay: Config.%w", err)
	}
	tel, err := newInstruments(&cfg, t.Outbox.String())
	if err != nil {
		return nil, err
	}
	r := &Relay{
		db: db, cfg: cfg, q: newQueries(t), tables: t,
		log: cfg.Logger.With("relay", cfg.Name),
		tel: tel, shareDefault: shareDefault,
	}
	r.window.Store(int64(cfg.ConfirmWindow))
	r.drained = make(chan struct{}, 1)
	r.wake = make(chan struct{}, 1)
	r.standby.Store(!cfg.DisableListen) // until Run takes a publishing slot (share.go)
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
	}
	wg.Add(2)
	go func() { defer wg.Done(); defer lock.close(); r.claimLoop(ctx, wake, batches, lock) }()
	go func() { defer wg.Done(); pub.run(ctx, batches); close(outcomes) }()
	r.finishLoop(ctx, outcomes) // returns when outcomes is closed and flushed
	stopCoordinating()
	wg.Wait()
	stopListen()
	r.closeStatements()
	return nil
}

// closeStatements closes the prepared statements (see prepared).
func (r *Relay) closeStatements() {
	r.stmtMu.Lock()
	defer r.stmtMu.Unlock()
	for _, st := range []**sql.Stmt{&r.deleteStmt, &r.claimAloneStmt} {
		if *st != nil {
			(*st).Close()
			*st = nil
		}
	}
}

// prepared returns *st, preparing query first if it is nil. database/sql
// prepares it again on each pooled connection it runs on; the server then
// parses it once per connection instead of at every run.
func (r *Relay) prepared(ctx context.Context, st **sql.Stmt, query string) (*sql.Stmt, error) {
	r.stmtMu.Lock()
	defer r.stmtMu.Unlock()
	if *st == nil {
		s, err := r.db.PrepareContext(ctx, query)
		if err != nil {
			return nil, err
		}
		*st = s
	}
	return *st, nil
}

// listen wakes the claimer on every NOTIFY, and on every listener
// reconnect (notifications may have been missed meanwhile). The channel is
// named after the outbox table's OID (see internal/wakeup), resolved once
// the database answers; until then the relay polls, and does not take the
// wake lock.
func (r *Relay) listen(wake chan<- struct{}, lock *wakeLock) (stop func()) {
	l := pq.NewListener(r.cfg.DatabaseURL, 100*time.Millisecond, 10*time.Second, func(ev pq.ListenerEventType, err error) {
		if err != nil {
			r.log.Warn("listen connection", "event", ev, "error", err)
		}
	})
	done := make(chan struct{})
	exited := make(chan struct{})
	go func() {
		defer close(exited)
		bo := backoff.NewExponentialBackOff()
		bo.InitialInterval, bo.MaxInterval, bo.MaxElapsedTime = 100*time.Millisecond, 10*time.Second, 0
		for {
			oid, err := r.outboxOID()
			if err == nil {
				err = l.Listen(wakeup.Channel(oid))
			}
			if err == nil || errors.Is(err, pq.ErrChannelAlreadyOpen) {
				lock.setTable(oid)
				select { // the claimer may go to sleep now: tell it
				case wake <- struct{}{}:
				default:
				}
				break
			}
			select {
			case <-done: // stopping: the listener was closed under Listen
				return
			default:
			}
			d := bo.NextBackOff()
			r.log.Warn("LISTEN failed; polling meanwhile", "error", err, "retry_in", d.String())
			select {
			case <-done:
				return
			case <-time.After(d):
			}
		}
		for {
			select {
			case <-done:
				return
			case n := <-l.Notify: // nil on reconnect: wake too
				if n == nil {
					// The sessions may all have dropped (a database
					// restart), the wake lock's with them: the claim loop
					// checks it at once rather than at its next poll.
					lock.suspect()
				}
				select {
				case wake <- struct{}{}:
				default:
				}
			}
		}
	}()
	// Close before waiting: Listen blocks until the listener has a
	// connection (one it may never get: a connection limit, a wrong
	// DatabaseURL), and Close is what ends that wait.
	return func() { close(done); l.Close(); <-exited }
}

func (r *Relay) outboxOID() (uint32, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var oid sql.NullInt64
	if err := r.db.QueryRowContext(ctx, wakeup.OIDQuery, r.tables.Outbox.Quoted()).Scan(&oid); err != nil {
		return 0, err
	}
	if !oid.Valid {
		return 0, fmt.Errorf("table %s does not exist (run `mailroom-relay migrate`)", r.tables.Outbox)
	}
	return uint32(oid.Int64), nil
}

// busyAfter is how long the relay must keep finding work before it tells
// writers to stop sending NOTIFYs; shorter bursts keep the wake-ups.
const busyAfter = 50 * time.Millisecond

// busyGap is the longest wait between claims that still counts as
// continuous work (the next NOTIFY was already pending, or came at once).
const busyGap = 2 * time.Millisecond

// awakePause is how long an awake relay (writers do not notify it) waits
// after a partial batch of n rows before it looks again: awakePausePerRow
// per row, at most awakePauseMax. It bounds the claim rate and the added
// latency. Each claim and its batch cost the database, the relay and the
// broker a fixed amount of CPU: at a steady 1 ms, a relay at 5,000 events/s
// claimed a few rows at a time, and on a busy machine that overhead queued
// every message behind it. A relay finding a row or two looks again soon,
// soon finds none and goes to sleep (writers then notify it); a fixed 5 ms
// kept it awake at 200 events/s, each look finding the one row written
// since, and added its pause to every message. The cap: at 5,000 events/s
// on a slow phase of a 2-core machine, 10 ms (about 50 rows a claim, 100
// claims a second) cut the commit→consumer p99 from 155 to 62 ms (medians
// of 14 alternating runs) against 5 ms, leaving the broker the CPU the
// extra claims took; it raises p50 at 1,000 events/s from about 4.5 to
// 7.5 ms, and does not touch a relay that sleeps between a few events.
func awakePause(n int) time.Duration {
	return min(time.Duration(n)*awakePausePerRow, awakePauseMax)
}

const (
	awakePausePerRow = time.Millisecond
	awakePauseMax    = 10 * time.Millisecond
)

// claimLoop claims batches while there are due rows, and otherwise waits for
// a wake-up or the poll interval. With LISTEN on (lock not nil) it sleeps
// holding the wake lock (see wake.go), so writers NOTIFY it; once it has
// been busy for busyAfter it releases the lock, so writers stop paying for
// NOTIFYs, and looks for new rows by itself.
func (r *Relay) claimLoop(ctx context.Context, wake <-chan struct{}, batches chan<- []*row, lock *wakeLock) {
	defer close(batches)
	var busySince time.Time
	bo := backoff.NewExponentialBackOff()
	bo.InitialInterval, bo.MaxInterval, bo.MaxElapsedTime = 50*time.Millisecond, 5*time.Second, 0
	poll := time.NewTimer(r.cfg.PollInterval)
	defer poll.Stop()
	for ctx.Err() == nil {
		if r.standby.Load() { // another relay publishes: wait to take over
			lock.release()
			busySince = time.Time{}
			select {
			case <-ctx.Done():
			case <-wake:
			}
			continue
		}
		rows, err := r.claim(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			d := bo.NextBackOff()
			r.log.Warn("claim failed; retrying", "error", err, "retry_in", d.String())
			if !sleepCtx(ctx, d) {
				return
			}
			continue
		}
		bo.Reset()
		r.counters.lastProgress.Store(time.Now().UnixNano())
		wait := r.cfg.PollInterval
		if len(rows) > 0 {
			select {
			case batches <- rows:
			case <-ctx.Done():
				r.finishNow(ctx, rows, released, nil)
				return
			}
			if lock.held() {
				if busySince.IsZero() {
					busySince = time.Now()
				} else if time.Since(busySince) >= busyAfter {
					lock.release()
				}
			}
			if len(rows) >= r.cfg.BatchSize {
				continue // more may be due: claim again at once
			}
			if lock.ready() && !lock.held() { // nobody notifies us: look again shortly
				if !sleepCtx(ctx, awakePause(len(rows))) {
					return
				}
				continue
			}
		} else {
			busySince = time.Time{}
			if lock.ready() && !lock.held() {
				res, err := lock.acquire(ctx)
				switch res {
				case lockHeld:
					continue // look once more: every writer before the lock has committed
				case lockBusy:
					wait = lockRetry
				case lockElsewhere:
					// A relay asleep (writers notify it, and this relay
					// too), or the session of one that is gone and still
					// ending (terminated, or discarded by this relay):
					// then nobody is notified. Look again soon.
					wait = min(wait, lockElsewhereRetry)
					r.log.Debug("another session holds the wake lock; trying again", "in", wait.String())
				case lockFailed:
					r.log.Warn("could not take the wake lock; relying on polling", "error", err)
				}
			}
		}
		if !poll.Stop() {
			select {
			case <-poll.C:
			default:
			}
		}
		poll.Reset(wait)
		waitStart := time.Now()
		select {
		case <-ctx.Done():
		case <-wake:
			if lock.suspected() {
				lock.check(ctx)
			}
		case <-poll.C:
			lock.check(ctx) // a lost session took the lock with it
		}
		if time.Since(waitStart) > busyGap {
			busySince = time.Time{} // a real pause: not continuously busy
		}
	}
}

// claim is not interrupted by ctx: a claim cancelled after the server ran
// it would leave its rows leased, unknown to this relay, until the lease
// expires. It is one short statement, bounded by its own timeout.
func (r *Relay) claim(ctx context.Context) ([]*row, error) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
	defer cancel()
	start := time.Now()
	clock := &batchClock{claimed: start}
	defer func() { r.tel.claim.Record(ctx, time.Since(start).Seconds(), r.tel.record...) }()
	r.claiming.Add(1)
	defer r.claiming.Add(-1) // after the rows are held
	rows, err := r.claimOnce(ctx, clock, r.held.list())
	r.held.add(rows)
	return rows, err
}

// claimOnce runs the claim that suits the relay's company on the table,
// skipping the rows in held.
func (r *Relay) claimOnce(ctx context.Context, clock *batchClock, held []int64) ([]*row, error) {
	if r.alone.Load() { // set by coordinate, which does not run with DisableListen
		// Nobody to take turns with, nor to keep out by leases.
		return r.claimRows(clock, "", func() (*sql.Rows, error) {
			st, err := r.prepared(ctx, &r.claimAloneStmt, r.q.claimAlone)
			if err != nil {
				return nil, err
			}
			n := r.cfg.BatchSize
			return st.QueryContext(ctx, n, pq.Array(held), r.keyCursor, n, windowRows*n, max(n, r.cfg.ConfirmWindow))
		})
	}
	lease := uuid.NewString()
	q := claimText(r.q.claim, r.cfg.BatchSize, r.cfg.ConfirmWindow, r.cfg.Lease.Milliseconds(), lease, held, !r.leaving.Load(), r.keyCursor)
	if skipped := r.turnSkipped.Load(); skipped == 0 || time.Since(time.Unix(0, skipped)) > claimLockSkip {
		rows, err := r.claimRows(clock, lease, func() (*sql.Rows, error) { return r.db.QueryContext(ctx, r.q.turn+q) })
		var pqErr *pq.Error
		if !errors.As(err, &pqErr) || pqErr.Code != "55P03" { // lock_not_available
			return rows, err
		}
		r.log.Warn("waited too long for the claim lock; claiming without it for a while", "wait", claimLockTimeout.String(), "for", claimLockSkip.String())
		r.turnSkipped.Store(time.Now().UnixNano())
	}
	return r.claimRows(clock, lease, func() (*sql.Rows, error) { return r.db.QueryContext(ctx, q) })
}

// claimLockSkip is how long a relay claims without the claim lock after it
// waited claimLockTimeout for it: claims then overlap, which costs the
// database more but waits for nobody.
const claimLockSkip = 10 * time.Second

// claimRows runs a claim statement (query) and reads the rows it claimed
// under lease ("": none). A message of several statements (turn, then the
// claim) has the claim's rows in its last result set.
func (r *Relay) claimRows(clock *batchClock, lease string, query func() (*sql.Rows, error)) ([]*row, error) {
	rs, err := query()
	if err != nil {
		var pqErr *pq.Error
		if errors.As(err, &pqErr) && pqErr.Code == "42703" { // undefined_column
			return nil, fmt.Errorf("claim from %s: the table is older than this relay (run mailroom.Migrate or `mailroom-relay migrate`): %w", r.tables.Outbox, err)
		}
		return nil, fmt.Errorf("claim from %s: %w", r.tables.Outbox, err)
	}
	defer rs.Close()
	if cols, _ := rs.Columns(); len(cols) == 1 { // the claim lock's result
		for rs.Next() {
		}
		if !rs.NextResultSet() {
			return nil, fmt.Errorf("claim from %s: %w", r.tables.Outbox, cmp.Or(rs.Err(), errors.New("no rows came back")))
		}
	}
	var rows []*row
	var cursor sql.NullString
	for rs.Next() {
		w := &row{lease: lease, batch: clock}
		var headers []byte
		var prev sql.NullInt64
		if err := rs.Scan(&w.seq, &w.rn, &prev, &cursor, &w.id, &w.exchange, &w.routingKey, &w.key, &w.typ, &w.contentType, &headers, &w.payload, &w.createdAt, &w.attempts); err != nil {
			return nil, fmt.Errorf("claim from %s: %w", r.tables.Outbox, err)
		}
		// A row written by hand may hold anything there: the publish
		// fails it (wire.ParseHeaders says what is wrong).
		w.headers, w.badHeaders = wire.ParseHeaders(headers)
		w.prev = prev.Int64
		rows = append(rows, w)
	}
	if err := rs.Err(); err != nil {
		return nil, fmt.Errorf("claim from %s: %w", r.tables.Outbox, err)
	}
	clock.left.Store(int32(len(rows)))
	r.keyCursor = cursor.String // none claimed: the next walk starts over
	markRuns(rows)
	return rows, nil
}

// finishLoop applies outcomes to the database in bulk: it blocks for one,
// takes whatever else comes within finishLinger (or is waiting already),
// and writes them together.
func (r *Relay) finishLoop(ctx context.Context, outcomes <-chan outcome) {
	const maxBatch = 2000
	var pending []outcome
	linger := time.NewTimer(finishLinger)
	for {
		o, ok := <-outcomes
		if !ok {
			return
		}
		pending = append(pending[:0], o)
		linger.Reset(finishLinger)
	gather:
		for len(pending) < maxBatch {
			select {
			case o, ok := <-outcomes:
				if !ok {
					break gather
				}
				pending = append(pending, o)
			case <-linger.C:
				break gather
			}
		}
		linger.Stop()
		r.finish(ctx, pending)
	}
}

// finishLinger is how long an outcome waits for others to share its
// write. Keys confirm a message at a time: without it, each delete was a
// statement of its own (one key: a statement per message, 0.2 ms of the
// database's CPU each), and the database took the CPU the broker needed.
// A confirmed row stays held that much longer; nothing waits on it.
const finishLinger = 5 * time.Millisecond

// finishNow applies one set of outcomes directly (claimer shutdown path).
func (r *Relay) finishNow(ctx context.Context, rows []*row, kind outcomeKind, err error) {
	os := make([]outcome, len(rows))
	for i, w := range rows {
		os[i] = outcome{row: w, kind: kind, err: err}
	}
	r.finish(ctx, os)
}

// graceful is a context that ends grace after ctx ends, so a stopping relay
// still gets to record what it did.
func graceful(ctx context.Context, grace time.Duration) (context.Context, context.CancelFunc) {
	g, cancel := context.WithCancel(context.WithoutCancel(ctx))
	stop := context.AfterFunc(ctx, func() { time.AfterFunc(grace, cancel) })
	return g, func() { stop(); cancel() }
}

// finish writes outcomes, retrying database errors with backoff. After ctx
// ends it still tries for a grace period, so a clean stop leaves no row
// leased; if even that fails, the leases expire and the rows are published
// again (a duplicate the inbox absorbs, never a loss).
func (r *Relay) finish(ctx context.Context, os []outcome) {
	var done, retry, bury, release []outcome
	for _, o := range os {
		switch {
		case o.kind == delivered:
			done = append(done, o)
		case o.kind == released:
			if o.row.lease != "" { // a row claimed without a lease is free as it is
				release = append(release, o)
			}
		case o.row.attempts+1 >= r.cfg.MaxAttempts:
			bury = append(bury, o)
		default:
			retry = append(retry, o)
		}
	}
	var buried, stuck []outcome // moved to the dead-letter table; could not be (see buryRows)
	op := func() (err error) { buried, stuck, err = r.apply(done, retry, bury, release); return err }
	bo := backoff.NewExponentialBackOff()
	bo.InitialInterval, bo.MaxInterval, bo.MaxElapsedTime = 50*time.Millisecond, 5*time.Second, 0
	gctx, cancel := graceful(ctx, 10*time.Second)
	defer cancel()
	err := backoff.RetryNotify(op, backoff.WithContext(bo, gctx), func(err error, d time.Duration) {
		r.log.Warn("recording publish outcomes failed; retrying", "error", err, "retry_in", d.String())
	})
	r.held.drop(os) // before the counters: whoever sees a row counted sees it no longer held
	if r.leaving.Load() && r.held.leaseless() == 0 {
		select {
		case r.drained <- struct{}{}:
		default:
		}
	}
	if err != nil {
		r.log.Error("could not record publish outcomes before stopping; the rows will be published again (once their lease expires, if they have one)", "rows", len(os), "error", err)
	}
	if err == nil {
		for _, o := range done {
			if o.row.wake {
				select {
				case r.wake <- struct{}{}:
				default:
				}
				break
			}
		}
		// Failures first: whoever sees an outcome counted sees the
		// attempt's failure counted too.
		c := &r.counters
		for _, o := range os {
			if o.reason != noReason {
				c.failures[o.reason].Add(1)
			}
		}
		c.published.Add(int64(len(done)))
		c.dead.Add(int64(len(buried)))
		c.released.Add(int64(len(os) - len(done) - len(retry) - len(bury)))
		for _, o := range buried {
			r.log.Error("message dead-lettered", "message_id", o.row.id, "exchange", o.row.exchange, "routing_key", o.row.routingKey, "key", o.row.key, "attempt", o.row.attempts+1, "error", o.err)
		}
		for _, o := range stuck {
			r.log.Error("could not dead-letter the message: its seq is already in the dead-letter table (one shared by two outboxes, or seqs reused); it stays in the outbox and is tried again after MaxBackoff", "message_id", o.row.id, "seq", o.row.seq, "dead_table", r.tables.Dead.String(), "error", o.err)
		}
		for _, o := range retry {
			r.log.Warn("publish failed; will retry", "message_id", o.row.id, "exchange", o.row.exchange, "routing_key", o.row.routingKey, "key", o.row.key, "attempt", o.row.attempts+1, "error", o.err)
		}
	}
}

// apply records outcomes in one transaction. Of bury, buried were moved to
// the dead-letter table and stuck could not be (scheduled again after
// MaxBackoff instead); the rest had lost their lease to another relay.
func (r *Relay) apply(done, retry, bury, release []outcome) (buried, stuck []outcome, err error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if len(retry)+len(bury)+len(release) == 0 && r.cfg.Retain == 0 {
		// The common case, confirmed rows only: one autocommit statement
		// (asynchronous commit inside it) instead of four round trips.
		seqs := pq.Int64Array(seqsOf(done))
		var err error
		if r.cfg.DisableListen {
			_, err = r.db.ExecContext(ctx, r.q.deleteDoneAsync, seqs)
		} else if st, perr := r.prepared(ctx, &r.deleteStmt, r.q.deleteDoneAsync); perr != nil {
			err = perr
		} else {
			_, err = st.ExecContext(ctx, seqs)
		}
		if err != nil {
			return nil, nil, fmt.Errorf("remove published rows: %w", err)
		}
		return nil, nil, nil
	}
	tx, err := r.db.BeginTx(ctx, nil)
	if err != nil {
		return nil, nil, err
	}
	defer tx.Rollback() //nolint:errcheck // after Commit this is a no-op
	// Asynchronous commit: if a crash loses this transaction, confirmed
	// rows are published again (a duplicate the inbox absorbs) and failed
	// ones keep their lease until it expires. Nothing is lost, and the
	// relay does not wait for the WAL flush.
	if _, err := tx.ExecContext(ctx, `SET LOCAL synchronous_commit = off`); err != nil {
		return nil, nil, err
	}
	if len(done) > 0 {
		q := r.q.deleteDone
		if r.cfg.Retain > 0 {
			q = r.q.archiveDone
		}
		if _, err := tx.ExecContext(ctx, q, pq.Int64Array(seqsOf(done))); err != nil {
			return nil, nil, fmt.Errorf("remove published rows: %w", err)
		}
	}
	if len(retry) > 0 {
		seqs, leases, errs := columnsOf(retry)
		delays := make([]float64, len(retry))
		for i, o := range retry {
			delays[i] = float64(r.backoffFor(o.row.attempts + 1).Milliseconds())
		}
		if _, err := tx.ExecContext(ctx, r.q.retry, pq.Int64Array(seqs), pq.StringArray(leases), pq.StringArray(errs), pq.Float64Array(delays)); err != nil {
			return nil, nil, fmt.Errorf("schedule retries: %w", err)
		}
	}
	if len(bury) > 0 {
		if buried, stuck, err = r.buryRows(ctx, tx, bury); err != nil {
			return nil, nil, err
		}
	}
	if len(release) > 0 {
		seqs, leases, _ := columnsOf(release)
		if _, err := tx.ExecContext(ctx, r.q.release, pq.Int64Array(seqs), pq.StringArray(leases)); err != nil {
			return nil, nil, fmt.Errorf("release rows: %w", err)
		}
	}
	return buried, stuck, tx.Commit()
}

// buryRows moves rows to the dead-letter table, returning them as buried,
// and schedules those it could not move (their seq is there already) again
// after MaxBackoff, returning them as stuck.
func (r *Relay) buryRows(ctx context.Context, tx *sql.Tx, bury []outcome) (buried, stuck []outcome, err error) {
	seqs, leases, errs := columnsOf(bury)
	moved, err := seqSet(tx.QueryContext(ctx, r.q.bury, pq.Int64Array(seqs), pq.StringArray(leases), pq.StringArray(errs)))
	if err != nil {
		return nil, nil, fmt.Errorf("move rows to %s: %w", r.tables.Dead, err)
	}
	var left []outcome
	var leftSeqs []int64
	var leftLeases, leftErrs []string
	var delays []float64
	for _, o := range bury {
		if moved[o.row.seq] {
			buried = append(buried, o)
			continue
		}
		left = append(left, o)
		leftSeqs, leftLeases = append(leftSeqs, o.row.seq), append(leftLeases, o.row.lease)
		leftErrs = append(leftErrs, fmt.Sprintf("could not move to %s: seq %d is there already; last error: %v", r.tables.Dead, o.row.seq, o.err))
		delays = append(delays, float64(r.cfg.MaxBackoff.Milliseconds()))
	}
	if len(left) == 0 {
		return buried, nil, nil
	}
	// Not moved: the seq is in the dead-letter table, or the lease was lost
	// meanwhile (another relay has the row). The retry, which checks the
	// lease, schedules only the first kind, and says which.
	scheduled, err := seqSet(tx.QueryContext(ctx, r.q.retry+` RETURNING o.seq`, pq.Int64Array(leftSeqs), pq.StringArray(leftLeases), pq.StringArray(leftErrs), pq.Float64Array(delays)))
	if err != nil {
		return nil, nil, fmt.Errorf("schedule rows %s refused: %w", r.tables.Dead, err)
	}
	for _, o := range left {
		if scheduled[o.row.seq] {
			stuck = append(stuck, o)
		}
	}
	return buried, stuck, nil
}

// seqSet reads the seqs a statement returned.
func seqSet(rows *sql.Rows, err error) (map[int64]bool, error) {
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	set := map[int64]bool{}
	for rows.Next() {
		var seq int64
		if err := rows.Scan(&seq); err != nil {
			return nil, err
		}
		set[seq] = true
	}
	return set, rows.Err()
}

func seqsOf(os []outcome) []int64 {
	seqs := make([]int64, len(os))
	for i, o := range os {
		seqs[i] = o.row.seq
	}
	return seqs
}

func columnsOf(os []outcome) (seqs []int64, leases, errs []string) {
	for _, o := range os {
		seqs = append(seqs, o.row.seq)
		leases = append(leases, o.row.lease)
		msg := "released"
		if o.err != nil {
			msg = o.err.Error()
		}
		errs = append(errs, msg)
	}
	return seqs, leases, errs
}

// backoffFor is the delay before attempt n+1 after n failures: exponential
// from MinBackoff, doubled each time, capped at MaxBackoff, ±50% jitter.
func (r *Relay) backoffFor(n int) time.Duration {
	b := backoff.NewExponentialBackOff()
	b.InitialInterval, b.MaxInterval, b.MaxElapsedTime = r.cfg.MinBackoff, r.cfg.MaxBackoff, 0
	b.Multiplier, b.RandomizationFactor = 2, 0.5
	b.Reset()
	d := b.NextBackOff()
	for i := 1; i < n; i++ {
		d = b.NextBackOff()
	}
	return d
}

func sleepCtx(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}
