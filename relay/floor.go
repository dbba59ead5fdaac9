package relay

import (
	"context"
	"sync/atomic"
	"time"

	"github.com/mailroom-go/mailroom/internal/pgerr"
	"github.com/mailroom-go/mailroom/internal/wait"
)

// seqFloor is the lowest seq a claim needs to look at: every row below it
// was published or dead-lettered, and no transaction can still commit one
// there. The claim's probes of key_idx start at it (sql.go): while a
// snapshot holds the vacuum horizon back (a long transaction, a report, a
// replica's feedback), the index keeps the entries of every deleted row,
// and each probe of a key visited the heap for each of that key's deleted
// rows before reaching a live one — 0.55 ms a probe with 300 deleted rows
// a key, hundreds of probes a claim (docs/performance.md, soak).
//
// The claims' window (due rows by available_at) starts likewise a second
// before the oldest due row the last look found, stepping over the
// deleted rows' entries of available_idx. A row committed later with an
// older available_at (written by a transaction that began before that
// look) waits for the next look, a second or so; a keyed one is found by
// the walk anyway.
//
// Finding the floor, once a second at most (at most a tenth of the time
// when the looks themselves slow down): the relay reads the sequence's last
// value S, then the transactions holding RowExclusiveLock on the outbox.
// Every INSERT takes that lock before it draws a seq and keeps it until
// its transaction ends, so once all of those have ended, every row with a
// seq up to S is committed or gone for good: the floor is then the least
// live seq, or S + 1. A writer transaction that stays open holds the floor
// where it was, which only costs the speed-up.
type seqFloor struct {
	value atomic.Int64 // 0 until found

	// Only the floor loop touches these (and tests, which run no loop).
	last    int64  // S of the round waiting to settle (0: none)
	writers string // the transactions that round waits for: virtual ids, comma-separated
	next    time.Time
	off     bool // the role cannot read the sequence, or it caches values: no floor

	// from is where the claims' window starts (unix microseconds; 0:
	// the beginning): a second before the oldest due row at the last
	// look (floorWindow in sql.go).
	from atomic.Int64
}

// windowFrom is where the next claim's window starts ($A in sql.go).
func (f *seqFloor) windowFrom() time.Time {
	if us := f.from.Load(); us != 0 {
		return time.UnixMicro(us).UTC()
	}
	return time.Time{}
}

// turnOff stops the looks: the floor stays where it is (still true: no
// row below it can commit), and the window starts at the beginning again,
// which no look would move back.
func (f *seqFloor) turnOff() {
	f.off = true
	f.from.Store(0)
}

// floorEvery is how often the floor moves at most.
const floorEvery = time.Second

// floorLoop looks for the floor (refreshFloor) until ctx ends or the
// floor is turned off. It runs beside the claim loop: a look walks what
// the claims skip, which a held horizon makes slow (85,000 heap fetches,
// 180 ms, in the soak), and a claim must not wait for it.
func (r *Relay) floorLoop(ctx context.Context) {
	for !r.floor.off {
		r.refreshFloor(ctx)
		if !wait.Sleep(ctx, time.Until(r.floor.next)) {
			return
		}
	}
}

// refreshFloor moves the floor when its time has come; a failure leaves
// it where it was (it is only a speed-up), and one the relay cannot fix
// (no privilege on the sequence) turns it off with a warning.
func (r *Relay) refreshFloor(ctx context.Context) {
	f := &r.floor
	if f.off || time.Now().Before(f.next) {
		return
	}
	began := time.Now()
	err := r.moveFloor(ctx)
	// Each look walks what the claims skip; at most a tenth of the time.
	f.next = time.Now().Add(max(floorEvery, 10*time.Since(began)))
	if err != nil && ctx.Err() == nil {
		if pgerr.Is(err, "42501") { // insufficient_privilege
			f.turnOff()
			r.log.Warn("cannot read the outbox's sequence: claims walk the index entries of deleted rows while the vacuum horizon is held back (grant USAGE or SELECT on the sequence to fix)", "error", err)
			return
		}
		r.log.Debug("seq floor not moved", "error", err)
		f.last, f.writers = 0, ""
	}
}

func (r *Relay) moveFloor(ctx context.Context) error {
	f := &r.floor
	if f.last != 0 {
		var settled bool
		if err := r.db.QueryRowContext(ctx, r.q.floorSettled, f.writers).Scan(&settled); err != nil {
			return err
		}
		if !settled {
			return nil
		}
		var v int64
		if err := r.db.QueryRowContext(ctx, r.q.floorMin, f.value.Load(), f.last).Scan(&v); err != nil {
			return err
		}
		if v > f.value.Load() {
			f.value.Store(v)
		}
		f.last, f.writers = 0, ""
	}
	var from time.Time
	if err := r.db.QueryRowContext(ctx, r.q.floorWindow).Scan(&from); err != nil {
		return err
	}
	f.from.Store(from.UnixMicro())
	var last int64
	if err := r.db.QueryRowContext(ctx, r.q.floorLast).Scan(&last); err != nil {
		return err
	}
	if last < 0 {
		f.turnOff()
		r.log.Warn("the outbox's sequence caches values (CACHE > 1), so seqs are not drawn in order across sessions: claims walk the index entries of deleted rows while the vacuum horizon is held back (ALTER the identity to CACHE 1 to fix)")
		return nil
	}
	if last < f.value.Load() {
		// The sequence went back (TRUNCATE … RESTART IDENTITY, ALTER
		// SEQUENCE … RESTART): the rows drawn since lie below the floor,
		// unseen by the probes. Start again from nothing.
		f.value.Store(0)
	}
	var writers string
	if err := r.db.QueryRowContext(ctx, r.q.floorWriters).Scan(&writers); err != nil {
		return err
	}
	f.last, f.writers = last, writers
	return nil
}
