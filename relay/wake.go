package relay

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"fmt"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/cenkalti/backoff/v4"
	"github.com/lib/pq"

	"github.com/mailroom-go/mailroom/internal/locks"
	"github.com/mailroom-go/mailroom/internal/pgerr"
	"github.com/mailroom-go/mailroom/internal/redact"
	"github.com/mailroom-go/mailroom/internal/wakeup"
)

// NOTIFY on demand (see internal/wakeup for the protocol). Going to sleep,
// the relay takes the wake lock exclusively and then claims once more: its
// request waits for every writer's transaction that took the lock shared,
// so their rows are visible to that claim, and every writer after it finds
// the lock taken and notifies. Nothing falls in between.

// lockWait bounds how long a relay going to sleep waits for writers'
// transactions holding the wake lock. Business transactions are shorter;
// a longer one (a batch job that called Add early) makes the relay look
// again after lockRetry instead of sleeping, until it ends.
const (
	lockWait  = 50 * time.Millisecond
	lockRetry = 20 * time.Millisecond
)

// lockElsewhereRetry bounds how long a relay that found the wake lock held
// by another session waits before it tries again (PollInterval, if
// shorter). The holder may be a session still ending after its relay let
// it go: it holds the lock for a moment, and then nobody does.
const lockElsewhereRetry = time.Second

// wakeLock holds the outbox table's wake lock for the relay while it
// sleeps. A session-level advisory lock belongs to one connection, so it
// has a pool of its own (one connection, from Config.DatabaseURL) and pins
// that connection while the lock is held. Used by the claim loop only,
// except setTable, which the listener calls once LISTEN works.
type wakeLock struct {
	db          *sql.DB
	oid         atomic.Uint32 // the outbox table's OID; 0 until the relay LISTENs
	conn        *sql.Conn     // non-nil while the lock is held
	suspectFlag atomic.Bool   // the listener reconnected: check the lock's session
}

type lockResult int

const (
	lockHeld      lockResult = iota // this relay sleeps: writers notify it
	lockElsewhere                   // another relay sleeps: writers notify it, and this relay too
	lockBusy                        // writers' transactions outlasted lockWait: look again soon
	lockFailed                      // the database failed: poll
)

func newWakeLock(url string) (*wakeLock, error) {
	db, err := sql.Open("postgres", url)
	if err != nil {
		return nil, redact.Error(err, url)
	}
	db.SetMaxOpenConns(1)
	db.SetMaxIdleConns(1)
	return &wakeLock{db: db}, nil
}

// ready reports whether the relay LISTENs, so that taking the lock is of
// use: a nil wakeLock (DisableListen) never is.
func (w *wakeLock) ready() bool { return w != nil && w.oid.Load() != 0 }

func (w *wakeLock) held() bool { return w != nil && w.conn != nil }

func (w *wakeLock) setTable(oid uint32) { w.oid.Store(oid) }

// suspect asks the claim loop to check the lock's session (see check) at
// its next wake-up; suspected reports, once, whether it was asked.
func (w *wakeLock) suspect() { w.suspectFlag.Store(true) }

func (w *wakeLock) suspected() bool { return w != nil && w.suspectFlag.Swap(false) }

// acquire takes the lock, waiting at most lockWait.
func (w *wakeLock) acquire(ctx context.Context) (lockResult, error) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	oid := w.oid.Load()
	c, err := w.db.Conn(ctx)
	if err != nil {
		return lockFailed, err
	}
	_, err = c.ExecContext(ctx, lockWithTimeoutSQL, locks.Wake, int32(oid), strconv.FormatInt(lockWait.Milliseconds(), 10))
	if err == nil {
		w.conn = c
		return lockHeld, nil
	}
	if !pgerr.Is(err, "55P03") { // lock_not_available
		discard(c)
		return lockFailed, err
	}
	// Held exclusively by a sleeping relay, or shared by writers?
	var relay bool
	err = c.QueryRowContext(ctx, wakeLockHeldSQL, oid).Scan(&relay)
	c.Close()
	switch {
	case err != nil:
		return lockFailed, err
	case relay:
		return lockElsewhere, nil
	default:
		return lockBusy, nil
	}
}

// release hands the lock back: writers stop notifying. When the unlock
// fails the connection is closed, and the lock ends with its session.
func (w *wakeLock) release() {
	if !w.held() {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := w.conn.ExecContext(ctx, unlockSQL, locks.Wake, int32(w.oid.Load())); err != nil {
		discard(w.conn)
	} else {
		w.conn.Close()
	}
	w.conn = nil
}

// check verifies, while the relay sleeps, that the lock's session is still
// alive (a terminated session takes the lock with it, and writers stop
// notifying); if not, the relay no longer holds it.
func (w *wakeLock) check(ctx context.Context) {
	if !w.held() {
		return
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	if err := w.conn.PingContext(ctx); err != nil {
		discard(w.conn)
		w.conn = nil
	}
}

// close releases the lock and closes the lock's pool.
func (w *wakeLock) close() {
	if w == nil {
		return
	}
	w.release()
	w.db.Close()
}

// discard closes c's connection rather than returning it to the pool: its
// lock state is unknown.
func discard(c *sql.Conn) {
	_ = c.Raw(func(any) error { return driver.ErrBadConn })
	c.Close()
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
