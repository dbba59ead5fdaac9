package inbox

import (
	"context"
	"errors"
	"sync"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

// dispatcher hands a session's deliveries to its workers: any free worker,
// or under OrderedByKey the worker of the delivery's key.
type dispatcher struct {
	c       *Consumer
	w       *worker // the template each worker copies
	shared  chan amqp.Delivery
	inputs  []chan amqp.Delivery // by worker; all shared unless OrderedByKey
	workers sync.WaitGroup
	next    uint32 // round robin for deliveries without a key

	// since and read: see stamp.
	since time.Time
	read  []time.Time // by tag % Prefetch
}

// startWorkers starts Concurrency workers, each on its own copy of w.
// since is when the consume began.
func startWorkers(w *worker, since time.Time) *dispatcher {
	c := w.c
	d := &dispatcher{
		c: c, w: w, since: since,
		shared: make(chan amqp.Delivery, c.cfg.Prefetch), // buffered so a worker finds a batch waiting
		inputs: make([]chan amqp.Delivery, c.cfg.Concurrency),
		read:   make([]time.Time, c.cfg.Prefetch),
	}
	for i := range d.inputs {
		d.inputs[i] = d.shared
		if c.cfg.OrderedByKey {
			d.inputs[i] = make(chan amqp.Delivery, max(1, c.cfg.Prefetch/c.cfg.Concurrency))
		}
		d.workers.Add(1)
		go func(in <-chan amqp.Delivery) { defer d.workers.Done(); w.work(in) }(d.inputs[i])
	}
	return d
}

// run hands deliveries to the workers until ctx ends (nil), the session
// breaks or the delivery channel closes (an error saying which).
func (d *dispatcher) run(ctx context.Context, deliveries <-chan amqp.Delivery, broken <-chan struct{}) error {
	for {
		var dl amqp.Delivery
		ok, waited := false, false
		select {
		case dl, ok = <-deliveries: // it was waiting (see stamp)
		default:
			waited = true
			select {
			case dl, ok = <-deliveries:
			case <-ctx.Done():
				return nil
			case <-broken:
				return errors.New("session broken")
			}
		}
		if !ok {
			return errors.New("delivery channel closed (connection lost or consumer cancelled)")
		}
		d.stamp(&dl, waited)
		in := d.shared
		if d.c.cfg.OrderedByKey {
			in = d.inputs[d.c.shard(&dl, &d.next)]
		}
		select {
		case in <- dl:
		case <-ctx.Done():
			if !d.c.cfg.OrderedByKey {
				select { // it fits (see passOn) and is finished with the rest
				case in <- dl:
				default:
				}
			}
			return nil
		case <-broken:
			return errors.New("session broken")
		}
	}
}

// stamp records since when a delivery may have been held: the broker's
// consumer_timeout counts from when it sent it (see watchHolds). One that
// was already waiting in amqp091-go's buffer (the loop was busy handing an
// earlier one to a full worker) may have come long before it is read, but
// not before the previous delivery, nor before the one Prefetch tags
// earlier was read: until that was settled, the prefetch was full.
func (d *dispatcher) stamp(dl *amqp.Delivery, waited bool) {
	now, slot := time.Now(), &d.read[dl.DeliveryTag%uint64(len(d.read))]
	if waited {
		d.since = now
	} else if slot.After(d.since) {
		d.since = *slot
	}
	*slot = now
	d.w.acks.received(dl.DeliveryTag, d.since)
}

// passOn gives the workers what the broker delivered before the consumer
// was cancelled (see cancelConsumer), until the delivery channel closes or
// limit passes; what it could not read is handed back with the connection.
// It fits: the broker sends at most Prefetch unacked, the size of shared
// (only the dispatcher sends to it).
func (d *dispatcher) passOn(deliveries <-chan amqp.Delivery, limit time.Duration) {
	timeout := time.NewTimer(limit)
	defer timeout.Stop()
	for {
		select {
		case dl, ok := <-deliveries:
			if !ok {
				return
			}
			d.w.acks.received(dl.DeliveryTag, time.Now())
			d.shared <- dl
		case <-timeout.C:
			return
		}
	}
}
