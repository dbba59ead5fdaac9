package relay

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync/atomic"
	"time"

	"github.com/google/uuid"
	"github.com/lib/pq"

	"github.com/mailroom-go/mailroom"
	"github.com/mailroom-go/mailroom/internal/tablenames"
	"github.com/mailroom-go/mailroom/outbox"
)

// Admin is the operator's side of one outbox: what is waiting, what died,
// and putting dead letters back or throwing them away. mailroom-relay's
// status and dead commands use it; a service that runs the relay
// in-process can call it from its own admin endpoints. Its statements are
// built once, by NewAdmin; it is safe for concurrent use.
type Admin struct {
	db     *sql.DB
	tables tablenames.Resolved
	q      adminQueries

	relaysTable atomic.Bool // the _relays table was found (Status)
}

// NewAdmin returns the Admin of the outbox named by tables (zero fields take
// their defaults). db must reach the tables (same search_path as the relay).
func NewAdmin(db *sql.DB, tables mailroom.Tables) (*Admin, error) {
	t, err := tablenames.Resolve(tablenames.Names(tables))
	if err != nil {
		return nil, fmt.Errorf("relay: %w", err)
	}
	return &Admin{db: db, tables: t, q: newAdminQueries(t)}, nil
}

// ErrDeadLetterNotFound is returned (wrapped, naming the ids) by ReplayDead
// and DiscardDead when an id is not in the dead-letter table. Nothing is
// changed then: the operation is all or nothing.
var ErrDeadLetterNotFound = errors.New("relay: no dead letter with this id")

// ErrInvalidID is returned (wrapped) for an id that is not a UUID: outbox
// message ids are UUIDs.
var ErrInvalidID = errors.New("relay: invalid message id")

// DefaultDeadListLimit is how many dead letters ListDead returns when given 0.
const DefaultDeadListLimit = 100

// StatusReport is a snapshot of one outbox.
type StatusReport struct {
	// Pending counts every row still in the outbox: due, in flight, backing
	// off after a failure, or scheduled for later (Message.AvailableAt).
	Pending int64 `json:"pending"`
	// Scheduled counts pending rows never attempted whose AvailableAt is
	// still in the future (delayed delivery). They do not count as lag.
	Scheduled int64 `json:"scheduled"`
	// Retrying counts pending rows that failed at least once.
	Retrying int64 `json:"retrying"`
	// InFlight counts pending rows leased by a relay right now. Only
	// relays publishing side by side lease; a relay publishing alone (the
	// default) holds its rows in memory, counted by its Stats().Held.
	InFlight int64 `json:"in_flight"`
	// OldestPendingAge is how long the oldest pending row that is not
	// Scheduled has waited: the relay's lag, the signal to alert on. A
	// row waits from when it became due (written, its AvailableAt, or its
	// replay from the dead-letter table), or, once it failed, from when it
	// was written. 0 when nothing is pending.
	OldestPendingAge time.Duration `json:"-"`
	// Dead counts rows in the dead-letter table.
	Dead int64 `json:"dead"`
	// Relays counts the relays running on the outbox now: each shows
	// itself by an advisory lock on a session of its own, or, with
	// DisableListen (no session of its own), by a row written every 5 s
	// and counted for 15 s (schema version 7). Polling counts the latter
	// (included in Relays). Publishing counts the relays that hold a
	// publishing slot (Config.ActiveRelays); the others stand by. Relays
	// with DisableListen take no slot: each publishes, with leases.
	Relays     int64 `json:"relays"`
	Polling    int64 `json:"polling"`
	Publishing int64 `json:"publishing"`
}

// MarshalJSON adds oldest_pending_age_seconds (a number, 0 when nothing is
// pending, never null).
func (s StatusReport) MarshalJSON() ([]byte, error) {
	type plain StatusReport
	return json.Marshal(struct {
		plain
		Age float64 `json:"oldest_pending_age_seconds"`
	}{plain(s), s.OldestPendingAge.Seconds()})
}

// DeadLetter is one row of the dead-letter table, without its payload.
type DeadLetter struct {
	Seq         int64     `json:"seq"` // the outbox sequence number it had
	ID          string    `json:"id"`  // message id (AMQP message_id)
	Exchange    string    `json:"exchange"`
	RoutingKey  string    `json:"routing_key"`
	Key         string    `json:"key"`
	Type        string    `json:"type"`
	ContentType string    `json:"content_type"`
	PayloadSize int       `json:"payload_bytes"`
	Attempts    int       `json:"attempts"`
	LastError   string    `json:"last_error"`
	CreatedAt   time.Time `json:"created_at"`
	DeadAt      time.Time `json:"dead_at"`
}

// Err is LastError as an error that wraps the failure it began with
// (ErrUnroutable, ErrNacked, ErrUnpublishable, ErrNoExchange), so
// errors.Is tells dead letters apart: a missing binding, a broker refusal,
// a message that can never be published as it is. nil when LastError is
// empty.
func (d DeadLetter) Err() error {
	if d.LastError == "" {
		return nil
	}
	for _, kind := range []error{ErrUnroutable, ErrNacked, ErrUnpublishable, ErrNoExchange} {
		if strings.HasPrefix(d.LastError, kind.Error()) {
			return &lastError{msg: d.LastError, kind: kind}
		}
	}
	return errors.New(d.LastError)
}

// lastError is a dead letter's recorded error, wrapping its kind.
type lastError struct {
	msg  string
	kind error
}

func (e *lastError) Error() string { return e.msg }
func (e *lastError) Unwrap() error { return e.kind }

// Status reports what is waiting in the outbox and how many dead letters
// there are.
func (a *Admin) Status(ctx context.Context) (StatusReport, error) {
	var s StatusReport
	var age float64
	if err := a.db.QueryRowContext(ctx, a.q.status).Scan(&s.Pending, &s.Scheduled, &s.Retrying, &s.InFlight, &age, &s.Dead, &s.Relays, &s.Publishing); err != nil {
		return StatusReport{}, fmt.Errorf("relay: status: %w", err)
	}
	s.OldestPendingAge = time.Duration(age * float64(time.Second))
	if !a.relaysTable.Load() { // looked up until found: a migration may come while the sidecar runs
		var exists bool
		if err := a.db.QueryRowContext(ctx, a.q.relaysTable).Scan(&exists); err != nil {
			return StatusReport{}, fmt.Errorf("relay: status: %w", err)
		}
		a.relaysTable.Store(exists)
	}
	if a.relaysTable.Load() {
		if err := a.db.QueryRowContext(ctx, a.q.polling).Scan(&s.Polling); err != nil {
			return StatusReport{}, fmt.Errorf("relay: status: relays without a session: %w", err)
		}
		s.Relays += s.Polling
	}
	return s, nil
}

// HorizonReport says whether VACUUM can clean the outbox. A relay deletes
// every row it publishes; while something holds PostgreSQL's vacuum
// horizon back (a long or idle-in-transaction session, a REPEATABLE READ
// snapshot, a prepared transaction, a replication slot), none of those
// deleted rows can be removed, and every claim reads past them.
type HorizonReport struct {
	// DeadTuples and LiveTuples are the outbox's n_dead_tup and n_live_tup
	// (pg_stat_all_tables): estimates, which sessions flush about once a
	// second. Dead tuples that keep growing while the outbox drains mean
	// the horizon is held, or autovacuum does not keep up.
	DeadTuples int64 `json:"outbox_dead_tuples"`
	LiveTuples int64 `json:"outbox_live_tuples"`
	// LastVacuum is when the outbox was last vacuumed, by autovacuum or
	// VACUUM; zero if never since the statistics were reset.
	LastVacuum time.Time `json:"-"`
	// Age is how long the oldest transaction holding the horizon back has
	// been open (a session's since it began, a prepared transaction's since
	// PREPARE); 0 when nothing holds it. A replication slot has no age in
	// time: it shows in XminAge.
	Age time.Duration `json:"-"`
	// XminAge is how many transactions behind the horizon is held: the
	// greatest age(xmin) of the Holders, 0 when there are none.
	XminAge int64 `json:"horizon_xmin_age"`
	// HeldBy describes Holders[0], the holder with the oldest xmin: the
	// one to end first. "" when there is none.
	HeldBy string `json:"horizon_held_by"`
	// Holders is everything holding the horizon back now, oldest xmin
	// first. It includes statements running for a moment, as every
	// statement holds a snapshot.
	Holders []HorizonHolder `json:"-"`
}

// MarshalJSON adds horizon_age_seconds (a number, 0 when nothing holds the
// horizon, never null) and outbox_last_vacuum (null when never).
func (h HorizonReport) MarshalJSON() ([]byte, error) {
	type plain HorizonReport
	var vacuumed *time.Time
	if !h.LastVacuum.IsZero() {
		vacuumed = &h.LastVacuum
	}
	return json.Marshal(struct {
		plain
		LastVacuum *time.Time `json:"outbox_last_vacuum"`
		Age        float64    `json:"horizon_age_seconds"`
	}{plain(h), vacuumed, h.Age.Seconds()})
}

// HorizonHolder is one thing holding the vacuum horizon back. The query it
// runs is never read: query texts may carry secrets.
type HorizonHolder struct {
	// Kind is "session", "prepared transaction" or "replication slot".
	Kind string
	// PID is the session's backend (a slot's, while one streams from it).
	PID int
	// ApplicationName, State ("idle in transaction", "active", …) and
	// BackendType are the session's, from pg_stat_activity.
	ApplicationName, State, BackendType string
	// Name is the prepared transaction's gid or the replication slot's name.
	Name string
	// Age is how long the transaction has been open (0 for a slot).
	Age time.Duration
	// XminAge is age(xmin) of what it holds, in transactions.
	XminAge int64
}

// String says what the holder is, for a log line or a person:
// `pid 4242 (application_name "billing", idle in transaction)`,
// `prepared transaction "gid"`, `replication slot "standby1"`.
func (h HorizonHolder) String() string {
	switch h.Kind {
	case "prepared transaction", "replication slot":
		return fmt.Sprintf("%s %q", h.Kind, h.Name)
	}
	var what []string
	if h.BackendType != "" && h.BackendType != "client backend" {
		what = append(what, h.BackendType)
	}
	what = append(what, fmt.Sprintf("application_name %q", h.ApplicationName))
	if h.State != "" {
		what = append(what, h.State)
	}
	return fmt.Sprintf("pid %d (%s)", h.PID, strings.Join(what, ", "))
}

// Horizon reports the outbox's dead and live tuples and what holds the
// vacuum horizon of its database back. Sessions count when they are in
// the outbox's database or in none (a walsender relaying a standby's
// hot_standby_feedback), as PostgreSQL counts them for a table's horizon;
// a role sees other roles' sessions only with pg_read_all_stats (or
// pg_monitor). Prepared transactions count for their database;
// replication slots by their xmin (a logical slot's catalog_xmin holds only
// the system catalogs). It reads statistics and shared memory, no table:
// cheap enough for every scrape; it is kept apart from Status, which the
// relay's backlog gauges call often and which is about rows, not the
// database.
func (a *Admin) Horizon(ctx context.Context) (HorizonReport, error) {
	var h HorizonReport
	var vacuumed sql.NullTime
	if err := a.db.QueryRowContext(ctx, a.q.tuples).Scan(&h.DeadTuples, &h.LiveTuples, &vacuumed); err != nil {
		return HorizonReport{}, fmt.Errorf("relay: horizon: outbox statistics: %w", err)
	}
	h.LastVacuum = vacuumed.Time
	rs, err := a.db.QueryContext(ctx, horizonSQL)
	if err != nil {
		return HorizonReport{}, fmt.Errorf("relay: horizon: %w", err)
	}
	defer rs.Close()
	for rs.Next() {
		var hh HorizonHolder
		var age float64
		if err := rs.Scan(&hh.Kind, &hh.PID, &hh.ApplicationName, &hh.State, &hh.BackendType, &hh.Name, &age, &hh.XminAge); err != nil {
			return HorizonReport{}, fmt.Errorf("relay: horizon: %w", err)
		}
		hh.Age = time.Duration(age * float64(time.Second))
		h.Age = max(h.Age, hh.Age)
		h.Holders = append(h.Holders, hh)
	}
	if err := rs.Err(); err != nil {
		return HorizonReport{}, fmt.Errorf("relay: horizon: %w", err)
	}
	if len(h.Holders) > 0 {
		h.XminAge, h.HeldBy = h.Holders[0].XminAge, h.Holders[0].String()
	}
	return h, nil
}

// DeadFilter selects dead letters; its zero value selects every one. Set
// fields must all match.
type DeadFilter struct {
	Exchange string        // exactly this exchange
	Type     string        // exactly this message type
	Error    string        // last_error contains this text
	MinAge   time.Duration // dead for at least this long
	MaxAge   time.Duration // dead for at most this long
}

func (f DeadFilter) args() []any {
	return []any{f.Exchange, f.Type, f.Error, f.MinAge.Milliseconds(), f.MaxAge.Milliseconds()}
}

func (f DeadFilter) check() error {
	if f.MinAge < 0 || f.MaxAge < 0 || f.MaxAge > 0 && f.MaxAge < f.MinAge {
		return fmt.Errorf("relay: DeadFilter ages %s…%s: must be positive, MinAge ≤ MaxAge", f.MinAge, f.MaxAge)
	}
	return nil
}

// DeadLetterDetail is a dead letter with its payload and headers, as the
// relay would publish it again.
type DeadLetterDetail struct {
	DeadLetter
	Headers map[string]string `json:"headers"`
	Payload []byte            `json:"payload"`
}

// ListDead returns up to limit dead letters in the order they were written
// (0 means DefaultDeadListLimit). Status reports how many there are in all.
func (a *Admin) ListDead(ctx context.Context, limit int) ([]DeadLetter, error) {
	return a.ListDeadWhere(ctx, DeadFilter{}, limit)
}

// ShowDead returns the dead letter with message id id, payload and
// headers included; ErrDeadLetterNotFound (wrapped) if there is none.
func (a *Admin) ShowDead(ctx context.Context, id string) (DeadLetterDetail, error) {
	ids, err := checkIDs([]string{id})
	if err != nil {
		return DeadLetterDetail{}, err
	}
	var d DeadLetterDetail
	var headers sql.NullString
	err = a.db.QueryRowContext(ctx, a.q.showDead, ids[0]).Scan(&d.Seq, &d.ID, &d.Exchange, &d.RoutingKey, &d.Key, &d.Type, &d.ContentType, &d.PayloadSize, &d.Attempts, &d.LastError, &d.CreatedAt, &d.DeadAt, &headers, &d.Payload)
	if errors.Is(err, sql.ErrNoRows) {
		return DeadLetterDetail{}, fmt.Errorf("%w: %s (`mailroom-relay dead list` shows the ids)", ErrDeadLetterNotFound, ids[0])
	}
	if err != nil {
		return DeadLetterDetail{}, fmt.Errorf("relay: show dead letter: %w", err)
	}
	if headers.Valid && headers.String != "" && headers.String != "null" {
		if err := json.Unmarshal([]byte(headers.String), &d.Headers); err != nil {
			d.Headers = map[string]string{"(unreadable headers)": headers.String}
		}
	}
	return d, nil
}

// ListDeadWhere is ListDead of the dead letters that match f.
func (a *Admin) ListDeadWhere(ctx context.Context, f DeadFilter, limit int) ([]DeadLetter, error) {
	if limit < 0 {
		return nil, fmt.Errorf("relay: ListDead limit %d: must be 0 (default %d) or positive", limit, DefaultDeadListLimit)
	}
	if err := f.check(); err != nil {
		return nil, err
	}
	if limit == 0 {
		limit = DefaultDeadListLimit
	}
	rs, err := a.db.QueryContext(ctx, a.q.listDead, append([]any{limit}, f.args()...)...)
	if err != nil {
		return nil, fmt.Errorf("relay: list dead letters: %w", err)
	}
	defer rs.Close()
	var out []DeadLetter
	for rs.Next() {
		var d DeadLetter
		if err := rs.Scan(&d.Seq, &d.ID, &d.Exchange, &d.RoutingKey, &d.Key, &d.Type, &d.ContentType, &d.PayloadSize, &d.Attempts, &d.LastError, &d.CreatedAt, &d.DeadAt); err != nil {
			return nil, fmt.Errorf("relay: list dead letters: %w", err)
		}
		out = append(out, d)
	}
	if err := rs.Err(); err != nil {
		return nil, fmt.Errorf("relay: list dead letters: %w", err)
	}
	return out, nil
}

// ReplayDead moves the dead letters with the given message ids back into
// the outbox, in one transaction: attempts start again at 0 and they are
// due at once; id, payload, headers and created_at are kept. If any id is
// not a dead letter, nothing is replayed and the error (ErrDeadLetterNotFound)
// names the missing ids.
//
// Per-key order: a replayed row gets a new sequence number, so it goes to
// the end of its key: rows of the same key written after it and still
// pending are published first, and consumers see it after everything of its
// key already published. Replayed rows keep their original order among
// themselves.
func (a *Admin) ReplayDead(ctx context.Context, ids []string) (replayed int64, err error) {
	return a.moveDead(ctx, ids, true)
}

// ReplayAllDead is ReplayDead for every dead letter up to the newest one
// there when it starts, in write order, replayBatch rows per transaction:
// a large dead-letter table is neither locked in one long transaction nor
// released into the outbox by one huge commit, and rows the relay buries
// again meanwhile (with the new, higher seq of their replay) are not
// replayed twice. If it stops early (ctx ends, an error), the rows it
// moved stay moved and the error says how many; run it again for the rest.
func (a *Admin) ReplayAllDead(ctx context.Context) (replayed int64, err error) {
	return a.ReplayDeadWhere(ctx, DeadFilter{})
}

// ReplayDeadWhere is ReplayAllDead for the dead letters that match f (an
// exchange fixed, a type, an error seen): the same batches, the same order.
func (a *Admin) ReplayDeadWhere(ctx context.Context, f DeadFilter) (replayed int64, err error) {
	if err := f.check(); err != nil {
		return 0, err
	}
	var last sql.NullInt64
	if err := a.db.QueryRowContext(ctx, a.q.lastDead).Scan(&last); err != nil {
		return 0, fmt.Errorf("relay: replay dead letters: %w", err)
	}
	for last.Valid {
		res, err := a.db.ExecContext(ctx, a.q.replayAll, append(append([]any{replayBatch}, f.args()...), last.Int64)...)
		var n int64
		if err == nil {
			n, err = res.RowsAffected()
		}
		if err != nil {
			return replayed, fmt.Errorf("relay: replay dead letters (%d replayed before this error; run it again for the rest): %w", replayed, err)
		}
		if n == 0 {
			break
		}
		replayed += n
	}
	return replayed, nil
}

// replayBatch is how many dead letters one ReplayAllDead transaction moves.
const replayBatch = 1000

// DiscardDead deletes the dead letters with the given message ids, in one
// transaction; if any id is not a dead letter, nothing is deleted and the
// error (ErrDeadLetterNotFound) names the missing ids.
func (a *Admin) DiscardDead(ctx context.Context, ids []string) (discarded int64, err error) {
	return a.moveDead(ctx, ids, false)
}

func (a *Admin) moveDead(ctx context.Context, ids []string, replay bool) (int64, error) {
	what := "discard"
	if replay {
		what = "replay"
	}
	ids, err := checkIDs(ids)
	if err != nil {
		return 0, err
	}
	tx, err := a.db.BeginTx(ctx, nil)
	if err != nil {
		return 0, fmt.Errorf("relay: %s dead letters: %w", what, err)
	}
	defer tx.Rollback() //nolint:errcheck // after Commit this is a no-op

	rs, err := tx.QueryContext(ctx, a.q.lockDead, pq.StringArray(ids))
	if err != nil {
		return 0, fmt.Errorf("relay: %s dead letters: %w", what, err)
	}
	found := map[string]bool{}
	for rs.Next() {
		var id string
		if err := rs.Scan(&id); err != nil {
			rs.Close()
			return 0, fmt.Errorf("relay: %s dead letters: %w", what, err)
		}
		found[id] = true
	}
	rs.Close()
	if err := rs.Err(); err != nil {
		return 0, fmt.Errorf("relay: %s dead letters: %w", what, err)
	}
	var missing []string
	for _, id := range ids {
		if !found[id] {
			missing = append(missing, id)
		}
	}
	if len(missing) > 0 {
		return 0, fmt.Errorf("%w: %s (nothing was %sed; `mailroom-relay dead list` shows the ids)", ErrDeadLetterNotFound, strings.Join(missing, ", "), what)
	}

	stmt := a.q.discard
	if replay {
		stmt = a.q.replay
	}
	res, err := tx.ExecContext(ctx, stmt, pq.StringArray(ids))
	if err != nil {
		return 0, fmt.Errorf("relay: %s dead letters: %w", what, err)
	}
	n, err := res.RowsAffected()
	if err != nil {
		return 0, fmt.Errorf("relay: %s dead letters: %w", what, err)
	}
	// A sleeping relay is woken by the outbox's notified default, as for Add.
	if err := tx.Commit(); err != nil {
		return 0, fmt.Errorf("relay: %s dead letters: commit: %w", what, err)
	}
	return n, nil
}

// checkIDs validates and de-duplicates ids, in their canonical form.
func checkIDs(ids []string) ([]string, error) {
	if len(ids) == 0 {
		return nil, fmt.Errorf("%w: no ids given", ErrInvalidID)
	}
	seen := map[string]bool{}
	var out []string
	for _, s := range ids {
		u, err := uuid.Parse(s)
		if err != nil {
			return nil, fmt.Errorf("%w: %q is not a UUID (copy it from `mailroom-relay dead list`)", ErrInvalidID, s)
		}
		if c := u.String(); !seen[c] {
			seen[c] = true
			out = append(out, c)
		}
	}
	sort.Strings(out)
	return out, nil
}

// DefaultPurgeBatch is how many rows one PurgePublished statement deletes
// when given 0.
const DefaultPurgeBatch = 1000

// PurgePublished deletes rows published more than olderThan ago from the
// published table (filled when Config.Retain is set), batch rows per
// statement (0 means DefaultPurgeBatch), each statement committing on its
// own, until none are left or ctx ends; it returns how many it deleted.
// Several purgers may run at once: they skip each other's rows.
func (a *Admin) PurgePublished(ctx context.Context, olderThan time.Duration, batch int) (deleted int64, err error) {
	return a.PurgePublishedOn(ctx, a.db, olderThan, batch)
}

// PurgePublishedOn is PurgePublished on conn, a *sql.DB or *sql.Conn (say
// the session of a lock the purge runs under), not a transaction.
func (a *Admin) PurgePublishedOn(ctx context.Context, conn outbox.Execer, olderThan time.Duration, batch int) (deleted int64, err error) {
	switch {
	case olderThan <= 0:
		return 0, fmt.Errorf("relay: PurgePublished olderThan %s: must be positive", olderThan)
	case batch < 0:
		return 0, fmt.Errorf("relay: PurgePublished batch %d: must be 0 (default %d) or positive", batch, DefaultPurgeBatch)
	case batch == 0:
		batch = DefaultPurgeBatch
	}
	for { // the cutoff is the database's clock, which stamped the rows
		res, err := conn.ExecContext(ctx, a.q.purgePublished, olderThan.Microseconds(), batch)
		if err != nil {
			return deleted, fmt.Errorf("relay: purge published rows: %w", err)
		}
		n, err := res.RowsAffected()
		if err != nil {
			return deleted, fmt.Errorf("relay: purge published rows: %w", err)
		}
		deleted += n
		if n < int64(batch) {
			return deleted, nil
		}
		if err := ctx.Err(); err != nil {
			return deleted, err
		}
	}
}

// The free functions of earlier releases build an Admin per call; they go
// in the next release.

// Status is NewAdmin(db, tables).Status.
//
// Deprecated: use Admin.Status.
func Status(ctx context.Context, db *sql.DB, tables mailroom.Tables) (StatusReport, error) {
	a, err := NewAdmin(db, tables)
	if err != nil {
		return StatusReport{}, err
	}
	return a.Status(ctx)
}

// ListDead is NewAdmin(db, tables).ListDead.
//
// Deprecated: use Admin.ListDead.
func ListDead(ctx context.Context, db *sql.DB, tables mailroom.Tables, limit int) ([]DeadLetter, error) {
	a, err := NewAdmin(db, tables)
	if err != nil {
		return nil, err
	}
	return a.ListDead(ctx, limit)
}

// ReplayDead is NewAdmin(db, tables).ReplayDead.
//
// Deprecated: use Admin.ReplayDead.
func ReplayDead(ctx context.Context, db *sql.DB, tables mailroom.Tables, ids []string) (int64, error) {
	a, err := NewAdmin(db, tables)
	if err != nil {
		return 0, err
	}
	return a.ReplayDead(ctx, ids)
}

// ReplayAllDead is NewAdmin(db, tables).ReplayAllDead.
//
// Deprecated: use Admin.ReplayAllDead.
func ReplayAllDead(ctx context.Context, db *sql.DB, tables mailroom.Tables) (int64, error) {
	a, err := NewAdmin(db, tables)
	if err != nil {
		return 0, err
	}
	return a.ReplayAllDead(ctx)
}

// DiscardDead is NewAdmin(db, tables).DiscardDead.
//
// Deprecated: use Admin.DiscardDead.
func DiscardDead(ctx context.Context, db *sql.DB, tables mailroom.Tables, ids []string) (int64, error) {
	a, err := NewAdmin(db, tables)
	if err != nil {
		return 0, err
	}
	return a.DiscardDead(ctx, ids)
}

// PurgePublished is NewAdmin(db, tables).PurgePublishedOn(ctx, db, …).
//
// Deprecated: use Admin.PurgePublished or Admin.PurgePublishedOn.
func PurgePublished(ctx context.Context, db outbox.Execer, tables mailroom.Tables, olderThan time.Duration, batch int) (int64, error) {
	a, err := NewAdmin(nil, tables)
	if err != nil {
		return 0, err
	}
	return a.PurgePublishedOn(ctx, db, olderThan, batch)
}
