package inbox

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

// publishTimeout bounds the wait for a confirm (a blocked connection never
// sends one).
const publishTimeout = 30 * time.Second

// publisher sends retries and dead letters on a confirm channel, one at a
// time: they are the exceptional path, and one publish in flight lets a
// basic.return be matched to its publish (the broker sends the return
// before the ack, and the library delivers them in that order).
type publisher struct {
	mu      sync.Mutex
	ch      *amqp.Channel
	returns chan amqp.Return
}

func newPublisher(conn *amqp.Connection, bg *sync.WaitGroup, log *slog.Logger, brk func()) (*publisher, error) {
	ch, err := conn.Channel()
	if err != nil {
		return nil, fmt.Errorf("open publishing channel: %w", err)
	}
	if err := ch.Confirm(false); err != nil {
		return nil, fmt.Errorf("enable publisher confirms: %w", err)
	}
	p := &publisher{ch: ch, returns: ch.NotifyReturn(make(chan amqp.Return, 8))}
	closed := ch.NotifyClose(make(chan *amqp.Error, 1))
	bg.Add(1)
	go func() {
		defer bg.Done()
		for err := range closed {
			log.Warn("inbox: publishing channel closed", "error", err)
			brk()
		}
	}()
	return p, nil
}

// publish sends msg to queue through the default exchange and waits for the
// broker to confirm that it is routed and stored.
func (p *publisher) publish(ctx context.Context, queue string, msg amqp.Publishing) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	ctx, cancel := context.WithTimeout(ctx, publishTimeout)
	defer cancel()
	dc, err := p.ch.PublishWithDeferredConfirmWithContext(ctx, "", queue, true, false, msg)
	if err != nil {
		return fmt.Errorf("publish to %q: %w", queue, err)
	}
	acked, err := dc.WaitContext(ctx)
	if err != nil {
		return fmt.Errorf("publish to %q: no confirm: %w", queue, err)
	}
	if !acked {
		return fmt.Errorf("publish to %q: broker nacked (or the channel closed)", queue)
	}
	for {
		select {
		case r, ok := <-p.returns:
			if !ok {
				return fmt.Errorf("publish to %q: channel closed", queue)
			}
			if r.MessageId == msg.MessageId {
				return fmt.Errorf("publish to %q: unroutable (%s): does the queue exist?", queue, r.ReplyText)
			}
		default:
			return nil
		}
	}
}
