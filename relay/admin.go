package relay

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/lib/pq"

	"github.com/mailroom-go/mailroom"
	"github.com/mailroom-go/mailroom/outbox"
)

// The operator's side of the relay: what is waiting, what died, and putting
// dead letters back or throwing them away. mailroom-relay's status and dead
// commands call these; a service that runs the relay in-process can call
// them from its own admin endpoints.

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
	// itself by an advisory lock on a session of its own (relays with
	// DisableListen do not). Publishing counts those of them that hold a
	// publishing slot (Config.ActiveRelays); the others stand by.
	Relays     int64 `json:"relays"`
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

type adminQueries struct {
	status, listDead, lockDead, lastDead, replay, replayAll, discard, purgePublished string
}

func newAdminQueries(tables mailroom.Tables) (adminQueries, error) {
	t, err := tables.Resolve()
	if err != nil {
		return adminQueries{}, fmt.Errorf("relay: %w", err)
	}
	ob, dead, pub := t.Outbox.Quoted(), t.Dead.Quoted(), t.Published.Quoted()
	// scheduled: never attempted, not leased, not yet due.
	const scheduled = `(attempts = 0 AND lease IS NULL AND available_at > now())`
	// waitingSince: when a row began to count as lag. A row never
	// attempted waits from when it was due (written, its AvailableAt, or
	// its replay); a row that failed, from when it was written, so a
	// message that keeps failing keeps the lag growing.
	const waitingSince = `CASE WHEN attempts = 0 THEN greatest(created_at, available_at) ELSE created_at END`
	obOID := `'` + strings.ReplaceAll(ob, `'`, `''`) + `'::regclass::oid`
	const deadCols = `seq, id, exchange, routing_key, key, type, content_type, headers, payload, created_at`
	return adminQueries{
		// A sequential scan of the outbox: it holds only what is not yet
		// published, so it is small when the relay keeps up (and when it
		// does not, this is the query that says so). The dead-letter count
		// scans that table, which only grows by failures.
		status: `SELECT count(*),
    count(*) FILTER (WHERE ` + scheduled + `),
    count(*) FILTER (WHERE attempts > 0),
    count(*) FILTER (WHERE leased_until > now()),
    coalesce(greatest(extract(epoch FROM now() - min(` + waitingSince + `) FILTER (WHERE NOT ` + scheduled + `)), 0), 0)::float8,
    (SELECT count(*) FROM ` + dead + `),
    ` + presentRelays(obOID) + `,
    ` + publishingRelays(obOID) + `
FROM ` + ob,
		// Write order (seq), oldest first.
		listDead: `SELECT seq, id, exchange, routing_key, key, type, content_type, length(payload), attempts, last_error, created_at, dead_at
FROM ` + dead + ` ORDER BY seq LIMIT $1`,
		// Lock the rows first, so a concurrent replay or discard of the same
		// id waits and then finds it gone (reported, not silently counted).
		// In seq order, as replayAll locks them: two of these cannot
		// deadlock. Index: dead_id_idx.
		lockDead: `SELECT id::text FROM ` + dead + ` WHERE id = ANY($1::uuid[]) ORDER BY seq FOR UPDATE`,
		lastDead: `SELECT max(seq) FROM ` + dead,
		// Back into the outbox in write order with a new seq (so at the end
		// of its key), attempts 0, due now; the id and created_at are kept.
		replay: `WITH d AS (DELETE FROM ` + dead + ` WHERE id = ANY($1::uuid[]) RETURNING ` + deadCols + `)
INSERT INTO ` + ob + ` (id, exchange, routing_key, key, type, content_type, headers, payload, created_at)
SELECT id, exchange, routing_key, key, type, content_type, headers, payload, created_at FROM d ORDER BY seq`,
		// The oldest $2 up to seq $1 (the last when the replay began).
		// A concurrent replay of one of them makes this one wait, then
		// skip it.
		replayAll: `WITH d AS (DELETE FROM ` + dead + ` WHERE seq IN (
    SELECT seq FROM ` + dead + ` WHERE seq <= $1 ORDER BY seq LIMIT $2 FOR UPDATE) RETURNING ` + deadCols + `)
INSERT INTO ` + ob + ` (id, exchange, routing_key, key, type, content_type, headers, payload, created_at)
SELECT id, exchange, routing_key, key, type, content_type, headers, payload, created_at FROM d ORDER BY seq`,
		discard: `DELETE FROM ` + dead + ` WHERE id = ANY($1::uuid[])`,
		// Oldest first along published_at_idx, at most $2 rows, skipping rows
		// another purger holds.
		purgePublished: `DELETE FROM ` + pub + ` WHERE seq IN (
    SELECT seq FROM ` + pub + ` WHERE published_at < now() - $1 * interval '1 microsecond'
    ORDER BY published_at LIMIT $2 FOR UPDATE SKIP LOCKED)`,
	}, nil
}

// Status reports what is waiting in the outbox named by tables and how many
// dead letters there are. db must reach the tables (same search_path as the
// relay).
func Status(ctx context.Context, db *sql.DB, tables mailroom.Tables) (StatusReport, error) {
	q, err := newAdminQueries(tables)
	if err != nil {
		return StatusReport{}, err
	}
	var s StatusReport
	var age float64
	if err := db.QueryRowContext(ctx, q.status).Scan(&s.Pending, &s.Scheduled, &s.Retrying, &s.InFlight, &age, &s.Dead, &s.Relays, &s.Publishing); err != nil {
		return StatusReport{}, fmt.Errorf("relay: status: %w", err)
	}
	s.OldestPendingAge = time.Duration(age * float64(time.Second))
	return s, nil
}

// ListDead returns up to limit dead letters in the order they were written
// (0 means DefaultDeadListLimit). Status reports how many there are in all.
func ListDead(ctx context.Context, db *sql.DB, tables mailroom.Tables, limit int) ([]DeadLetter, error) {
	q, err := newAdminQueries(tables)
	if err != nil {
		return nil, err
	}
	if limit < 0 {
		return nil, fmt.Errorf("relay: ListDead limit %d: must be 0 (default %d) or positive", limit, DefaultDeadListLimit)
	}
	if limit == 0 {
		limit = DefaultDeadListLimit
	}
	rs, err := db.QueryContext(ctx, q.listDead, limit)
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
func ReplayDead(ctx context.Context, db *sql.DB, tables mailroom.Tables, ids []string) (replayed int64, err error) {
	return moveDead(ctx, db, tables, ids, true)
}

// ReplayAllDead is ReplayDead for every dead letter up to the newest one
// there when it starts, in write order, replayBatch rows per transaction:
// a large dead-letter table is neither locked in one long transaction nor
// released into the outbox by one huge commit, and rows the relay buries
// again meanwhile (with the new, higher seq of their replay) are not
// replayed twice. If it stops early (ctx ends, an error), the rows it
// moved stay moved and the error says how many; run it again for the rest.
func ReplayAllDead(ctx context.Context, db *sql.DB, tables mailroom.Tables) (replayed int64, err error) {
	q, err := newAdminQueries(tables)
	if err != nil {
		return 0, err
	}
	var last sql.NullInt64
	if err := db.QueryRowContext(ctx, q.lastDead).Scan(&last); err != nil {
		return 0, fmt.Errorf("relay: replay dead letters: %w", err)
	}
	for last.Valid {
		res, err := db.ExecContext(ctx, q.replayAll, last.Int64, replayBatch)
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
func DiscardDead(ctx context.Context, db *sql.DB, tables mailroom.Tables, ids []string) (discarded int64, err error) {
	return moveDead(ctx, db, tables, ids, false)
}

func moveDead(ctx context.Context, db *sql.DB, tables mailroom.Tables, ids []string, replay bool) (int64, error) {
	what := "discard"
	if replay {
		what = "replay"
	}
	q, err := newAdminQueries(tables)
	if err != nil {
		return 0, err
	}
	if ids, err = checkIDs(ids); err != nil {
		return 0, err
	}
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		return 0, fmt.Errorf("relay: %s dead letters: %w", what, err)
	}
	defer tx.Rollback() //nolint:errcheck // after Commit this is a no-op

	rs, err := tx.QueryContext(ctx, q.lockDead, pq.StringArray(ids))
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

	stmt := q.discard
	if replay {
		stmt = q.replay
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
// Pass a *sql.DB or *sql.Conn, not a transaction. Several purgers may run at
// once: they skip each other's rows.
func PurgePublished(ctx context.Context, db outbox.Execer, tables mailroom.Tables, olderThan time.Duration, batch int) (deleted int64, err error) {
	q, err := newAdminQueries(tables)
	if err != nil {
		return 0, err
	}
	switch {
	case olderThan <= 0:
		return 0, fmt.Errorf("relay: PurgePublished olderThan %s: must be positive", olderThan)
	case batch < 0:
		return 0, fmt.Errorf("relay: PurgePublished batch %d: must be 0 (default %d) or positive", batch, DefaultPurgeBatch)
	case batch == 0:
		batch = DefaultPurgeBatch
	}
	for { // the cutoff is the database's clock, which stamped the rows
		res, err := db.ExecContext(ctx, q.purgePublished, olderThan.Microseconds(), batch)
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
