package relay

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/mailroom-go/mailroom/internal/amqpx"
	"github.com/mailroom-go/mailroom/internal/wait"
	"github.com/mailroom-go/mailroom/internal/wire"
)

// publisher owns the AMQP connection and one confirm-mode channel. It
// publishes rows in claim order with up to ConfirmWindow unconfirmed at
// once, and turns every confirm, return, nack, timeout or channel loss into
// an outcome for the finisher.
type publisher struct {
	r        *Relay
	outcomes chan<- outcome
	slots    chan struct{} // confirm window: one token per unconfirmed message
	chains   *chains       // the rows of a key waiting for the one before them

	conn  *amqp.Connection
	watch *amqpx.Watch     // conn's supervisor: closes, connection.blocked (a resource alarm)
	wire  *amqpx.BatchConn // conn's socket: publishes of a batch are held and written at once
	down  atomic.Bool      // connecting fails: the relay leaves publishing to others (coordinate.go)
	sess  *session
	probe *amqp.Channel   // checks exchanges exist (a failed check closes only this channel)
	known map[string]bool // exchanges seen to exist on this connection

	spanNames map[string]string // "publish <exchange>" by exchange, built once

	// refused holds why the broker closed a channel on a publish (403: an
	// internal exchange, no write permission; a routing key its topic
	// permissions refuse), by exchange or by exchange and routing key
	// (refusalKey), and its max_message_size once a message went over it
	// (406), for the current connection. Written by confirm loops, read by
	// publish.
	refusedMu sync.Mutex
	refused   map[string]refusal
	brokerMax int // 0: not known
}

// refusal is the broker's reason for refusing an exchange, and when.
type refusal struct {
	reason string
	at     time.Time
}

// session is one confirm-mode channel and the messages awaiting its confirms.
type session struct {
	ch   *amqp.Channel
	conn *amqp.Connection // the channel's
	mu   sync.Mutex
	wait map[uint64]*pending // by delivery tag
	done chan struct{}       // closed when the confirm loop has settled everything

	timedOut atomic.Bool // the confirm loop closed the channel on ConfirmTimeout
}

type pending struct {
	row      *row
	sent     time.Time
	returned bool // the broker returned a message with this row's id (unroutable)
}

func newPublisher(r *Relay, outcomes chan<- outcome) *publisher {
	return &publisher{r: r, outcomes: outcomes, chains: newChains(), slots: make(chan struct{}, r.cfg.ConfirmWindow), known: map[string]bool{}, spanNames: map[string]string{}, refused: map[string]refusal{}}
}

// run publishes every batch it receives until batches is closed or ctx
// ends, each key's rows one at a time (chains.go), then hands back what it
// did not publish, waits for the outstanding confirms (bounded by
// ConfirmTimeout) and closes the connection.
func (p *publisher) run(ctx context.Context, batches <-chan []*row) {
	defer p.close()
	for batches != nil && ctx.Err() == nil {
		in := batches
		if p.chains.waiting() >= p.r.cfg.ConfirmWindow {
			in = nil // enough rows wait behind their keys: claim no more
		}
		select {
		case batch, ok := <-in:
			if !ok {
				batches = nil
				break
			}
			p.chains.newBatch()
			for i, w := range batch {
				if ctx.Err() != nil {
					p.settle(batch[i:], released, nil)
					break
				}
				switch publish, handBack := p.chains.admit(w); {
				case publish:
					p.publish(ctx, w)
				case handBack:
					p.settle([]*row{w}, released, nil)
				}
			}
		case <-p.chains.more:
		case <-ctx.Done():
		}
		p.publishReady(ctx)
		p.flush()
	}
	p.settle(p.chains.close(), released, nil)
	if p.sess != nil {
		p.awaitConfirms()
	}
}

// publishReady publishes the rows whose previous row of their key was
// confirmed meanwhile.
func (p *publisher) publishReady(ctx context.Context) {
	for ready := p.chains.next(); len(ready) > 0; ready = p.chains.next() {
		for _, w := range ready {
			if ctx.Err() != nil {
				p.settle([]*row{w}, released, nil)
				continue
			}
			p.publish(ctx, w)
		}
	}
}

// publish sends one row or settles it: it never returns with the row lost.
func (p *publisher) publish(ctx context.Context, w *row) {
	w.span = p.startPublish(w)
	if err := p.check(w); err != nil {
		p.emit(outcome{row: w, kind: failed, reason: reasonUnpublishable, err: err})
		return
	}
	msg := message(w, w.span != nil, p.r.cfg.CloudEvents)
	if w.span != nil {
		p.injectSpan(w.span, msg.Headers)
	}
	for {
		if err := p.connect(ctx); err != nil { // only fails when ctx ended
			p.settle([]*row{w}, released, nil)
			return
		}
		if err := fits(msg, p.conn.Config.FrameSize); err != nil {
			// Sent, it would fail in the client's encoder or close the
			// connection (frame_too_large), again at every claim.
			p.emit(outcome{row: w, kind: failed, reason: reasonUnpublishable, err: err})
			return
		}
		if err := p.tooLarge(w); err != nil {
			p.emit(outcome{row: w, kind: failed, reason: reasonUnpublishable, err: err})
			return
		}
		// A row held too long (the broker out of reach, or blocking us)
		// could be confirmed after its lease ends, when another relay may
		// have claimed it: it is handed back instead. A blocked connection
		// is not read by the broker, so the wait comes before any RPC.
		due := w.batch.claimed.Add(p.r.cfg.Lease - p.r.cfg.ConfirmTimeout)
		if time.Now().After(due) || !p.waitUnblocked(ctx, due) {
			p.settle([]*row{w}, released, nil)
			return
		}
		if ok, err := p.exchangeExists(ctx, w.exchange); err != nil {
			if ctx.Err() != nil {
				p.settle([]*row{w}, released, nil)
				return
			}
			p.reset(ctx, err)
			continue
		} else if !ok {
			p.emit(outcome{row: w, kind: failed, reason: reasonNoExchange,
				err: fmt.Errorf("%w: %q (declare it, e.g. in your topology code or with `rabbitmqadmin declare exchange`)", ErrNoExchange, w.exchange)})
			return
		}
		if why := p.refusedAt(w.exchange, w.routingKey); why != "" {
			// Publishing there closes the channel, releasing every
			// unconfirmed message, and the row comes back at once.
			p.emit(outcome{row: w, kind: failed, reason: reasonUnpublishable,
				err: fmt.Errorf("%w: the broker refuses publishing to exchange %q with routing key %q: %s (fix the exchange or the relay user's permissions)", ErrUnpublishable, w.exchange, w.routingKey, why)})
			return
		}
		if !p.acquire(ctx) {
			p.settle([]*row{w}, released, nil)
			return
		}
		if time.Now().After(due) { // acquire waited for confirms that long
			<-p.slots
			p.settle([]*row{w}, released, nil)
			return
		}
		s := p.sess
		s.mu.Lock()
		tag := s.ch.GetNextPublishSeqNo()
		s.wait[tag] = &pending{row: w, sent: time.Now()}
		s.mu.Unlock()
		p.wire.Hold()
		err := s.ch.PublishWithContext(ctx, w.exchange, w.routingKey, true, false, msg)
		if err == nil {
			return
		}
		s.mu.Lock()
		_, mine := s.wait[tag]
		delete(s.wait, tag)
		s.mu.Unlock()
		if !mine {
			return // the confirm loop released it as the channel closed
		}
		<-p.slots
		if ctx.Err() != nil {
			p.settle([]*row{w}, released, nil)
			return
		}
		p.reset(ctx, fmt.Errorf("publish: %w", err))
	}
}

// message is the AMQP form of a row (docs/wire.md). Its headers table is
// nil when there is nothing to put in it (and no span to inject).
func message(w *row, traced bool, ce *CloudEvents) amqp.Publishing {
	var h amqp.Table
	if len(w.headers) > 0 || w.key != "" || traced || ce != nil {
		h = make(amqp.Table, len(w.headers)+2)
	}
	for k, v := range w.headers {
		h[k] = v
	}
	if w.key != "" {
		h[wire.HeaderKey] = w.key
		h[wire.HeaderBucket] = wire.Bucket(w.key)
	}
	if ce != nil {
		for k, v := range wire.CloudEventHeaders(cmp.Or(ce.Prefix, wire.DefaultCloudEventsPrefix), wire.CloudEvent{
			ID: w.id, Source: ce.Source, Type: cmp.Or(w.typ, w.routingKey), Subject: w.key, Time: w.createdAt,
		}) {
			h[k] = v
		}
	}
	return amqp.Publishing{
		MessageId:    w.id,
		Type:         w.typ,
		ContentType:  w.contentType,
		DeliveryMode: amqp.Persistent,
		Timestamp:    w.createdAt,
		Headers:      h,
		Body:         w.payload,
	}
}

// acquire takes a window slot; before waiting for one it flushes the held
// publishes, whose confirms free the slots.
func (p *publisher) acquire(ctx context.Context) bool {
	select {
	case p.slots <- struct{}{}:
		return true
	default:
	}
	p.flush()
	select {
	case p.slots <- struct{}{}:
		return true
	case <-ctx.Done():
		return false
	}
}

// flush writes the held publishes. A failed write closes the connection;
// the confirm loop then releases their rows.
func (p *publisher) flush() {
	if p.wire != nil {
		p.wire.Flush()
	}
}

// brokerDown reports whether connecting to the broker fails now: the
// coordinator then leaves the publishing slot to a relay standing by.
func (p *publisher) brokerDown() bool { return p.down.Load() }

// reserve takes up to n slots of the confirm window out of use without
// waiting (those in use by unconfirmed messages are left for a later call,
// as confirms free them) and returns how many it took; unreserve hands n
// back. The coordinator shares the window among publishing relays so.
func (p *publisher) reserve(n int) (took int) {
	for ; took < n; took++ {
		select {
		case p.slots <- struct{}{}:
		default:
			return took
		}
	}
	return took
}

func (p *publisher) unreserve(n int) {
	for range n {
		<-p.slots
	}
}

// waitUnblocked pauses while the broker blocks the connection (memory or
// disk alarm): a publish then would block forever. It gives up when ctx
// ends or at due.
func (p *publisher) waitUnblocked(ctx context.Context, due time.Time) bool {
	if !p.watch.Blocked() { // the watch logs the block and the unblock
		return true
	}
	p.flush()
	t := time.NewTicker(50 * time.Millisecond)
	defer t.Stop()
	for p.watch.Blocked() {
		select {
		case <-ctx.Done():
			return false
		case <-t.C:
			if time.Now().After(due) {
				return false
			}
		}
	}
	return true
}

// connect makes sure a connection, a confirm channel and a probe channel
// are open, retrying with backoff until ctx ends.
func (p *publisher) connect(ctx context.Context) error {
	for {
		if p.sess != nil && !p.sess.ch.IsClosed() && p.probe != nil && !p.probe.IsClosed() {
			return nil
		}
		if p.sess != nil && p.sess.ch.IsClosed() {
			p.reset(ctx, errors.New("channel closed"))
		}
		if p.conn == nil || p.conn.IsClosed() {
			conn, wire, err := p.r.nodes.DialBatchRetry(ctx, "mailroom-relay "+p.r.cfg.Name, 5*time.Second, func(err error, d time.Duration) {
				p.down.Store(true)
				p.r.log.Warn("broker connection failed; retrying", "error", err, "retry_in", d.String())
			})
			if err != nil {
				return err
			}
			p.conn, p.wire, p.watch = conn, wire, amqpx.NewWatch(conn, p.r.log, "")
			p.known = map[string]bool{}
			p.refusedMu.Lock()
			clear(p.refused)
			p.brokerMax = 0
			p.refusedMu.Unlock()
		}
		if err := p.openChannels(ctx); err != nil {
			p.down.Store(true)
			p.r.log.Warn("opening broker channels failed; reconnecting", "error", err)
			p.watch.Close()
			if !wait.Sleep(ctx, 100*time.Millisecond) {
				return ctx.Err()
			}
		} else {
			p.down.Store(false)
		}
	}
}

func (p *publisher) openChannels(ctx context.Context) error {
	if p.probe == nil || p.probe.IsClosed() {
		var ch *amqp.Channel
		if err := p.bounded(ctx, "open a channel", func() (err error) { ch, err = p.conn.Channel(); return err }); err != nil {
			return err
		}
		p.probe = ch
	}
	if p.sess != nil && !p.sess.ch.IsClosed() {
		return nil
	}
	var ch *amqp.Channel
	if err := p.bounded(ctx, "open a channel", func() (err error) { ch, err = p.conn.Channel(); return err }); err != nil {
		return err
	}
	if err := p.bounded(ctx, "enable publisher confirms", func() error { return ch.Confirm(false) }); err != nil {
		return fmt.Errorf("enable publisher confirms: %w", err)
	}
	s := &session{ch: ch, conn: p.conn, wait: map[uint64]*pending{}, done: make(chan struct{})}
	confirms := ch.NotifyPublish(make(chan amqp.Confirmation, p.r.cfg.ConfirmWindow))
	returns := ch.NotifyReturn(make(chan amqp.Return, p.r.cfg.ConfirmWindow))
	closed := ch.NotifyClose(make(chan *amqp.Error, 1))
	p.sess = s
	go p.confirmLoop(s, confirms, returns, closed)
	return nil
}

// exchangeExists checks (once per connection) that an exchange exists, on
// the probe channel, because publishing to a missing exchange closes the
// publishing channel and with it every unconfirmed message.
func (p *publisher) exchangeExists(ctx context.Context, name string) (bool, error) {
	if name == "" || p.known[name] {
		return true, nil
	}
	p.flush()
	err := p.bounded(ctx, "check exchange "+strconv.Quote(name), func() error {
		return p.probe.ExchangeDeclarePassive(name, "direct", true, false, false, false, nil)
	})
	var ae *amqp.Error
	if errors.As(err, &ae) && ae.Code == amqp.NotFound {
		return false, nil // the probe channel is now closed; connect reopens it
	}
	if err != nil {
		return false, err
	}
	p.known[name] = true
	return true, nil
}

// reset closes the current channel after an error; its confirm loop
// releases whatever was unconfirmed, and connect opens a new one.
func (p *publisher) reset(ctx context.Context, why error) {
	p.r.log.Warn("resetting broker channel", "error", why)
	p.flush() // the channel.close must not wait behind held publishes
	if p.sess != nil {
		_ = p.bounded(ctx, "close the channel", p.sess.ch.Close)
		<-p.sess.done
		p.sess = nil
	}
	p.known = map[string]bool{} // an exchange may have vanished
}

// awaitConfirms waits until every published message is settled or
// ConfirmTimeout passes; the rest is released by closing the channel.
func (p *publisher) awaitConfirms() {
	deadline := time.Now().Add(p.r.cfg.ConfirmTimeout)
	for time.Now().Before(deadline) {
		p.sess.mu.Lock()
		n := len(p.sess.wait)
		p.sess.mu.Unlock()
		if n == 0 {
			break
		}
		select {
		case <-p.sess.done:
			return
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// close closes the connection, and with it the channels (their closes
// would each wait for a broker that may not read them: amqpx.Close).
func (p *publisher) close() {
	p.flush()
	if p.watch != nil {
		p.watch.Close()
	}
	if p.sess != nil {
		<-p.sess.done
	}
}

func (p *publisher) settle(rows []*row, kind outcomeKind, err error) {
	for _, w := range rows {
		p.emit(outcome{row: w, kind: kind, err: err})
	}
}

// emit hands an outcome to the finisher, after ending the row's span, and
// advances the row's key: its next row is published, or, if it was not
// delivered, the rest of its run is handed back.
func (p *publisher) emit(o outcome) {
	p.r.settled(&o)
	p.outcomes <- o
	for _, w := range p.chains.settled(&o) {
		p.emit(outcome{row: w, kind: released})
	}
}

// bounded runs f, an RPC on the connection, until the broker answers, ctx
// ends or ConfirmTimeout passes. A broker that blocked the connection (a
// resource alarm) stops reading it and never answers; then the socket is
// closed, which ends f at once (a close handshake would wait for the
// broker too), and whatever was unconfirmed on it is handed back.
func (p *publisher) bounded(ctx context.Context, what string, f func() error) error {
	done := make(chan error, 1)
	go func() { done <- f() }()
	t := time.NewTimer(p.r.cfg.ConfirmTimeout)
	defer t.Stop()
	var why error
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		why = ctx.Err()
	case <-t.C:
		why = fmt.Errorf("no answer within %s (a resource alarm?)", p.r.cfg.ConfirmTimeout)
	}
	p.wire.Conn.Close()
	<-done
	return fmt.Errorf("%s: %w; connection closed", what, why)
}
