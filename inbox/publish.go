package inbox

import (
	"context"
	"fmt"
	"sync"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/mailroom-go/mailroom/internal/amqpx"
)

// publishTimeout bounds the wait for a confirm (a blocked connection never
// sends one).
const publishTimeout = 30 * time.Second

// publisher sends retries and dead letters on a confirm channel, one at a
// time: they are the exceptional path, and one publish in flight lets a
// basic.return be matched to its publish (the broker sends the return
// before the ack, and the library delivers them in that order).
type publisher struct {
	mu      sync.Mutex // one publish at a time
	ch      *amqp.Channel
	asks    chan returnedAsk // publish asks drain, after the ack
	drained chan struct{}    // closed when the channel's returns end
}

// returnedAsk asks whether the message with id came back: the reply is
// the broker's reply text, or "" when it did not.
type returnedAsk struct {
	id    string
	reply chan string
}

func newPublisher(conn *amqp.Connection, bg *sync.WaitGroup, w *amqpx.Watch) (*publisher, error) {
	ch, err := conn.Channel()
	if err != nil {
		return nil, fmt.Errorf("open publishing channel: %w", err)
	}
	if err := ch.Confirm(false); err != nil {
		return nil, fmt.Errorf("enable publisher confirms: %w", err)
	}
	p := &publisher{ch: ch, asks: make(chan returnedAsk), drained: make(chan struct{})}
	returns := ch.NotifyReturn(make(chan amqp.Return, 16))
	w.Channel(ch, "publishing channel")
	bg.Add(1)
	go func() { defer bg.Done(); p.drain(returns) }()
	return p, nil
}

// drain reads every basic.return as it comes, until the channel closes:
// amqp091-go drops a return it cannot hand over within 5 s, and the
// unroutable copy's ack would then pass for a delivery. It answers each
// publish, after its ack, whether its message came back: the return came
// first, so it has been read, or waits in returns.
func (p *publisher) drain(returns <-chan amqp.Return) {
	defer close(p.drained)
	returned := map[string]string{} // id: reply text, since the last ask (a stray one only fails a publish)
	for {
		select {
		case r, ok := <-returns:
			if !ok {
				return
			}
			returned[r.MessageId] = returnText(r)
		case a := <-p.asks:
			for more := true; more; {
				select {
				case r, ok := <-returns:
					if !ok {
						return
					}
					returned[r.MessageId] = returnText(r)
				default:
					more = false
				}
			}
			a.reply <- returned[a.id]
			clear(returned)
		}
	}
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
	a := returnedAsk{id: msg.MessageId, reply: make(chan string, 1)}
	select {
	case p.asks <- a:
	case <-p.drained:
		return fmt.Errorf("publish to %q: channel closed", queue)
	}
	select {
	case text := <-a.reply:
		if text != "" {
			return fmt.Errorf("publish to %q: unroutable (%s): does the queue exist?", queue, text)
		}
		return nil
	case <-p.drained:
		return fmt.Errorf("publish to %q: channel closed", queue)
	}
}

func returnText(r amqp.Return) string {
	if r.ReplyText == "" {
		return "returned"
	}
	return r.ReplyText
}
