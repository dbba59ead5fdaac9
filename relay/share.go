package relay

import (
	"context"
	"database/sql"
	"errors"
	"strconv"
	"time"
)

// Relays on one outbox table publish, as a rule, to the same queues, and
// RabbitMQ does best with about one default window of messages unconfirmed
// in all: messages beyond what it confirms at full speed wait in its
// queues and cost it more CPU each. Two relays with 1024 each delivered
// 0.93× what one did, with 512 each 0.98×. So every relay shows itself to
// the others by a shared advisory lock (presenceKey, outbox table OID) held
// on a session of its own, and a relay whose ConfirmWindow was left at the
// default takes an equal share of it (at least BatchSize). The lock ends
// with the session, so a relay that dies stops counting.

const (
	presenceKey      = 1919249505 // "rela" in ASCII
	presenceInterval = time.Second
)

// heldAdvisoryLocks is the FROM and WHERE of a query over the granted
// entries of the two-key advisory lock (key, the outbox OID the SQL
// expression oid gives) in this database, as the wake, claim and presence
// locks are keyed.
func heldAdvisoryLocks(key int, oid string) string {
	return `pg_locks
WHERE locktype = 'advisory' AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND classid = ` + strconv.Itoa(key) + ` AND objid = ` + oid + ` AND objsubid = 2 AND granted`
}

// presentRelays is a scalar subquery counting the relays that hold the
// presence lock on the outbox whose OID the SQL expression oid gives.
func presentRelays(oid string) string {
	return `(SELECT count(*) FROM ` + heldAdvisoryLocks(presenceKey, oid) + `)`
}

// presence holds this relay's presence lock and counts the relays that
// hold one on the same table. Used by shareWindow only.
type presence struct {
	r    *Relay
	db   *sql.DB   // one connection, from Config.DatabaseURL
	conn *sql.Conn // holds the lock; nil until taken, or after an error
	oid  uint32
}

// relays takes the lock if this relay does not hold it yet, and counts
// the relays holding it (this one included).
func (p *presence) relays(ctx context.Context) (int, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if p.conn == nil {
		oid, err := p.r.outboxOID()
		if err != nil {
			return 0, err
		}
		c, err := p.db.Conn(ctx)
		if err != nil {
			return 0, err
		}
		if _, err := c.ExecContext(ctx, `SELECT pg_advisory_lock_shared($1, $2)`, presenceKey, int32(oid)); err != nil {
			discard(c)
			return 0, err
		}
		p.conn, p.oid = c, oid
	}
	var n int
	err := p.conn.QueryRowContext(ctx, `SELECT `+presentRelays("$1"), p.oid).Scan(&n)
	if err == nil && n < 1 {
		err = errors.New("the presence lock is gone with its session")
	}
	if err != nil {
		discard(p.conn)
		p.conn = nil
		return 0, err
	}
	return n, nil
}

// shareWindow shows this relay to the others of its table until ctx ends
// and, when share is set, keeps the slots it leaves to them out of p's
// window: it holds them as tokens in p.slots, taken as confirms free
// them and handed back when fewer relays run. A database error keeps
// the current share and is retried at the next count.
func (r *Relay) shareWindow(ctx context.Context, p *publisher, share bool) {
	db, err := sql.Open("postgres", r.cfg.DatabaseURL)
	if err != nil {
		return // validated by New; the listener reports a bad URL
	}
	db.SetMaxOpenConns(1)
	db.SetMaxIdleConns(1)
	defer db.Close()
	me := &presence{r: r, db: db}
	defer func() {
		if me.conn != nil {
			me.conn.Close()
		}
	}()
	held, last := 0, 1
	defer func() {
		for ; held > 0; held-- {
			<-p.slots
		}
		r.window.Store(int64(r.cfg.ConfirmWindow))
	}()
	for {
		n, err := me.relays(ctx)
		switch {
		case ctx.Err() != nil:
			return
		case err != nil:
			r.log.Debug("counting the relays of the table", "error", err)
		case share:
			want := r.cfg.ConfirmWindow - max(r.cfg.ConfirmWindow/n, r.cfg.BatchSize)
			for ; held < want; held++ {
				select {
				case p.slots <- struct{}{}:
				case <-ctx.Done():
					return
				}
			}
			for ; held > want; held-- {
				<-p.slots
			}
			r.window.Store(int64(r.cfg.ConfirmWindow - held))
			if n != last {
				r.log.Info("relays on the outbox table share the confirm window", "relays", n, "window", r.cfg.ConfirmWindow-held)
				last = n
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(presenceInterval):
		}
	}
}
