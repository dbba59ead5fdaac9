package relay

import (
	"cmp"
	"context"
	"database/sql"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/cenkalti/backoff/v4"
	"github.com/google/uuid"
	"github.com/lib/pq"

	"github.com/mailroom-go/mailroom/internal/pgerr"
	"github.com/mailroom-go/mailroom/internal/wait"
	"github.com/mailroom-go/mailroom/internal/wire"
)

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
		if r.coord.standingBy() { // another relay publishes: wait to take over
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
			if !wait.Sleep(ctx, d) {
				return
			}
			continue
		}
		bo.Reset()
		r.counters.lastProgress.Store(time.Now().UnixNano())
		idle := r.cfg.PollInterval
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
				if !wait.Sleep(ctx, awakePause(len(rows))) {
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
					idle = lockRetry
				case lockElsewhere:
					// A relay asleep (writers notify it, and this relay
					// too), or the session of one that is gone and still
					// ending (terminated, or discarded by this relay):
					// then nobody is notified. Look again soon.
					idle = min(idle, lockElsewhereRetry)
					r.log.Debug("another session holds the wake lock; trying again", "in", idle.String())
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
		poll.Reset(idle)
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
	return r.coord.claim(func(alone, checkAlone bool, held []int64) ([]*row, error) {
		return r.claimOnce(ctx, clock, alone, checkAlone, held)
	})
}

// claimOnce runs the claim that suits the relay's company on the table
// (see coordination.claim), skipping the rows in held.
func (r *Relay) claimOnce(ctx context.Context, clock *batchClock, alone, checkAlone bool, held []int64) ([]*row, error) {
	if alone { // set by the coordinator, which does not run with DisableListen
		// Nobody to take turns with, nor to keep out by leases.
		return r.claimRows(clock, "", func() (*sql.Rows, error) {
			st, err := r.stmts.get(ctx, r.q.claimAlone)
			if err != nil {
				return nil, err
			}
			n := r.cfg.BatchSize
			return st.QueryContext(ctx, n, pq.Array(held), r.keyCursor, n, windowRows*n, max(n, r.cfg.ConfirmWindow))
		})
	}
	lease := uuid.NewString()
	q := claimText(r.q.claim, r.cfg.BatchSize, r.cfg.ConfirmWindow, r.cfg.Lease.Milliseconds(), lease, held, checkAlone, r.keyCursor)
	if skipped := r.turnSkipped.Load(); skipped == 0 || time.Since(time.Unix(0, skipped)) > claimLockSkip {
		rows, err := r.claimInTurn(ctx, clock, lease, q)
		if !pgerr.Is(err, "55P03") { // lock_not_available
			return rows, err
		}
		r.log.Warn("waited too long for the claim lock; claiming without it for a while", "wait", claimLockTimeout.String(), "for", claimLockSkip.String())
		r.turnSkipped.Store(time.Now().UnixNano())
	}
	return r.claimRows(clock, lease, func() (*sql.Rows, error) { return r.db.QueryContext(ctx, q) })
}

// claimInTurn runs the leased claim q after taking the claim lock: in one
// message, turn then q, one round trip, where the driver sends a statement
// without arguments as a simple query (lib/pq); else (pgx, whose extended
// protocol takes one command per statement: SQLSTATE 42601, noticed once)
// in an explicit transaction of three statements.
func (r *Relay) claimInTurn(ctx context.Context, clock *batchClock, lease, q string) ([]*row, error) {
	if !r.turnInTx.Load() {
		rows, err := r.claimRows(clock, lease, func() (*sql.Rows, error) { return r.db.QueryContext(ctx, r.q.turn+q) })
		if !pgerr.Is(err, "42601") || !strings.Contains(err.Error(), "multiple commands") {
			return rows, err
		}
		r.turnInTx.Store(true)
	}
	tx, err := r.db.BeginTx(ctx, nil)
	if err != nil {
		return nil, fmt.Errorf("claim from %s: %w", r.tables.Outbox, err)
	}
	defer tx.Rollback() //nolint:errcheck // after Commit this is a no-op
	for _, stmt := range []string{r.q.turnTimeout, r.q.turnLock} {
		if _, err := tx.ExecContext(ctx, stmt); err != nil {
			return nil, fmt.Errorf("claim from %s: the claim lock: %w", r.tables.Outbox, err)
		}
	}
	rows, err := r.claimRows(clock, lease, func() (*sql.Rows, error) { return tx.QueryContext(ctx, q) })
	if err != nil {
		return nil, err
	}
	if err := tx.Commit(); err != nil { // the leases were not taken
		return nil, fmt.Errorf("claim from %s: %w", r.tables.Outbox, err)
	}
	return rows, nil
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
		if pgerr.Is(err, "42703") { // undefined_column
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
