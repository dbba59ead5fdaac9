package inbox

import (
	"context"
	"log/slog"
	"sync/atomic"

	amqp "github.com/rabbitmq/amqp091-go"
)

// worker is the state of one worker of a connection: what the workers of
// the connection share, and its own counters (each works on its own copy).
type worker struct {
	c    *Consumer
	ctx  context.Context // handlers' context: outlives Run's by ShutdownTimeout
	stop <-chan struct{} // closed: Run stops or the session broke (see work)
	// finish is true when the stop is Run's (not a broken session): then
	// each worker first handles what was already delivered to it.
	finish   *atomic.Bool
	broken   <-chan struct{} // closed when the connection or channel is lost
	left     bool            // this worker left a delivery unacked as the session stopped
	pub      *publisher
	handBack func(why error) // returns every delivery to the queue, in order, ending the session
	log      *slog.Logger
	acks     *acker // the consuming channel's
	infra    int    // consecutive database/broker failures of this worker (see work)
	// unknowns counts the commits of unknown outcome in a row of the
	// message or batch that starts with delivery unknownTag (see
	// unknownAgain).
	unknownTag uint64
	unknowns   int
}

// item is a decoded delivery.
type item struct {
	d *amqp.Delivery
	m Message
}

// work takes deliveries from in, up to BatchSize of those already waiting
// at a time, until stop (and then, see below, what in still holds). Each
// worker runs on its own copy of the session (its own infra and left).
func (s worker) work(in <-chan amqp.Delivery) {
	size := s.c.cfg.BatchSize
	for {
		var first amqp.Delivery
		if s.stopped() {
			// Run is stopping: handle what the broker already delivered
			// rather than hand it back (a quorum queue counts every
			// return in x-delivery-count, an attempt lost at each
			// deploy), until in is empty or ShutdownTimeout ends the
			// handlers' context. Not under OrderedByKey (see
			// Consumer.session), not after a delivery was left unacked,
			// nor when the session broke (its acks cannot reach the
			// broker).
			if s.abandon() {
				return
			}
			select {
			case first = <-in:
			default:
				s.flushAcks() // not held back by a slower worker's last handler
				return
			}
		} else {
			select {
			case first = <-in:
			default:
				s.flushAcks()
				select {
				case <-s.stop:
					continue
				case first = <-in:
				}
			}
		}
		batch := []amqp.Delivery{first}
	fill:
		for len(batch) < size {
			select {
			case d := <-in:
				batch = append(batch, d)
			default:
				break fill
			}
		}
		s.handle(batch)
	}
}

// flushAcks sends the acks held for coalescing (see acker): when a worker
// runs out of work.
func (s *worker) flushAcks() {
	if err := s.acks.flush(); err != nil {
		s.log.Debug("inbox: acks lost with their channel; the redeliveries will be deduplicated", "error", err)
	}
}

// abandon reports whether the worker must leave what it holds unacked for
// the broker to redeliver: it left one such already (see pause), the
// session broke, or ShutdownTimeout passed.
func (s *worker) abandon() bool {
	if s.left || s.ctx.Err() != nil {
		return true
	}
	select {
	case <-s.broken:
		return true
	default:
		return s.stopped() && !s.finish.Load()
	}
}

func (s *worker) stopped() bool {
	select {
	case <-s.stop:
		return true
	default:
		return false
	}
}

// handle dead-letters undecodable deliveries and applies the rest.
func (s *worker) handle(ds []amqp.Delivery) {
	items := make([]item, 0, len(ds))
	for i := range ds {
		m, err := decode(&ds[i])
		if err != nil {
			s.deadLetter(&ds[i], "undecodable: "+err.Error())
			continue
		}
		items = append(items, item{&ds[i], m})
	}
	for len(items) > 0 && !s.abandon() {
		if len(items) == 1 {
			s.one(items[0])
			return
		}
		items = s.batch(items)
	}
}

// one applies a single message in its own transaction.
func (s *worker) one(it item) {
	dup, herr, ierr := s.apply(it.m)
	s.settle(it, dup, herr, ierr)
}
