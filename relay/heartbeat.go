package relay

import (
	"context"
	"time"

	"github.com/google/uuid"

	"github.com/mailroom-go/mailroom/internal/pgerr"
	"github.com/mailroom-go/mailroom/internal/wait"
)

// A relay without a session of its own (DisableListen: behind PgBouncer in
// transaction mode) cannot show itself by the presence lock that Status
// counts. It keeps a row in the outbox's _relays table instead (schema
// version 7), written every heartbeatEvery and deleted when it stops;
// Status counts the rows seen within seenWithin, so one that died stops
// counting by then.
const (
	heartbeatEvery = 5 * time.Second
	seenWithin     = 15 * time.Second
)

// heartbeat keeps this relay's row until ctx ends, then deletes it. On a
// schema older than version 7 it warns once and stops: the relay runs,
// uncounted.
func (r *Relay) heartbeat(ctx context.Context) {
	instance := uuid.NewString()
	defer func() {
		ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
		defer cancel()
		r.db.ExecContext(ctx, r.q.leave, instance) //nolint:errcheck // it ages out anyway
	}()
	for {
		_, err := r.db.ExecContext(ctx, r.q.seen, instance, r.cfg.Name)
		if pgerr.Is(err, "42P01") { // undefined_table
			r.log.Warn("the outbox's schema is older than version 7: status will not count this relay (run `mailroom-relay migrate` or mailroom.Migrate)", "error", err)
			return
		}
		if err == nil {
			_, err = r.db.ExecContext(ctx, r.q.forgetGone)
		}
		if err != nil && ctx.Err() == nil {
			r.log.Debug("relay heartbeat failed; trying again", "error", err)
		}
		if !wait.Sleep(ctx, heartbeatEvery) {
			return
		}
	}
}
