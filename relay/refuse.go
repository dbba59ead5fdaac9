package relay

import (
	"errors"
	"fmt"
	"regexp"
	"strconv"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/mailroom-go/mailroom/internal/wire"
)

// check applies the wire contract to a row, as Add did (a row written by
// other means, SQL or COPY, may break it), and MaxMessageSize.
func (p *publisher) check(w *row) error {
	if w.badHeaders != nil {
		return fmt.Errorf("%w: %w", ErrUnpublishable, w.badHeaders)
	}
	if err := wire.Check(wire.Message{Exchange: w.exchange, RoutingKey: w.routingKey, Type: w.typ, ContentType: w.contentType, Headers: w.headers, Payload: w.payload}); err != nil {
		return fmt.Errorf("%w: %w", ErrUnpublishable, err)
	}
	if n := len(w.payload); n > p.r.cfg.MaxMessageSize {
		return fmt.Errorf("%w: Payload: %d bytes is over the relay's MaxMessageSize of %d bytes (raise it, and the broker's max_message_size, or send it in smaller messages)", ErrUnpublishable, n, p.r.cfg.MaxMessageSize)
	}
	return nil
}

// fits checks that the headers, with those the relay adds (the key, the
// trace context), fit in the connection's frame: a larger one would close
// the connection (frame_too_large), again at every claim.
func fits(msg amqp.Publishing, frameSize int) error {
	size := 64 + len(msg.MessageId) + len(msg.Type) + len(msg.ContentType) // frame, class and property overhead
	for k, v := range msg.Headers {
		size += 1 + len(k) + 5 // name, type, length
		if s, ok := v.(string); ok {
			size += len(s)
		} else {
			size += 16
		}
	}
	if frameSize > 0 && size > frameSize {
		return fmt.Errorf("%w: its headers take about %d bytes, over the connection's %d-byte frame", ErrUnpublishable, size, frameSize)
	}
	return nil
}

// The broker's texts of the channel closes that refuse one message:
// ACCESS_REFUSED "cannot publish to internal exchange 'x' in vhost '/'",
// "access to exchange 'x' in vhost '/' refused for user 'u'", "write
// access to topic 'k' in exchange 'x' in vhost '/' refused for user 'u'";
// PRECONDITION_FAILED "message size 2097152 is larger than configured max
// size 1048576".
var (
	refusedExchange = regexp.MustCompile(`exchange '([^']*)' in vhost`)
	refusedTopic    = regexp.MustCompile(`access to topic '(.*)' in exchange '([^']*)' in vhost`)
	overMaxSize     = regexp.MustCompile(`message size (\d+) is larger than (?:configured )?max size (\d+)`)
)

// refusal parses a channel close that refuses messages: the exchange (and
// routing key, for topic authorisation) it names, or the broker's
// max_message_size. ok is false for any other close.
func parseRefusal(why error) (exchange, routingKey string, maxSize int, topic, ok bool) {
	var ae *amqp.Error
	if !errors.As(why, &ae) {
		return "", "", 0, false, false
	}
	switch ae.Code {
	case amqp.AccessRefused:
		if m := refusedTopic.FindStringSubmatch(ae.Reason); m != nil {
			return m[2], m[1], 0, true, true
		}
		if m := refusedExchange.FindStringSubmatch(ae.Reason); m != nil {
			return m[1], "", 0, false, true
		}
	case amqp.PreconditionFailed:
		if m := overMaxSize.FindStringSubmatch(ae.Reason); m != nil {
			if n, err := strconv.Atoi(m[2]); err == nil && n > 0 {
				return "", "", n, false, true
			}
		}
	}
	return "", "", 0, false, false
}

// refusedBy is the failure of w if the broker closed the channel (why)
// because of it, or of a message it refuses the same way; nil otherwise.
func refusedBy(why error, w *row) error {
	exchange, routingKey, maxSize, topic, ok := parseRefusal(why)
	switch {
	case !ok:
		return nil
	case maxSize > 0:
		if len(w.payload) > maxSize {
			return overBrokerMax(len(w.payload), maxSize)
		}
	case topic:
		if w.exchange == exchange && w.routingKey == routingKey {
			return fmt.Errorf("%w: the broker refuses routing key %q on exchange %q: %s (grant the relay user topic permission)", ErrUnpublishable, routingKey, exchange, why)
		}
	case w.exchange == exchange:
		return fmt.Errorf("%w: the broker refuses publishing to exchange %q: %s (fix the exchange or the relay user's permissions)", ErrUnpublishable, exchange, why)
	}
	return nil
}

func overBrokerMax(size, limit int) error {
	return fmt.Errorf("%w: Payload: %d bytes is over the broker's max_message_size of %d bytes (raise max_message_size in rabbitmq.conf, or send it in smaller messages)", ErrUnpublishable, size, limit)
}

// noteRefusal records what a channel close refused, so the rows it would
// refuse again fail as attempts before they are sent, instead of closing
// the channel (and handing back every unconfirmed message) at each claim.
func (p *publisher) noteRefusal(why error) {
	exchange, routingKey, maxSize, topic, ok := parseRefusal(why)
	if !ok {
		return
	}
	var ae *amqp.Error
	errors.As(why, &ae)
	p.refusedMu.Lock()
	defer p.refusedMu.Unlock()
	switch {
	case maxSize > 0:
		p.brokerMax = maxSize
	case topic:
		p.refused[refusalKey(exchange, routingKey)] = refusal{ae.Reason, time.Now()}
	default:
		p.refused[exchange] = refusal{ae.Reason, time.Now()}
	}
}

// refusalKey is the key of a refused routing key in p.refused (exchange
// names hold no NUL).
func refusalKey(exchange, routingKey string) string { return exchange + "\x00" + routingKey }

// refusedAt is the broker's reason for refusing exchange, or routingKey on
// it, if it did within MaxBackoff (after that one publish tries again:
// permissions may have been fixed).
func (p *publisher) refusedAt(exchange, routingKey string) string {
	p.refusedMu.Lock()
	defer p.refusedMu.Unlock()
	for _, k := range [...]string{exchange, refusalKey(exchange, routingKey)} {
		if r, ok := p.refused[k]; ok && time.Since(r.at) <= p.r.cfg.MaxBackoff {
			return r.reason
		}
	}
	return ""
}

// tooLarge fails a row whose payload is over the broker's
// max_message_size, once a channel close told it.
func (p *publisher) tooLarge(w *row) error {
	p.refusedMu.Lock()
	limit := p.brokerMax
	p.refusedMu.Unlock()
	if limit > 0 && len(w.payload) > limit {
		return overBrokerMax(len(w.payload), limit)
	}
	return nil
}
