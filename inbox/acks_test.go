package inbox

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

// broker is a channel's side of acks: it fails the test when an ack would
// settle a delivery the consumer still holds, or names a tag that is not
// outstanding (RabbitMQ closes the channel then).
type broker struct {
	t           *testing.T
	outstanding map[uint64]bool // delivered, not settled by the broker
	applied     map[uint64]bool // the consumer has called ack for it
	acked       map[uint64]int
	frames      int
}

func newBroker(t *testing.T) *broker {
	return &broker{t: t, outstanding: map[uint64]bool{}, applied: map[uint64]bool{}, acked: map[uint64]int{}}
}

func (b *broker) Ack(tag uint64, multiple bool) error {
	b.frames++
	if !b.outstanding[tag] {
		b.t.Fatalf("ack of tag %d, which is not outstanding", tag)
	}
	for t := range b.outstanding {
		if t == tag || multiple && t < tag {
			if !b.applied[t] {
				b.t.Fatalf("ack of %d (multiple %v) settles %d, which the consumer still holds", tag, multiple, t)
			}
			delete(b.outstanding, t)
			b.acked[t]++
		}
	}
	return nil
}

func (b *broker) Nack(tag uint64, multiple, requeue bool) error {
	if multiple || !b.outstanding[tag] {
		b.t.Fatalf("nack of %d (multiple %v)", tag, multiple)
	}
	delete(b.outstanding, tag)
	return nil
}

func (b *broker) Reject(tag uint64, requeue bool) error { return b.Nack(tag, false, requeue) }

func (b *broker) deliver(a *acker, tag uint64) *amqp.Delivery {
	b.outstanding[tag] = true
	a.received(tag, time.Now())
	return &amqp.Delivery{Acknowledger: b, DeliveryTag: tag}
}

// ack is what a worker does for an applied batch.
func (b *broker) ack(a *acker, ds ...*amqp.Delivery) {
	for _, d := range ds {
		b.applied[d.DeliveryTag] = true
	}
	if err := a.ack(ds...); err != nil {
		b.t.Fatal(err)
	}
}

// One worker acking consecutive batches sends one frame per batch.
func TestAckerCoalescesBatches(t *testing.T) {
	b := newBroker(t)
	a := newAcker(64)
	var tag uint64
	for range 10 {
		var batch []*amqp.Delivery
		for range 32 {
			tag++
			batch = append(batch, b.deliver(a, tag))
		}
		b.ack(a, batch...)
	}
	if b.frames != 10 || len(b.outstanding) != 0 {
		t.Fatalf("%d frames for 10 batches, %d outstanding", b.frames, len(b.outstanding))
	}
}

// Acks behind a delivery still held wait for it, and go one by one when
// flushed (a worker ran out of work) or when half the prefetch is held.
func TestAckerHoldsBehindAHeldDelivery(t *testing.T) {
	b := newBroker(t)
	a := newAcker(20)
	first := b.deliver(a, 1)
	var rest []*amqp.Delivery
	for tag := uint64(2); tag <= 5; tag++ {
		rest = append(rest, b.deliver(a, tag))
	}
	b.ack(a, rest[:2]...)
	if b.frames != 0 {
		t.Fatalf("%d frames: acks 2 and 3 must wait while 1 is held", b.frames)
	}
	b.ack(a, first)
	if b.frames != 1 || b.acked[3] != 1 {
		t.Fatalf("%d frames, acked %v: want one multiple ack up to 3", b.frames, b.acked)
	}
	six := b.deliver(a, 6)
	b.ack(a, rest[2:]...)
	if err := a.flush(); err != nil {
		t.Fatal(err)
	}
	if b.frames != 2 || b.acked[4] != 1 || b.acked[5] != 1 {
		t.Fatalf("%d frames, acked %v: want 4 and 5 acked by one multiple ack", b.frames, b.acked)
	}
	var held []*amqp.Delivery
	for tag := uint64(7); tag <= 16; tag++ {
		held = append(held, b.deliver(a, tag))
	}
	b.ack(a, held[:9]...)
	if b.frames != 2 {
		t.Fatalf("%d frames: 9 acks behind 6 stay held (limit 10)", b.frames)
	}
	b.ack(a, held[9])
	if b.frames != 12 || len(a.held) != 0 {
		t.Fatalf("%d frames, %d held: at the limit all 10 go one by one", b.frames, len(a.held))
	}
	if err := b.Nack(6, false, true); err != nil {
		t.Fatal(err)
	}
	a.settled(six.DeliveryTag)
	if len(b.outstanding) != 0 {
		t.Fatalf("outstanding %v", b.outstanding)
	}
}

// Workers settling at random, in random order (acks, nacks, flushes):
// every applied delivery is acked exactly once and no ack ever settles a
// delivery still held.
func TestAckerRandomSettlement(t *testing.T) {
	for seed := range uint64(50) {
		t.Run(fmt.Sprint("seed ", seed), func(t *testing.T) {
			rng := rand.New(rand.NewPCG(seed, 1))
			b := newBroker(t)
			a := newAcker(2 + rng.IntN(200))
			var tag uint64
			var held []*amqp.Delivery // handed to workers, not settled
			const n = 3000
			for tag < n || len(held) > 0 {
				switch op := rng.IntN(10); {
				case op < 4 && tag < n: // deliveries arrive
					for range 1 + rng.IntN(40) {
						tag++
						held = append(held, b.deliver(a, tag))
					}
				case op < 8 && len(held) > 0: // a worker acks a batch, taken from anywhere
					k := 1 + rng.IntN(min(len(held), 32))
					start := rng.IntN(len(held) - k + 1)
					batch := slices.Clone(held[start : start+k])
					held = slices.Delete(held, start, start+k)
					b.ack(a, batch...)
				case op < 9 && len(held) > 0: // one is requeued or dead-lettered
					i := rng.IntN(len(held))
					d := held[i]
					held = slices.Delete(held, i, i+1)
					if err := b.Nack(d.DeliveryTag, false, rng.IntN(2) == 0); err != nil {
						t.Fatal(err)
					}
					a.settled(d.DeliveryTag)
				default: // a worker ran out of work
					if err := a.flush(); err != nil {
						t.Fatal(err)
					}
				}
			}
			if err := a.flush(); err != nil {
				t.Fatal(err)
			}
			if len(b.outstanding) != 0 {
				t.Fatalf("%d deliveries never settled", len(b.outstanding))
			}
			for tag := range b.applied {
				if b.acked[tag] != 1 {
					t.Fatalf("tag %d acked %d times", tag, b.acked[tag])
				}
			}
			if len(a.inflight) != 0 || len(a.held) != 0 {
				t.Errorf("acker keeps %d in flight, %d held", len(a.inflight), len(a.held))
			}
		})
	}
}
