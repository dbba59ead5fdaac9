package relay

import (
	"slices"
	"sync"
)

// A claim brings, after the first row of a key, the rows after it (its run,
// see runs in sql.go). The publisher sends a key's rows one at a time: the
// next only once the broker confirmed the one before it and did not return
// it. So a key moves at the speed of one confirm round trip, without
// waiting for the next claim, and its order holds: when a row of a run
// fails or is handed back, the rest of the run is handed back unpublished,
// and they come again in a later claim only after it.
//
// A claim also continues runs: the first row of a key that this relay
// does not hold heads a claim when every row of its key before it is held
// here (prev, the last of them). It joins the key's run behind that row
// if the run goes on (not cut, prev its last row); otherwise it is handed
// back. So a key's run never stops to wait for its rows to be deleted and
// claimed again.

// markRuns puts the heads of a claim first, then the second rows of their
// keys, and so on (the claim's order, which an UPDATE's RETURNING does not
// keep), and marks the last row of each key to wake the claim loop when it
// is delivered: more rows of the key may be due by then.
func markRuns(rows []*row) {
	slices.SortStableFunc(rows, func(a, b *row) int { return a.rn - b.rn })
	last := map[string]*row{}
	for _, w := range rows {
		if w.key != "" {
			last[w.key] = w
		}
	}
	for _, w := range last {
		w.wake = true
	}
}

// chains holds, by key, the run the publisher is sending. The publisher's
// goroutine admits rows; outcomes (from the confirm loop or the publisher)
// advance a key's run.
type chains struct {
	mu    sync.Mutex
	keys  map[string]*chain
	ready []*row        // next rows of runs whose previous row was confirmed
	more  chan struct{} // signalled when ready has rows (wake)
	held  int           // rows admitted and not yet published (waiting and ready)
}

// chain is one key's run in progress.
type chain struct {
	batch   *batchClock // the claim the run's last row came in
	rn      int         // the last row admitted: its place in its claim
	last    int64       // and its seq
	idle    int         // batches since the run had nothing in flight or waiting
	current *row        // published and not yet settled (or ready); nil: none
	waiting []*row      // admitted, behind current, in order
	cut     bool        // a row failed or was handed back: the rest of the run is too
}

func newChains() *chains {
	return &chains{keys: map[string]*chain{}, more: make(chan struct{}, 1)}
}

// idleBatches is how many claims a run with nothing in flight is kept for:
// its last row may still be held (confirmed, its delete not yet done), and
// a claim may bring a row that continues it. Forgetting it sooner only
// hands such a row back.
const idleBatches = 16

// newBatch forgets the runs that have been over for a while (every row of
// the previous claims has been admitted by now).
func (c *chains) newBatch() {
	c.mu.Lock()
	defer c.mu.Unlock()
	for k, ch := range c.keys {
		if ch.current == nil && len(ch.waiting) == 0 {
			if ch.idle++; ch.idle > idleBatches || ch.cut {
				delete(c.keys, k)
			}
		}
	}
}

// admit says what to do with a claimed row: publish it now, or nothing
// (it waits behind the row of its key in flight), or hand it back (its
// run was cut, or the row before it is missing from the claim).
func (c *chains) admit(w *row) (publish, handBack bool) {
	if w.key == "" {
		return true, false
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	ch := c.keys[w.key]
	switch {
	case w.rn == 0 && w.prev == 0:
		// The first row of its key in the outbox: any run of the key
		// before it is over.
		c.keys[w.key] = &chain{batch: w.batch, last: w.seq, current: w}
		return true, false
	case w.rn == 0: // continues the run whose last row is prev
		if ch == nil || ch.cut || ch.last != w.prev {
			return false, true
		}
		ch.batch = w.batch
	case ch == nil || ch.batch != w.batch || ch.rn != w.rn-1 || ch.cut:
		return false, true
	}
	ch.rn, ch.last, ch.idle = w.rn, w.seq, 0
	if ch.current == nil {
		ch.current = w
		return true, false
	}
	ch.waiting = append(ch.waiting, w)
	c.held++
	return false, false
}

// settled advances the run of o's row: on a delivery its next row is
// ready; otherwise the rest of the run is returned, to be handed back.
func (c *chains) settled(o *outcome) (handBack []*row) {
	w := o.row
	if w.key == "" {
		return nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	ch := c.keys[w.key]
	if ch == nil || ch.current != w {
		return nil // not admitted (handed back before it was)
	}
	ch.current = nil
	if o.kind != delivered {
		ch.cut = true
		handBack, ch.waiting = ch.waiting, nil
		c.held -= len(handBack)
		return handBack
	}
	if len(ch.waiting) > 0 {
		ch.current, ch.waiting = ch.waiting[0], ch.waiting[1:]
		c.ready = append(c.ready, ch.current)
	}
	return nil
}

// wake signals more if rows are ready. The confirm loop calls it once it
// has settled the confirms that came together (a multiple ack), so the
// publisher sends their next rows in one write rather than one each.
func (c *chains) wake() {
	c.mu.Lock()
	n := len(c.ready)
	c.mu.Unlock()
	if n > 0 {
		select {
		case c.more <- struct{}{}:
		default:
		}
	}
}

// next takes the ready rows.
func (c *chains) next() []*row {
	c.mu.Lock()
	defer c.mu.Unlock()
	ready := c.ready
	c.ready = nil
	c.held -= len(ready)
	return ready
}

// waiting counts the rows admitted and not yet published.
func (c *chains) waiting() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.held
}

// close cuts every run and returns the rows not yet published (the
// publisher is stopping).
func (c *chains) close() (handBack []*row) {
	c.mu.Lock()
	defer c.mu.Unlock()
	handBack, c.ready = c.ready, nil
	for _, ch := range c.keys {
		handBack = append(handBack, ch.waiting...)
		ch.waiting, ch.cut = nil, true
		// current, if any, is published: its outcome comes from the
		// confirm loop (or it is ready, and in handBack).
	}
	c.held = 0
	return handBack
}
