package relay

import (
	"context"
	"database/sql"
	"errors"
	"sync"
	"sync/atomic"
	"time"

	"github.com/mailroom-go/mailroom/internal/locks"
)

// Relays on one outbox table coordinate through advisory locks keyed by
// the table's OID, held on a session of each relay's own and looked at
// every second:
//
//   - Presence (shared, locks.Presence): every running relay holds it; Status
//     counts them. It ends with the session, so a relay that dies stops
//     counting.
//   - Publishing slots (exclusive, locks.Active+i for i < ActiveRelays): a
//     relay claims and publishes only while it holds one; the others stand
//     by and try for one every second. On this machine RabbitMQ is the
//     limit, and a second publishing connection only adds work for it and
//     the database: two relays publishing at once delivered 0.91–0.97× what
//     one did. Standing by, the second relay costs a query a second, and
//     takes over within about a second when the publishing relay stops,
//     dies (its session ends) or cannot reach the broker (it gives its slot
//     up while it reconnects, when a relay stands by), and within about
//     frozenAfter when it freezes with its session open (see endFrozen).
//   - Alone (exclusive, locks.Alone): a relay publishing alone takes it and
//     claims without the claim lock and without leases (claimAlone in
//     sql.go), skipping the rows it holds. A relay taking a slot while
//     another holds it waits: the holder, seeing a second relay publish,
//     claims with leases again and gives the lock up once the rows it
//     claimed without one are finished. A stopping relay keeps its locks
//     until it has finished the rows it holds, so a relay taking over does
//     not publish them again.
//   - The default confirm window (1024) is shared among the relays holding
//     a slot, at least BatchSize each: RabbitMQ does best with about that
//     many messages unconfirmed in all. Two relays publishing with 1024 each
//     delivered 0.93× what one did, with 512 each 0.98×.
//
// The locks save work; correctness does not rest on them (the claim's key
// check and the consumers' inbox do that). Where they fail — a relay whose
// session fails publishes anyway until the session is back, rather than
// leave the outbox to no one; a frozen relay wakes up after its slot was
// taken over; a relay that left its slot while the broker was out of reach
// reconnects — rows are published twice, never lost nor out of key order:
// a later row of a key is claimable only once the earlier one is confirmed
// and deleted, so any copy of the earlier one is a duplicate the inbox
// drops.

const presenceInterval = time.Second

// coordinator holds this relay's presence lock and publishing slot.
type coordinator struct {
	r     *Relay
	db    *sql.DB   // one connection, from Config.DatabaseURL
	conn  *sql.Conn // holds the locks; nil until taken, or after an error
	oid   uint32
	slot  int  // the publishing slot held; -1: none
	alone bool // holds the alone lock
}

// tick takes the presence lock if this relay does not hold it yet; gives
// its slot up while the broker is out of reach (brokerDown) and another
// relay stands by to take it, or tries for one if it has none and can
// reach the broker (ending the sessions of frozen holders); and counts the
// relays holding a slot.
func (c *coordinator) tick(ctx context.Context, brokerDown bool) (publishing bool, n int, err error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	defer func() {
		if err != nil && c.conn != nil {
			discard(c.conn)
			c.conn, c.slot, c.alone = nil, -1, false
			c.r.coord.leftAlone()
		}
	}()
	if c.conn == nil {
		oid, err := c.r.outboxOID()
		if err != nil {
			return false, 0, err
		}
		conn, err := c.db.Conn(ctx)
		if err != nil {
			return false, 0, err
		}
		c.conn, c.oid, c.slot = conn, oid, -1
		if _, err := conn.ExecContext(ctx, lockSharedSQL, locks.Presence, int32(oid)); err != nil {
			return false, 0, err
		}
	}
	if c.slot >= 0 && brokerDown {
		var standing int
		if err := c.conn.QueryRowContext(ctx, standingRelaysSQL, c.oid).Scan(&standing); err != nil {
			return false, 0, err
		}
		if standing > 0 {
			if _, err := c.conn.ExecContext(ctx, unlockSQL, locks.Active+c.slot, int32(c.oid)); err != nil {
				return false, 0, err
			}
			c.slot = -1
			c.r.log.Warn("the broker is out of reach: leaving publishing to a relay standing by meanwhile")
		}
	}
	for i := 0; c.slot < 0 && !brokerDown && i < c.r.cfg.ActiveRelays; i++ {
		var got bool
		if err := c.conn.QueryRowContext(ctx, tryLockSQL, locks.Active+i, int32(c.oid)).Scan(&got); err != nil {
			return false, 0, err
		}
		if got {
			c.slot = i
		}
	}
	if c.slot < 0 && !brokerDown {
		if err := c.endFrozen(ctx); err != nil {
			return false, 0, err
		}
	}
	if err := c.conn.QueryRowContext(ctx, publishingRelaysSQL, c.oid).Scan(&n); err != nil {
		return false, 0, err
	}
	if c.slot >= 0 && n < 1 {
		return false, 0, errors.New("the publishing lock is gone with its session")
	}
	if err := c.claimAlone(ctx, n, brokerDown); err != nil {
		return false, 0, err
	}
	if c.slot >= 0 && !c.alone {
		var others int
		if err := c.conn.QueryRowContext(ctx, othersAloneSQL, c.oid).Scan(&others); err != nil {
			return false, 0, err
		}
		if others > 0 { // it has not seen this relay yet: wait (claims hold the lock shared: not counted)
			return false, n, nil
		}
	}
	return c.slot >= 0, n, nil
}

// claimAlone takes the alone lock when this relay is the only one
// publishing, and gives it up when it is not: it first makes the relay
// claim with leases, then waits (over ticks) until the rows it claimed
// without a lease are finished. When it left its slot because the broker
// is out of reach, those rows wait for the broker, and it gives the lock
// up at once (the relay taking over may publish them too).
func (c *coordinator) claimAlone(ctx context.Context, n int, brokerDown bool) error {
	if c.slot >= 0 && n == 1 {
		if !c.alone {
			// Take the lock, then count again: a relay taking a slot
			// meanwhile looked for the lock before this took it, found it
			// free, and publishes. (It takes its slot, then looks; this
			// relay takes the lock, then looks: one of them sees the other.)
			var got bool
			if err := c.conn.QueryRowContext(ctx, tryLockSQL, locks.Alone, int32(c.oid)).Scan(&got); err != nil {
				return err
			}
			if !got { // another relay has it: this one waits (tick)
				c.r.coord.notAlone()
				return nil
			}
			c.alone = true
			if err := c.conn.QueryRowContext(ctx, publishingRelaysSQL, c.oid).Scan(&n); err != nil {
				return err
			}
		}
		if n == 1 {
			c.r.coord.claimAlone()
			return nil
		}
	}
	if c.r.coord.leaveAlone(c.alone, brokerDown) {
		if _, err := c.conn.ExecContext(ctx, unlockSQL, locks.Alone, int32(c.oid)); err != nil {
			return err
		}
		c.alone = false
		c.r.coord.leftAlone()
	}
	return nil
}

// A relay checks in every second (its tick's queries). A slot holder whose
// session has been idle for frozenAfter belongs to a relay that stopped
// running without ending its session: a paused container, a SIGSTOPped or
// stalled process. Its slot would keep every standby waiting, so a standby
// ends that session (pg_terminate_backend: the relays' role may signal
// its own sessions) and takes the slot at its next tick. If the frozen
// relay comes back, it finds its session gone and stands by.
const frozenAfter = 10 * time.Second

// endFrozen ends the sessions of slot holders idle for r.frozenAfter.
func (c *coordinator) endFrozen(ctx context.Context) error {
	rows, err := c.conn.QueryContext(ctx, endFrozenSQL, c.oid, c.r.frozenAfter.Milliseconds())
	if err != nil {
		return err
	}
	defer rows.Close()
	for rows.Next() {
		var pid int
		var ended bool
		if err := rows.Scan(&pid, &ended); err != nil {
			return err
		}
		c.r.log.Warn("a relay holding a publishing slot stopped checking in; ended its session to take over", "pid", pid, "idle_for_more_than", c.r.frozenAfter.String(), "ended", ended)
	}
	return rows.Err()
}

// coordinate shows this relay to the others of its table until ctx ends,
// records in r.coord whether it stands by while another relay publishes
// in its place, and, when share is set, keeps the part of p's confirm
// window it leaves to the other publishing relays out of use (reserved as
// confirms free it, handed back when fewer relays publish). wake tells the
// claim loop when this relay takes over.
func (r *Relay) coordinate(ctx context.Context, p *publisher, share bool, wake chan<- struct{}) {
	db, err := sql.Open("postgres", r.cfg.DatabaseURL)
	if err != nil {
		r.setStandby(false, wake) // validated by New; the listener reports a bad URL
		return
	}
	db.SetMaxOpenConns(1)
	db.SetMaxIdleConns(1)
	defer db.Close()
	me := &coordinator{r: r, db: db, slot: -1}
	defer func() {
		if me.conn != nil {
			me.conn.Close()
		}
	}()
	held, last := 0, 1
	defer func() {
		p.unreserve(held)
		r.window.Store(int64(r.cfg.ConfirmWindow))
	}()
	for {
		publishing, n, err := me.tick(ctx, p.brokerDown())
		switch {
		case ctx.Err() != nil:
			return
		case err != nil:
			r.log.Debug("coordinating with the relays of the table", "error", err)
			r.coord.notAlone()
			r.setStandby(false, wake) // publish rather than leave the table to no one
		case !publishing:
			r.setStandby(true, wake)
			r.counters.lastProgress.Store(time.Now().UnixNano()) // alive, standing by
		default:
			r.setStandby(false, wake)
			if !share {
				break
			}
			// Slots in use by unconfirmed messages are taken at later
			// ticks, as confirms free them: the tick never waits (it is
			// this relay's heartbeat, see frozenAfter).
			want := r.cfg.ConfirmWindow - max(r.cfg.ConfirmWindow/n, r.cfg.BatchSize)
			if held < want {
				held += p.reserve(want - held)
			} else if held > want {
				p.unreserve(held - want)
				held = want
			}
			r.window.Store(int64(r.cfg.ConfirmWindow - held))
			if n != last {
				r.log.Info("relays publishing on the outbox table share the confirm window", "relays", n, "window", r.cfg.ConfirmWindow-held)
				last = n
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(presenceInterval):
		case <-r.coord.drained: // leaving alone: its last row without a lease is finished
		}
	}
}

// setStandby records whether this relay stands by, and wakes the claim
// loop on a change: to claim, or to give the wake lock up.
func (r *Relay) setStandby(v bool, wake chan<- struct{}) {
	if !r.coord.setStandby(v) {
		return
	}
	if v {
		r.log.Info("standing by: another relay publishes from the outbox table")
	} else {
		r.log.Info("publishing from the outbox table")
	}
	select {
	case wake <- struct{}{}:
	default:
	}
}

// coordination is what the claim loop, the finish loop and the coordinator
// share about this relay's place among the relays of its table: whether it
// stands by, whether it claims alone, and the rows it holds. Its methods
// keep the ordering rules that make claiming without a lease safe:
//
//   - A claim counts itself in claiming before it reads alone, and stays
//     counted until its rows are held (claim); the coordinator clears alone
//     before it reads claiming (leaveAlone). Once the coordinator has
//     cleared alone and seen no claim counted, none without a lease is
//     running or can start.
//   - The coordinator sets leaving before it clears alone, and a claim
//     reads alone before leaving: a claim that sees neither would take
//     nothing, so it never does.
//   - While leaving, the coordinator waits for the rows claimed without a
//     lease to be finished before it gives the alone lock up; finished
//     tells it on drained when the last one is.
type coordination struct {
	standby  atomic.Bool // another relay publishes in this one's place
	alone    atomic.Bool // the relay holds the alone lock: claims without turn or lease
	leaving  atomic.Bool // giving the alone lock up: claims check it is still free
	claiming atomic.Int32
	held     holding // rows claimed and not finished
	drained  chan struct{}
}

// standingBy reports whether another relay publishes in this one's place.
func (c *coordination) standingBy() bool { return c.standby.Load() }

// setStandby records whether the relay stands by, reporting a change.
func (c *coordination) setStandby(v bool) (changed bool) { return c.standby.Swap(v) != v }

// claim runs one claim: fn gets whether to claim alone (no turn, no lease),
// whether a leased claim must check the alone lock is free (the relay is
// not giving it up), and the seqs held, which it must skip. The rows it
// returns are held.
func (c *coordination) claim(fn func(alone, checkAlone bool, held []int64) ([]*row, error)) ([]*row, error) {
	c.claiming.Add(1)
	defer c.claiming.Add(-1) // after the rows are held
	held := c.held.list()
	alone := c.alone.Load()
	checkAlone := !c.leaving.Load()
	rows, err := fn(alone, checkAlone, held)
	c.held.add(rows)
	return rows, err
}

// finished forgets rows whose outcome is recorded (or given up on), and
// tells a coordinator leaving the alone lock when the last row claimed
// without a lease is.
func (c *coordination) finished(os []outcome) {
	c.held.drop(os)
	if c.leaving.Load() && c.held.leaseless() == 0 {
		select {
		case c.drained <- struct{}{}:
		default:
		}
	}
}

// claimAlone lets claims go without turn or lease (the relay holds the
// alone lock and is the only one publishing); notAlone stops that.
func (c *coordination) claimAlone() { c.alone.Store(true) }
func (c *coordination) notAlone()   { c.alone.Store(false) }

// leaveAlone makes claims take leases again. holding says whether the
// relay holds the alone lock; it may give it up (unlock) when it does and
// no row claimed without a lease is left to finish, or at once when the
// broker is down (those rows wait for it; the relay taking over may
// publish them too). Until leftAlone, claims check the lock is free.
func (c *coordination) leaveAlone(holding, brokerDown bool) (unlock bool) {
	c.leaving.Store(holding) // first: a claim seeing neither would take nothing
	c.alone.Store(false)
	return holding && (brokerDown || c.claiming.Load() == 0 && c.held.leaseless() == 0)
}

// leftAlone records that the alone lock is given up (or lost with its
// session).
func (c *coordination) leftAlone() { c.leaving.Store(false) }

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
