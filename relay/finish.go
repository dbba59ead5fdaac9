package relay

import (
	"context"
	"database/sql"
	"fmt"
	"time"

	"github.com/cenkalti/backoff/v4"
	"github.com/lib/pq"

	"github.com/mailroom-go/mailroom/internal/wait"
)

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
	r.coord.finished(os) // before the counters: whoever sees a row counted sees it no longer held
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
		} else if st, perr := r.stmts.get(ctx, r.q.deleteDoneAsync); perr != nil {
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
	if _, err := tx.ExecContext(ctx, asyncCommitSQL); err != nil {
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
	scheduled, err := seqSet(tx.QueryContext(ctx, r.q.retryReturning, pq.Int64Array(leftSeqs), pq.StringArray(leftLeases), pq.StringArray(leftErrs), pq.Float64Array(delays)))
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
	return wait.Backoff(r.cfg.MinBackoff, r.cfg.MaxBackoff, 0.5, n)
}
