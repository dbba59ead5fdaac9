package inbox

import (
	"sync"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

// acker acks the deliveries of one consuming channel, shared by its
// workers. An ack with multiple=true settles every unsettled delivery of
// the channel up to its tag, so one frame can ack a whole batch, or
// several; but it must never cover a delivery that a worker still holds.
// The acker knows which are held: the session reports each delivery as it
// receives it (tags grow by one per delivery on a channel) and every
// settlement. An ack waits (is held) until every earlier delivery is
// settled, and then goes out with the others in one multiple ack. Held
// acks are sent one by one instead when a worker runs out of deliveries
// (so a slow or stuck delivery never stalls the others' acks while the
// broker waits for them), when they reach half the prefetch, and when
// the session ends.
type acker struct {
	mu       sync.Mutex
	inflight map[uint64]time.Time // received, not yet settled: held since (see stamp in Consumer.session)
	next     uint64               // the tag after the last one received
	low      uint64               // every tag below low is settled
	held     []*amqp.Delivery     // applied, ack not sent yet
	maxHeld  int
}

func newAcker(prefetch int) *acker {
	return &acker{inflight: map[uint64]time.Time{}, next: 1, low: 1, maxHeld: max(1, prefetch/2)}
}

// received records a delivery, held since at, before any worker can see
// it.
func (a *acker) received(tag uint64, at time.Time) {
	a.mu.Lock()
	a.inflight[tag] = at
	a.next = tag + 1
	a.mu.Unlock()
}

// oldest returns since when the oldest delivery not yet settled has been
// held, if there is one.
func (a *acker) oldest() (time.Time, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.advance()
	at, ok := a.inflight[a.low]
	return at, ok
}

// advance moves low past the settled tags.
func (a *acker) advance() {
	for a.low < a.next {
		if _, ok := a.inflight[a.low]; ok {
			break
		}
		a.low++
	}
}

// ack acks ds now or later (see acker). An error means the channel is
// gone: the broker redelivers and dedupe absorbs it.
func (a *acker) ack(ds ...*amqp.Delivery) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, d := range ds {
		delete(a.inflight, d.DeliveryTag)
	}
	a.held = append(a.held, ds...)
	return a.send(len(a.held) >= a.maxHeld)
}

// settled records a delivery settled otherwise (nacked or rejected).
func (a *acker) settled(tag uint64) {
	a.mu.Lock()
	defer a.mu.Unlock()
	delete(a.inflight, tag)
	_ = a.send(false) // an error is the channel's, reported by its next ack
}

// flush sends every held ack now.
func (a *acker) flush() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if len(a.held) == 0 {
		return nil
	}
	return a.send(true)
}

// send sends the held acks that every earlier delivery's settlement
// allows in one multiple ack, and with all the rest one by one.
func (a *acker) send(all bool) error {
	a.advance()
	var top *amqp.Delivery // the highest held delivery below low
	keep := a.held[:0]
	for _, d := range a.held {
		switch {
		case d.DeliveryTag >= a.low:
			keep = append(keep, d)
		case top == nil || d.DeliveryTag > top.DeliveryTag:
			top = d
		}
	}
	var first error
	if top != nil {
		first = top.Ack(true)
	}
	if all {
		for _, d := range keep {
			if err := d.Ack(false); err != nil && first == nil {
				first = err
			}
		}
		keep = keep[:0]
	}
	clear(a.held[len(keep):]) // no stale pointers past the end
	a.held = keep
	return first
}
