package relay

import (
	"context"
	"time"
)

// NOTIFY on demand (see internal/wakeup for the protocol). Going to sleep
// is announce-then-check: the relay writes its wake row, then claims once
// more before it sleeps. A commit before the announcement is seen by that
// claim; an Add after it notifies. What falls in between — a transaction
// that called Add before the announcement and commits after the last claim
// — waits for the next poll, never longer.

// wakeRow keeps the relay's wake row current: asleep (wake_until a few
// poll intervals ahead, refreshed at every poll, so a relay that died stops
// costing writers a NOTIFY soon after) or awake (wake_until -infinity).
func (r *Relay) wakeRow(ctx context.Context, asleep bool) error {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	// The database's clock, not ours: Add compares against its now().
	// Asynchronous commit, like the claim: the claim loop waits for this
	// statement, and a wake row lost in a crash costs nothing (it is
	// rewritten within a poll interval).
	_, err := r.db.ExecContext(ctx, `WITH async AS (SELECT set_config('synchronous_commit', 'off', true))
INSERT INTO `+r.tables.Wake.Quoted()+` (relay, wake_until)
SELECT $1, CASE WHEN $2 THEN now() + $3 * interval '1 millisecond' ELSE '-infinity' END FROM async
ON CONFLICT (relay) DO UPDATE SET wake_until = excluded.wake_until`, r.cfg.Name, asleep, (3*r.cfg.PollInterval + time.Second).Milliseconds())
	return err
}

// dropWakeRow removes the relay's wake row when it stops.
func (r *Relay) dropWakeRow() {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := r.db.ExecContext(ctx, `DELETE FROM `+r.tables.Wake.Quoted()+` WHERE relay = $1`, r.cfg.Name); err != nil {
		r.log.Warn("could not remove the wake row; it expires by itself", "error", err)
	}
}

// setWakeRow is wakeRow that logs a failure and reports success: without
// its row the relay still works, by polling.
func (r *Relay) setWakeRow(ctx context.Context, asleep bool) bool {
	if err := r.wakeRow(ctx, asleep); err != nil {
		r.log.Warn("could not update the wake row; relying on polling", "table", r.tables.Wake.String(), "error", err)
		return false
	}
	return true
}
