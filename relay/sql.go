package relay

import (
	"context"
	"database/sql"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/lib/pq"

	"github.com/mailroom-go/mailroom/internal/locks"
	"github.com/mailroom-go/mailroom/internal/tablenames"
)

// queries holds every statement of the relay, rendered once for the
// configured table names.
type queries struct {
	claim, claimAlone, deleteDone, deleteDoneAsync, archiveDone, retry, retryReturning, bury, release string

	// seen, forgetGone and leave keep the row of a relay without a
	// session of its own (heartbeat.go).
	seen, forgetGone, leave string

	// turn takes the claim lock for the claim that follows it in the same
	// message (see claimInTurn); turnTimeout and turnLock are its two
	// statements, for a driver that takes one per call.
	turn, turnTimeout, turnLock string
}

// claimLockTimeout bounds the wait for the claim lock. It is held for one
// claim statement (milliseconds); a longer wait means the holder's server
// is stalled, and the relay claims without the lock for a while.
const claimLockTimeout = time.Second

// claimText renders the claim statement of relays that lease (claim) with
// its values as literals: it goes in one message after turn, which a
// prepared statement cannot (claimAlone is prepared; see aloneParams). The
// values: limit, the lease's length and token, the seqs this relay holds
// (claimed, not yet finished), which the claim skips, whether the claim
// checks that no relay publishes alone, and the key the last claim's walk
// of keys ended at (quoted as a literal: it is the users' data).
//
// Each claim looks at windowRows × BatchSize rows in time order and walks
// BatchSize keys (see found in newQueries); it takes up to limit heads and,
// with their runs, up to runRows rows in all ($9; see runs).
func claimText(query string, limit, runRows int, leaseMS int64, lease string, held []int64, checkAlone bool, cursor string) string {
	var b strings.Builder
	b.WriteString("'{")
	for i, seq := range held {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteString(strconv.FormatInt(seq, 10))
	}
	b.WriteString("}'::bigint[]")
	check := "true"
	if checkAlone {
		check = "(SELECT ok FROM free)"
	}
	return strings.NewReplacer(
		"$1", strconv.Itoa(limit), "$2", strconv.FormatInt(leaseMS, 10), "$3", "'"+lease+"'::uuid", "$4", b.String(), "$5", check,
		"$6", pq.QuoteLiteral(cursor), "$7", strconv.Itoa(limit), "$8", strconv.Itoa(windowRows*limit), "$9", strconv.Itoa(max(limit, runRows)),
	).Replace(query)
}

// windowRows is how many due rows, per row of a batch, a claim looks at
// in time order (see found).
const windowRows = 1

const columns = `id, exchange, routing_key, key, type, content_type, headers, payload, created_at, attempts`

func newQueries(t tablenames.Resolved) queries {
	ob, dead, pub := t.Outbox.Quoted(), t.Dead.Quoted(), t.Published.Quoted()
	obOID := `'` + strings.ReplaceAll(ob, `'`, `''`) + `'::regclass::oid::integer`
	// due: a row that may be published now: due, no live lease of
	// another relay, not held by this one (held).
	due := `o.available_at <= now()
      AND (o.leased_until IS NULL OR o.leased_until <= now())
      AND ` + notHeld("o")
	// found are the candidate heads of a claim, the rows that may go
	// first: those among the first $8 due rows (by available_at) that
	// are unkeyed or first of their key, and the first rows of $7 keys
	// walked in key order from where the last claim's walk ended ($6),
	// round and round. The window keeps the claim in time order and
	// finds unkeyed rows; the walk finds the first row of a key however
	// many rows of other keys (or of its own) lie before it. A scan for
	// the first rows of keys through the whole table visited every row
	// behind them: 0.86 s a claim with 100,000 rows over 50 keys. A walk
	// step is one probe of key_idx (index only); last is where this
	// walk ended. Rows after the window behind more than $8 due rows
	// of keys wait until the window reaches them (unkeyed rows, or keys
	// the walk has not come round to).
	//
	// "First of its key" leaves out the rows this relay holds: a row
	// whose key's earlier rows are all held here continues their run
	// (prev in runs, and chains.go).
	//
	// held is the seqs this relay holds ($4), hashed once for the
	// statement (NOT IN a subquery): the literal appears once, which
	// keeps the planning short (a literal array in each place cost the
	// planner more than running the claim).
	found := `windowed AS (SELECT o.seq, o.key, o.available_at FROM ` + ob + ` o WHERE ` + due + ` ORDER BY o.available_at LIMIT $8),
held AS MATERIALIZED (SELECT unnest($4) AS seq),
walk1(key, seq, n) AS (
    SELECT f.key, f.seq, 1 FROM (SELECT p.key, p.seq FROM ` + ob + ` p WHERE p.key <> '' AND p.key > $6 ORDER BY p.key, p.seq LIMIT 1) f
    UNION ALL
    SELECT f.key, f.seq, w.n + 1 FROM walk1 w, LATERAL (SELECT p.key, p.seq FROM ` + ob + ` p WHERE p.key <> '' AND p.key > w.key ORDER BY p.key, p.seq LIMIT 1) f
    WHERE w.n < $7),
walk2(key, seq, n) AS (
    SELECT f.key, f.seq, (SELECT count(*) FROM walk1) + 1 FROM (SELECT p.key, p.seq FROM ` + ob + ` p WHERE p.key <> '' AND p.key <= $6 ORDER BY p.key, p.seq LIMIT 1) f
    WHERE (SELECT count(*) FROM walk1) < $7
    UNION ALL
    SELECT f.key, f.seq, w.n + 1 FROM walk2 w, LATERAL (SELECT p.key, p.seq FROM ` + ob + ` p WHERE p.key <> '' AND p.key > w.key AND p.key <= $6 ORDER BY p.key, p.seq LIMIT 1) f
    WHERE w.n < $7),
walked AS (SELECT * FROM walk1 UNION ALL SELECT * FROM walk2),
last AS (SELECT key FROM walked ORDER BY n DESC LIMIT 1),
found AS (
    SELECT w.seq, w.key, w.available_at FROM windowed w WHERE w.key = ''
    UNION
    SELECT f.seq, f.key, f.available_at FROM (SELECT DISTINCT ON (w.key) w.seq, w.key, w.available_at FROM windowed w WHERE w.key <> '' ORDER BY w.key, w.seq) f
    WHERE f.seq = (SELECT p.seq FROM ` + ob + ` p WHERE p.key = f.key AND p.key <> '' AND ` + notHeld("p") + ` ORDER BY p.seq LIMIT 1)
    UNION
    SELECT o.seq, o.key, o.available_at FROM walked w JOIN ` + ob + ` o ON o.seq = CASE WHEN ` + notHeld("w") + ` THEN w.seq
        ELSE (SELECT p.seq FROM ` + ob + ` p WHERE p.key = w.key AND p.key <> '' AND ` + notHeld("p") + ` ORDER BY p.seq LIMIT 1) END
    WHERE ` + due + `)`
	// runs follows the heads (first rows of their key, or unkeyed rows)
	// of a claim with the rows after them of their key, in seq order, as
	// long as each is due: a key's run, published one at a time by the
	// publisher (each after the one before it is confirmed), so a key
	// moves at confirm speed rather than one message per claim. The
	// room the heads leave in $9 rows (the confirm window: the rows a
	// publisher holds back are bounded by it anyway) is shared among the
	// keyed heads
	// (run), and picked takes the heads first, then the second row of
	// each key, and so on (rn), so keys advance side by side and one hot
	// key does not fill a batch others wait behind. When the heads fill
	// the batch (many keys), run is 0 and the runs are not read (a
	// one-time filter). Index: key_idx (key, seq) for each run.
	runs := `room AS (SELECT ($9 - count(*)) / greatest(count(*) FILTER (WHERE key <> ''), 1) AS run FROM heads),
picked AS (
    SELECT c.seq, c.rn, c.prev FROM (
        SELECT h.seq, 0 AS rn, h.available_at AS at,
               CASE WHEN h.key <> '' THEN (SELECT max(p.seq) FROM ` + ob + ` p WHERE p.key = h.key AND p.key <> '' AND p.seq < h.seq) END AS prev
        FROM heads h
        UNION ALL
        SELECT q.seq, q.rn, h.available_at, NULL FROM heads h CROSS JOIN LATERAL (
            SELECT p.seq, p.rn FROM (
                SELECT p.seq, row_number() OVER w AS rn,
                       bool_and(p.available_at <= now() AND (p.leased_until IS NULL OR p.leased_until <= now()) AND ` + notHeld("p") + `) OVER w AS ok
                FROM (SELECT p.seq, p.available_at, p.leased_until FROM ` + ob + ` p
                      WHERE p.key = h.key AND p.key <> '' AND p.seq > h.seq
                      ORDER BY p.seq LIMIT (SELECT run FROM room)) p
                WINDOW w AS (ORDER BY p.seq)) p
            WHERE p.ok) q
        WHERE h.key <> '' AND (SELECT run FROM room) > 0) c
    ORDER BY c.rn, c.at
    LIMIT $9)`
	q := queries{
		turnTimeout: `SET LOCAL lock_timeout = ` + strconv.FormatInt(claimLockTimeout.Milliseconds(), 10),
		turnLock:    `SELECT pg_advisory_xact_lock(` + strconv.Itoa(locks.Claim) + `, ` + obOID + `)`,
		// claim takes up to $1 due rows, oldest first, and leases them for
		// $2 ms under token $3, in one short autocommit statement: no
		// transaction stays open while the broker is awaited.
		//
		// Index: available_idx (available_at) for the scan; backing-off
		// and delayed rows lie in the future and are never visited. The
		// lease is leased_until, which no index covers: leasing is a HOT
		// update (schema version 4) that writes no index entry. The
		// scan steps over rows leased and still in flight, a few thousand
		// at most (ConfirmWindow and a claim ahead, per relay).
		// Ordering: a keyed row heads a claim only when no earlier row of
		// its key exists (key_idx probe; "p.key <> ''" lets the planner
		// use that partial index instead of a sequential scan per keyed
		// candidate), and the rows after it come with it (runs), leased
		// together: so one relay holds a key's rows at a time, the next
		// of a key becomes claimable by anyone only once those before it
		// were confirmed and deleted (or dead-lettered), and the
		// publisher sends a key's rows one at a time (chains.go).
		// Relays publishing side by side claim in turn (claimText after
		// turn). When they do not, SKIP LOCKED lets them claim side by
		// side, and a row another relay leased after this statement's
		// snapshot fails the re-checked leased_until condition and is not
		// claimed twice. $4: the seqs this relay holds (claimText).
		//
		// While a relay publishes alone (it holds the alone lock, see
		// coordinate.go) this claim takes nothing: that relay's rows carry no
		// lease. Relays that coordinate wait for it anyway; this keeps
		// out those that cannot (DisableListen), and any relay whose
		// coordination fails. The lock is tried in shared mode for the
		// claim's transaction, which PgBouncer's transaction mode allows.
		// $5 is that check, or true for the relay leaving lone mode
		// (it holds the lock itself, and skips its own rows by $4).
		//
		// The claim commits asynchronously (synchronous_commit off for this
		// statement's transaction): a lease lost in a database crash only
		// lets the row be claimed and published again — a duplicate the
		// inbox absorbs — and not waiting for the WAL flush keeps the claim
		// off the disk's latency.
		claim: `WITH RECURSIVE async AS (SELECT set_config('synchronous_commit', 'off', true)),
free AS MATERIALIZED (SELECT pg_try_advisory_xact_lock_shared(` + strconv.Itoa(locks.Alone) + `, ` + obOID + `) AS ok),
` + found + `,
heads AS (
    SELECT o.seq, o.key, o.available_at FROM ` + ob + ` o
    WHERE o.seq IN (SELECT seq FROM found) AND ` + due + `
    ORDER BY o.available_at, o.seq
    LIMIT $1
    FOR UPDATE SKIP LOCKED),
` + runs + `
UPDATE ` + ob + ` o SET leased_until = now() + $2 * interval '1 millisecond', lease = $3
FROM picked WHERE o.seq = picked.seq AND (SELECT true FROM async) AND $5
RETURNING o.seq, picked.rn, picked.prev, (SELECT key FROM last), ` + prefixed("o.", columns),

		// claimAlone is the claim of a relay publishing alone on its table
		// (coordinate.go): it reads the rows and writes nothing. The relay keeps
		// what it holds in memory instead of in leases, and skips it ($4);
		// nobody else claims meanwhile. The row lock and the lease update
		// were half the database's work per row: draining 100,000 rows
		// (claim, then delete) took the server 1.0-1.1 s of CPU with them,
		// 0.5-0.6 s without (keyed rows: 1.6-1.9 s and 1.0 s). The same
		// conditions as claim: due, no live lease of another relay (one
		// that published before), first of its key.
		claimAlone: aloneParams.Replace(`WITH RECURSIVE ` + found + `,
heads AS (SELECT * FROM found ORDER BY available_at, seq LIMIT $1),
` + runs + `
SELECT o.seq, picked.rn, picked.prev, (SELECT key FROM last), ` + prefixed("o.", columns) + ` FROM picked JOIN ` + ob + ` o ON o.seq = picked.seq
ORDER BY picked.rn, o.available_at, o.seq`),

		// deleteDone removes confirmed rows by primary key. No lease check: a
		// confirmed message is delivered whoever holds the row now.
		deleteDone: `DELETE FROM ` + ob + ` WHERE seq = ANY($1::bigint[])`,

		seen: `INSERT INTO ` + t.Relays.Quoted() + ` (instance, name) VALUES ($1::uuid, $2)
ON CONFLICT (instance) DO UPDATE SET seen_at = now(), name = excluded.name`,
		forgetGone: `DELETE FROM ` + t.Relays.Quoted() + ` WHERE seen_at < now() - interval '1 minute'`,
		leave:      `DELETE FROM ` + t.Relays.Quoted() + ` WHERE instance = $1::uuid`,

		// deleteDoneAsync is deleteDone as one autocommit statement that
		// commits asynchronously, like the claim.
		deleteDoneAsync: `WITH async AS (SELECT set_config('synchronous_commit', 'off', true))
DELETE FROM ` + ob + ` WHERE seq = ANY($1::bigint[]) AND (SELECT true FROM async)`,

		// archiveDone moves confirmed rows to the published table (Retain).
		archiveDone: `WITH d AS (DELETE FROM ` + ob + ` WHERE seq = ANY($1::bigint[]) RETURNING seq, ` + columns + `)
INSERT INTO ` + pub + ` (seq, ` + columns + `) SELECT seq, ` + columns + ` FROM d
ON CONFLICT (seq) DO NOTHING`,

		// retry records a failed attempt and schedules the next one, only
		// while this relay still owns the row (owned).
		retry: `UPDATE ` + ob + ` o SET attempts = o.attempts + 1, last_error = f.err,
    available_at = now() + f.delay_ms * interval '1 millisecond', lease = NULL, leased_until = NULL
FROM unnest($1::bigint[], $2::text[], $3::text[], $4::float8[]) AS f(seq, lease, err, delay_ms)
WHERE o.seq = f.seq AND ` + owned,

		// bury moves rows that used up their attempts to the dead-letter
		// table with their last error, in one statement (one transaction),
		// and returns the seqs it moved. A row is deleted only once it is
		// in the dead-letter table: one whose seq is there already (a table
		// shared by two outboxes, seqs reused after RESTART IDENTITY)
		// stays in the outbox, and the relay schedules it again. The rows
		// are locked as they are read, so the lease checked is the one
		// deleted under: a row another relay claimed meanwhile is in
		// neither statement, not copied to the dead-letter table while it
		// stays in the outbox.
		bury: `WITH f AS (SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[]) AS f(seq, lease, err)),
ins AS (INSERT INTO ` + dead + ` (seq, ` + columns + `, last_error)
    SELECT o.seq, ` + prefixed("o.", strings.Replace(columns, "attempts", "attempts + 1", 1)) + `, f.err
    FROM ` + ob + ` o JOIN f ON o.seq = f.seq AND ` + owned + `
    FOR UPDATE OF o
    ON CONFLICT (seq) DO NOTHING RETURNING seq)
DELETE FROM ` + ob + ` o USING ins, f WHERE o.seq = ins.seq AND o.seq = f.seq AND ` + owned + `
RETURNING o.seq`,

		// release hands leased rows back at once (shutdown, lost
		// connection) without counting an attempt. They keep their place:
		// available_at is as it was when they were claimed. (A row
		// claimed without a lease needs no release.)
		release: `UPDATE ` + ob + ` o SET lease = NULL, leased_until = NULL
FROM unnest($1::bigint[], $2::uuid[]) AS f(seq, lease)
WHERE o.seq = f.seq AND o.lease = f.lease`,
	}
	q.turn = q.turnTimeout + ";\n" + q.turnLock + ";\n"
	// retryReturning is retry returning the seqs it scheduled (buryRows).
	q.retryReturning = q.retry + ` RETURNING o.seq`
	return q
}

// owned is the condition under which this relay may still record an
// outcome for row o of its claim f: o carries f's lease, or, for a row
// claimed without one (f.lease is ”), no other relay holds a live lease
// on it.
const owned = `CASE WHEN f.lease = '' THEN o.leased_until IS NULL OR o.leased_until <= now() ELSE o.lease = f.lease::uuid END`

// aloneParams numbers the values of claimAlone, a prepared statement (the
// claim a relay publishing alone runs at every turn, so its planning is
// saved): $1 limit, $2 the held seqs, $3 the walk's cursor, $4 the keys to
// walk, $5 the window's rows, $6 the rows with runs (see claimText). The
// held seqs are hashed once (held), so a generic plan costs them nothing
// more than a literal would.
var aloneParams = strings.NewReplacer("$1", "$1::int", "$4", "$2::bigint[]", "$6", "$3::text", "$7", "$4::int", "$8", "$5::int", "$9", "$6::int")

// notHeld is the condition that row a is not held by this relay (the
// held CTE of a claim).
func notHeld(a string) string { return a + `.seq NOT IN (SELECT seq FROM held)` }

func prefixed(p, cols string) string {
	parts := strings.Split(cols, ", ")
	for i := range parts {
		parts[i] = p + parts[i]
	}
	return strings.Join(parts, ", ")
}

// statements are the relay's prepared statements, by query text: prepared
// on first use, closed by close (when Run returns). database/sql prepares
// each again on every pooled connection it runs on; the server then parses
// it once per connection instead of at every run.
type statements struct {
	db *sql.DB
	mu sync.Mutex
	by map[string]*sql.Stmt
}

func (s *statements) get(ctx context.Context, query string) (*sql.Stmt, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if st := s.by[query]; st != nil {
		return st, nil
	}
	st, err := s.db.PrepareContext(ctx, query)
	if err != nil {
		return nil, err
	}
	if s.by == nil {
		s.by = map[string]*sql.Stmt{}
	}
	s.by[query] = st
	return st, nil
}

func (s *statements) close() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for q, st := range s.by {
		st.Close()
		delete(s.by, q)
	}
}

// heldAdvisoryLocks is the FROM and WHERE of a query over the granted
// entries of the two-key advisory locks (first…last, the outbox OID the SQL
// expression oid gives) in this database, as the wake, claim, presence and
// publishing locks are keyed.
func heldAdvisoryLocks(first, last int, oid string) string {
	return `pg_locks
WHERE locktype = 'advisory' AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND classid BETWEEN ` + strconv.Itoa(first) + ` AND ` + strconv.Itoa(last) + ` AND objid = ` + oid + ` AND objsubid = 2 AND granted`
}

// presentRelays and publishingRelays are scalar subqueries counting the
// relays running on, and publishing to, the outbox whose OID the SQL
// expression oid gives.
func presentRelays(oid string) string {
	return `(SELECT count(*) FROM ` + heldAdvisoryLocks(locks.Presence, locks.Presence, oid) + `)`
}

func publishingRelays(oid string) string {
	return `(SELECT count(*) FROM ` + heldAdvisoryLocks(locks.Active, locks.Active+locks.MaxActive-1, oid) + `)`
}

// The advisory-lock statements of the wake lock and the coordinator: $1 is
// the lock's first key (internal/locks), $2 the outbox table's OID as an
// integer.
const (
	lockSharedSQL = `SELECT pg_advisory_lock_shared($1, $2)`
	tryLockSQL    = `SELECT pg_try_advisory_lock($1, $2)`
	unlockSQL     = `SELECT pg_advisory_unlock($1, $2)`
	// lockWithTimeoutSQL waits at most $3 milliseconds (the session's
	// lock_timeout, set for the wake lock's connection only).
	lockWithTimeoutSQL = `WITH t AS MATERIALIZED (SELECT set_config('lock_timeout', $3, false))
SELECT pg_advisory_lock($1, $2) FROM t`
)

// The coordinator's and the wake lock's looks at pg_locks; $1 is the
// outbox table's OID.
var (
	standingRelaysSQL   = `SELECT ` + presentRelays("$1") + ` - ` + publishingRelays("$1")
	publishingRelaysSQL = `SELECT ` + publishingRelays("$1")
	// othersAloneSQL counts the other sessions holding the alone lock
	// exclusively (claims hold it shared: not counted).
	othersAloneSQL = `SELECT count(*) FROM ` + heldAdvisoryLocks(locks.Alone, locks.Alone, "$1") + ` AND mode = 'ExclusiveLock' AND pid <> pg_backend_pid()`
	// endFrozenSQL ends the sessions of slot holders idle for more than $2
	// milliseconds (see frozenAfter), returning their pids.
	endFrozenSQL = `SELECT pid, pg_terminate_backend(pid) FROM ` + heldAdvisoryLocks(locks.Active, locks.Active+locks.MaxActive-1, "$1") + `
  AND pid IN (SELECT pid FROM pg_stat_activity WHERE state = 'idle' AND state_change < now() - $2 * interval '1 millisecond')`
	// wakeLockHeldSQL: is the wake lock held exclusively (by a sleeping
	// relay), rather than shared by writers?
	wakeLockHeldSQL = `SELECT EXISTS (SELECT FROM ` + heldAdvisoryLocks(locks.Wake, locks.Wake, "$1") + ` AND mode = 'ExclusiveLock')`
)

// asyncCommitSQL: the finisher's transactions do not wait for the WAL
// flush (see apply).
const asyncCommitSQL = `SET LOCAL synchronous_commit = off`

// adminQueries are the statements of Admin (admin.go).
type adminQueries struct {
	status, listDead, showDead, lockDead, lastDead, replay, replayAll, discard, purgePublished string
	// polling counts the relays without a session of their own seen
	// lately (heartbeat.go); relaysTable says whether their table exists
	// (schema version 7).
	polling, relaysTable string
	// tuples is Admin.Horizon's, with horizonSQL.
	tuples string
}

// horizonSQL lists what holds this database's vacuum horizon back (see
// Admin.Horizon), oldest xmin first: columns kind, pid, application_name,
// state, backend_type, name, age in seconds (0 for a replication slot),
// age(xmin) in transactions. It reads shared memory only (pg_stat_activity,
// the procarray and slot arrays); no table, no lock, no query text.
//
// Sessions count when they are in this database or in none (a walsender
// relaying a standby's hot_standby_feedback): PostgreSQL 14 and later
// compute the horizon of a database's tables from its own sessions and
// those, and ignore sessions that are only vacuuming (pg_stat_progress_vacuum).
// Prepared transactions count for their database. Replication slots count
// by xmin, which holds every database; a logical slot's catalog_xmin holds
// only the system catalogs, not the outbox, and is left out.
const horizonSQL = `SELECT kind, pid, application_name, state, backend_type, name, age_seconds, xmin_age FROM (
SELECT 'session' AS kind, a.pid, coalesce(a.application_name, '') AS application_name, coalesce(a.state, '') AS state,
    coalesce(a.backend_type, '') AS backend_type, '' AS name,
    greatest(extract(epoch FROM now() - a.xact_start), 0)::float8 AS age_seconds,
    greatest(age(a.backend_xmin), age(a.backend_xid))::bigint AS xmin_age
FROM pg_stat_activity a
WHERE (a.backend_xmin IS NOT NULL OR a.backend_xid IS NOT NULL) AND a.pid <> pg_backend_pid()
  AND (a.datname = current_database() OR a.datid IS NULL)
  AND a.pid NOT IN (SELECT pid FROM pg_stat_progress_vacuum)
UNION ALL
SELECT 'prepared transaction', 0, '', '', '', p.gid, greatest(extract(epoch FROM now() - p.prepared), 0)::float8, age(p.transaction)::bigint
FROM pg_prepared_xacts p WHERE p.database = current_database()
UNION ALL
SELECT 'replication slot', coalesce(s.active_pid, 0), '', '', '', s.slot_name, 0, age(s.xmin)::bigint
FROM pg_replication_slots s WHERE s.xmin IS NOT NULL
) h ORDER BY xmin_age DESC, age_seconds DESC`

// deadWhere is DeadFilter as SQL: $2 exchange, $3 type, $4 a substring of
// last_error (” for any), $5 dead for at least, $6 at most, that many
// milliseconds (0 for any).
const deadWhere = `($2 = '' OR exchange = $2) AND ($3 = '' OR type = $3) AND ($4 = '' OR strpos(last_error, $4) > 0)
  AND ($5 <= 0 OR dead_at <= now() - $5 * interval '1 millisecond') AND ($6 <= 0 OR dead_at >= now() - $6 * interval '1 millisecond')`

// newAdminQueries builds the statements of Admin.
func newAdminQueries(t tablenames.Resolved) adminQueries {
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
		polling:     `SELECT count(*) FROM ` + t.Relays.Quoted() + ` WHERE seen_at > now() - ` + strconv.Itoa(int(seenWithin.Seconds())) + ` * interval '1 second'`,
		relaysTable: `SELECT to_regclass('` + strings.ReplaceAll(t.Relays.Quoted(), `'`, `''`) + `') IS NOT NULL`,
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
		// Write order (seq), oldest first, those matching the filter
		// $2…$6 (deadWhere).
		listDead: `SELECT seq, id, exchange, routing_key, key, type, content_type, length(payload), attempts, last_error, created_at, dead_at
FROM ` + dead + ` WHERE ` + deadWhere + ` ORDER BY seq LIMIT $1`,
		showDead: `SELECT seq, id, exchange, routing_key, key, type, content_type, length(payload), attempts, last_error, created_at, dead_at, headers::text, payload
FROM ` + dead + ` WHERE id = $1::uuid`,
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
		// The oldest $1 matching the filter $2…$6 (deadWhere) up to seq $7
		// (the last when the replay began). A concurrent replay of one of
		// them makes this one wait, then skip it.
		replayAll: `WITH d AS (DELETE FROM ` + dead + ` WHERE seq IN (
    SELECT seq FROM ` + dead + ` WHERE seq <= $7 AND ` + deadWhere + ` ORDER BY seq LIMIT $1 FOR UPDATE) RETURNING ` + deadCols + `)
INSERT INTO ` + ob + ` (id, exchange, routing_key, key, type, content_type, headers, payload, created_at)
SELECT id, exchange, routing_key, key, type, content_type, headers, payload, created_at FROM d ORDER BY seq`,
		discard: `DELETE FROM ` + dead + ` WHERE id = ANY($1::uuid[])`,
		// The outbox's counters in the cumulative statistics, as the
		// sessions that changed it last flushed them (each at most once a
		// second, and within about 10 s of going idle). Scans nothing.
		tuples: `SELECT n_dead_tup, n_live_tup, greatest(last_autovacuum, last_vacuum)
FROM pg_stat_all_tables WHERE relid = ` + obOID,
		// Oldest first along published_at_idx, at most $2 rows, skipping rows
		// another purger holds.
		purgePublished: `DELETE FROM ` + pub + ` WHERE seq IN (
    SELECT seq FROM ` + pub + ` WHERE published_at < now() - $1 * interval '1 microsecond'
    ORDER BY published_at LIMIT $2 FOR UPDATE SKIP LOCKED)`,
	}
}
