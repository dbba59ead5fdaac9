package relay

import (
	"context"
	"errors"
	"fmt"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/mailroom-go/mailroom/internal/amqpx"
)

// confirmLoop settles the messages of one channel. RabbitMQ sends a
// basic.return before the basic.ack of the same message, and amqp091-go
// hands both over in that order but on different Go channels; so before
// settling an ack the loop drains every return already handed over, and an
// ack of a returned message is a failure (unroutable), not a delivery.
// Returns carry no delivery tag: they are matched by message id, and
// every message in flight with the returned id counts as returned (if an
// id is in flight twice, a needless retry of the copy that was routed,
// never a loss of the one that was not).
func (p *publisher) confirmLoop(s *session, confirms <-chan amqp.Confirmation, returns <-chan amqp.Return, closed <-chan *amqp.Error) {
	defer close(s.done)
	markReturned := func(id string) {
		s.mu.Lock()
		defer s.mu.Unlock()
		for _, e := range s.wait {
			if e.row.id == id {
				e.returned = true
			}
		}
	}
	drainReturns := func() {
		for {
			select {
			case r, ok := <-returns:
				if !ok {
					returns = nil
					return
				}
				markReturned(r.MessageId)
			default:
				return
			}
		}
	}
	tick := time.NewTicker(p.r.cfg.ConfirmTimeout / 4)
	defer tick.Stop()
	unwoken := 0
	for {
		select {
		case c, ok := <-confirms:
			if !ok { // channel closed: every unconfirmed message is unknown
				why := closeReason(closed)
				p.noteRefusal(why)
				p.abandon(s, why)
				return
			}
			drainReturns()
			s.mu.Lock()
			e := s.wait[c.DeliveryTag]
			delete(s.wait, c.DeliveryTag)
			s.mu.Unlock()
			if e == nil {
				continue // settled already (publish error path)
			}
			<-p.slots
			p.r.tel.confirm.Record(context.Background(), time.Since(e.sent).Seconds(), p.r.tel.record...)
			switch {
			case e.returned:
				p.emit(outcome{row: e.row, kind: failed, reason: reasonUnroutable, err: fmt.Errorf("%w (exchange %q, routing key %q)", ErrUnroutable, e.row.exchange, e.row.routingKey)})
			case c.Ack:
				p.emit(outcome{row: e.row, kind: delivered})
			default:
				p.emit(outcome{row: e.row, kind: failed, err: ErrNacked, reason: reasonNack})
			}
			// Wake the publisher for the next rows of the keys settled
			// once no confirm is waiting, or every wakeEvery confirms in
			// a steady stream.
			if unwoken++; len(confirms) == 0 || unwoken >= wakeEvery {
				p.chains.wake()
				unwoken = 0
			}
		case r, ok := <-returns:
			if !ok {
				returns = nil
				continue
			}
			markReturned(r.MessageId)
		case <-tick.C:
			if p.oldest(s) > p.r.cfg.ConfirmTimeout {
				p.r.log.Warn("confirm timed out; closing the channel so unconfirmed messages are retried", "timeout", p.r.cfg.ConfirmTimeout)
				s.timedOut.Store(true)
				// A broker that blocked the connection (a resource alarm)
				// stops reading it, and would never answer the channel's
				// close: then the connection is closed, bounded, instead.
				closing := time.AfterFunc(amqpx.CloseTimeout, func() { amqpx.Close(s.conn) })
				s.ch.Close() // confirms is closed next, and we abandon
				closing.Stop()
			}
		}
	}
}

// wakeEvery bounds the confirms the confirm loop settles before it wakes
// the publisher for the keys' next rows (see chains.wake).
const wakeEvery = 64

func closeReason(closed <-chan *amqp.Error) error {
	select {
	case e, ok := <-closed:
		if ok && e != nil {
			return e
		}
	default:
	}
	return errors.New("channel closed")
}

// abandon releases every message still awaiting a confirm on s: the broker
// may or may not have it, so it is published again (at-least-once).
func (p *publisher) abandon(s *session, why error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.wait) > 0 {
		p.r.log.Warn("channel lost with messages unconfirmed; they will be published again", "unconfirmed", len(s.wait), "error", why)
	}
	rs := reasonChannelClosed
	if s.timedOut.Load() {
		rs = reasonTimeout
	}
	for tag, e := range s.wait {
		delete(s.wait, tag)
		<-p.slots
		if err := refusedBy(why, e.row); err != nil {
			// The broker closed the channel because of this message: its
			// fault, an attempt (or it would head every claim, and close
			// the channel at each).
			p.emit(outcome{row: e.row, kind: failed, err: err, reason: reasonUnpublishable})
			continue
		}
		p.emit(outcome{row: e.row, kind: released, err: why, reason: rs})
	}
}

func (p *publisher) oldest(s *session) time.Duration {
	s.mu.Lock()
	defer s.mu.Unlock()
	var age time.Duration
	for _, e := range s.wait {
		if a := time.Since(e.sent); a > age {
			age = a
		}
	}
	return age
}
